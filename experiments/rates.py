"""The ``rates`` experiment: sample complexity of the robust DPO estimators (SPEC 5).

For each method (``dpo``, ``kldpo``, ``chi2dpo``, ``wdpo1`` = Wasserstein p=1,
``wdpo2`` = Wasserstein p=2, both with ``kappa = inf``) and radius ``rho``, the
population robust optimum ``theta*`` is solved exactly on ``env.population()``;
for every ``n`` of the grid and every seed, ``theta_hat_n`` is solved on
``env.sample(n, merged=cfg["merged"])`` and compared with ``theta*``. With
``merged = true`` (the default) the ``n`` i.i.d. pairs are drawn as multinomial counts
over the population atoms (``FiniteEnv.sample_counts``: the same law, ``O(|atoms|)``
whatever ``n``), so the grid runs to ``n = 1e7``. Before sampling, the sandwich law of
``sqrt(n)(theta_hat - theta*)`` is computed (``sim.asymptotic_covariance``): each row
carries its predicted median error and whether the predicted 95% Wald ellipsoid around
``theta_hat`` holds ``theta*``.

A cell is one ``(method, rho, seed)``: it solves ``theta*`` (cached per worker
process, so once per method and radius in each process) and then every ``n``.
The sample of ``(seed, n)`` is drawn from ``default_rng([seed, n])``, the same for
every method, so methods are compared on the same data.

Columns of ``rates.csv`` (besides the runner's): ``method``, ``rho``, ``seed``,
``n``, ``err_l2 = ||theta_hat - theta*||_2``, ``err_sigma = ||theta_hat -
theta*||_Sigma`` (``Sigma = E_P x x^T``), ``excess_risk = L(theta_hat) - L(theta*)``
on the population, ``bound`` (slow-rate error bound at level ``delta``; a plug-in
heuristic, since ``B`` and ``dual_lo`` are chosen from the same sample, docs/theory.md),
``bound_uniform`` (the same with the union bound over dyadic grids of ``B`` and
``dual_lo``, :func:`simulator.theory.uniform_slow_rate`: valid at level ``delta``),
``bound_excess`` (its excess-risk bound), ``bound_fast`` (plug-in fast-rate bound),
``B``, ``gamma``, ``gamma_n``, ``dual`` (at ``theta_hat``), ``dual_star`` (at
``theta*``), ``dual_lo`` (lower bound used by the KL and W2 bounds), ``norm_star``,
``norm_hat``, ``rho_n`` (radius used at this ``n``), ``err_truth = ||theta_hat -
theta_dpo*||`` (error against the non-robust truth), ``shift_div`` and ``shift_in_ball``
(divergence of the label-noise test shift ``shift_noise`` from the sample, and whether it
lies inside the ball; :func:`shift_divergence`), ``pred_err_median`` (sandwich
prediction of the median of ``err_l2`` at this ``n``; NaN when the limit is not
regular), ``pred_err_q10``, ``pred_err_q90`` (its 10% and 90% quantiles),
``in_ellipsoid`` (1 when ``theta*`` lies in the predicted 95% Wald ellipsoid around
``theta_hat``), ``solve_time_s``.

Radius schedule (DRO-REBEL's radius-coverage study, SPEC 5): with ``schedule_c > 0``
the radius at ``n`` is ``rho_n = schedule_c n^{-schedule_a}`` (``rho`` then holds
``schedule_c``); ``theta*`` is the population optimum at ``rho_n``, and ``err_truth``
shows the trade between the rate and the bias towards the non-robust truth.

``rates_summary.csv``: per ``(method, rho)`` the log-log slopes of the root-mean-square
error, of the excess risk and of ``err_truth`` against ``n`` with bootstrap 95% intervals
over seeds (``slope_note`` names degenerate cases), ``frac_exact``, the measured and
predicted ``sqrt(n)`` error constants, their ratio, the ellipsoid coverage, the count of
failed cells,
the share of seeds whose ball contains the test shift at the largest ``n``, the bound
coverages, and the constants at the largest ``n`` (``sqrt(n) err`` and
``sqrt(n) bound_fast``, medians) for comparing environments (``--beta``,
``--theta-norm``, ...). See docs/experiments.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import rel_entr

import simulator as sim
from simulator import theory

from .runner import add_failed_count

NAME = "rates"
DESCRIPTION = ("Sample complexity (SPEC 5): error of the empirical robust optimum theta_hat_n "
               "against the population robust optimum theta*, for DPO, KLDPO, chi2-DPO and "
               "WDPO (p=1, 2) over a log grid of n and many seeds, with the slow-rate and "
               "plug-in fast-rate bounds of simulator.theory.")

METHODS = sim.METHOD_NAMES
SUMMARY_COLUMNS = ("method", "rho", "slope", "slope_lo", "slope_hi", "slope_excess",
                   "slope_excess_lo", "slope_excess_hi", "slope_truth", "slope_truth_lo",
                   "slope_truth_hi", "slope_note", "frac_exact", "shift_in_ball",
                   "bound_coverage", "uniform_bound_coverage", "fast_bound_coverage",
                   "err_sqrt_n", "err_sqrt_n_lo", "err_sqrt_n_hi", "pred_sqrt_n_err",
                   "sqrt_n_ratio", "ellipsoid_coverage", "regular", "fast_sqrt_n", "gamma",
                   "n_seeds", "n_failed", "dual_star", "norm_star")


def ambiguity(method: str, rho: float) -> sim.AmbiguitySet:
    """The ambiguity set of a method name at radius ``rho`` (``AmbiguitySet.from_name``)."""
    return sim.AmbiguitySet.from_name(method, rho)


def make_env(cfg: dict[str, Any]) -> sim.FiniteEnv:
    """The environment of the configuration (``FiniteEnv.random``)."""
    return sim.FiniteEnv.random(cfg["n_states"], cfg["n_actions"], cfg["dim"], cfg["beta"],
                                seed=cfg["env_seed"], theta_norm=cfg["theta_norm"],
                                coverage_scale=cfg.get("coverage_scale", 1.0))


@functools.lru_cache(maxsize=256)
def _population_optimum(env_key: tuple, method: str, rho: float, solver: str):
    cfg = dict(env_key)
    env = make_env(cfg)
    pop = env.population()
    sol = sim.solve(pop, ambiguity(method, rho), beta=cfg["beta"], solver=solver)
    return env, pop, sol


@functools.lru_cache(maxsize=256)
def _prediction(env_key: tuple, method: str, rho: float, solver: str) -> sim.Asymptotics:
    """The sandwich law of ``sqrt(n)(theta_hat - theta*)`` (``sim.asymptotic_covariance``)."""
    env, pop, sol = _population_optimum(env_key, method, rho, solver)
    return sim.asymptotic_covariance(pop, ambiguity(method, rho), beta=env.beta,
                                     theta_ref=env.theta_ref, solution=sol)


def _env_key(cfg: dict[str, Any]) -> tuple:
    return tuple(sorted((k, cfg[k]) for k in ("n_states", "n_actions", "dim", "beta",
                                              "env_seed", "theta_norm", "coverage_scale")
                        if k in cfg))


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per ``(method, rho, seed)``; ``dpo`` only at ``rho = 0``.

    With a radius schedule (``schedule_c > 0``) the only radius is ``rho = schedule_c``,
    and the cell uses ``rho_n = schedule_c n^{-schedule_a}`` at each ``n``. The keys are
    checked by :func:`validate`.
    """
    radii = [cfg["schedule_c"]] if cfg["schedule_c"] > 0 else cfg["rhos"]
    out = []
    for method in cfg["methods"]:
        for rho in ([0.0] if method == "dpo" else radii):
            for seed in range(cfg["seed"], cfg["seed"] + cfg["n_seeds"]):
                out.append({"method": method, "rho": float(rho), "seed": seed})
    return out


