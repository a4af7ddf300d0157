"""The ``approx`` experiment: scalable surrogates against exact robust optima (SPEC 4, 6).

The world is ``FiniteEnv.random(n_states, n_actions, dim, beta, seed=env_seed,
theta_norm)``; the data are its exact population (``n_data = 0``) or an i.i.d.
sample. Three sweeps, one cell per point:

``radius``
    every surrogate of ``radius_surrogates`` against its exact problem
    (``wdpo-gr``, ``wdpo-sq``: Wasserstein p = 2; ``kl-var``, ``kldpo-tau``,
    ``kldpo-clip``: KL; ``chi2-var``: chi-square) at each radius of ``rhos``, full
    batch; the KL temperature is calibrated, ``tau = lambda*(rho)``.
``tau``
    the KL surrogates at ``tau = tau_factor * lambda*(tau_rho)``.
``batch``
    the mini-batch fixed point (:func:`simulator.optim.batch_fixed_point`,
    ``batch_samples // B`` Monte Carlo batches of size ``B``) against the
    full-batch solution, at ``batch_rho``; ``batch_size = 0`` is full batch.

Rows (``approx.csv``) carry the cell (``sweep, surrogate, rho, tau_factor,
batch_size, seed``), the :class:`simulator.approx_check.ApproximationReport`
fields (``param_distance, exact_value, value_at_approx, price,
surrogate_value_at_exact, value_gap, dual_exact, implied_radius, converged``,
``param_<name>`` for each surrogate parameter), ``ambiguity`` and, in the batch
sweep, ``bias`` (distance between the mini-batch and full-batch fixed points),
``n_batches`` and ``time_s``. ``approx_summary.csv``: the fitted log-log orders
(see :func:`summarize`).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import pandas as pd

import simulator as sim
from simulator.approx_check import check_approximation
from simulator.optim import batch_fixed_point
from simulator.surrogates import SURROGATES, get_surrogate

from .runner import add_failed_count
from .validation import ENV_SCHEMA, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, check, one_of

NAME = "approx"
DESCRIPTION = ("Scalable approximations (SPEC 4): each surrogate's solution against the exact "
               "robust optimum over a radius grid, a KL temperature grid and mini-batch sizes; "
               "parameter distance, price on the exact objective, fitted orders. "
               "--check prints the report of one setting.")

#: order in rho of the parameter distance / value gap that SPEC 4 predicts (None: exact)
EXPECTED_ORDER = {"wdpo-gr": 2.0, "wdpo-sq": 1.0, "kl-var": 1.0, "chi2-var": None,
                  "kldpo-tau": None, "kldpo-clip": None}
#: distances below this count as zero (solver precision) when fitting orders
ZERO = 1e-7


#: the exact problem of each kind of surrogate (Wasserstein: p = 2, as in SPEC 4)
_ROBUST_TO = {"KL": sim.KL, "ChiSquare": sim.ChiSquare,
              "Wasserstein": functools.partial(sim.Wasserstein, p=2)}


def ambiguity_for(surrogate: str, rho: float) -> sim.AmbiguitySet:
    """The exact problem a surrogate approximates, at radius ``rho``."""
    kind = get_surrogate(surrogate).robust_to
    if kind in _ROBUST_TO:
        return _ROBUST_TO[kind](rho)
    raise ValueError(f"surrogate must approximate a KL, chi-square or Wasserstein ball, "
                     f"got {surrogate!r}")


@functools.lru_cache(maxsize=4)
def _data(key: tuple) -> sim.PreferenceData:
    cfg = dict(key)
    env = sim.FiniteEnv.random(cfg["n_states"], cfg["n_actions"], cfg["dim"], cfg["beta"],
                               seed=cfg["env_seed"], theta_norm=cfg["theta_norm"])
    return env.population() if cfg["n_data"] == 0 else env.sample(cfg["n_data"],
                                                                  seed=cfg["data_seed"])


def data_for(cfg: dict[str, Any]) -> sim.PreferenceData:
    """The data set of the configuration (cached per process)."""
    return _data(tuple(sorted((k, cfg[k]) for k in ("n_states", "n_actions", "dim", "beta",
                                                    "env_seed", "theta_norm", "n_data",
                                                    "data_seed"))))


def validate(cfg: dict[str, Any]) -> None:
    """Check every key before any cell runs (:mod:`experiments.validation`).

    A sweep is skipped by giving it no surrogate (e.g. ``--tau-surrogates ''``).
    """
    robust = [s for s, spec in SURROGATES.items() if spec.robust_to in _ROBUST_TO]
    tempered = [s for s in robust if "tau" in SURROGATES[s].defaults]
    check(cfg, {"radius_surrogates": one_of(*robust).or_empty(),
                "tau_surrogates": one_of(*tempered).or_empty(),
                "batch_surrogates": one_of(*robust).or_empty(),
                "rhos": POSITIVE, "fit_max_rho": POSITIVE, "tau_rho": POSITIVE,
                "tau_factors": POSITIVE, "batch_rho": POSITIVE,
                "batch_sizes": NONNEGATIVE_INT, "batch_samples": POSITIVE_INT,
                "batch_fit_max": POSITIVE_INT, "n_data": NONNEGATIVE_INT,
                "data_seed": NONNEGATIVE_INT, **ENV_SCHEMA})


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The three sweeps; every cell has ``sweep, surrogate, rho, tau_factor, batch_size, seed``."""
    cell = functools.partial(dict, seed=cfg["seed"])
    return ([cell(sweep="radius", surrogate=s, rho=float(r), tau_factor=1.0, batch_size=0)
             for s in cfg["radius_surrogates"] for r in cfg["rhos"]]
            + [cell(sweep="tau", surrogate=s, rho=float(cfg["tau_rho"]), tau_factor=float(f),
                    batch_size=0)
               for s in cfg["tau_surrogates"] for f in cfg["tau_factors"]]
            + [cell(sweep="batch", surrogate=s, rho=float(cfg["batch_rho"]), tau_factor=1.0,
                    batch_size=int(b))
               for s in cfg["batch_surrogates"] for b in cfg["batch_sizes"]])


