"""``llm.png``: rewards of the policies trained by the ``llm`` experiment (SPEC 7).

(a) mean mixture reward (convex ``alpha r_1 + (1 - alpha) r_2`` or geometric
``r_1^alpha r_2^(1 - alpha)``, the experiment's ``mixing``) of fresh generations
against the test mixture weight ``alpha_test``, per method (mean over seeds,
bars: standard error), the reference policy dashed; (b) the gain over the
reference at ``alpha_train`` (in distribution) and the worst gain over the
``alpha_test`` grid, per method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._style import color, load_config, load_ok_rows, new_figure, save

__all__ = ["plot"]

_COLORS = {"dpo": "dpo", "kldpo": "kldpo", "kldpo-clip": "chi2dpo", "chi2": "wdpo1",
           "wdpo": "wdpo2"}
_LABELS = {"dpo": "DPO", "kldpo": "KLDPO (tau)", "kldpo-clip": "KLDPO (clip)",
           "chi2": "chi2-DPO", "klvar": "KL-var", "drdpo": "Dr. DPO", "wdpo": "WDPO"}


def plot(results_dir: Path, out_dir: Path) -> list[Path]:
    """Draw ``llm.png`` from ``results_dir/llm.csv``; returns the path written."""
    df = load_ok_rows(results_dir, "llm")
    cfg = load_config(results_dir, "llm")
    alpha_train = cfg.get("alpha_train")
    fig, (ax, ax_gain) = new_figure(2, width=4.6)
    stats = df.groupby(["method", "alpha_test"], sort=False)["reward"].agg(["mean", "sem", "size"])
    methods = list(dict.fromkeys(df["method"]))
    for method in methods:
        s = stats.loc[method].sort_index()
        err = np.nan_to_num(s["sem"].to_numpy())
        ax.errorbar(s.index, s["mean"], yerr=err, fmt="o-", ms=3, capsize=2,
                    color=color(_COLORS.get(method, method)), label=_LABELS.get(method, method))
    ref = df.groupby("alpha_test")["reward_ref"].mean().sort_index()
    ax.plot(ref.index, ref.values, "k--", lw=1, label="reference")
    if alpha_train is not None:
        ax.axvline(alpha_train, color="0.5", ls=":", lw=1, label="alpha_train")
    ax.set_xlabel("alpha_test (weight of r_1)")
    ax.set_ylabel(f"mean reward, {cfg.get('mixing', 'convex')} mixture")
    ax.legend(fontsize=7)
    alphas = np.asarray(sorted(df["alpha_test"].unique()))
    a_in = alphas[np.argmin(np.abs(alphas - (alpha_train if alpha_train is not None else 0.5)))]
    gain = df.assign(gain=df["reward"] - df["reward_ref"])
    per_seed = gain.groupby(["method", "seed"], sort=False)
    worst = per_seed["gain"].min().groupby(level="method", sort=False).mean()
    ind = gain[np.isclose(gain["alpha_test"], a_in)].groupby("method", sort=False)["gain"].mean()
    x = np.arange(len(methods))
    ax_gain.bar(x - 0.2, [ind[m] for m in methods], 0.4, label=f"at alpha = {a_in:g}",
                color=[color(_COLORS.get(m, m)) for m in methods])
    ax_gain.bar(x + 0.2, [worst[m] for m in methods], 0.4, label="worst over alpha_test",
                color=[color(_COLORS.get(m, m)) for m in methods], alpha=0.45, hatch="//")
    ax_gain.axhline(0, color="k", lw=0.8)
    ax_gain.set_xticks(x, [_LABELS.get(m, m) for m in methods], fontsize=8)
    ax_gain.set_ylabel("reward gain over the reference")
    ax_gain.legend(fontsize=7)
    if cfg.get("reward_model"):
        labels = " and ".join(cfg.get("reward_labels", []))
        title = f"{Path(cfg['model']).name}, rewards {labels} of {Path(cfg['reward_model']).name}"
    else:
        title = "Small GPT-2, token-share rewards"
    fig.suptitle(f"{title}: preferences from a mixture, evaluated on other mixtures")
    return [save(fig, Path(out_dir) / "llm.png")]
