"""The ``shift`` experiment: train on one preference mixture, test on others (SPEC 2, 6).

Two reward tables on the same world: ``r_1`` (realizable, from ``theta_true``) and
``r_2`` (realizable from ``theta_2``, of the same norm, at the angle ``shift_angle``
from ``theta_true`` in a random plane). The
training preferences follow the mixture ``r_alpha = alpha r_1 + (1 - alpha) r_2`` at
``alpha = alpha_train`` (``env.reward_mixture``, the paper's Emotion/ArmoRM shift);
each method (DPO, KLDPO, chi2-DPO, WDPO p=1, 2) is trained at every radius of the grid
on ``n_train`` samples (or on the exact training population when ``n_train = 0``),
and the learned policy is evaluated on the exact test population of every
``alpha_test``.

A cell is one ``(method, rho, seed)``; it returns one row per ``alpha_test`` with
``test_logloss`` (population DPO loss ``E softplus(-m)`` under the test mixture),
``test_accuracy`` (population share of pairs whose preferred action gets the larger
implicit reward; ties count one half), ``test_reward`` (``env.expected_reward`` of
``pi_theta`` under ``r_alpha_test``), ``test_reward_ref`` (the same for ``pi_ref``)
and ``norm`` (``||theta||``). ``shift_summary.csv``: per ``(method, rho)`` the mean
over seeds of the in-distribution values (``alpha_test = alpha_train``) and of the
worst values over the ``alpha_test`` grid (largest loss, smallest accuracy and reward),
and ``n_failed``, the number of failed cells of the row (left out of the means).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pandas as pd

import simulator as sim
from simulator.losses import dpo_loss, margins

from .rates import METHODS, ambiguity
from .runner import add_failed_count
from .validation import (
    ENV_SCHEMA,
    NONNEGATIVE_INT,
    POSITIVE,
    SOLVERS,
    UNIT_INTERVAL,
    check,
    in_range,
    one_of,
)

NAME = "shift"
DESCRIPTION = ("Preference shift (SPEC 2, 6): train DPO, KLDPO, chi2-DPO and WDPO on one "
               "reward mixture alpha_train r_1 + (1 - alpha_train) r_2 over a radius grid, "
               "evaluate test log-loss, accuracy and expected reward on other mixtures.")


@functools.lru_cache(maxsize=8)
def _worlds(env_key: tuple) -> tuple[sim.FiniteEnv, np.ndarray]:
    cfg = dict(env_key)
    env = sim.FiniteEnv.random(cfg["n_states"], cfg["n_actions"], cfg["dim"], cfg["beta"],
                               seed=cfg["env_seed"], theta_norm=cfg["theta_norm"])
    u = env.theta_true / np.linalg.norm(env.theta_true)
    v = np.random.default_rng([cfg["env_seed"], 2]).standard_normal(env.dim)
    v -= (v @ u) * u
    angle = np.deg2rad(cfg["shift_angle"])
    theta_2 = cfg["theta_norm"] * (np.cos(angle) * u + np.sin(angle) * v / np.linalg.norm(v))
    return env, sim.realizable_reward(env.features, theta_2, cfg["beta"], env.theta_ref)


def _env_key(cfg: dict[str, Any]) -> tuple:
    return tuple(sorted((k, cfg[k]) for k in ("n_states", "n_actions", "dim", "beta",
                                              "env_seed", "theta_norm", "shift_angle")))


def mixture_env(cfg: dict[str, Any], alpha: float) -> sim.FiniteEnv:
    """The world with reward ``alpha r_1 + (1 - alpha) r_2``."""
    env, r2 = _worlds(_env_key(cfg))
    return env.reward_mixture(r2, alpha)


def validate(cfg: dict[str, Any]) -> None:
    """Check every key before any cell runs (:mod:`experiments.validation`)."""
    check(cfg, {"methods": one_of(*METHODS), "rhos": POSITIVE,
                "alpha_train": UNIT_INTERVAL, "alpha_test": UNIT_INTERVAL,
                "n_train": NONNEGATIVE_INT, "solver": one_of(*SOLVERS),
                "shift_angle": in_range(0, 180, closed=True), **ENV_SCHEMA})


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per ``(method, rho, seed)``; ``dpo`` only at ``rho = 0``."""
    n_seeds = 1 if cfg["n_train"] == 0 else cfg["n_seeds"]
    return [{"method": m, "rho": float(rho), "seed": s}
            for m in cfg["methods"] for rho in ([0.0] if m == "dpo" else cfg["rhos"])
            for s in range(cfg["seed"], cfg["seed"] + n_seeds)]


def evaluate(theta: np.ndarray, env: sim.FiniteEnv) -> dict[str, float]:
    """Population log-loss, accuracy and expected reward of ``pi_theta`` on ``env``."""
    pop = env.population()
    m = margins(theta, pop.x, pop.y, env.beta, env.theta_ref)
    acc = np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))
    return {"test_logloss": float(pop.weights @ dpo_loss(m)),
            "test_accuracy": float(pop.weights @ acc),
            "test_reward": env.expected_reward(theta),
            "test_reward_ref": env.expected_reward(env.theta_ref)}


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train at ``alpha_train``; one row per ``alpha_test``."""
    train = mixture_env(cfg, cfg["alpha_train"])
    data = (train.population() if cfg["n_train"] == 0
            else train.sample(cfg["n_train"], np.random.default_rng([cell["seed"], 1])))
    sol = sim.solve(data, ambiguity(cell["method"], cell["rho"]), beta=cfg["beta"],
                    solver=cfg["solver"])
    return [{"alpha_test": float(a), **evaluate(sol.theta, mixture_env(cfg, a)),
             "norm": float(np.linalg.norm(sol.theta)), "dual": sol.dual,
             "solve_time_s": sol.solve_time_s}
            for a in cfg["alpha_test"]]


def summarize(df: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``shift_summary``: in-distribution and worst-case test metrics per method and radius."""
    alphas = np.asarray(sorted(df["alpha_test"].unique()))
    a_in = float(alphas[np.argmin(np.abs(alphas - cfg["alpha_train"]))])
    per_seed = df.groupby(["method", "rho", "seed"], sort=False).agg(
        worst_logloss=("test_logloss", "max"), worst_accuracy=("test_accuracy", "min"),
        worst_reward=("test_reward", "min"))
    ind = df[np.isclose(df["alpha_test"], a_in)].set_index(["method", "rho", "seed"])[
        ["test_logloss", "test_accuracy", "test_reward"]].rename(
        columns=lambda c: c.replace("test_", "in_"))
    per = ind.join(per_seed).reset_index()
    metrics = [c for c in per.columns if c.startswith(("in_", "worst_"))]
    table = per.groupby(["method", "rho"], sort=False).agg(
        **{c: (c, "mean") for c in metrics}, n_seeds=("seed", "nunique")).reset_index()
    table.insert(2, "alpha_in", a_in)
    return {"shift_summary": add_failed_count(table, df, ["method", "rho"])}
