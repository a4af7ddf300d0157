"""The ``constants`` experiment: how the sqrt(n) error constant and the bounds scale (SPEC 5).

One parameter at a time is moved around the default world of ``rates``: the temperature
``beta``, the parameter norm ``theta_norm`` (``B``), the coverage (``coverage_scale``,
which shrinks the last feature coordinate, ``FiniteEnv.random``) and the radius ``rho``.
For each value, method and seed, one sample of ``n`` pairs is solved exactly and the
row of :func:`experiments.rates.run_cell` is kept (error, sandwich prediction, slow-rate
and plug-in fast-rate bounds, growth constants).

A cell is one ``(param, value, method, seed)``. Columns of ``constants.csv``: the
columns of ``rates.csv`` plus ``param``, ``value``, ``lambda_min``
(``lambda_min(Sigma_P)``) and ``paper_gamma`` (``theory.strong_convexity(beta, B,
lambda_min)``, the paper's ``gamma = beta^2 lambda e^{4 beta B} / (1 + e^{4 beta B})^2``).

``constants_summary.csv``, per ``(param, value, method)``: ``lambda_min``, ``gamma``
(growth at theta*), ``paper_gamma``, ``err_sqrt_n`` (measured median of ``sqrt(n)
err_l2``) with a bootstrap interval ``err_sqrt_n_lo``/``_hi``, ``pred_sqrt_n_err``
(sandwich), ``ratio`` (measured / predicted), ``slow_const`` (median of ``n^{1/4}
bound``, the constant in front of the slow rate), ``paper_const`` (``1 /
sqrt(paper_gamma)``), ``fast_sqrt_n`` (median of ``sqrt(n) bound_fast``),
``frac_exact``, ``n_seeds``, ``n_failed``. ``constants_scaling.csv``, per ``(param,
method)``: the factor by which each constant grows from the first to the last value of
the sweep as configured (``*_factor``; the coverage sweep runs from the default
``coverage_scale = 1`` down).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from simulator import theory

from . import rates

NAME = "constants"
DESCRIPTION = ("How the constants scale (SPEC 5): beta, B (theta_norm), coverage and rho "
               "swept one at a time around the default world; the measured sqrt(n) error "
               "constant against the sandwich prediction and the bounds' constants.")

PARAMS = ("beta", "theta_norm", "coverage_scale", "rho")
#: Constants whose growth across each sweep is tabulated in ``constants_scaling``.
SCALED = ("err_sqrt_n", "pred_sqrt_n_err", "slow_const", "paper_const", "fast_sqrt_n")


def _sweeps(cfg: dict[str, Any]) -> dict[str, list[float]]:
    return {p: [float(v) for v in cfg[f"{p}_values"]] for p in PARAMS}


def _rates_cfg(cfg: dict[str, Any], param: str, value: float) -> dict[str, Any]:
    """The ``rates`` configuration of one sweep point (one ``n``, fixed radius)."""
    out = dict(cfg, n_grid=[cfg["n"]], schedule_c=0.0, schedule_a=0.5)
    if param != "rho":
        out[param] = value
    return out


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per ``(param, value, method, seed)``; ``dpo`` is left out of the rho sweep
    (the keys are checked by :func:`validate`)."""
    out = []
    for param, values in _sweeps(cfg).items():
        for value in values:
            for method in cfg["methods"]:
                if method == "dpo" and param == "rho":
                    continue
                for seed in range(cfg["seed"], cfg["seed"] + cfg["n_seeds"]):
                    out.append({"param": param, "value": value, "method": method,
                                "seed": seed})
    return out


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``rates`` row of one sample, with the coverage and the paper's gamma."""
    rc = _rates_cfg(cfg, cell["param"], cell["value"])
    rho = 0.0 if cell["method"] == "dpo" else (
        cell["value"] if cell["param"] == "rho" else cfg["rho"])
    rows = rates.run_cell({"method": cell["method"], "rho": rho, "seed": cell["seed"]}, rc)
    lam = rates.make_env(rc).lambda_min()
    for row in rows:
        row.pop("rho_n", None)
        row["rho"] = rho
        row["lambda_min"] = lam
        row["paper_gamma"] = theory.strong_convexity(rc["beta"], row["B"], lam)
    return rows


def summarize(df: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``constants_summary`` per ``(param, value, method)`` and ``constants_scaling``."""
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    expected = pd.DataFrame(cells(cfg)).groupby(["param", "value", "method"]).size()
    out = []
    for (param, value, method), g in df.groupby(["param", "value", "method"], sort=False):
        n = g["n"].to_numpy(dtype=float)
        scaled = g["err_l2"].to_numpy() * np.sqrt(n)
        lo, hi = rates._median_interval(scaled, cfg["n_boot"], cfg["seed"])
        pred = float(np.median(g["pred_err_median"] * np.sqrt(n)))
        meas = float(np.median(scaled))
        paper_gamma = float(np.median(g["paper_gamma"]))
        out.append({
            "param": param, "value": value, "method": method,
            "lambda_min": float(g["lambda_min"].iloc[0]), "gamma": float(np.median(g["gamma"])),
            "paper_gamma": paper_gamma, "err_sqrt_n": meas, "err_sqrt_n_lo": lo,
            "err_sqrt_n_hi": hi, "pred_sqrt_n_err": pred,
            "ratio": meas / pred if pred > 0 else math.nan,
            "slow_const": float(np.median(g["bound"] * n**0.25)),
            "paper_const": 1 / math.sqrt(paper_gamma) if paper_gamma > 0 else math.inf,
            "fast_sqrt_n": float(np.median(g["bound_fast"] * np.sqrt(n))),
            "frac_exact": float(np.mean(g["err_l2"] == 0.0)),
            "n_seeds": int(g["seed"].nunique()),
            "n_failed": int(expected.get((param, value, method), 0) - g["seed"].nunique()),
        })
    summary = pd.DataFrame(out)
    scaling = []
    sweeps = _sweeps(cfg)
    for (param, method), g in summary.groupby(["param", "method"], sort=False):
        g = g.set_index("value").reindex(sweeps[param]).dropna(subset=["method"]).reset_index()
        row = {"param": param, "method": method, "from": g["value"].iloc[0],
               "to": g["value"].iloc[-1]}
        for key in SCALED:
            row[f"{key}_factor"] = float(g[key].iloc[-1] / g[key].iloc[0])
        scaling.append(row)
    return {"constants_summary": summary, "constants_scaling": pd.DataFrame(scaling)}


def validate(cfg: dict[str, Any]) -> None:
    """Check every key before any cell runs (:mod:`experiments.validation`)."""
    from . import validation as v

    v.check(cfg, {"methods": v.one_of(*rates.METHODS), "beta_values": v.POSITIVE,
                  "theta_norm_values": v.NONNEGATIVE, "coverage_scale_values": v.POSITIVE,
                  "rho_values": v.POSITIVE, "n": v.POSITIVE_INT, "rho": v.POSITIVE,
                  "coverage_scale": v.POSITIVE,
                  "delta": v.PROBABILITY, "n_boot": v.POSITIVE_INT,
                  "solver": v.one_of(*v.SOLVERS), "shift_noise": v.UNIT_INTERVAL,
                  **v.ENV_SCHEMA})
