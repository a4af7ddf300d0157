"""``regimes.png``: where the sqrt(n) Gaussian limit fails, one panel per set.

Against ``rho / rho_0`` (``rho_0`` the collapse radius): the measured / predicted ratio
of the median of ``sqrt(n) ||theta_hat - theta*||`` (solid, left axis; 1 is a perfect
prediction, the grey band is +-10%), and the share of seeds with ``theta_hat =
theta_ref`` exactly (dashed, right axis) with its prediction ``Phi(sqrt(n)(rho - rho_0)/sd)``
(dotted, ``sim.collapse_influence``), one colour per ``n``. From
``regimes_summary.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps

from ._style import new_figure, save

__all__ = ["plot"]

TITLES = {"kldpo": "KLDPO", "chi2dpo": "chi2-DPO", "wdpo1": "WDPO p=1 (kappa=inf)",
          "wdpo1k": "WDPO p=1 (finite kappa)", "wdpo2": "WDPO p=2 (kappa=inf)"}


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``regimes.png`` from ``results_dir/regimes_summary.csv``."""
    df = pd.read_csv(Path(results_dir) / "regimes_summary.csv")
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = new_figure(len(methods), width=4.4)
    ns = sorted(df["n"].unique())
    cmap = colormaps["viridis"]
    for ax, method in zip(axes, methods, strict=True):
        g = df[df["method"] == method]
        right = ax.twinx()
        ax.axhspan(0.9, 1.1, color="0.85", alpha=0.6, lw=0)
        ax.axvline(1.0, color="0.4", lw=0.8, ls=":")
        for k, n in enumerate(ns):
            h = g[g["n"] == n].sort_values("ratio")
            c = cmap(k / max(len(ns) - 1, 1))
            ax.plot(h["ratio"], h["ratio_meas_pred"], "o-", color=c, ms=3, label=f"n={n:g}")
            right.plot(h["ratio"], h["frac_ref"], "s--", color=c, ms=3, alpha=0.8)
            if "pred_frac_ref" in h:
                right.plot(h["ratio"], h["pred_frac_ref"], ":", color=c, lw=1.5, alpha=0.9)
        ax.set_ylim(0, 3)
        right.set_ylim(-0.03, 1.03)
        ax.set_xlabel("rho / rho_0")
        ax.set_ylabel("measured / predicted median sqrt(n) err")
        right.set_ylabel("share theta_hat = theta_ref (dashed)")
        rho0 = float(g["rho0"].iloc[0])
        ax.set_title(f"{TITLES.get(method, method)}, rho_0 = {rho0:.3g}")
        if not np.isfinite(g["ratio_meas_pred"]).any():
            ax.text(0.5, 0.5, "no regular prediction", transform=ax.transAxes, ha="center",
                    color="0.4")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Regimes: sandwich prediction (solid, grey band +-10%) and collapse to "
                 "theta_ref (dashed; dotted: predicted) through the collapse radius")
    return [save(fig, Path(out_dir) / "regimes.png")]
