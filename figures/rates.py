"""``rates.png``: parameter error against n on log-log axes, one panel per method.

For each radius: the median of ``err_l2`` over seeds with its 10-90% band, the
fitted slope (from ``rates_summary.csv``), the sandwich prediction made before sampling
(black dotted median with a hatched 10-90% band, ``sim.asymptotic_covariance``), the
median slow-rate bound (dashed; a plug-in heuristic) and the median plug-in fast-rate bound
(dash-dotted); grey guides show ``n^{-1/4}`` and ``n^{-1/2}`` anchored at the first median.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ._style import color, label, load_ok_rows, new_figure, save

__all__ = ["plot"]


def _slopes(results_dir: Path) -> pd.DataFrame | None:
    path = results_dir / "rates_summary.csv"
    return pd.read_csv(path) if path.exists() else None


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``rates.png`` from ``results_dir/rates.csv``; returns the path written."""
    df = load_ok_rows(results_dir, "rates")
    slopes = _slopes(Path(results_dir))
    methods = list(dict.fromkeys(df["method"]))
    fig, axes = new_figure(len(methods), sharey=True)
    styles = ["-", "--", ":", "-."]
    for ax, method in zip(axes, methods, strict=True):
        g = df[df["method"] == method]
        for k, (rho, h) in enumerate(g.groupby("rho")):
            q = h.groupby("n")["err_l2"].quantile([0.1, 0.5, 0.9]).unstack()
            n = q.index.to_numpy(dtype=float)
            text = f"rho={rho:g}" if method != "dpo" else "median"
            if slopes is not None:
                s = slopes[(slopes["method"] == method) & np.isclose(slopes["rho"], rho)]
                if len(s) and np.isfinite(s["slope"].iloc[0]):
                    r = s.iloc[0]
                    text += f", slope {r['slope']:.2f} [{r['slope_lo']:.2f}, {r['slope_hi']:.2f}]"
            ls = styles[k % len(styles)]
            ax.plot(n, q[0.5], ls, color=color(method), marker="o", ms=3, label=text)
            ax.fill_between(n, q[0.1], q[0.9], color=color(method), alpha=0.15)
            if "pred_err_median" in h and h["pred_err_median"].notna().any():
                pred = h.groupby("n")[["pred_err_q10", "pred_err_median", "pred_err_q90"]].median()
                ax.plot(n, pred["pred_err_median"], ":", color="black", lw=1.2,
                        label="predicted median (sandwich)" if k == 0 else None)
                ax.fill_between(n, pred["pred_err_q10"], pred["pred_err_q90"], facecolor="none",
                                edgecolor="0.3", hatch="///", lw=0, alpha=0.5,
                                label="predicted 10-90%" if k == 0 else None)
            bound = h.groupby("n")["bound"].median()
            if np.isfinite(bound).any():
                ax.plot(n, bound, "--", color=color(method), lw=1, alpha=0.7,
                        label="slow-rate bound (plug-in)" if k == 0 else None)
            fast = h.groupby("n")["bound_fast"].median()
            ax.plot(n, fast, "-.", color=color(method), lw=1, alpha=0.7,
                    label="plug-in fast bound" if k == 0 else None)
            if k == 0:
                y0 = float(q[0.5].iloc[0])
                for power, st in ((0.25, (0, (1, 1))), (0.5, (0, (4, 2)))):
                    ax.plot(n, y0 * (n / n[0]) ** -power, color="0.55", ls=st, lw=1,
                            label=f"n^-{power:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(label(method))
        ax.set_xlabel("n (preference pairs)")
        ax.set_ylabel("||theta_hat - theta*||_2")
        ax.legend(fontsize=7)
    fig.suptitle("Rates: error of the empirical robust optimum (median, 10-90% band) "
                 "against the sandwich prediction")
    return [save(fig, Path(out_dir) / "rates.png")]
