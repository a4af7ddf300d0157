"""The constants experiment (reduced --quick grid through the CLI) and its figure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from experiments.__main__ import main
from figures.__main__ import main as figures_main
from simulator import theory


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("constants")
    args = ["constants", "--quick", "--out", str(out), "--no-progress", "--jobs", "2",
            "--methods", "dpo,wdpo1", "--n-seeds", "6"]
    assert main(args) == 0
    cfg = json.loads((out / "constants_config.json").read_text())["config"]
    return (out, cfg, pd.read_csv(out / "constants.csv"),
            pd.read_csv(out / "constants_summary.csv"),
            pd.read_csv(out / "constants_scaling.csv"))


def test_sweeps_move_one_parameter(quick):
    _, cfg, df, summary, _ = quick
    cov = summary[summary["param"] == "coverage_scale"].groupby("value")["lambda_min"].first()
    assert cov.is_monotonic_increasing  # less coverage, smaller lambda_min
    assert cov.iloc[0] < 0.2 * cov.iloc[-1]
    others = summary[summary["param"] != "coverage_scale"]["lambda_min"]
    assert np.allclose(others, others.iloc[0])  # the other sweeps keep the world's coverage
    rho = df[df["param"] == "rho"]
    assert np.allclose(rho["rho"], rho["value"]) and "dpo" not in set(rho["method"])
    # paper_gamma is the SPEC 5 formula at the row's beta, B and coverage
    for _, row in df.iloc[::7].iterrows():
        beta = row["value"] if row["param"] == "beta" else cfg["beta"]
        want = theory.strong_convexity(beta, row["B"], row["lambda_min"])
        assert row["paper_gamma"] == pytest.approx(want, rel=1e-12)


def test_bounds_dependence_is_looser_than_the_error(quick):
    """From B = 1 to 4 the plug-in fast bound's constant grows at least 100 times more
    than the measured constant, which the sandwich follows within its sampling error."""
    _, _, _, summary, scaling = quick
    s = scaling.set_index(["param", "method"])
    for method in ("dpo", "wdpo1"):
        row = s.loc[("theta_norm", method)]
        assert row["fast_sqrt_n_factor"] > 100 * row["err_sqrt_n_factor"]
        assert row["pred_sqrt_n_err_factor"] == pytest.approx(row["err_sqrt_n_factor"], rel=0.5)
    assert ((summary["pred_sqrt_n_err"] >= summary["err_sqrt_n_lo"] * 0.9)
            & (summary["pred_sqrt_n_err"] <= summary["err_sqrt_n_hi"] * 1.1)).all()


def test_figure_from_results(quick, tmp_path):
    out = quick[0]
    assert figures_main(["--results", str(out), "--out", str(tmp_path), "--only",
                         "constants"]) == 0
    assert (tmp_path / "constants.png").stat().st_size > 20_000
