"""The KL inner minimisation over ``lambda`` (SPEC 3.1): the prediction of ``lambda*``
from the last evaluation against ``lambda*`` itself, the blocked tilt against one block."""

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


def test_predicted_lambda_is_first_order_accurate():
    """The start of the root search from the state at ``delta`` (its losses and worst case),
    ``log s + Cov_Q(l, dl) / Var_Q l`` removed, against ``lambda*`` itself a step away: the
    error falls fourfold when the step halves (second order), and is far below the step's
    first-order change of ``log(1 / lambda*)``."""
    at, delta = _atoms()
    amb = sim.KL(0.15)
    res = evaluate_inner(at, delta, amb, worst=False)
    direction = np.array([1.0, -0.6, 0.4])
    errors, moves = [], []
    for h in (2e-2, 1e-2, 5e-3):
        new = delta + h * direction
        l = evaluate_inner(at, new, amb, worst=False).losses
        z = l - l.max()
        guess = kl._first_guess(res.state, at.w, l, z, amb.rho, res.state.warm)
        truth = 1.0 / evaluate_inner(at, new, amb, worst=False).dual
        errors.append(abs(math.log(guess) - math.log(truth)))
        moves.append(abs(math.log(truth) + math.log(res.dual)))
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.25)
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.25)
    assert max(e / m for e, m in zip(errors, moves, strict=True)) < 0.1


def test_predicted_start_needs_one_halley_step(monkeypatch):
    """From the state at ``delta`` (its losses and worst case), the root search at a point a
    small step away starts within the second-order error of ``lambda*``: one Halley step and
    the tilt that confirms it, and the same ``lambda*`` as a cold search."""
    at, delta = _atoms()
    amb = sim.KL(0.15)
    res = evaluate_inner(at, delta, amb, hess=True, worst=False)
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
