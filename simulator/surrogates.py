"""Scalable surrogates of the robust DPO objectives (SPEC section 4).

Each surrogate is a loss on a weighted batch of preference atoms ``(x_i, y_i, p_i)``
(a mini-batch with ``p_i = 1/B`` or a whole data set with its weights) together
with its search direction in ``theta``. Write ``m_i`` for the margins,
``l_i = softplus(-m_i)`` for the DPO losses, ``s_i = sigmoid(-m_i)``,
``g_i = grad_theta l_i = -s_i ytil_i beta x_i`` and ``b = beta ||theta - theta_ref||``
(SPEC 1, 3.3), so that ``||grad_x l_i|| = b s_i``. Expectations ``E`` are
``p``-weighted sums.

============  ==========================================================  =======================
name          loss                                                        source
============  ==========================================================  =======================
dpo           ``E l``                                                     Rafailov et al. 2023
wdpo-gr       ``E l + rho b (E s^q)^(1/q)``, ``1/p + 1/q = 1``            Gao, Chen, Kleywegt 2022
wdpo-sq       ``E [l + rho k b^2 s^2]``, ``k = 2`` (pair view) or 1       WDPO released code
kldpo-tau     ``tau log E exp(l / tau)``                                  WDPO/KLDPO Algorithm 2
kldpo-clip    ``E [w l]``, ``w = min(exp((l - E l)/tau), clip)`` detached KLDPO released code
kl-var        ``E l + sqrt(2 rho Var l)``                                 Duchi, Namkoong 2019
chi2-var      ``E l + sqrt(rho Var l)``                                   SPEC 3.2
drdpo         ``-beta' log E exp(-l / beta')``                            Dr. DPO, Wu et al. 2025
============  ==========================================================  =======================

Every direction has the form ``sum_i c_i g_i + a (theta - theta_ref)``: the
per-sample coefficients ``c_i`` are returned by :func:`surrogate_weights`.
For every surrogate except ``kldpo-clip`` the direction is the exact gradient
of the loss; in particular Algorithm 2's detached softmax weights
``w_i = softmax_i(l_i / tau)`` give ``sum_i w_i g_i = grad tau log E exp(l / tau)``.
``kldpo-clip`` is *detached*: its direction ``E[w g]`` holds ``w`` constant and
is not the gradient of any scalar, so training on it is a fixed-point iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax

from ._validation import check_nonnegative, check_positive, check_theta
from .data import PreferenceData
from .losses import dpo_loss, margins, sigmoid

__all__ = [
    "SURROGATES",
    "Surrogate",
    "get_surrogate",
    "evaluate_arrays",
    "surrogate_loss",
    "surrogate_grad",
    "surrogate_value_and_grad",
    "surrogate_weights",
    "surrogate_per_sample_loss",
]


@dataclass(frozen=True)
class _Batch:
    """Per-sample quantities of one weighted batch, or of a stack of batches.

    ``l``, ``s`` and ``p`` broadcast against each other; reductions run over
    the last axis, so a stack of ``M`` batches (shape ``(M, B)``) is handled in
    one vectorised pass.
    """

    l: np.ndarray
    s: np.ndarray
    p: np.ndarray
    b: float
    beta: float

    def mean(self, v: np.ndarray) -> np.ndarray:
        """``E_p v`` over the last axis."""
        return np.sum(self.p * v, axis=-1)


# Each kernel maps a batch and its parameters to ``(loss, c, a)``: the direction
# is ``sum_i c_i g_i + a * (theta - theta_ref)``; ``loss`` and ``a`` have the
# batch-stack shape, ``c`` the per-sample shape.
Kernel = Callable[[_Batch, dict], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _dpo(bt: _Batch, prm: dict):
    return bt.mean(bt.l), bt.p, 0.0


def _tilted(bt: _Batch, t: float):
    """``t log E_p exp(l / t)`` and its weights ``softmax(l / t + log p)`` (any sign of t)."""
    with np.errstate(divide="ignore"):
        z = bt.l / t + np.log(bt.p)
    return t * logsumexp(z, axis=-1), softmax(z, axis=-1), 0.0


def _kldpo_tau(bt: _Batch, prm: dict):
    return _tilted(bt, prm["tau"])


def _drdpo(bt: _Batch, prm: dict):
    return _tilted(bt, -prm["beta_prime"])


def _clip_weights(bt: _Batch, prm: dict) -> np.ndarray:
    """Released KLDPO weights ``min(exp((l_i - E l) / tau), clip)`` (capped exponent)."""
    z = (bt.l - bt.mean(bt.l)[..., None]) / prm["tau"]
    return np.exp(np.minimum(z, np.log(prm["clip"])))


def _kldpo_clip(bt: _Batch, prm: dict):
    c = bt.p * _clip_weights(bt, prm)
    return np.sum(c * bt.l, axis=-1), c, 0.0


def _variance_expansion(bt: _Batch, coef: float):
    """``E l + sqrt(coef Var l)``; gradient weights ``p_i (1 + sqrt(coef) (l_i - E l) / sd)``.

    Where ``Var l = 0`` (e.g. at ``theta = theta_ref``) the square root has a
    kink and the DPO weights ``p_i`` are returned.
    """
    mean = bt.mean(bt.l)
    dev = bt.l - mean[..., None]
    sd = np.sqrt(np.maximum(bt.mean(dev**2), 0.0))
    safe = np.where(sd > 0, sd, 1.0)[..., None]
    c = bt.p * (1.0 + np.where(sd[..., None] > 0, np.sqrt(coef) * dev / safe, 0.0))
    return mean + np.sqrt(coef) * sd, c, 0.0


def _kl_var(bt: _Batch, prm: dict):
    return _variance_expansion(bt, 2.0 * prm["rho"])


def _chi2_var(bt: _Batch, prm: dict):
    return _variance_expansion(bt, prm["rho"])


def _wdpo_gr(bt: _Batch, prm: dict):
    # L = E l + rho b N, N = (E s^q)^(1/q) (q = 1 when p = inf). With ds_i/dtheta = (1 - s_i) g_i
    # and grad b = beta^2 delta / b: grad N = E[s^(q-1) (1 - s) g] N^(1-q).
    rho, p = prm["rho"], prm["p"]
    q = 1.0 if np.isinf(p) else p / (p - 1.0)
    mq = bt.mean(bt.s**q)
    norm = mq ** (1.0 / q)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mq > 0, norm / mq, 0.0)
    dnorm = bt.p * bt.s ** (q - 1.0) * (1.0 - bt.s) * ratio[..., None]
    a = rho * bt.beta**2 * norm / bt.b if bt.b > 0 else 0.0 * norm
    return bt.mean(bt.l) + rho * bt.b * norm, bt.p + rho * bt.b * dnorm, a


def _wdpo_sq(bt: _Batch, prm: dict):
    # ||grad_z l||^2 = k b^2 s^2 with k = 2 in the pair view (SPEC 3.3); grad b^2 = 2 beta^2 delta.
    k = 2.0 if prm["view"] == "pair" else 1.0
    rho = prm["rho"]
    es2 = bt.mean(bt.s**2)
    loss = bt.mean(bt.l) + rho * k * bt.b**2 * es2
    c = bt.p * (1.0 + rho * k * bt.b**2 * 2.0 * bt.s * (1.0 - bt.s))
    return loss, c, rho * k * 2.0 * bt.beta**2 * es2


def _check_p(v) -> float:
    v = float(v)
    if np.isnan(v) or v <= 1:
        raise ValueError(f"p must be in (1, inf], got {v!r}")
    return v


def _check_view(v) -> str:
    if v not in ("pair", "x"):
        raise ValueError(f"view must be 'pair' or 'x', got {v!r}")
    return v


def _nonneg(name):
    return lambda v: check_nonnegative(v, name)


def _pos(name):
    return lambda v: check_positive(v, name)


@dataclass(frozen=True)
class Surrogate:
    """A registered surrogate: its kernel, parameters (with defaults and checks) and flags.

    Attributes
    ----------
    name : str
    kernel : callable
        ``(batch, params) -> (loss, c, a)``; direction ``sum_i c_i g_i + a delta``.
    defaults : dict
        Parameter defaults; ``None`` marks a required parameter.
    checks : dict
        Parameter validators raising ``ValueError``.
    detached : bool
        True when the direction is not the gradient of the loss (fixed-point iteration).
    robust_to : str
        The ambiguity set the surrogate approximates (``KL``, ``Wasserstein``, ...).
    """

    name: str
    kernel: Kernel
    defaults: dict
    checks: dict
    detached: bool = False
    robust_to: str = "Nominal"

    def params(self, given: dict) -> dict:
        """Validated parameters: ``given`` merged into the defaults."""
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise ValueError(f"surrogate {self.name!r} takes parameters "
                             f"{sorted(self.defaults)}, got unknown {sorted(unknown)}")
        out = dict(self.defaults, **given)
        for k, v in out.items():
            if v is None:
                raise ValueError(f"surrogate {self.name!r} needs parameter {k!r}")
            out[k] = self.checks[k](v)
        return out


SURROGATES: dict[str, Surrogate] = {s.name: s for s in (
    Surrogate("dpo", _dpo, {}, {}),
    Surrogate("wdpo-gr", _wdpo_gr, {"rho": None, "p": 2.0},
              {"rho": _nonneg("rho"), "p": _check_p}, robust_to="Wasserstein"),
    Surrogate("wdpo-sq", _wdpo_sq, {"rho": None, "view": "pair"},
              {"rho": _nonneg("rho"), "view": _check_view}, robust_to="Wasserstein"),
    Surrogate("kldpo-tau", _kldpo_tau, {"tau": None}, {"tau": _pos("tau")}, robust_to="KL"),
    Surrogate("kldpo-clip", _kldpo_clip, {"tau": None, "clip": 10.0},
              {"tau": _pos("tau"), "clip": _pos("clip")}, detached=True, robust_to="KL"),
    Surrogate("kl-var", _kl_var, {"rho": None}, {"rho": _nonneg("rho")}, robust_to="KL"),
    Surrogate("chi2-var", _chi2_var, {"rho": None}, {"rho": _nonneg("rho")},
              robust_to="ChiSquare"),
    Surrogate("drdpo", _drdpo, {"beta_prime": None}, {"beta_prime": _pos("beta_prime")}),
)}


def get_surrogate(name: str) -> Surrogate:
    """The registered :class:`Surrogate` called ``name``."""
    if name not in SURROGATES:
        raise ValueError(f"surrogate must be one of {sorted(SURROGATES)}, got {name!r}")
    return SURROGATES[name]


def _batch(theta, x, y, p, beta, theta_ref):
    m = margins(theta, x, y, beta, theta_ref)
    b = beta * float(np.linalg.norm(theta - theta_ref))
    return _Batch(dpo_loss(m), sigmoid(-m), p, b, beta), m


def evaluate_arrays(sur: Surrogate, params: dict, theta: np.ndarray, x: np.ndarray,
                    y: np.ndarray, p: np.ndarray, beta: float,
                    theta_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loss, direction and coefficients ``c`` on raw, already validated arrays.

    The unchecked fast path of the optimiser; ``params`` must come from
    :meth:`Surrogate.params`. Shapes: ``x (..., n, d)``, ``y (..., n)`` and
    ``p (..., n)`` broadcast over leading axes, one batch per leading index
    (e.g. ``M`` stacked mini-batches, or one set of atoms with ``C`` weight
    vectors). Returns ``loss (...)``, ``grad (..., d)`` and ``c (..., n)``;
    a single batch gives a float loss.
    """
    bt, m = _batch(theta, x, y, p, beta, theta_ref)
    loss, c, a = sur.kernel(bt, params)
    # sum_i c_i g_i with g_i = -sigmoid(-m_i) ytil_i beta x_i (losses.dpo_grad_theta)
    coef = -(c * bt.s * (2.0 * y - 1.0) * beta)
    grad = np.matmul(coef[..., None, :], x)[..., 0, :]
    grad = grad + np.asarray(a)[..., None] * (theta - theta_ref)
    loss = float(loss) if np.ndim(loss) == 0 else loss
    return loss, grad, c