def _dual_lo(*duals: float | None) -> float | None:
    vals = [d for d in duals if d is not None]
    return min(vals) if vals else None


def shift_divergence(method: str, test: sim.PreferenceData, sample: sim.PreferenceData,
                     shape: tuple[int, int, int]) -> float:
    """Divergence of a test distribution from the empirical one, on atoms ``(s, a1, a2, y)``.

    ``KL(P_test || P_n)`` for ``kldpo``, ``E_{P_n}(dP_test/dP_n - 1)^2`` for ``chi2dpo``
    (``inf`` when ``P_test`` charges an atom that the sample missed); ``inf`` for the
    Wasserstein methods when the labels differ in law (``kappa = inf`` forbids label
    changes; the test shifts used here only move labels); ``nan`` for ``dpo``.
    """
    if method == "dpo":
        return math.nan
    size = (*shape, 2)

    def mass(d: sim.PreferenceData) -> np.ndarray:
        idx = np.ravel_multi_index((d.states, d.actions[:, 0], d.actions[:, 1],
                                    d.y.astype(np.int64)), size)
        return np.bincount(idx, weights=d.weights, minlength=int(np.prod(size)))

    p, q = mass(test), mass(sample)
    if method == "kldpo":
        return float(np.sum(rel_entr(p, q)))
    if method == "chi2dpo":
        if np.any((p > 0) & (q == 0)):
            return math.inf
        keep = q > 0
        return float(np.sum(p[keep] ** 2 / q[keep]) - 1.0)
    return 0.0 if np.allclose(p, q, atol=1e-12) else math.inf


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Errors and bounds of ``theta_hat_n`` for every ``n`` of the grid."""
    method, beta = cell["method"], cfg["beta"]
    env, pop, truth = _population_optimum(_env_key(cfg), "dpo", 0.0, cfg["solver"])
    test = env.with_label_noise(cfg["shift_noise"]).population()
    sigma = pop.coverage()
    x_max = float(np.linalg.norm(pop.x, axis=1).max())
    rows = []
    for n in cfg["n_grid"]:
        rho = cell["rho"] * (n ** -cfg["schedule_a"] if cfg["schedule_c"] > 0 else 1.0)
        star = _population_optimum(_env_key(cfg), method, rho, cfg["solver"])[2]
        pred = _prediction(_env_key(cfg), method, rho, cfg["solver"])
        amb = ambiguity(method, rho)
        data = env.sample(n, np.random.default_rng([cell["seed"], n]), merged=cfg["merged"])
        sol = sim.solve(data, amb, beta=beta, solver=cfg["solver"])
        at_hat = sim.robust_objective(sol.theta, pop, amb, beta=beta)
        at_star = sim.robust_objective(star.theta, data, amb, beta=beta)
        diff = sol.theta - star.theta
        B = max(float(np.linalg.norm(star.theta)), float(np.linalg.norm(sol.theta)),
                float(np.linalg.norm(env.theta_ref)))
        gamma = theory.robust_growth(amb, pop, star.worst_case, beta, B, theta=star.theta,
                                     theta_ref=env.theta_ref)
        gamma_n = theory.robust_growth(amb, data, sol.worst_case, beta, B, theta=sol.theta,
                                       theta_ref=env.theta_ref)
        lo = (_dual_lo(star.dual, sol.dual, at_hat.dual, at_star.dual)
              if method in ("kldpo", "wdpo2") else None)
        if (method in ("kldpo", "wdpo2") and not (lo and lo > 0)) or not gamma >= 0:
            slow = theory.SlowRate(math.inf, math.inf, math.inf)
        else:
            slow = theory.slow_rate(amb, n, cfg["delta"], beta, B, gamma, dual_lo=lo,
                                    x_max=x_max)
        if (method in ("kldpo", "wdpo2") and not (lo and lo > 0)) or not gamma >= 0:
            uniform = math.inf
        else:
            growth = functools.partial(theory.robust_growth, amb, pop, star.worst_case, beta,
                                       theta=star.theta, theta_ref=env.theta_ref)
            uniform = theory.uniform_slow_rate(amb, n, cfg["delta"], beta, B, growth,
                                               dual_lo=lo, x_max=x_max).error
        div = shift_divergence(method, test, data,
                               (env.n_states, env.n_actions, env.n_actions))
        rows.append({
            "n": n,
            "rho_n": rho,
            "err_l2": float(np.linalg.norm(diff)),
            "err_truth": float(np.linalg.norm(sol.theta - truth.theta)),
            "err_sigma": float(np.sqrt(max(diff @ sigma @ diff, 0.0))),
            "excess_risk": at_hat.value - star.value,
            "bound": slow.error,
            "bound_excess": slow.excess_risk,
            "bound_uniform": uniform,
            "bound_fast": (theory.fast_rate(float(np.linalg.norm(at_star.grad)), gamma_n)
                           if gamma_n >= 0 else math.inf),
            **dict(zip(("pred_err_q10", "pred_err_median", "pred_err_q90"),
                       pred.error_quantile([0.1, 0.5, 0.9], n) if pred.regular
                       else [math.nan] * 3, strict=True)),
            "in_ellipsoid": float(pred.in_ellipsoid(sol.theta, n)) if pred.regular else math.nan,
            "B": B, "gamma": gamma, "gamma_n": gamma_n,
            "dual": sol.dual, "dual_star": star.dual, "dual_lo": lo,
            "norm_star": float(np.linalg.norm(star.theta)),
            "norm_hat": float(np.linalg.norm(sol.theta)),
            "shift_div": div,
            "shift_in_ball": math.nan if method == "dpo" else float(div <= rho),
            "solve_time_s": sol.solve_time_s,
        })
    return rows


def loglog_slope(n: np.ndarray, values: np.ndarray, n_boot: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Slope of ``log RMS_seeds(values)`` against ``log n``, with a bootstrap 95% interval.

    The root-mean-square over seeds stays defined when some errors are exactly 0 (the
    estimate equals theta*, as it does whenever both optima are theta_ref); it is NaN
    only when every seed is 0 at some ``n``. Bootstrap resamples with such an ``n`` are
    left out of the interval.

    Parameters
    ----------
    n : array (k,)
        Sample sizes (``k >= 2``, else the slope is NaN).
    values : array (n_seeds, k)
        Non-negative errors, one row per seed (seeds are resampled with replacement).
    """
    logn = np.log(np.asarray(n, dtype=np.float64))
    sq = np.asarray(values, dtype=np.float64) ** 2
    if logn.size < 2 or sq.shape[0] == 0:
        return math.nan, math.nan, math.nan
    centred = (logn - logn.mean()) / np.sum((logn - logn.mean()) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = float(0.5 * np.log(sq.mean(axis=0)) @ centred)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, sq.shape[0], size=(n_boot, sq.shape[0]))
        boot = 0.5 * np.log(sq[idx].mean(axis=1)) @ centred
    boot = boot[np.isfinite(boot)]
    if not math.isfinite(slope) or boot.size == 0:
        return math.nan, math.nan, math.nan
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return slope, float(lo), float(hi)