def _tau_params(surrogate: str, factor: float, data, amb, beta) -> dict:
    if "tau" not in SURROGATES[surrogate].defaults or factor == 1.0:
        return {}  # check_approximation calibrates tau = lambda*
    lam = sim.solve(data, amb, beta=beta, solver="dual").dual
    if lam is None or not lam > 0:
        raise ValueError(f"rho = {amb.rho!r} gives lambda* = {lam!r}: no temperature to calibrate")
    return {"tau": factor * float(lam)}


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row: the approximation report of the cell (plus the bias in the batch sweep)."""
    t0 = time.perf_counter()
    data, beta = data_for(cfg), cfg["beta"]
    amb = ambiguity_for(cell["surrogate"], cell["rho"])
    given = _tau_params(cell["surrogate"], cell["tau_factor"], data, amb, beta)
    rep = check_approximation(data, amb, cell["surrogate"], beta=beta, **given)
    row = {"ambiguity": amb.name, **rep.as_row(), "bias": 0.0, "n_batches": 0}
    if cell["batch_size"] > 0:
        n_batches = max(1, cfg["batch_samples"] // cell["batch_size"])
        fp = batch_fixed_point(data, cell["surrogate"], cell["batch_size"], beta,
                               n_batches=n_batches, seed=cell["seed"],
                               theta0=rep.theta_approx, **rep.params)
        if not fp.converged:
            raise RuntimeError(f"batch fixed point did not converge: {fp.info['root']}")
        row.update(bias=float(np.linalg.norm(fp.theta - rep.theta_approx)),
                   param_distance=float(np.linalg.norm(fp.theta - rep.theta_exact)),
                   n_batches=n_batches)
    for k in ("rho", "surrogate"):  # already in the cell columns
        row.pop(k)
    row["time_s"] = time.perf_counter() - t0
    return [row]


def _slope(x, y) -> tuple[float, int]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (y > ZERO) & (x > 0) & np.isfinite(y)
    if keep.sum() < 2:
        return float("nan"), int(keep.sum())
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0]), int(keep.sum())


def summarize(df: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``approx_summary``: fitted log-log orders per sweep and surrogate.

    ``radius``: least-squares slopes of ``log param_distance`` and of
    ``log |value_gap|`` against ``log rho`` over the radii ``<= fit_max_rho``
    where the quantity exceeds ``1e-7`` (``expected_order``: SPEC 4; empty for
    surrogates that are exact there). ``batch``: slope of ``log bias`` against
    ``log B`` over ``0 < B <= batch_fit_max`` (expected -1: SPEC 4 states it for
    ``kldpo-tau``). ``tau``: no fit. Every row: ``n_cells``, the largest
    ``param_distance`` and ``price``, and ``n_failed`` (failed cells, left out).
    """
    rows = []
    for (sweep, sur), g in df.groupby(["sweep", "surrogate"], sort=False):
        row = {"sweep": sweep, "surrogate": sur, "n_cells": len(g),
               "max_param_distance": float(g["param_distance"].max()),
               "max_price": float(g["price"].max())}
        if sweep == "radius":
            small = g[g["rho"] <= cfg["fit_max_rho"]]
            row["slope_param_distance"], row["n_fit"] = _slope(small["rho"],
                                                               small["param_distance"])
            row["slope_value_gap"], _ = _slope(small["rho"], small["value_gap"].abs())
            row["expected_order"] = EXPECTED_ORDER.get(sur)
        elif sweep == "batch":
            fit = g[(g["batch_size"] > 0) & (g["batch_size"] <= cfg["batch_fit_max"])]
            row["slope_bias"], row["n_fit"] = _slope(fit["batch_size"], fit["bias"])
            row["expected_order"] = -1.0
        rows.append(row)
    return {"approx_summary": add_failed_count(pd.DataFrame(rows), df, ["sweep", "surrogate"])}