def _prepare(name, theta, data, beta, theta_ref, params):
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")
    sur = get_surrogate(name)
    prm = sur.params(params)
    theta = check_theta(theta, data.d, "theta")
    ref = check_theta(theta_ref, data.d, "theta_ref")
    return sur, prm, theta, ref, check_positive(beta, "beta")


def surrogate_value_and_grad(name: str, theta, data: PreferenceData, beta: float = 1.0,
                             theta_ref=None, **params) -> tuple[float, np.ndarray]:
    """Surrogate loss and its direction in ``theta`` on a weighted data set or batch.

    Parameters
    ----------
    name : str
        A key of :data:`SURROGATES` (see the module docstring for the formulas).
    theta : array (d,)
    data : PreferenceData
        Atoms with weights ``p_i`` (population weights or ``1/B`` for a batch).
    beta : float
        DPO temperature.
    theta_ref : array (d,), optional
        Reference parameter (zeros).
    **params
        The surrogate's parameters (``rho``, ``p``, ``view``, ``tau``, ``clip``,
        ``beta_prime``).

    Returns
    -------
    loss : float
    grad : ndarray (d,)
        The gradient of ``loss``, or for ``kldpo-clip`` the detached direction ``E[w g]``.

    Raises
    ------
    ValueError
        On an unknown surrogate or parameter, or invalid ``theta``, ``beta``, parameters.
    """
    sur, prm, theta, ref, beta = _prepare(name, theta, data, beta, theta_ref, params)
    loss, grad, _ = evaluate_arrays(sur, prm, theta, data.x, data.y, data.weights, beta, ref)
    return loss, grad


