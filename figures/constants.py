"""``constants.png``: how each constant scales with beta, B, coverage and rho.

One column per swept parameter (log axes). Top: the measured ``sqrt(n)`` error constant
(markers, with its bootstrap interval) and the sandwich prediction (lines), per method.
Bottom: the constants of the bounds: the slow-rate constant ``n^{1/4} bound`` (dashed),
the plug-in fast bound ``sqrt(n) bound_fast`` (dash-dotted), the paper's
``1/sqrt(gamma)`` (black dotted), each over the measured constant's value. From
``constants_summary.csv``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ._style import color, label, new_figure, save

__all__ = ["plot"]

XLABELS = {"beta": "beta", "theta_norm": "B = theta_norm", "coverage_scale":
           "coverage_scale (lambda_min ~ scale^2)", "rho": "rho"}


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``constants.png`` from ``results_dir/constants_summary.csv``."""
    df = pd.read_csv(Path(results_dir) / "constants_summary.csv")
    params = list(dict.fromkeys(df["param"]))
    fig, axes = new_figure(2 * len(params), width=3.8, ncols=len(params))
    for j, param in enumerate(params):
        top, bottom = axes[j], axes[len(params) + j]
        g = df[df["param"] == param]
        for method, h in g.groupby("method", sort=False):
            h = h.sort_values("value")
            c = color(method)
            top.errorbar(h["value"], h["err_sqrt_n"],
                         yerr=[h["err_sqrt_n"] - h["err_sqrt_n_lo"],
                               h["err_sqrt_n_hi"] - h["err_sqrt_n"]],
                         fmt="o", color=c, ms=4, capsize=2, label=f"{label(method)} measured")
            top.plot(h["value"], h["pred_sqrt_n_err"], "-", color=c, lw=1.2)
            bottom.plot(h["value"], h["slow_const"], "--", color=c, marker="v", ms=3,
                        label=f"{label(method)} slow (n^1/4 bound)")
            bottom.plot(h["value"], h["fast_sqrt_n"], "-.", color=c, marker="^", ms=3)
        paper = g.groupby("value")["paper_const"].median()
        bottom.plot(paper.index, paper, ":", color="black", lw=1.5, label="1/sqrt(gamma) (paper)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(XLABELS.get(param, param))
        top.set_ylabel("sqrt(n) median error (line: sandwich)")
        bottom.set_ylabel("bound constants")
        top.set_title(f"sqrt(n) error vs {param}")
        bottom.set_title(f"bounds vs {param}")
        if j == 0:
            top.legend(fontsize=6)
            bottom.legend(fontsize=6)
    fig.suptitle("Constants: measured sqrt(n) error against the sandwich prediction (top) "
                 "and the bounds (bottom)")
    return [save(fig, Path(out_dir) / "constants.png")]