def add_arguments(parser) -> None:
    """``--check`` mode: the report of one setting (SPEC 4 against SPEC 3)."""
    parser.add_argument("--check", action="store_true",
                        help="print sim.check_approximation for one setting instead of the grid")
    parser.add_argument("--surrogate", default="kldpo-tau", choices=sorted(SURROGATES),
                        help="surrogate to check")
    parser.add_argument("--rho", type=float, default=0.1, help="radius of the exact problem")
    parser.add_argument("--tau", type=float, default=None,
                        help="KL temperature (default: calibrated to lambda*(rho))")
    parser.add_argument("--p", type=float, default=None, help="wdpo-gr: Wasserstein order p")
    parser.add_argument("--view", choices=("pair", "x"), default=None,
                        help="wdpo-sq: gradient w.r.t. both responses (pair) or x")
    parser.add_argument("--clip", type=float, default=None, help="kldpo-clip: weight cap")
    parser.add_argument("--beta-prime", type=float, default=None, help="drdpo: beta'")
    parser.add_argument("--ambiguity", choices=sim.METHOD_NAMES[1:], default=None,
                        help="exact problem (default: the one the surrogate approximates; "
                             "needed for drdpo and dpo)")


def run_special(args, cfg: dict[str, Any]) -> bool:
    """With ``--check``: print the report for the flags' setting and return True."""
    if not getattr(args, "check", False):
        return False
    if args.ambiguity is None:
        if SURROGATES[args.surrogate].robust_to == "Nominal":
            raise ValueError(f"surrogate {args.surrogate!r} approximates no ambiguity set: "
                             f"give --ambiguity {'|'.join(sim.METHOD_NAMES[1:])}")
        amb = ambiguity_for(args.surrogate, args.rho)
    else:
        amb = sim.AmbiguitySet.from_name(args.ambiguity, args.rho)
    given = {k: v for k, v in (("tau", args.tau), ("p", args.p), ("view", args.view),
                               ("clip", args.clip), ("beta_prime", args.beta_prime))
             if v is not None}
    data = data_for(cfg)
    print(f"data: {data.n} atoms, d = {data.d}, beta = {cfg['beta']}")
    print(check_approximation(data, amb, args.surrogate, beta=cfg["beta"], **given))
    return True

