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


def test_losses_are_dpo_loss_bit_for_bit():
    """KL's own losses (in a recycled vector) are :func:`simulator.losses.dpo_loss`'s, bit for
    bit, over margins from -800 to 800."""
    from simulator.losses import dpo_loss
    from simulator.solvers.core import Workspace

    m = np.concatenate([np.linspace(-800, 800, 20001), np.geomspace(1e-300, 1e3, 2000),
                        -np.geomspace(1e-300, 1e3, 2000), [0.0, -0.0]])
    l, drift = kl._losses(m, Workspace())
    np.testing.assert_array_equal(l, dpo_loss(m))
    assert drift is None  # no last evaluation to drift from


def test_first_guess_sums_in_the_losses_pass_match_their_own_pass():
    """The first guess's ``Var_Q l`` and ``Cov_Q(l, dl)`` summed in the pass of the losses
    (blocks of 16384) against their own pass (blocks of 65536), from the state of an
    evaluation a step away, to rounding; and the guess made from either is the same."""
    at, delta = _atoms(n=50_000)
    amb = sim.KL(0.15)
    res = evaluate_inner(at, delta, amb, worst=False)
    m = at.matvec(delta + np.array([2e-2, -1e-2, 5e-3]))
    l, drift = kl._losses(m, res.state.warm, res.state)
    own = kl._drift_moments(res.state, l, res.state.warm)
    assert drift[0] == pytest.approx(own[0], rel=1e-13)
    assert drift[1] == pytest.approx(own[1], rel=1e-12)
    z = l - l.max()
    assert kl._first_guess(res.state, at.w, l, z, amb.rho, res.state.warm, drift) == (
        pytest.approx(kl._first_guess(res.state, at.w, l, z, amb.rho, res.state.warm),
                      rel=1e-13))


@pytest.mark.parametrize("offset", [0.0, 1e-3, 0.3])
def test_tilt_moments_in_one_pass_match_the_two_passes(offset, monkeypatch):
    """The moments the tilt sums about a centre near ``E_Q z`` (in its first pass, blocks of
    64 atoms) against the second pass about ``E_Q z`` itself; a centre so far that they
    would cancel leaves them to that pass."""
    monkeypatch.setattr(kl, "_BLOCK", 64)
    rng = np.random.default_rng(5)
    z = -rng.gamma(2.0, 0.4, size=3001)
    z -= z.max()
    w = rng.random(z.size)
    w /= w.sum()
    buf = (np.empty(z.size), np.empty(64), np.empty(64))
    ref = kl._tilt(w, z, 1.7, buf)
    var, skew, ez = ref.var, ref.skew, ref.ez
    one = kl._tilt(w, z, 1.7, buf, ez + offset)
    assert one._var is not None and one._skew is not None  # from the first pass
    assert one.kl == ref.kl and one.ez == ez
    assert one.var == pytest.approx(var, rel=1e-12)
    assert one.skew == pytest.approx(skew, rel=1e-10)
    far = kl._tilt(w, z, 1.7, buf, ez + 1e4 * math.sqrt(var))
    assert far._var is None and far.var == pytest.approx(var, rel=1e-15)
