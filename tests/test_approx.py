"""Surrogates against the exact robust objectives (SPEC 4 against SPEC 3), the check, the
``approx`` experiment and its figure."""

import json

import numpy as np
import pandas as pd
import pytest

import simulator as sim
from experiments import approx
from experiments.__main__ import main
from experiments.config import load_defaults
from simulator.optim import solve_surrogate, train
from simulator.surrogates import surrogate_loss

RHOS_W = np.array([0.001, 0.002, 0.005, 0.01, 0.02])  # five radii, 1.3 decades


@pytest.fixture(scope="module")
def pop():
    """A small exact population (8 states, 4 actions, d = 3): 192 weighted atoms."""
    return sim.FiniteEnv.random(8, 4, 3, seed=0).population()


@pytest.fixture(scope="module")
def theta_fixed(pop):
    return sim.solve(pop, sim.Nominal()).theta


def slope(x, y):
    return np.polyfit(np.log(x), np.log(y), 1)[0]


# ----------------------------------------------------------------- Wasserstein p = 2
def test_wdpo_gr_objective_error_is_second_order(pop, theta_fixed):
    rhos = np.geomspace(0.003, 0.3, 5)  # two decades
    diff = np.array([sim.robust_objective(theta_fixed, pop, sim.Wasserstein(r, p=2)).value
                     - surrogate_loss("wdpo-gr", theta_fixed, pop, rho=r) for r in rhos])
    ratio = diff / rhos**2
    assert np.all(diff > 0)  # the loss is convex in x: the sup beats its linearisation
    assert ratio.max() < 1.5 * ratio.min()  # bounded as rho -> 0
    assert slope(rhos, diff) == pytest.approx(2.0, abs=0.1)


def test_wdpo_gr_minimiser_distance_shrinks_like_rho_squared(pop):
    dist = []
    for r in RHOS_W:
        exact = sim.solve(pop, sim.Wasserstein(r, p=2), solver="dual")
        gr = solve_surrogate(pop, "wdpo-gr", rho=r)
        assert gr.converged
        dist.append(np.linalg.norm(gr.theta - exact.theta))
    assert slope(RHOS_W, dist) >= 1.8
    assert np.all(np.array(dist) / RHOS_W**2 < 15.0)  # measured: 12 at the smallest radius


# ----------------------------------------------------------------- KL
def test_kldpo_tau_at_calibrated_tau_is_the_exact_kl_optimum(pop):
    for rho in (0.01, 0.05):
        exact = sim.solve(pop, sim.KL(rho), solver="dual")
        assert exact.dual > 0
        sur = solve_surrogate(pop, "kldpo-tau", tau=exact.dual, tol=1e-11)
        assert sur.converged
        assert np.linalg.norm(sur.theta - exact.theta) < 1e-6


def test_kl_variance_expansion_error_is_first_order(pop, theta_fixed):
    rhos = np.geomspace(1e-4, 1e-2, 5)
    diff = np.array([sim.robust_objective(theta_fixed, pop, sim.KL(r)).value
                     - surrogate_loss("kl-var", theta_fixed, pop, rho=r) for r in rhos])
    assert np.all(np.abs(diff) / rhos < 1.5 * np.abs(diff[0]) / rhos[0])
    assert slope(rhos, np.abs(diff)) == pytest.approx(1.0, abs=0.1)


def test_chi2_variance_expansion_is_exact_while_weights_are_nonnegative(pop, theta_fixed):
    l = sim.dpo_loss(sim.margins(theta_fixed, pop.x, pop.y, 1.0))
    mean = pop.weights @ l
    sd = np.sqrt(pop.weights @ (l - mean) ** 2)
    rho_edge = (sd / (mean - l.min())) ** 2  # weights 1 + sqrt(rho) (l - El) / sd hit zero
    for rho in (0.01 * rho_edge, 0.5 * rho_edge, 0.99 * rho_edge):
        exact = sim.robust_objective(theta_fixed, pop, sim.ChiSquare(rho)).value
        assert surrogate_loss("chi2-var", theta_fixed, pop, rho=rho) == pytest.approx(
            exact, abs=1e-10)
    # past the regime the expansion is a sup over signed measures: it overshoots
    past = 4 * rho_edge
    assert sim.robust_objective(theta_fixed, pop, sim.ChiSquare(past)).value < surrogate_loss(
        "chi2-var", theta_fixed, pop, rho=past) - 1e-6


# ----------------------------------------------------------------- released variants
def test_released_variants_measurably_differ(pop):
    # Pinned on fixed problems (docs/approximations.md, "Released variants"). kldpo-clip needs
    # sharp preferences (theta_norm = 8) for its cap of 10 to bind at tau = lambda*.
    sq = sim.check_approximation(pop, sim.Wasserstein(0.05, p=2), "wdpo-sq")
    gr = sim.check_approximation(pop, sim.Wasserstein(0.05, p=2), "wdpo-gr")
    assert sq.param_distance == pytest.approx(WDPO_SQ_DISTANCE, rel=0.02)
    assert sq.param_distance > 20 * gr.param_distance
    assert sq.price == pytest.approx(3.50e-3, rel=0.02)
    sharp = sim.FiniteEnv.random(8, 4, 3, theta_norm=8.0, seed=0).population()
    clip = sim.check_approximation(sharp, sim.KL(0.1), "kldpo-clip")
    tau = sim.check_approximation(sharp, sim.KL(0.1), "kldpo-tau")
    assert clip.param_distance == pytest.approx(KLDPO_CLIP_DISTANCE, rel=0.02)
    assert tau.param_distance < 1e-6 < 1e-3 < clip.param_distance
    assert clip.price == pytest.approx(4.11e-5, rel=0.05)
    mild = sim.check_approximation(pop, sim.KL(0.05), "kldpo-clip")
    assert mild.param_distance < 1e-6  # the cap does not bind: same fixed point as kldpo-tau


