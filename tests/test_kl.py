"""The KL inner minimisation over ``lambda`` (SPEC 3.1): the slope that predicts
``lambda*`` along Newton's steps against finite differences, the blocked tilt against one
block."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest

import simulator as sim
from simulator.solvers import kl
from simulator.solvers.inner import Atoms, evaluate_inner


def _atoms(n=4000, d=3, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-x @ np.array([1.0, -0.5, 0.3])))).astype(float)
    at = Atoms.from_data(sim.PreferenceData(x, y), 1.0, normalise=True)
    return at, np.array([0.8, -0.4, 0.25])


def test_slope_is_the_derivative_of_log_inverse_lambda():
    """The slope ``d log(1 / lambda*) / d delta = -Cov_Q(grad l, l) / Var_Q l`` that the
    Hessian leaves in the state matches central differences of ``lambda*`` itself."""
    at, delta = _atoms()
    amb = sim.KL(0.15)
    res = evaluate_inner(at, delta, amb, hess=True, worst=False)
    res.hess()
    slope = res.state.warm.slope
    h = 1e-5
    for j in range(delta.size):
        e = np.zeros_like(delta)
        e[j] = h
        up = evaluate_inner(at, delta + e, amb, worst=False).dual
        down = evaluate_inner(at, delta - e, amb, worst=False).dual
        fd = (math.log(1.0 / up) - math.log(1.0 / down)) / (2.0 * h)
        assert slope[j] == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_predicted_start_needs_one_halley_step(monkeypatch):
    """From the state at ``delta`` (with its slope), the root search at a point a small
    step away starts within the second-order error of ``lambda*``: one Halley step and the
    tilt that confirms it, and the same ``lambda*`` as a cold search."""
    at, delta = _atoms()
    amb = sim.KL(0.15)
    res = evaluate_inner(at, delta, amb, hess=True, worst=False)
    res.hess()
    spy = mock.Mock(wraps=kl._tilt)
    monkeypatch.setattr(kl, "_tilt", spy)
    step = np.array([3e-3, -2e-3, 1e-3])
    warm = evaluate_inner(at, delta + step, amb, hess=True, worst=False, state=res.state)
    assert spy.call_count <= 2
    cold = evaluate_inner(at, delta + step, amb, hess=True, worst=False)
    assert warm.dual == pytest.approx(cold.dual, rel=1e-12)
    assert warm.value == pytest.approx(cold.value, rel=1e-15)


def test_blocked_tilt_matches_one_block(monkeypatch):
    """The tilt in blocks of 64 atoms (block sums added exactly) gives the evaluation of one
    block over all atoms."""
    at, delta = _atoms()
    amb = sim.KL(0.15)
    one = evaluate_inner(at, delta, amb, hess=True, worst=True)
    monkeypatch.setattr(kl, "_BLOCK", 64)
    many = evaluate_inner(at, delta, amb, hess=True, worst=True)
    assert many.dual == pytest.approx(one.dual, rel=1e-13)
    assert many.value == pytest.approx(one.value, rel=1e-15)
    np.testing.assert_allclose(many.worst_case.weights, one.worst_case.weights, rtol=1e-12,
                               atol=1e-20)
