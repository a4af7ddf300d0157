"""Training the log-linear policy on a surrogate (SPEC section 4).

Two ways to reach a surrogate's solution:

* :func:`train` -- the paper's kind of algorithm: mini-batch SGD (with
  momentum) or Adam with a learning-rate schedule, batches drawn
  deterministically from a seed, or full-batch steps. Each step moves along the
  surrogate's direction (:func:`simulator.surrogates.surrogate_value_and_grad`)
  on the batch; for the detached ``kldpo-clip`` that direction is not a
  gradient, so the iteration seeks a fixed point ``E[w g] = 0``.
* :func:`solve_surrogate` -- a deterministic full-batch solver for high
  accuracy: quasi-Newton (BFGS) on the scalar surrogates, then a
  Powell-hybrid root polish of the first-order condition
  ``direction(theta) = 0`` (the only step for detached surrogates).

Batches: with uniform data weights (an empirical sample) every epoch is a
fresh permutation cut into batches of ``B`` atoms (the remainder dropped); with
non-uniform weights (a population) each batch is ``B`` i.i.d. draws from the
weights. Either way the batch weights are ``1/B``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, root

from ._validation import check_nonnegative, check_positive, check_theta
from .data import PreferenceData
from .surrogates import evaluate_arrays, get_surrogate

__all__ = ["TrainResult", "SCHEDULES", "learning_rate", "batches", "train", "solve_surrogate",
           "batch_fixed_point"]

SCHEDULES = ("constant", "cosine", "inverse-sqrt")


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of :func:`train` or :func:`solve_surrogate`.

    Attributes
    ----------
    theta : ndarray (d,)
        Final parameter.
    history : dict of ndarray
        Per step: ``loss`` and ``grad_norm`` of the batch, ``lr`` (train only).
    converged : bool
        Whether the full-data direction norm fell to ``tol``.
    steps : int
        Steps (or solver iterations) taken.
    grad_norm : float
        Full-data direction norm ``||direction(theta)||`` at the returned point.
    info : dict
        Solver extras (scipy messages).
    """

    theta: np.ndarray
    history: dict
    converged: bool
    steps: int
    grad_norm: float
    info: dict = field(default_factory=dict)


def learning_rate(schedule: str, lr: float, step: int, max_steps: int,
                  warmup: int = 0) -> float:
    """Step size at ``step`` (0-based).

    ``constant``: ``lr``; ``cosine``: ``lr (1 + cos(pi t / T)) / 2`` with
    ``T = max_steps``; ``inverse-sqrt``: ``lr / sqrt(1 + t)``. A linear warm-up
    over the first ``warmup`` steps multiplies any of them.
    """
    if schedule == "constant":
        rate = lr
    elif schedule == "cosine":
        rate = 0.5 * lr * (1.0 + math.cos(math.pi * min(step, max_steps) / max(max_steps, 1)))
    elif schedule == "inverse-sqrt":
        rate = lr / math.sqrt(1.0 + step)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return rate * min(1.0, (step + 1) / warmup) if warmup > 0 else rate


