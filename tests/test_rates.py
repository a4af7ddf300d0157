"""The rates experiment end to end (--quick through the CLI) and the figures it feeds."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import simulator as sim
from experiments.__main__ import main
from experiments.rates import cells, loglog_slope, make_env, shift_divergence, summarize
from figures.__main__ import main as figures_main

COLUMNS = ["method", "rho", "n", "seed", "err_l2", "err_sigma", "excess_risk", "bound",
           "bound_fast", "solve_time_s", "status", "cell_id", "error", "rho_n", "err_truth",
           "shift_div", "shift_in_ball", "pred_err_median", "in_ellipsoid"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("rates")
    assert main(["rates", "--quick", "--out", str(out), "--no-progress", "--jobs", "2"]) == 0
    cfg = json.loads((out / "rates_config.json").read_text())["config"]
    return out, cfg, pd.read_csv(out / "rates.csv"), pd.read_csv(out / "rates_summary.csv")


def test_rows_and_columns(quick):
    _, cfg, df, summary = quick
    assert set(COLUMNS) <= set(df.columns)
    assert (df["status"] == "ok").all()
    n_cells = len(cells(cfg))
    assert len(df) == n_cells * len(cfg["n_grid"])
    assert not df.duplicated(["method", "rho", "n", "seed"]).any()
    assert set(summary["method"]) == set(cfg["methods"])
    for col in ("slope", "slope_lo", "slope_hi", "bound_coverage"):
        assert summary[col].notna().all()


def test_invariants_of_the_errors(quick):
    _, cfg, df, _ = quick
    env = make_env(cfg)
    eig = np.linalg.eigvalsh(env.coverage())
    assert (df["err_sigma"] <= np.sqrt(eig[-1]) * df["err_l2"] * (1 + 1e-9) + 1e-12).all()
    assert (df["err_sigma"] >= np.sqrt(eig[0]) * df["err_l2"] * (1 - 1e-9) - 1e-12).all()
    # theta* minimises the population robust risk
    assert (df["excess_risk"] >= -1e-8).all()
    # realizable world: the population DPO optimum is theta_true
    dpo = df[df["method"] == "dpo"]
    assert np.allclose(dpo["norm_star"], np.linalg.norm(env.theta_true), atol=1e-5)
    # robust optima shrink towards theta_ref = 0 but stay far from it
    robust = df[df["method"] != "dpo"]
    assert ((robust["norm_star"] < cfg["theta_norm"]) & (robust["norm_star"] > 0.3)).all()


def test_slopes_and_deterministic_bounds(quick):
    _, cfg, df, summary = quick
    s = summary.set_index("method")
    # parametric rate for DPO: slope near -1/2 (wide interval for a small quick grid)
    assert -0.8 < s.loc["dpo", "slope"] < -0.3
    assert (summary["slope_lo"] <= summary["slope"]).all()
    assert (summary["slope"] <= summary["slope_hi"]).all()
    assert (summary["slope_hi"] < -0.15).all()  # every method's error shrinks with n
    # the plug-in fast bound is a deterministic inequality (it fails if gamma_n is wrong);
    # the union-bound slow rate is never below the plug-in one
    assert (summary["fast_bound_coverage"] == 1.0).all()
    assert (df["bound_uniform"] >= df["bound"]).all()


def test_prediction_before_sampling_matches_the_measurement(quick):
    """The sandwich median of sqrt(n) err lies in the bootstrap interval of the measured
    median at the largest n, for every method; every row is regular at rho = 0.03."""
    _, cfg, df, summary = quick
    assert summary["regular"].all()
    assert (summary["pred_sqrt_n_err"] >= summary["err_sqrt_n_lo"]).all()
    assert (summary["pred_sqrt_n_err"] <= summary["err_sqrt_n_hi"]).all()
    np.testing.assert_allclose(summary["sqrt_n_ratio"],
                               summary["err_sqrt_n"] / summary["pred_sqrt_n_err"])
    # the predicted median falls like n^-1/2 exactly
    for _, g in df.groupby("method"):
        scaled = g["pred_err_median"] * np.sqrt(g["n"])
        np.testing.assert_allclose(scaled, scaled.iloc[0], rtol=1e-12)
    assert set(df["in_ellipsoid"].unique()) <= {0.0, 1.0}


def _rows(errs: dict[int, list[float]], method="kldpo", rho=0.1) -> pd.DataFrame:
    rows = []
    for n, vals in errs.items():
        for seed, e in enumerate(vals):
            rows.append({"method": method, "rho": rho, "seed": seed, "n": n, "err_l2": e,
                         "excess_risk": e**2, "err_truth": e + 1, "bound": 1.0,
                         "bound_fast": 1.0, "bound_uniform": 1.0, "shift_in_ball": 0.0,
                         "pred_err_median": 0.1,
                         "in_ellipsoid": 1.0, "gamma": 0.1, "dual_star": 0.0,
                         "norm_star": 0.0, "status": "ok"})
    return pd.DataFrame(rows)


def test_summary_rules_for_exact_zeros_degenerate_grids_and_failed_cells():
    cfg = {"methods": ["kldpo"], "rhos": [0.1], "schedule_c": 0.0, "seed": 0, "n_seeds": 4,
           "n_boot": 200}
    # exact zeros: the RMS slope stays defined (errors 0.5 n^-1/2 on two of four seeds)
    n = [100, 10_000]
    df = _rows({k: [0.0, 0.5 * k**-0.5, 0.0, 0.5 * k**-0.5] for k in n})
    row = summarize(df, cfg)["rates_summary"].iloc[0]
    assert row["frac_exact"] == 0.5
    assert row["slope"] == pytest.approx(-0.5, abs=1e-12)
    assert row["slope_note"] == "" and row["n_failed"] == 0
    # every seed exact at one n: no slope, said so
    df = _rows({100: [0.0, 0.1, 0.0, 0.2], 10_000: [0.0] * 4})
    row = summarize(df, cfg)["rates_summary"].iloc[0]
    assert math.isnan(row["slope"]) and "every seed exact" in row["slope_note"]
    # one n, one seed
    row = summarize(_rows({100: [0.1, 0.2, 0.3, 0.4]}), cfg)["rates_summary"].iloc[0]
    assert math.isnan(row["slope"]) and row["slope_note"] == "one n: no slope"
    one = dict(cfg, n_seeds=1)
    row = summarize(_rows({100: [0.1], 1000: [0.03]}), one)["rates_summary"].iloc[0]
    assert "one seed" in row["slope_note"] and row["slope_lo"] == row["slope_hi"]
    # failed cells (the runner's df.attrs["failed"]): counted per row; a row whose cells
    # all failed is kept and said so
    df = _rows({100: [0.1, 0.2, 0.3, 0.4], 1000: [0.03, 0.06, 0.1, 0.1]})
    df = df[df["seed"] != 2]
    df.attrs["failed"] = pd.DataFrame({"cell_id": ["a", "b"], "error": ["x", "y"],
                                       "method": ["kldpo", "wdpo1"], "rho": [0.1, 0.2],
                                       "seed": [2, 0]})
    table = summarize(df, cfg)["rates_summary"].set_index("method")
    assert table.loc["kldpo", "n_failed"] == 1 and table.loc["kldpo", "n_seeds"] == 3
    assert table.loc["wdpo1", "n_failed"] == 1 and table.loc["wdpo1", "n_seeds"] == 0
    assert table.loc["wdpo1", "slope_note"] == "every cell failed"


def test_merged_sampler_is_multinomial():
    env = sim.FiniteEnv.random(3, 3, 2, seed=1)
    pop = env.population()
    n = 1000
    mean = np.zeros(pop.n)
    for seed in range(400):
        d = env.sample(n, seed, merged=True)
        assert d.n <= pop.n and np.allclose(d.weights * n, np.round(d.weights * n))
        idx = [np.flatnonzero((pop.states == s) & (pop.actions == a).all(1) & (pop.y == y))[0]
               for s, a, y in zip(d.states, d.actions, d.y, strict=True)]
        mean[idx] += d.weights / 400
    sd = np.sqrt(pop.weights * (1 - pop.weights) / (n * 400))
    assert np.all(np.abs(mean - pop.weights) <= 4.5 * sd)
    # the same draws merged give the same estimator as unmerged
    raw = env.sample(500, 7)
    key = raw.states * 100 + raw.actions[:, 0] * 10 + raw.actions[:, 1] + 1000 * raw.y
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    merged = sim.PreferenceData(raw.x[first], raw.y[first], counts / 500)
    for amb in (sim.KL(0.05), sim.Wasserstein(0.05, p=2)):
        np.testing.assert_allclose(sim.solve(merged, amb).theta, sim.solve(raw, amb).theta,
                                   atol=1e-8)


def test_radius_schedule_and_truth_error(tmp_path):
    out = tmp_path / "sched"
    args = ["rates", "--quick", "--out", str(out), "--no-progress", "--methods", "dpo,kldpo",
            "--schedule-c", "0.3", "--schedule-a", "0.5", "--n-seeds", "3"]
    assert main(args) == 0
    df = pd.read_csv(out / "rates.csv")
    kl, dpo = df[df["method"] == "kldpo"], df[df["method"] == "dpo"]
    assert np.allclose(kl["rho_n"], 0.3 * kl["n"] ** -0.5)
    assert (dpo["rho_n"] == 0).all()
    # for DPO the population optimum is the non-robust truth
    assert np.allclose(dpo["err_truth"], dpo["err_l2"])
    # the robust optimum at rho_n moves towards the truth as the radius shrinks
    bias = kl.groupby("n")["norm_star"].first()
    assert bias.is_monotonic_increasing and bias.iloc[-1] < 2.0
    summary = pd.read_csv(out / "rates_summary.csv").set_index("method")
    assert summary.loc["kldpo", "slope_truth"] < -0.1


def test_shift_divergence_against_direct_formulas():
    env = sim.FiniteEnv.random(3, 3, 2, seed=1)
    pop = env.population()
    test = env.with_label_noise(0.2).population()
    shape = (3, 3, 3)
    # on the population itself (every atom covered) against direct formulas
    p_test = test.weights  # same atom order as pop: same pairs, same labels
    assert np.array_equal(test.states, pop.states) and np.array_equal(test.y, pop.y)
    kl = np.sum(p_test * np.log(p_test / pop.weights))
    chi2 = np.sum(p_test**2 / pop.weights) - 1
    assert shift_divergence("kldpo", test, pop, shape) == pytest.approx(kl, rel=1e-12)
    assert shift_divergence("chi2dpo", test, pop, shape) == pytest.approx(chi2, rel=1e-12)
    assert shift_divergence("kldpo", pop, pop, shape) == pytest.approx(0.0, abs=1e-12)
    assert shift_divergence("wdpo1", test, pop, shape) == np.inf  # labels cannot move
    assert shift_divergence("wdpo2", pop, pop, shape) == 0.0
    assert np.isnan(shift_divergence("dpo", test, pop, shape))
    # a small sample misses atoms: the divergence balls cannot contain the shift
    small = env.sample(5, 0)
    assert shift_divergence("kldpo", test, small, shape) == np.inf
    assert shift_divergence("chi2dpo", test, small, shape) == np.inf


def test_loglog_slope_recovers_power_law():
    n = np.array([100, 1000, 10_000])
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(size=(20, 1)) * 0.1)
    values = scale * n[None, :] ** -0.5
    slope, lo, hi = loglog_slope(n, values, n_boot=200)
    assert slope == pytest.approx(-0.5, abs=1e-12)
    assert lo == pytest.approx(-0.5, abs=1e-9) and hi == pytest.approx(-0.5, abs=1e-9)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_figures_from_results_without_solving(quick, tmp_path, monkeypatch):
    out, _, _, _ = quick

    def forbidden(*args, **kwargs):
        raise AssertionError("figures must not solve anything")

    monkeypatch.setattr(sim, "solve", forbidden)
    monkeypatch.setattr(sim, "robust_objective", forbidden)
    assert figures_main(["--results", str(out), "--out", str(tmp_path)]) == 0
    for name in ("rates.png", "coverage.png"):
        path = tmp_path / name
        w, h = _png_size(path)
        assert w > 400 and h > 300
        assert path.stat().st_size > 20_000  # real content, not an empty canvas
    assert figures_main(["--results", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