def surrogate_loss(name: str, theta, data: PreferenceData, beta: float = 1.0,
                   theta_ref=None, **params) -> float:
    """Aggregate surrogate loss (see :func:`surrogate_value_and_grad`)."""
    return surrogate_value_and_grad(name, theta, data, beta, theta_ref, **params)[0]


def surrogate_grad(name: str, theta, data: PreferenceData, beta: float = 1.0,
                   theta_ref=None, **params) -> np.ndarray:
    """Direction in ``theta`` (see :func:`surrogate_value_and_grad`)."""
    return surrogate_value_and_grad(name, theta, data, beta, theta_ref, **params)[1]


def surrogate_weights(name: str, theta, data: PreferenceData, beta: float = 1.0,
                      theta_ref=None, **params) -> np.ndarray:
    """Per-sample coefficients ``c_i`` of the direction ``sum_i c_i grad_theta l_i``.

    For ``kldpo-tau`` these are Algorithm 2's detached weights
    ``softmax_i(l_i / tau + log p_i)``; for ``kldpo-clip`` they are
    ``p_i min(exp((l_i - E l) / tau), clip)``; for ``dpo`` they are ``p_i``.

    Raises
    ------
    ValueError
        For ``wdpo-gr`` and ``wdpo-sq``, whose direction has the extra term
        ``a (theta - theta_ref)`` and so no per-sample weight form.
    """
    sur, prm, theta, ref, beta = _prepare(name, theta, data, beta, theta_ref, params)
    if sur.robust_to == "Wasserstein":
        raise ValueError(f"name {name!r} has a norm term and no per-sample weight form")
    return evaluate_arrays(sur, prm, theta, data.x, data.y, data.weights, beta, ref)[2]


def surrogate_per_sample_loss(name: str, theta, data: PreferenceData, beta: float = 1.0,
                              theta_ref=None, **params) -> np.ndarray:
    """Per-sample losses whose ``p``-weighted mean is the loss, where such a form exists.

    ``dpo``: ``l_i``; ``wdpo-sq``: ``l_i + rho k ||grad_x l_i||^2``; ``kldpo-clip``:
    ``w_i l_i`` (``w_i`` detached). The other surrogates are non-linear in the
    batch distribution (a norm, a variance or a log-mean-exp) and raise
    ``ValueError``.
    """
    sur, prm, theta, ref, beta = _prepare(name, theta, data, beta, theta_ref, params)
    bt, _ = _batch(theta, data.x, data.y, data.weights, beta, ref)
    if name == "dpo":
        return bt.l
    if name == "wdpo-sq":
        k = 2.0 if prm["view"] == "pair" else 1.0
        return bt.l + prm["rho"] * k * bt.b**2 * bt.s**2
    if name == "kldpo-clip":
        return _clip_weights(bt, prm) * bt.l
    raise ValueError(f"name {name!r} is not a mean of per-sample losses")