def _slope_note(table: pd.DataFrame) -> str:
    """Why a slope or its interval is degenerate ('' when it is not)."""
    if table.shape[1] < 2:
        return "one n: no slope"
    notes = []
    if table.shape[0] < 2:
        notes.append("one seed: zero-width interval")
    dead = [int(n) for n in table.columns if (table[n] == 0).all()]
    if dead:
        notes.append(f"every seed exact (err 0) at n = {dead}: no slope")
    return "; ".join(notes)


def _median_interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Bootstrap 95% interval of the median over seeds."""
    rng = np.random.default_rng(seed)
    boot = np.median(values[rng.integers(0, values.size, size=(n_boot, values.size))], axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(lo), float(hi)


def summarize(df: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``rates_summary``: slopes, predictions and coverage per ``(method, rho)``.

    Rules (docs/experiments.md): slopes of the root-mean-square error over seeds
    (:func:`loglog_slope`), on the seeds with every ``n``; ``frac_exact`` the share of
    rows with ``theta_hat == theta*``; ``slope_note`` names degenerate cases (one seed,
    one ``n``, all-exact columns); ``n_failed`` counts the failed cells of the row
    (:func:`experiments.runner.add_failed_count`; the runner names them in a warning).
    """
    out = []
    for (method, rho), g in df.groupby(["method", "rho"], sort=False):
        err = g.pivot_table(index="seed", columns="n", values="err_l2").dropna()
        exc = g.pivot_table(index="seed", columns="n", values="excess_risk").dropna()
        truth = g.pivot_table(index="seed", columns="n", values="err_truth").dropna()
        row = {"method": method, "rho": rho}
        for key, table in (("slope", err), ("slope_excess", exc.abs()), ("slope_truth", truth)):
            row[key], row[f"{key}_lo"], row[f"{key}_hi"] = loglog_slope(
                table.columns.to_numpy(), table.to_numpy(), cfg["n_boot"], cfg["seed"])
        row["slope_note"] = _slope_note(err)
        row["frac_exact"] = float(np.mean(g["err_l2"] == 0.0))
        row["bound_coverage"] = float(np.mean(g["err_l2"] <= g["bound"]))
        row["uniform_bound_coverage"] = float(np.mean(g["err_l2"] <= g["bound_uniform"]))
        row["fast_bound_coverage"] = float(np.mean(g["err_l2"] <= g["bound_fast"] * (1 + 1e-9)))
        last = g[g["n"] == g["n"].max()]
        row["shift_in_ball"] = float(last["shift_in_ball"].mean())
        scaled = (last["err_l2"] * np.sqrt(last["n"])).to_numpy()
        row["err_sqrt_n"] = float(np.median(scaled))
        row["err_sqrt_n_lo"], row["err_sqrt_n_hi"] = _median_interval(scaled, cfg["n_boot"],
                                                                      cfg["seed"])
        row["pred_sqrt_n_err"] = float(np.median(last["pred_err_median"] * np.sqrt(last["n"])))
        row["sqrt_n_ratio"] = row["err_sqrt_n"] / row["pred_sqrt_n_err"]
        row["ellipsoid_coverage"] = float(last["in_ellipsoid"].mean())
        row["regular"] = bool(last["pred_err_median"].notna().all())
        row["fast_sqrt_n"] = float(np.median(last["bound_fast"] * np.sqrt(last["n"])))
        row["gamma"] = float(np.median(last["gamma"]))
        row["n_seeds"] = int(g["seed"].nunique())
        row["dual_star"] = float(last["dual_star"].median())
        row["norm_star"] = float(last["norm_star"].median())
        out.append(row)
    table = pd.DataFrame(out, columns=[c for c in SUMMARY_COLUMNS if c != "n_failed"])
    table = add_failed_count(table, df, ["method", "rho"])
    table.loc[table["n_seeds"].isna(), "slope_note"] = "every cell failed"
    table["n_seeds"] = table["n_seeds"].fillna(0).astype(int)
    return {"rates_summary": table.reindex(columns=list(SUMMARY_COLUMNS))}


def validate(cfg: dict[str, Any]) -> None:
    """Check every key before any cell runs (:mod:`experiments.validation`)."""
    from . import validation as v

    v.check(cfg, {"methods": v.one_of(*METHODS), "rhos": v.POSITIVE, "n_grid": v.POSITIVE_INT,
                  "delta": v.PROBABILITY, "n_boot": v.POSITIVE_INT,
                  "solver": v.one_of(*v.SOLVERS), "schedule_c": v.NONNEGATIVE,
                  "schedule_a": v.NONNEGATIVE, "shift_noise": v.UNIT_INTERVAL,
                  "coverage_scale": v.POSITIVE,
                  **v.ENV_SCHEMA})
