"""``coverage.png``: share of seeds whose error lies inside each bound, against n.

One line per (method, radius) for the slow-rate bound (left) and the plug-in
fast-rate bound, with the level ``1 - delta`` that a valid bound must reach; how loose
each bound is (median of ``bound / err_l2``); and the share of seeds whose 95% Wald
ellipsoid (``sim.asymptotic_covariance``, centred at ``theta_hat``) holds ``theta*``.
"""

from __future__ import annotations

from pathlib import Path

from ._style import color, label, load_config, load_ok_rows, new_figure, save

__all__ = ["plot"]


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``coverage.png`` from ``results_dir/rates.csv``; returns the path written."""
    df = load_ok_rows(results_dir, "rates")
    delta = load_config(results_dir, "rates").get("delta")
    fig, (ax_slow, ax_fast, ax_ratio, ax_wald) = new_figure(4, width=4.6, ncols=2)
    for (method, rho), g in df.groupby(["method", "rho"], sort=False):
        name = label(method) + ("" if method == "dpo" else f" rho={rho:g}")
        inside = g.assign(slow=g["err_l2"] <= g["bound"],
                          fast=g["err_l2"] <= g["bound_fast"] * (1 + 1e-9))
        share = inside.groupby("n")[["slow", "fast"]].mean()
        ax_slow.plot(share.index, share["slow"], "o-", color=color(method), ms=3, label=name)
        ax_fast.plot(share.index, share["fast"], "o--", color=color(method), ms=3, label=name)
        ratio = (g.assign(slow=g["bound"] / g["err_l2"], fast=g["bound_fast"] / g["err_l2"])
                 .groupby("n")[["slow", "fast"]].median())
        ax_ratio.plot(ratio.index, ratio["slow"], "o-", color=color(method), ms=3, label=name)
        ax_ratio.plot(ratio.index, ratio["fast"], "o--", color=color(method), ms=3)
        if "in_ellipsoid" in g and g["in_ellipsoid"].notna().any():
            wald = g.groupby("n")["in_ellipsoid"].mean()
            ax_wald.plot(wald.index, wald, "o-", color=color(method), ms=3, label=name)
    for ax, title in ((ax_slow, "slow-rate bound (plug-in heuristic, nominal 1 - delta)"),
                      (ax_fast, "plug-in fast-rate bound (deterministic)")):
        if delta is not None:
            ax.axhline(1 - delta, color="0.4", lw=1, ls=":", label=f"1 - delta = {1 - delta:g}")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("n (preference pairs)")
        ax.set_ylabel("share of seeds inside the bound")
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax_ratio.set_xscale("log")
    ax_ratio.set_yscale("log")
    ax_ratio.set_xlabel("n (preference pairs)")
    ax_ratio.set_ylabel("median bound / error")
    ax_ratio.set_title("looseness: slow (solid), fast (dashed)")
    ax_ratio.legend(fontsize=7)
    ax_wald.axhline(0.95, color="0.4", lw=1, ls=":", label="0.95")
    ax_wald.set_xscale("log")
    ax_wald.set_ylim(-0.03, 1.03)
    ax_wald.set_xlabel("n (preference pairs)")
    ax_wald.set_ylabel("share of seeds with theta* inside")
    ax_wald.set_title("95% Wald ellipsoid of the sandwich covariance")
    ax_wald.legend(fontsize=7)
    fig.suptitle("Bound coverage and looseness")
    return [save(fig, Path(out_dir) / "coverage.png")]
