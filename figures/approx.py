"""``approx.png``: how far the scalable surrogates land from the exact robust optima (SPEC 4).

(a) parameter distance ``||theta_approx - theta*(rho)||`` against the radius on
log-log axes, one line per surrogate, with dashed guides of slope 1 and 2 (the
orders SPEC 4 predicts for the first-order expansions and for ``wdpo-gr``);
surrogates that are exact at a radius (distance below ``1e-7``) are drawn at that
floor. (b) the same distance against the KL temperature ``tau / lambda*(rho)``
(``tau_rho``): zero for ``kldpo-tau`` only at the calibrated temperature.
(c) mini-batch bias (distance between the mini-batch and the full-batch fixed
points) against the batch size ``B``, with a dashed ``1/B`` guide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._style import load_config, load_ok_rows, new_figure, save

__all__ = ["plot"]

FLOOR = 1e-7
COLORS = {"wdpo-gr": "#ff7f0e", "wdpo-sq": "#d62728", "kl-var": "#9467bd",
          "chi2-var": "#2ca02c", "kldpo-tau": "#1f77b4", "kldpo-clip": "#17becf",
          "drdpo": "#8c564b", "dpo": "#444444"}
MARKERS = {"chi2-var": "s-", "kldpo-tau": "o-", "kldpo-clip": "^-"}


def _guide(ax, x, y0, order, text):
    x = np.asarray(sorted(x), float)
    ax.plot(x, y0 * (x / x[0]) ** order, "--", color="0.5", lw=1)
    ax.annotate(text, (x[-1], y0 * (x[-1] / x[0]) ** order), fontsize=7, color="0.4")


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``approx.png`` from ``results_dir/approx.csv``; returns the path written."""
    df = load_ok_rows(results_dir, "approx")
    cfg = load_config(results_dir, "approx")
    fig, (ax_rho, ax_tau, ax_b) = new_figure(3)
    radius = df[df["sweep"] == "radius"]
    for sur, g in radius.groupby("surrogate", sort=False):
        g = g.sort_values("rho")
        ax_rho.plot(g["rho"], np.maximum(g["param_distance"], FLOOR), MARKERS.get(sur, "o-"),
                    ms=4, mfc="none", color=COLORS.get(sur), label=sur)
    if len(radius):
        ref = radius[radius["surrogate"] == "wdpo-gr"]
        rhos = radius["rho"].unique()
        y0 = float(ref.sort_values("rho")["param_distance"].iloc[0]) if len(ref) else 1e-4
        _guide(ax_rho, rhos, y0, 2, "rho^2")
        _guide(ax_rho, rhos, 10 * y0, 1, "rho")
    ax_rho.set(xscale="log", yscale="log", xlabel="radius rho",
               ylabel="||theta_approx - theta*(rho)||",
               title="(a) full batch, tau = lambda*(rho)")
    for sur, g in df[df["sweep"] == "tau"].groupby("surrogate", sort=False):
        g = g.sort_values("tau_factor")
        ax_tau.plot(g["tau_factor"], np.maximum(g["param_distance"], FLOOR), "o-", ms=3,
                    color=COLORS.get(sur), label=sur)
    ax_tau.axvline(1.0, color="0.5", ls=":", lw=1)
    factors = sorted(df.loc[df["sweep"] == "tau", "tau_factor"].unique())
    if factors:
        ax_tau.set_xscale("log")
        ax_tau.set_xticks(factors, [f"{f:g}" for f in factors])
        ax_tau.minorticks_off()
    ax_tau.set(yscale="log", xlabel="tau / lambda*(rho)",
               ylabel="||theta_approx - theta*(rho)||",
               title=f"(b) KL temperature, rho = {cfg.get('tau_rho', '?')}")
    batch = df[(df["sweep"] == "batch") & (df["batch_size"] > 0)]
    for sur, g in batch.groupby("surrogate", sort=False):
        g = g.sort_values("batch_size")
        ax_b.plot(g["batch_size"], np.maximum(g["bias"], FLOOR), "o-", ms=3,
                  color=COLORS.get(sur), label=sur)
    if len(batch):
        first = batch.sort_values("batch_size").groupby("surrogate")["bias"].first().max()
        _guide(ax_b, batch["batch_size"].unique(), first, -1, "1/B")
    ax_b.set(xscale="log", yscale="log", xlabel="batch size B",
             ylabel="||theta_B - theta_full||",
             title=f"(c) mini-batch bias, rho = {cfg.get('batch_rho', '?')}")
    for ax in (ax_rho, ax_tau, ax_b):
        ax.legend(fontsize=7)
    ax_rho.annotate("floor: exact (distance < 1e-7)", (0.35, 0.07), xycoords="axes fraction",
                    fontsize=7, color="0.4")
    fig.suptitle("Scalable surrogates against the exact robust optimum")
    return [save(fig, Path(out_dir) / "approx.png")]
