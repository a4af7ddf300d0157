"""The ``regimes`` experiment: where the sqrt(n) Gaussian limit fails (SPEC 5.1).

For each robust set (``kldpo``, ``chi2dpo``, ``wdpo1`` = Wasserstein p = 1 with
``kappa = inf``, ``wdpo1k`` = p = 1 with the finite ``kappa`` of the configuration,
``wdpo2`` = p = 2 with ``kappa = inf``) the collapse radius ``rho_0`` -- the smallest
radius at which the population robust optimum is ``theta_ref`` -- is computed exactly
(``sim.collapse_radius``), and the radius is swept through it as ``rho = ratio * rho_0``.
At each radius the population optimum ``theta*`` and the sandwich law
(``sim.asymptotic_covariance``) are computed once; then, for every ``n`` and seed,
``theta_hat_n`` is solved on a multinomial sample (``FiniteEnv.sample(merged=True)``).

A cell is one ``(method, ratio, seed)`` and loops over ``n``. A sample whose solve
raises (a named solver error) gives a row with ``solve_failed = 1`` and NaN results; the
summary counts them.

Columns of ``regimes.csv`` (besides the runner's): ``method``, ``ratio``, ``seed``,
``n``, ``rho0``, ``rho``, ``err_l2 = ||theta_hat - theta*||``, ``at_ref`` (1 when
``theta_hat = theta_ref`` exactly), ``dual`` (``lambda_hat``, ``eta_hat`` for
chi-square), ``dual_zero`` (1 when the dual is 0: ``lambda_hat = 0`` for KL and
Wasserstein), ``z_proj = sqrt(n) (theta_hat - theta*) . u`` (``u`` the leading
eigenvector of the predicted covariance when regular, else of ``Sigma_P``), ``wald``
(Wald statistic, NaN when not regular), ``in_ellipsoid``, ``pred_err_median``,
``regular``, ``norm_star``, ``dual_star``, ``solve_failed``, ``rho0_hat`` (the collapse
radius of the sample itself, ``sim.collapse_radius``) and ``collapse_hat`` (1 when
``rho0_hat <= rho``: then, and only then, ``theta_hat = theta_ref`` is the exact optimum,
a check of the solver independent of it).

``regimes_summary.csv``, per ``(method, ratio, n)``: ``rho0``, ``rho``, ``frac_ref``
(share of ``theta_hat = theta_ref``), ``pred_frac_ref`` (its prediction
``Phi(sqrt(n) (rho - rho_0) / sd)``: ``theta_hat = theta_ref`` exactly when the sample's
collapse radius is at most ``rho``, and that radius is asymptotically normal with the
``sd`` of ``sim.collapse_influence``), ``frac_dual_zero``, ``frac_collapse_hat`` (share of
samples with ``rho0_hat <= rho``, failed solves included), ``n_disagree`` (solved samples
whose ``at_ref`` differs from ``collapse_hat``: wrong answers of the solver), ``err_q10``,
``err_median``, ``err_q90``, ``sqrt_n_err`` (measured median of ``sqrt(n) err``),
``pred_sqrt_n_err`` (sandwich), ``ratio_meas_pred`` with the bootstrap 95% interval ``ratio_lo``,
``ratio_hi`` (seeds resampled), ``shapiro_p`` (Shapiro-Wilk p-value of ``z_proj``;
NaN when fewer than 3 distinct values), ``ellipsoid_coverage``, ``dual_q10``,
``dual_median``, ``dual_q90``, ``regular``, ``n_ok``, ``n_failed``.
``regimes_slopes.csv``, per ``(method, ratio)``: the log-log slope of the RMS error
against ``n`` with its bootstrap interval (:func:`experiments.rates.loglog_slope`).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm, shapiro

import simulator as sim

from . import rates

NAME = "regimes"
DESCRIPTION = ("Where the sqrt(n) Gaussian limit fails (SPEC 5.1): the radius swept through "
               "the collapse radius rho_0 of each robust set; share of theta_hat = theta_ref, "
               "error quantiles, normality test, sandwich prediction and the dual's law.")

METHODS = ("kldpo", "chi2dpo", "wdpo1", "wdpo1k", "wdpo2")
#: ``||theta_hat - theta_ref|| <= AT_REF_TOL`` counts as ``theta_hat = theta_ref``
#: (the dual solver returns theta_ref exactly when it certifies the kink).
AT_REF_TOL = 1e-12
#: A dual variable at most this counts as 0 (``lambda_hat = 0``).
DUAL_ZERO_TOL = 1e-12


def ambiguity(method: str, rho: float, kappa: float) -> sim.AmbiguitySet:
    """``wdpo1k``: Wasserstein p = 1 with finite ``kappa``; the rest as in ``rates``."""
    if method == "wdpo1k":
        return sim.Wasserstein(rho, p=1, kappa=kappa)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return rates.ambiguity(method, rho)


def _env_key(cfg: dict[str, Any]) -> tuple:
    return rates._env_key(cfg) + (("kappa", cfg["kappa"]), ("solver", cfg["solver"]))


@functools.lru_cache(maxsize=64)
def _world(env_key: tuple, method: str, ratio: float):
    """Environment, population, ``rho_0``, ``theta*`` and the sandwich law at one radius."""
    cfg = dict(env_key)
    env = rates.make_env(cfg)
    pop = env.population()
    rho0 = sim.collapse_radius(pop, ambiguity(method, 1.0, cfg["kappa"]), beta=env.beta)
    amb = ambiguity(method, ratio * rho0, cfg["kappa"])
    if ratio >= 1:  # rho >= rho_0: theta_ref is optimal, by the definition of rho_0
        at = sim.robust_objective(env.theta_ref, pop, amb, beta=env.beta,
                                  theta_ref=env.theta_ref)
        star = SimpleNamespace(theta=env.theta_ref.copy(), dual=at.dual)
    else:
        star = sim.solve(pop, amb, beta=env.beta, theta_ref=env.theta_ref, solver=cfg["solver"])
    pred = sim.asymptotic_covariance(pop, amb, beta=env.beta, theta_ref=env.theta_ref,
                                     solution=star)
    basis = pred.cov if pred.regular else pop.coverage()
    u = np.linalg.eigh(basis)[1][:, -1]
    return env, pop, rho0, amb, star, pred, u


@functools.lru_cache(maxsize=4096)
def _sample_collapse(env_key: tuple, method: str, seed: int, n: int) -> float:
    """``rho_0(P_n)``, the collapse radius of the sample itself (the same for every ratio)."""
    cfg = dict(env_key)
    env = rates.make_env(cfg)
    data = env.sample(n, np.random.default_rng([seed, n]), merged=True)
    return sim.collapse_radius(data, ambiguity(method, 1.0, cfg["kappa"]), beta=env.beta)


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per ``(method, ratio, seed)`` (the keys are checked by :func:`validate`)."""
    return [{"method": m, "ratio": float(r), "seed": s}
            for m in cfg["methods"] for r in cfg["ratios"]
            for s in range(cfg["seed"], cfg["seed"] + cfg["n_seeds"])]


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ``n``: error, exact-collapse flags, dual, projection, prediction."""
    env, pop, rho0, amb, star, pred, u = _world(_env_key(cfg), cell["method"], cell["ratio"])
    rows = []
    for n in cfg["n_grid"]:
        data = env.sample(n, np.random.default_rng([cell["seed"], n]), merged=True)
        rho0_hat = _sample_collapse(_env_key(cfg), cell["method"], cell["seed"], n)
        row = {"n": n, "rho0": rho0, "rho": amb.rho, "regular": float(pred.regular),
               "rho0_hat": rho0_hat, "collapse_hat": float(rho0_hat <= amb.rho),
               "norm_star": float(np.linalg.norm(star.theta - env.theta_ref)),
               "dual_star": math.nan if star.dual is None else float(star.dual),
               "pred_err_median": pred.error_quantile(0.5, n) if pred.regular else math.nan}
        try:
            sol = sim.solve(data, amb, beta=env.beta, theta_ref=env.theta_ref,
                            solver=cfg["solver"])
        except RuntimeError:
            rows.append(row | {"solve_failed": 1.0, "err_l2": math.nan, "at_ref": math.nan,
                               "dual": math.nan, "dual_zero": math.nan, "z_proj": math.nan,
                               "wald": math.nan, "in_ellipsoid": math.nan})
            continue
        diff = sol.theta - star.theta
        dual = math.nan if sol.dual is None else float(sol.dual)
        rows.append(row | {
            "solve_failed": 0.0,
            "err_l2": float(np.linalg.norm(diff)),
            "at_ref": float(np.linalg.norm(sol.theta - env.theta_ref) <= AT_REF_TOL),
            "dual": dual,
            "dual_zero": float(abs(dual) <= DUAL_ZERO_TOL) if cell["method"] != "chi2dpo"
            else math.nan,
            "z_proj": float(math.sqrt(n) * diff @ u),
            "wald": pred.wald_statistic(sol.theta, n),
            "in_ellipsoid": float(pred.in_ellipsoid(sol.theta, n)) if pred.regular
            else math.nan,
        })
    return rows


def _shapiro(z: np.ndarray) -> float:
    z = z[np.isfinite(z)]
    if np.unique(z).size < 3:
        return math.nan
    return float(shapiro(z).pvalue)


def summarize(df: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``regimes_summary`` per ``(method, ratio, n)`` and ``regimes_slopes`` per
    ``(method, ratio)`` (RMS slope rule of ``rates``)."""
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    pop = rates.make_env(cfg).population()
    collapse = {m: sim.collapse_influence(pop, ambiguity(m, 1.0, cfg["kappa"]))
                for m in df["method"].unique()}
    out, slopes = [], []
    for (method, ratio), g in df.groupby(["method", "ratio"], sort=False):
        ok = g[g["solve_failed"] == 0]
        rho0, infl = collapse[method]
        sd = math.sqrt(float(pop.weights @ infl**2))
        for n, h in g.groupby("n"):
            k = h[h["solve_failed"] == 0]
            err = k["err_l2"].to_numpy()
            q = np.quantile(err, [0.1, 0.5, 0.9]) if err.size else [math.nan] * 3
            dq = (np.quantile(k["dual"], [0.1, 0.5, 0.9]) if k["dual"].notna().any()
                  else [math.nan] * 3)
            pred = float(h["pred_err_median"].iloc[0] * math.sqrt(n))
            meas = float(q[1] * math.sqrt(n))
            lo, hi = (rates._median_interval(err * math.sqrt(n), cfg["n_boot"], cfg["seed"])
                      if err.size else (math.nan, math.nan))
            out.append({
                "method": method, "ratio": ratio, "n": int(n),
                "rho0": float(h["rho0"].iloc[0]), "rho": float(h["rho"].iloc[0]),
                "frac_ref": float(k["at_ref"].mean()) if len(k) else math.nan,
                "pred_frac_ref": float(norm.cdf(math.sqrt(n) * (ratio - 1) * rho0 / sd)),
                "frac_dual_zero": float(k["dual_zero"].mean()) if len(k) else math.nan,
                "frac_collapse_hat": float(h["collapse_hat"].mean()),
                "n_disagree": int((k["at_ref"] != k["collapse_hat"]).sum()),
                "err_q10": q[0], "err_median": q[1], "err_q90": q[2],
                "sqrt_n_err": meas, "pred_sqrt_n_err": pred,
                "ratio_meas_pred": meas / pred if pred > 0 else math.nan,
                "ratio_lo": lo / pred if pred > 0 else math.nan,
                "ratio_hi": hi / pred if pred > 0 else math.nan,
                "shapiro_p": _shapiro(k["z_proj"].to_numpy()),
                "ellipsoid_coverage": float(k["in_ellipsoid"].mean()) if len(k) else math.nan,
                "dual_q10": dq[0], "dual_median": dq[1], "dual_q90": dq[2],
                "regular": bool(h["regular"].iloc[0]),
                "n_ok": len(k), "n_failed": int(h["solve_failed"].sum()),
            })
        table = ok.pivot_table(index="seed", columns="n", values="err_l2").dropna()
        slope, lo, hi = rates.loglog_slope(table.columns.to_numpy(), table.to_numpy(),
                                           cfg["n_boot"], cfg["seed"])
        slopes.append({"method": method, "ratio": ratio, "slope": slope, "slope_lo": lo,
                       "slope_hi": hi, "slope_note": rates._slope_note(table),
                       "n_seeds": int(table.shape[0])})
    return {"regimes_summary": pd.DataFrame(out), "regimes_slopes": pd.DataFrame(slopes)}


def validate(cfg: dict[str, Any]) -> None:
    """Check every key before any cell runs (:mod:`experiments.validation`)."""
    from . import validation as v

    v.check(cfg, {"methods": v.one_of(*METHODS), "ratios": v.POSITIVE,
                  "n_grid": v.POSITIVE_INT, "n_boot": v.POSITIVE_INT, "kappa": v.POSITIVE,
                  "solver": v.one_of(*v.SOLVERS), **v.ENV_SCHEMA})
