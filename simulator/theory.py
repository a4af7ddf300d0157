"""Constants and sample-complexity bounds of the robust DPO estimators (SPEC section 5).

Setting: log-linear policies, features ``||x|| <= x_max`` (``x_max = 2`` for
``||phi|| <= 1``), parameters and ``theta_ref`` in the ball ``||theta|| <= B``, so that
every margin obeys ``|m| <= M = 2 beta B x_max`` (``= 4 beta B``). Then

* ``L_max = softplus(M) = log(1 + e^{4 beta B})`` bounds the loss, ``0 <= l <= L_max``;
* ``gamma = beta^2 lambda sigmoid(M) sigmoid(-M)
  = beta^2 lambda e^{4 beta B} / (1 + e^{4 beta B})^2`` is the strong-convexity
  (growth) constant of ``E_Q l`` for a distribution ``Q`` with coverage
  ``lambda_min(E_Q x x^T) >= lambda``.

Two bounds on ``||theta_hat_n - theta*||_2`` (derivations in docs/theory.md):

* :func:`slow_rate` -- valid with probability ``>= 1 - delta`` for a *fixed* ball ``B`` and
  a fixed dual range (with ``B`` and ``dual_lo`` taken from the sample, as the ``rates``
  experiment does, it is a plug-in heuristic; docs/theory.md section 9): a uniform deviation
  ``eps_n`` of the robust objective (Rademacher complexity of the margin class,
  contraction, McDiarmid, and a union bound over a grid of the dual variable) plus
  quadratic growth give ``excess risk <= 2 eps_n`` and
  ``||theta_hat - theta*|| <= 2 sqrt(eps_n / gamma)``: ``O(n^{-1/4})``
  (``O(n^{-1/8})`` for chi-square, whose dual involves a square root).
* :func:`uniform_slow_rate` -- the same bound with a union bound over dyadic grids of ``B``
  and ``dual_lo``: valid with probability ``>= 1 - delta`` although both are chosen from
  the sample.
* :func:`fast_rate` -- a deterministic, data-dependent inequality
  ``||theta_hat - theta*|| <= 2 ||grad L_n(theta*)|| / gamma_n``: the plug-in form of
  the ``O(n^{-1/2})`` argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validation import check_finite_array, check_nonnegative, check_positive, check_weights
from .ambiguity import KL, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from .asymptotics import KINK_TOL, zero_gradient_mixture
from .losses import sigmoid, softplus

__all__ = [
    "margin_bound",
    "loss_bound",
    "strong_convexity",
    "growth_constant",
    "robust_growth",
    "rademacher_bound",
    "SlowRate",
    "slow_rate",
    "uniform_slow_rate",
    "fast_rate",
    "grid_size",
]


def margin_bound(beta: float, B: float, x_max: float = 2.0) -> float:
    """``M = 2 beta B x_max`` (``= 4 beta B``): ``|m| <= M`` on the ball (SPEC 5)."""
    beta = check_positive(beta, "beta")
    return 2.0 * beta * check_nonnegative(B, "B") * check_nonnegative(x_max, "x_max")


def loss_bound(beta: float, B: float, x_max: float = 2.0) -> float:
    """``L_max = softplus(M) = log(1 + e^{4 beta B})``, computed as ``logaddexp(0, M)``."""
    return float(softplus(margin_bound(beta, B, x_max)))


def strong_convexity(beta: float, B: float, coverage: float, x_max: float = 2.0) -> float:
    """``gamma = beta^2 lambda sigmoid(M) sigmoid(-M)`` (SPEC 5), stable for any ``M``.

    Equal to ``beta^2 lambda e^{4 beta B} / (1 + e^{4 beta B})^2`` for ``x_max = 2``.
    """
    m = margin_bound(beta, B, x_max)
    lam = check_nonnegative(coverage, "coverage")
    return float(beta**2 * lam * sigmoid(m) * sigmoid(-m))


def growth_constant(x, weights, beta: float, B: float) -> float:
    """Growth constant of ``E_Q l`` for a discrete ``Q`` with atoms ``x`` and ``weights``.

    ``gamma_Q = beta^2 lambda_min(E_Q x x^T) sigmoid(M) sigmoid(-M)`` with
    ``M = 2 beta B max_k ||x_k||`` over the atoms of positive weight. Applied to a
    worst case ``Q*`` at a robust optimum it gives the quadratic growth of the robust
    objective there (docs/theory.md, "Growth of the robust objective").
    """
    x = check_finite_array(x, "x", ndim=2)
    w = check_weights(weights, x.shape[0], "weights", atol=1e-6)
    keep = w > 0
    cov = (x[keep] * w[keep, None]).T @ x[keep]
    lam = max(float(np.linalg.eigvalsh(cov)[0]), 0.0)
    x_max = float(np.linalg.norm(x[keep], axis=1).max())
    return strong_convexity(beta, B, lam, x_max)


def robust_growth(ambiguity: AmbiguitySet, data, worst_case, beta: float, B: float,
                  theta=None, theta_ref=None) -> float:
    """Growth constant of ``L_U(.; data)`` at its minimiser, from a zero-gradient worst case.

    The growth argument (docs/theory.md section 3) needs a worst case ``Q*`` at the
    minimiser whose gradient ``E_Q* grad l`` is zero. Away from ``theta_ref`` the
    solver's worst case is unique and has it. At ``theta = theta_ref`` (pass ``theta``
    and ``theta_ref`` to detect it) every reweighting is a worst case and the solver's
    generally has a non-zero gradient, so:

    * KL and chi-square: the zero-gradient mixture ``Q0`` of
      :func:`simulator.asymptotics.zero_gradient_mixture` (in the ball whenever
      ``theta_ref`` is optimal) gives the constant;
    * Wasserstein p = 2 and p = 1 with finite ``kappa``: no valid constant is computed
      (``nan``).

    For Wasserstein ``p = 1``, ``kappa = inf`` the objective is ``E_P l + rho b``
    (convex penalty), so the nominal atoms ``data`` give the growth anywhere; its worst
    case sends a vanishing mass arbitrarily far and would give ``0``. DPO uses ``data``.
    """
    if isinstance(ambiguity, Nominal) or ambiguity.rho == 0 or (
            isinstance(ambiguity, Wasserstein) and ambiguity.p == 1
            and math.isinf(ambiguity.kappa)):
        return growth_constant(data.x, data.weights, beta, B)
    if theta is not None:
        theta = np.asarray(theta, dtype=np.float64)
        ref = np.zeros_like(theta) if theta_ref is None else np.asarray(theta_ref, np.float64)
        if np.linalg.norm(theta - ref) <= KINK_TOL * max(1.0, float(np.linalg.norm(ref))):
            if isinstance(ambiguity, KL | ChiSquare):
                div, q0 = zero_gradient_mixture(data, ambiguity)
                if q0 is None or div > ambiguity.rho * (1 + 1e-6):
                    return math.nan
                return growth_constant(data.x, q0, beta, B)
            return math.nan
    return growth_constant(worst_case.x, worst_case.weights, beta, B)


def rademacher_bound(beta: float, B: float, n: int, x_max: float = 2.0) -> float:
    """``R_n <= beta B x_max / sqrt(n)``: Rademacher complexity of the margin class.

    The class is ``{z -> ytil beta (theta - theta_ref) . x : ||theta|| <= B}``.
    """
    return check_positive(beta, "beta") * check_nonnegative(B, "B") * x_max / math.sqrt(n)


def grid_size(n: int) -> int:
    """Points of the dual-variable grid of the union bound: ``ceil(sqrt(n)) + 1``."""
    return math.ceil(math.sqrt(n)) + 1


@dataclass(frozen=True)
class SlowRate:
    """The slow-rate bound at one ``(n, delta)``.

    Attributes
    ----------
    deviation : float
        ``eps_n >= sup_theta |L_U(theta; P_n) - L_U(theta; P)|`` w.p. ``>= 1 - delta``.
    excess_risk : float
        ``2 eps_n >= L_U(theta_hat) - L_U(theta*)``.
    error : float
        ``2 sqrt(eps_n / gamma) >= ||theta_hat - theta*||_2``.
    """

    deviation: float
    excess_risk: float
    error: float


def _deviation(lip_m: float, width: float, lip_s: float, span: float, R: float, n: int,
               delta: float) -> float:
    """``2 lip_m R + width sqrt(log(2K/delta)/(2n)) + lip_s span/(K-1)`` (docs/theory.md)."""
    k = grid_size(n) if span > 0 else 1
    interp = lip_s * span / (k - 1) if k > 1 else 0.0
    return 2 * lip_m * R + width * math.sqrt(math.log(2 * k / delta) / (2 * n)) + interp


def slow_rate(ambiguity: AmbiguitySet, n: int, delta: float, beta: float, B: float,
              gamma: float, dual_lo: float | None = None, x_max: float = 2.0) -> SlowRate:
    """Slow-rate (``O(n^{-1/4})``) bound for one method, valid w.p. ``>= 1 - delta``.

    Parameters
    ----------
    ambiguity
        ``Nominal()``, ``KL(rho)``, ``ChiSquare(rho)`` or ``Wasserstein(rho, p, kappa=inf)``.
    n, delta
        Sample size and confidence level.
    beta, B, x_max
        Temperature, parameter-ball radius, feature-difference bound.
    gamma
        Growth constant of the population robust objective at ``theta*``
        (:func:`growth_constant` of its worst case).
    dual_lo
        Lower bound ``lambda_lo > 0`` on the optimal dual variable, required by
        ``KL`` and ``Wasserstein(p=2)`` (the constant grows like ``exp(L_max / lambda_lo)``
        for KL).

    Returns
    -------
    SlowRate
        Deviation ``eps_n``, excess-risk bound ``2 eps_n``, error bound
        ``2 sqrt(eps_n / gamma)`` (``inf`` when ``gamma = 0``).

    Raises
    ------
    ValueError
        On bad arguments, a missing ``dual_lo``, or a Wasserstein set with finite
        ``kappa`` (no bound derived).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    delta = check_positive(delta, "delta")
    if delta >= 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    gamma = check_nonnegative(gamma, "gamma")
    L = loss_bound(beta, B, x_max)
    R = rademacher_bound(beta, B, n, x_max)
    rho = ambiguity.rho
    if isinstance(ambiguity, Nominal) or rho == 0 or (
            isinstance(ambiguity, Wasserstein) and ambiguity.p == 1
            and math.isinf(ambiguity.kappa)):
        eps = _deviation(1.0, L, 0.0, 0.0, R, n, delta)
    elif isinstance(ambiguity, KL):
        lo = _dual_lo(dual_lo)
        hi = max(L / rho, lo)
        with np.errstate(over="ignore"):
            e = float(np.exp(L / lo))
        eps = _deviation(e, lo * math.expm1(L / lo) if math.isfinite(e) else math.inf,
                         e * max(1.0, L / lo), hi - lo, R, n, delta)
    elif isinstance(ambiguity, ChiSquare):
        w = L + L / (2 * math.sqrt(rho))
        dev = _deviation(2 * w, w**2, 2 * w, w, R, n, delta)
        eps = math.sqrt(1 + rho) * math.sqrt(dev)
    elif isinstance(ambiguity, Wasserstein) and math.isinf(ambiguity.kappa):
        nu_hi = (2 * beta * B) ** 2 / _dual_lo(dual_lo)
        eps = _deviation(1.0, L + nu_hi / 4, 0.25, nu_hi, R, n, delta)
    else:
        raise ValueError(f"no slow-rate bound is derived for {ambiguity!r}")
    err = 2 * math.sqrt(eps / gamma) if gamma > 0 else math.inf
    return SlowRate(deviation=eps, excess_risk=2 * eps, error=err)


