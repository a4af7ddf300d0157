"""The regimes experiment (--quick through the CLI) and its figure (SPEC 5.1)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import simulator as sim
from experiments.__main__ import main
from experiments.rates import make_env
from figures.__main__ import main as figures_main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes")
    args = ["regimes", "--quick", "--out", str(out), "--no-progress", "--jobs", "2",
            "--methods", "kldpo,chi2dpo,wdpo1,wdpo2"]
    assert main(args) == 0
    cfg = json.loads((out / "regimes_config.json").read_text())["config"]
    return out, cfg, pd.read_csv(out / "regimes.csv"), pd.read_csv(out / "regimes_summary.csv")


def test_collapse_radius_is_where_theta_ref_becomes_exact(quick):
    _, cfg, df, summary = quick
    pop = make_env(cfg).population()
    for method, amb in (("kldpo", sim.KL(1.0)), ("wdpo1", sim.Wasserstein(1.0, p=1))):
        rho0 = sim.collapse_radius(pop, amb)
        assert np.allclose(df.loc[df["method"] == method, "rho0"], rho0, rtol=1e-12)
    s = summary.set_index(["method", "ratio", "n"]).sort_index()
    for method in ("kldpo", "chi2dpo", "wdpo1", "wdpo2"):
        # beyond rho_0 every sample collapses to theta_ref (theta* = theta_ref too)
        assert (s.loc[(method, 1.2), "frac_ref"] == 1.0).all()
        assert (s.loc[(method, 1.2), "err_median"] == 0.0).all()
        # well inside, no sample collapses and the limit is regular
        assert (s.loc[(method, 0.5), "frac_ref"] == 0.0).all()
        assert s.loc[(method, 0.5), "regular"].all()
        assert not s.loc[(method, 1.0), "regular"].any()
    # KL: lambda_hat = 0 exactly when theta_hat = theta_ref beyond rho_0
    assert (s.loc[("kldpo", 1.2), "frac_dual_zero"] == 1.0).all()
    assert (s.loc[("kldpo", 0.5), "frac_dual_zero"] == 0.0).all()


def test_theta_ref_exactly_when_the_sample_collapse_radius_allows_it(quick):
    """theta_hat = theta_ref is the exact optimum iff rho_0(P_n) <= rho: the solver's answers
    agree with that solver-free test on every W1 and W2 sample (kappa = inf)."""
    _, _, df, summary = quick
    w = df[df["method"].isin(["wdpo1", "wdpo2"]) & (df["solve_failed"] == 0)]
    assert (w["at_ref"] == w["collapse_hat"]).all()
    assert (summary[summary["method"].isin(["wdpo1", "wdpo2"])]["n_disagree"] == 0).all()
    # the predicted collapse share is 1/2 at rho_0 and moves to 0 / 1 on either side
    s = summary.set_index(["method", "ratio", "n"]).sort_index()
    np.testing.assert_allclose(s.loc[("wdpo1", 1.0), "pred_frac_ref"], 0.5, atol=1e-9)
    assert (s.loc[("wdpo1", 0.5), "pred_frac_ref"] < 1e-3).all()
    assert (s.loc[("wdpo1", 1.2), "pred_frac_ref"] > 0.99).all()


def test_sandwich_holds_inside_and_prediction_ratio_is_reported(quick):
    _, _, _, summary = quick
    inside = summary[(summary["ratio"] == 0.5) & (summary["n"] == summary["n"].max())]
    # 8 seeds: the median of sqrt(n) err has a sampling spread of about 25%
    assert ((inside["ratio_meas_pred"] > 0.6) & (inside["ratio_meas_pred"] < 1.6)).all()
    np.testing.assert_allclose(inside["ratio_meas_pred"],
                               inside["sqrt_n_err"] / inside["pred_sqrt_n_err"])
    assert (summary["n_failed"] + summary["n_ok"] == 8).all()


def test_figure_from_results(quick, tmp_path):
    out, _, _, _ = quick
    assert figures_main(["--results", str(out), "--out", str(tmp_path), "--only",
                         "regimes"]) == 0
    assert (tmp_path / "regimes.png").stat().st_size > 20_000
