"""Shared fixtures of the test suite: random problem generators used by several files."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

import simulator as sim


def make_case(seed: int, kind: str):
    """A random problem: size, dimension, weights, beta, reference and radius all vary."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 6))
    n = int(rng.choice([30, 100, 300]))
    beta = float(rng.uniform(0.3, 2.0))
    theta_true = rng.normal(size=d) * rng.uniform(1.0, 4.0)
    x = rng.normal(size=(n, d))
    x *= rng.uniform(0.2, 2.0) / np.maximum(1.0, np.linalg.norm(x, axis=1))[:, None]
    y = (rng.uniform(size=n) < expit(beta * x @ theta_true)).astype(float)
    w = rng.dirichlet(np.ones(n) * rng.uniform(0.5, 5.0)) if seed % 2 else None
    ref = rng.normal(size=d) * 0.3 if seed % 3 else None
    rho = float(np.exp(rng.uniform(np.log(0.005), np.log(0.5))))
    kappa = float(rng.uniform(0.2, 3.0))
    amb = {"dpo": sim.Nominal(), "kldpo": sim.KL(rho), "chi2dpo": sim.ChiSquare(rho),
           "wdpo1": sim.Wasserstein(rho / 3, p=1),
           "wdpo1_kappa": sim.Wasserstein(rho / 3, p=1, kappa=kappa)}[kind]
    return sim.PreferenceData(x, y, w), amb, beta, ref


def make_gaussian(n, d=4, seed=0, beta=1.0):
    """Gaussian features and labels drawn from a logistic model with a random parameter."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = (rng.random(n) < expit(beta * x @ rng.standard_normal(d) * 2.0)).astype(float)
    return sim.PreferenceData(x, y)

@pytest.fixture
def random_case():
    """``make_case(seed, kind) -> (data, ambiguity, beta, theta_ref)``: a random problem of
    kind ``dpo``, ``kldpo``, ``chi2dpo``, ``wdpo1`` or ``wdpo1_kappa``."""
    return make_case


@pytest.fixture
def gaussian_data():
    """``make_gaussian(n, d=4, seed=0, beta=1.0)``: Gaussian features, logistic labels."""
    return make_gaussian