#: Normaliser of the union-bound weights ``c_k = 1 / (Z (|k| + 1)^2)`` over the integers:
#: ``Z = sum_{k in Z} 1 / (|k| + 1)^2 = 2 zeta(2) - 1 = pi^2 / 3 - 1``, so ``sum_k c_k = 1``.
_GRID_Z = math.pi**2 / 3 - 1


def _grid_weight(k: int) -> float:
    """Share ``c_k = 1 / (Z (|k| + 1)^2)`` of ``delta`` given to grid point ``k``."""
    return 1.0 / (_GRID_Z * (abs(k) + 1) ** 2)


def uniform_slow_rate(ambiguity: AmbiguitySet, n: int, delta: float, beta: float, B: float,
                      gamma_at, dual_lo: float | None = None, x_max: float = 2.0) -> SlowRate:
    """:func:`slow_rate` made valid for a ball ``B`` and a ``dual_lo`` chosen from the sample.

    Union bound over dyadic grids (docs/theory.md section 9): the ball radius is rounded up
    to ``B_k = 2^k`` (``k = ceil(log2 B)``), the dual lower bound down to
    ``lambda_j = 2^-j`` (``j = ceil(-log2 dual_lo)``), and the pair ``(k, j)`` gets the level
    ``delta c_k c_j`` with ``c_k = 1 / (Z (|k| + 1)^2)``; the levels of all pairs sum to at
    most ``delta``, so with probability ``>= 1 - delta`` the bound holds simultaneously at
    every grid point, in particular at the data-dependent one.

    Parameters
    ----------
    gamma_at : callable
        ``gamma_at(B_k)``: the growth constant at ``theta*`` for the rounded ball (a
        deterministic function of the population).
    Other parameters as in :func:`slow_rate`.
    """
    B = check_nonnegative(B, "B")
    # B = 0 (theta_hat = theta* = theta_ref = 0): every grid ball holds it; the unit one
    k = math.ceil(math.log2(B)) if B > 0 else 0
    level = delta * _grid_weight(k)
    lo = None
    if dual_lo is not None:
        j = math.ceil(-math.log2(check_positive(dual_lo, "dual_lo")))
        lo = 2.0**-j
        level *= _grid_weight(j)
    Bk = 2.0**k
    return slow_rate(ambiguity, n, level, beta, Bk, gamma_at(Bk), dual_lo=lo, x_max=x_max)


def _dual_lo(dual_lo: float | None) -> float:
    if dual_lo is None:
        raise ValueError("dual_lo (a lower bound on the optimal dual variable) is required "
                         "for KL and Wasserstein p=2, got None")
    return check_positive(dual_lo, "dual_lo")


def fast_rate(grad_norm: float, gamma_n: float) -> float:
    """Plug-in bound ``||theta_hat - theta*|| <= 2 ||grad L_n(theta*)|| / gamma_n``.

    ``grad L_n(theta*)`` is a (Danskin) gradient of the empirical robust objective at
    the population optimum and ``gamma_n`` the growth constant of the empirical
    robust objective at ``theta_hat`` (:func:`growth_constant` of its worst case).
    Deterministic given the sample (docs/theory.md, "Fast rate").
    """
    g = check_nonnegative(grad_norm, "grad_norm")
    gam = check_nonnegative(gamma_n, "gamma_n")
    return 2 * g / gam if gam > 0 else math.inf
