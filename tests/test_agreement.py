"""The ``dual`` solver against the cvxpy reference on randomised problems (SPEC 3.4).

Every one of the 40 problems (5 sets x 8 seeds of ``random_case``) is solved by both
solvers; cvxpy reaches ``optimal`` on all of them (35 through Clarabel, 5 through SCS,
the fourth solver of the chain), so a :class:`ConicSolveError` fails the test instead of
skipping the comparison. Each dual solution is certified (``gap < 1e-8`` and
``info["optimality_gap"] <= 1e-12``) and must agree with cvxpy's on

* theta: ``|theta_dual - theta_cvxpy|_inf <= 1e-5`` (SPEC 3.4), on every problem, flat
  ones included. The objective is flattest on kldpo seed 2 (smallest Hessian eigenvalue
  ``9.8e-5``, ``||theta|| = 18``), wdpo1_kappa seed 0 (``3.6e-4``) and chi2dpo seed 7
  (``2.6e-3``); there the value alone fixes theta only to ``sqrt(2 gap / eig_min)``, but
  an interior-point solver returns a point of its KKT system, whose stationarity residual
  fixes theta to ``residual / eig_min``, so no flatness allowance is needed. (chi2dpo
  seed 7 once had one, 1e-4: before the chain tried the equilibrated problem first,
  Clarabel stopped ``2.1e-5`` away on the problem as written; it is now ``5.5e-9`` away.)
* value: relative gap ``<= 1e-8``, ten times tighter than SPEC 3.4's ``1e-7``;
* the dual variable (``lambda*`` for KL and Wasserstein, ``eta*`` for chi-square;
  Nominal has none): within ``1e-6`` relative. It is unique on every problem here,
  including the boundary ``lambda* = 0`` (KL seed 6: the worst case sits on the max-loss
  atoms; Wasserstein at ``theta* = theta_ref``, where ``G(theta_ref, lambda) = log 2 +
  lambda rho`` increases from 0), where the dual solver returns exactly 0 and a relative
  tolerance means nothing: there cvxpy's dual must be within ``1e-7`` of 0.

Each check is shown able to fail: it rejects cvxpy's answer moved by twice its tolerance.
Worst differences measured over the 40 problems: theta ``9.6e-7``, value ``9.1e-10``,
dual ``7.5e-8`` relative (all three on wdpo1_kappa seed 0, solved by SCS at
``eps = 1e-9``), dual at the boundary ``8.5e-9`` (wdpo1_kappa seed 7).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import simulator as sim

KINDS = ("dpo", "kldpo", "chi2dpo", "wdpo1", "wdpo1_kappa")  # random_case kinds

#: SPEC 3.4: ``|theta_dual - theta_cvxpy|_inf``; ten times the worst measured (9.6e-7).
THETA_TOL = 1e-5
#: Relative objective gap: SPEC 3.4 asks 1e-7; both solvers reach ten times better
#: (worst measured 9.1e-10, SCS at eps = 1e-9), so the test holds them to that.
VALUE_RTOL = 1e-8
#: Dual variable, relative, where it is not 0 (worst measured 7.5e-8).
DUAL_RTOL = 1e-6
#: Dual variable at the boundary ``lambda* = 0``, absolute: ten times the worst measured
#: (8.5e-9, Clarabel on a Wasserstein problem whose ``G`` rises from 0 with slope rho).
DUAL_BOUNDARY_ATOL = 1e-7


def _failures(sol: sim.Solution, ref: sim.Solution) -> set[str]:
    """The agreement checks (``theta``, ``value``, ``dual``) that ``sol`` fails against ``ref``."""
    failed = set()
    if np.max(np.abs(sol.theta - ref.theta)) > THETA_TOL:
        failed.add("theta")
    if abs(sol.value - ref.value) > VALUE_RTOL * max(1.0, abs(ref.value)):
        failed.add("value")
    if sol.dual is None:
        ok = ref.dual is None
    elif sol.dual == 0.0:  # the boundary lambda* = 0: the dual solver returns it exactly
        ok = abs(ref.dual) <= DUAL_BOUNDARY_ATOL
    else:
        ok = abs(sol.dual - ref.dual) <= DUAL_RTOL * abs(sol.dual)
    if not ok:
        failed.add("dual")
    return failed


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", KINDS)
def test_dual_agrees_with_cvxpy(kind, seed, random_case):
    data, amb, beta, ref = random_case(100 * KINDS.index(kind) + seed, kind)
    sol = sim.solve(data, amb, beta=beta, theta_ref=ref, solver="dual")
    assert sol.gap < 1e-8 and sol.info["optimality_gap"] <= 1e-12
    ref_sol = sim.solve(data, amb, beta=beta, theta_ref=ref, solver="cvxpy")
    assert _failures(sol, ref_sol) == set()
    # each check can fail: cvxpy's answer moved by twice the tolerance is rejected
    step = np.zeros(data.d)
    step[seed % data.d] = 2 * THETA_TOL
    moved = {"theta": {"theta": ref_sol.theta + step},
             "value": {"value": ref_sol.value + 2 * VALUE_RTOL * max(1.0, abs(ref_sol.value))}}
    if sol.dual is not None:
        moved["dual"] = {"dual": ref_sol.dual + (2 * DUAL_BOUNDARY_ATOL if sol.dual == 0.0
                                                 else 2 * DUAL_RTOL * abs(sol.dual))}
    for check, change in moved.items():
        assert _failures(sol, dataclasses.replace(ref_sol, **change)) == {check}