def batches(weights: np.ndarray, batch_size: int | None,
            seed: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless deterministic stream of ``(indices, batch weights)``.

    ``batch_size=None`` yields the full data with its own weights every time;
    otherwise epochs of permutations (uniform weights, ``batch_size <= n``) or
    i.i.d. draws from the weights, each batch weighted ``1/B`` (module docstring).
    """
    n = weights.shape[0]
    full = np.arange(n)
    if batch_size is None:
        while True:
            yield full, weights
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    B = int(batch_size)
    rng = np.random.default_rng(seed)
    uniform = np.allclose(weights, 1.0 / n, rtol=1e-9, atol=0.0)
    if uniform and B > n:
        raise ValueError(f"batch_size must be at most n = {n} for an empirical sample, got {B}")
    wb = np.full(B, 1.0 / B)
    while True:
        if uniform:
            perm = rng.permutation(n)
            for k in range(n // B):
                yield perm[k * B:(k + 1) * B], wb
        else:  # i.i.d. draws from the weights, 256 batches per call to the generator
            cdf = np.cumsum(weights)
            draws = np.searchsorted(cdf, rng.random((256, B)) * cdf[-1], side="right")
            yield from ((np.minimum(idx, n - 1), wb) for idx in draws)


def _setup(data, surrogate, beta, theta_ref, theta0, params):
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")
    sur = get_surrogate(surrogate)
    prm = sur.params(params)
    beta = check_positive(beta, "beta")
    ref = check_theta(theta_ref, data.d, "theta_ref")
    th = ref.copy() if theta0 is None else check_theta(theta0, data.d, "theta0").copy()

    def full(theta):
        return evaluate_arrays(sur, prm, theta, data.x, data.y, data.weights, beta, ref)[:2]

    return sur, prm, beta, ref, th, full


def train(data: PreferenceData, surrogate: str = "dpo", beta: float = 1.0, theta_ref=None, *,
          theta0=None, optimizer: str = "adam", lr: float = 0.05, schedule: str = "constant",
          warmup: int = 0, batch_size: int | None = None, max_steps: int = 2000,
          tol: float = 1e-6, seed: int | None = 0, momentum: float = 0.0,
          adam_betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          check_every: int | None = None, average_from: int | None = None,
          **params) -> TrainResult:
    """Mini-batch (or full-batch) first-order training on a surrogate.

    Parameters
    ----------
    data : PreferenceData
    surrogate : str
        A key of :data:`simulator.surrogates.SURROGATES`; ``**params`` are its parameters.
    beta, theta_ref
        DPO temperature and reference parameter (zeros).
    theta0 : array (d,), optional
        Starting point (``theta_ref``).
    optimizer : {'adam', 'sgd'}
        Adam (``adam_betas``, ``eps``, bias-corrected) or SGD with heavy-ball ``momentum``.
    lr, schedule, warmup
        Step size and its schedule (:func:`learning_rate`).
    batch_size : int or None
        ``None`` is full batch (data weights); otherwise see :func:`batches`.
    max_steps : int
    tol : float
        Stop when the full-data direction norm is ``<= tol``; ``0`` runs all
        ``max_steps`` without checks.
    seed : int
        Seed of the batch stream: equal seeds give identical runs.
    check_every : int, optional
        Steps between full-data convergence checks (1 for full batch, one
        epoch ``n // batch_size`` otherwise).
    average_from : int, optional
        Polyak-Ruppert averaging: from this step on, the returned (and
        convergence-checked) parameter is the running mean of the iterates,
        which removes the step-size noise of mini-batch training and leaves its
        fixed point (:func:`batch_fixed_point`).

    Returns
    -------
    TrainResult
    """
    sur, prm, beta, ref, theta, full = _setup(data, surrogate, beta, theta_ref, theta0, params)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    lr = check_positive(lr, "lr")
    learning_rate(schedule, lr, 0, max_steps)  # validates the schedule name up front
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    tol = check_nonnegative(tol, "tol")
    momentum = check_nonnegative(momentum, "momentum")
    if check_every is None:
        check_every = 1 if batch_size is None else max(1, data.n // int(batch_size))
    b1, b2 = adam_betas
    stream = batches(data.weights, batch_size, seed)
    m1 = np.zeros_like(theta)
    m2 = np.zeros_like(theta)
    hist = {"loss": [], "grad_norm": [], "lr": []}
    converged, step, gnorm = False, 0, float("nan")
    avg, n_avg = np.zeros_like(theta), 0
    for step in range(1, int(max_steps) + 1):
        idx, wb = next(stream)
        loss, g, _ = evaluate_arrays(sur, prm, theta, data.x[idx], data.y[idx], wb, beta, ref)
        rate = learning_rate(schedule, lr, step - 1, max_steps, warmup)
        hist["loss"].append(loss)
        hist["grad_norm"].append(float(np.linalg.norm(g)))
        hist["lr"].append(rate)
        if optimizer == "adam":
            m1 = b1 * m1 + (1 - b1) * g
            m2 = b2 * m2 + (1 - b2) * g * g
            theta = theta - rate * (m1 / (1 - b1**step)) / (np.sqrt(m2 / (1 - b2**step)) + eps)
        else:
            m1 = momentum * m1 + g
            theta = theta - rate * m1
        if average_from is not None and step >= average_from:
            n_avg += 1
            avg += (theta - avg) / n_avg
        if tol > 0 and step % check_every == 0:
            gnorm = float(np.linalg.norm(full(avg if n_avg else theta)[1]))
            if gnorm <= tol:
                converged = True
                break
    out = avg if n_avg else theta
    if not converged:
        gnorm = float(np.linalg.norm(full(out)[1]))
        converged = gnorm <= tol
    return TrainResult(out, {k: np.asarray(v) for k, v in hist.items()}, converged, step,
                       gnorm)


def solve_surrogate(data: PreferenceData, surrogate: str = "dpo", beta: float = 1.0,
                    theta_ref=None, *, theta0=None, tol: float = 1e-9,
                    **params) -> TrainResult:
    """Deterministic full-batch solution of a surrogate's first-order condition.

    Scalar surrogates: BFGS on the loss, then a root polish of
    ``grad(theta) = 0`` (scipy ``hybr``). Detached surrogates (``kldpo-clip``):
    the root of the direction ``E[w g] = 0``. Both start from ``theta0``, by
    default the DPO solution (itself started from ``theta_ref``), which keeps
    clear of the kink of ``wdpo-gr`` and the variance expansions at
    ``theta = theta_ref`` where every margin vanishes.

    Returns
    -------
    TrainResult
        ``converged`` is ``grad_norm <= tol``; ``history`` holds the BFGS iterates' loss
        and gradient norm.

    Raises
    ------
    ValueError
        On bad arguments.
    """
    sur, prm, beta, ref, theta, full = _setup(data, surrogate, beta, theta_ref, theta0, params)
    tol = check_positive(tol, "tol")
    hist = {"loss": [], "grad_norm": []}
    info = {}
    if surrogate != "dpo" and theta0 is None:
        theta = solve_surrogate(data, "dpo", beta, ref, tol=tol).theta
    if not sur.detached:
        def record(xk):
            f, g = full(xk)
            hist["loss"].append(f)
            hist["grad_norm"].append(float(np.linalg.norm(g)))

        res = minimize(full, theta, jac=True, method="BFGS", callback=record,
                       options={"gtol": tol, "maxiter": 2000})
        theta, info["minimize"] = res.x, res.message
    sol = root(lambda t: full(t)[1], theta, method="hybr", options={"xtol": 1e-14})
    info["root"] = sol.message
    if np.linalg.norm(full(sol.x)[1]) <= np.linalg.norm(full(theta)[1]):
        theta = sol.x
    gnorm = float(np.linalg.norm(full(theta)[1]))
    return TrainResult(theta, {k: np.asarray(v) for k, v in hist.items()}, gnorm <= tol,
                       len(hist["loss"]) + int(sol.nfev), gnorm, info)


def batch_fixed_point(data: PreferenceData, surrogate: str, batch_size: int,
                      beta: float = 1.0, theta_ref=None, *, n_batches: int = 2000,
                      seed: int | None = 0, theta0=None, **params) -> TrainResult:
    """Fixed point of mini-batch training: the root of the expected batch direction.

    With a vanishing step size, mini-batch training on a surrogate settles
    where the *expected* batch direction ``E_batch[direction_B(theta)]``
    vanishes. This estimates that expectation by the mean over ``n_batches``
    batches drawn once from ``seed`` exactly as :func:`train` draws them
    (common random numbers across ``theta``) and returns its root, found by
    scipy ``hybr`` from ``theta0`` (default: the full-batch solution of
    :func:`solve_surrogate`). The mini-batch bias is the distance to that
    full-batch solution; for ``kldpo-tau`` it is ``O(1/B)`` (SPEC 4). The
    Monte Carlo error of the estimate is ``O((n_batches * B)^(-1/2))``.

    Returns
    -------
    TrainResult
        ``grad_norm`` is the norm of the averaged direction at the root.
    """
    sur, prm, beta, ref, _, _ = _setup(data, surrogate, beta, theta_ref, theta0, params)
    if int(n_batches) != n_batches or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    if batch_size is None:
        raise ValueError("batch_size must be a positive integer, got None")
    stream = batches(data.weights, batch_size, seed)
    idx, wb = (np.stack(v) for v in zip(*(next(stream) for _ in range(int(n_batches))),
                                        strict=True))
    x, y = data.x[idx], data.y[idx]

    def direction(theta):
        return evaluate_arrays(sur, prm, theta, x, y, wb, beta, ref)[1].mean(axis=0)

    start = (solve_surrogate(data, surrogate, beta, ref, **params).theta if theta0 is None
             else check_theta(theta0, data.d, "theta0"))
    sol = root(direction, start, method="hybr", options={"xtol": 1e-13})
    gnorm = float(np.linalg.norm(direction(sol.x)))
    return TrainResult(sol.x, {}, bool(sol.success), int(sol.nfev), gnorm,
                       {"root": sol.message})