WDPO_SQ_DISTANCE = 0.4021
KLDPO_CLIP_DISTANCE = 0.0745


# ----------------------------------------------------------------- optimiser vs sim.solve
@pytest.mark.parametrize("optimizer,lr", [("adam", 0.1), ("sgd", 2.0)])
def test_training_reaches_the_nominal_optimum(pop, optimizer, lr):
    exact = sim.solve(pop, sim.Nominal())
    res = train(pop, optimizer=optimizer, lr=lr, max_steps=20000, tol=1e-9)
    assert res.converged
    np.testing.assert_allclose(res.theta, exact.theta, atol=1e-6)


def test_drdpo_minimiser_tends_to_dpo_like_one_over_beta_prime(pop, theta_fixed):
    bps = np.array([20.0, 40.0, 80.0, 160.0])
    dist = [np.linalg.norm(solve_surrogate(pop, "drdpo", beta_prime=b).theta - theta_fixed)
            for b in bps]
    assert slope(bps, dist) == pytest.approx(-1.0, abs=0.1)


# ----------------------------------------------------------------- the check
def test_check_approximation_report(pop):
    rep = sim.check_approximation(pop, sim.KL(0.02), "kldpo-tau")
    assert rep.params["tau"] == rep.dual_exact > 0
    assert rep.implied_radius == pytest.approx(0.02, rel=1e-5)  # KL(Q_tau || P) = rho
    assert rep.value_gap == pytest.approx(rep.dual_exact * 0.02, rel=1e-6)  # L = S + lambda rho
    assert abs(rep.price) < 1e-10
    half = sim.check_approximation(pop, sim.KL(0.02), "kldpo-tau", tau=0.5 * rep.dual_exact)
    assert half.implied_radius > 0.02 and half.price > 0  # colder tilt: a larger ball
    chi = sim.check_approximation(pop, sim.ChiSquare(0.01), "chi2-var")
    assert chi.implied_radius == pytest.approx(0.01, rel=1e-9)
    assert "implied radius" in str(rep) and rep.as_row()["param_tau"] == rep.params["tau"]
    with pytest.raises(ValueError, match="tau must be given"):
        sim.check_approximation(pop, sim.ChiSquare(0.1), "kldpo-tau")
    with pytest.raises(ValueError, match="ambiguity must be an AmbiguitySet"):
        sim.check_approximation(pop, 0.1, "kldpo-tau")


# ----------------------------------------------------------------- experiment and figure
def test_cells_cover_the_three_sweeps():
    cfg = {"seed": 0, "radius_surrogates": ["wdpo-gr", "kl-var"], "rhos": [0.01, 0.1],
           "tau_surrogates": ["kldpo-tau"], "tau_rho": 0.02, "tau_factors": [0.5, 1.0, 2.0],
           "batch_surrogates": ["kldpo-tau"], "batch_rho": 0.02, "batch_sizes": [8, 0]}
    cells = approx.cells(cfg)
    assert [c["sweep"] for c in cells].count("radius") == 4
    assert [c["sweep"] for c in cells].count("tau") == 3
    assert [c["batch_size"] for c in cells if c["sweep"] == "batch"] == [8, 0]
    json.dumps(cells)
    full, _ = load_defaults(approx)
    approx.validate(full)
    with pytest.raises(ValueError, match=r"--radius-surrogates \(radius_surrogates\).*drdpo"):
        approx.validate(dict(full, radius_surrogates=["drdpo"]))
    with pytest.raises(ValueError, match=r"--tau-surrogates \(tau_surrogates\).*kl-var"):
        approx.validate(dict(full, tau_surrogates=["kl-var"]))


def test_failed_cells_are_counted_per_summary_row(tmp_path, monkeypatch, capsys):
    real = approx.run_cell

    def flaky(cell, cfg):
        if cell["rho"] == 0.05:
            raise RuntimeError("no convergence")
        return real(cell, cfg)

    monkeypatch.setattr(approx, "run_cell", flaky)
    assert main(["approx", "--quick", "--radius-surrogates", "kl-var,wdpo-gr",
                 "--tau-surrogates", "", "--batch-surrogates", "", "--out", str(tmp_path),
                 "--no-progress"]) == 1
    assert "warning: 2 of 6 cells failed" in capsys.readouterr().out
    summary = pd.read_csv(tmp_path / "approx_summary.csv")
    assert list(summary["n_failed"]) == [1, 1] and list(summary["n_cells"]) == [2, 2]


def test_quick_run_writes_results_summary_and_figure(tmp_path, capsys):
    from figures.approx import plot

    out = tmp_path / "results"
    assert main(["approx", "--quick", "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "approx.csv")
    assert (df["status"] == "ok").all()
    cfg = json.loads((out / "approx_config.json").read_text())["config"]
    assert len(df) == len(approx.cells(cfg))
    exact = df[(df["sweep"] == "radius") & (df["surrogate"] == "kldpo-tau")]
    assert (exact["param_distance"] < 1e-6).all()
    summary = pd.read_csv(out / "approx_summary.csv").set_index(["sweep", "surrogate"])
    assert summary.loc[("radius", "wdpo-gr"), "slope_param_distance"] > 1.5
    paths = plot(out, tmp_path / "fig")
    assert [p.name for p in paths] == ["approx.png"] and paths[0].stat().st_size > 10_000
    assert main(["approx", "--quick", "--check", "--surrogate", "kl-var", "--rho", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "surrogate kl-var (rho=0.01) against exact kldpo" in printed
