"""``shift.png``: test performance of each method under preference shift.

(a) test accuracy and (b) expected test reward against the test mixture weight
``alpha_test``, for DPO and each robust method at the radius with the best
worst-case reward; (c) worst-case test reward over ``alpha_test`` against the
radius (DPO as a horizontal line). Means over seeds.
"""

from __future__ import annotations

from pathlib import Path

from ._style import color, label, load_config, load_ok_rows, new_figure, save

__all__ = ["plot"]


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``shift.png`` from ``results_dir/shift.csv``; returns the path written."""
    df = load_ok_rows(results_dir, "shift")
    alpha_train = load_config(results_dir, "shift").get("alpha_train")
    mean = df.groupby(["method", "rho", "alpha_test"], sort=False)[
        ["test_accuracy", "test_reward"]].mean().reset_index()
    worst = mean.groupby(["method", "rho"], sort=False)["test_reward"].min().reset_index()
    fig, (ax_acc, ax_rew, ax_rho) = new_figure(3)
    for method, w in worst.groupby("method", sort=False):
        best = w.loc[w["test_reward"].idxmax(), "rho"]
        m = mean[(mean["method"] == method) & (mean["rho"] == best)]
        name = label(method) + ("" if method == "dpo" else f" rho={best:g}")
        for ax, col in ((ax_acc, "test_accuracy"), (ax_rew, "test_reward")):
            ax.plot(m["alpha_test"], m[col], "o-", ms=3, color=color(method), label=name)
        if method == "dpo":
            ax_rho.axhline(w["test_reward"].iloc[0], color=color(method), label=label(method))
        else:
            ax_rho.plot(w["rho"], w["test_reward"], "o-", ms=3, color=color(method),
                        label=label(method))
    for ax, ylabel in ((ax_acc, "test preference accuracy"), (ax_rew, "expected test reward")):
        ax.set_xlabel("alpha_test (weight of r_1)")
        ax.set_ylabel(ylabel)
        if alpha_train is not None:
            ax.axvline(alpha_train, color="0.5", ls=":", lw=1, label="alpha_train")
        ax.legend(fontsize=7)
    ax_rho.set_xlabel("radius rho")
    ax_rho.set_ylabel("worst-case expected test reward")
    ax_rho.legend(fontsize=7)
    fig.suptitle("Preference shift: train on one reward mixture, test on others")
    return [save(fig, Path(out_dir) / "shift.png")]
