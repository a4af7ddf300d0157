"""DPO losses on sequence log-probabilities and their robust aggregations (SPEC 4, 7).

Per sample (TRL convention), with policy and reference log-probabilities of the
chosen and rejected responses,

    m_i = beta * ((pc_i - rc_i) - (pr_i - rr_i)),      l_i = -log sigmoid(m_i) = softplus(-m_i),

the torch twin of :func:`simulator.losses.dpo_loss` (``m`` is the margin of
SPEC 1, ``beta h``). :func:`aggregate` turns the per-sample losses of a batch
into one of the objectives of :mod:`simulator.surrogates` (same names, same
formulas, uniform batch weights ``1/N``):

============  ==================================================================
dpo           ``mean l``
kldpo-tau     ``tau log mean exp(l / tau)``; gradient ``sum softmax(l/tau)_i grad l_i``
kldpo-clip    ``mean w l``, ``w = min(exp((l - mean l)/tau), clip)`` detached (released code)
kl-var        ``mean l + sqrt(2 rho Var l)``
chi2-var      ``mean l + sqrt(rho Var l)``
drdpo         ``-beta' log mean exp(-l / beta')`` (Dr. DPO)
============  ==================================================================

Every gradient has the form ``sum_i c_i grad l_i`` with coefficients ``c_i``
computed from the detached losses of the *global* batch (all processes, see
:class:`~simulator.torch_backend.distributed.GlobalBatch`); the loss returned for
``backward`` is ``W sum_{i local} c_i l_i`` shifted by a constant so that its
value is the objective, and DDP's averaging over ``W`` processes then gives the
concatenated-batch gradient exactly. For ``kldpo-clip`` the direction is the
released code's detached one, not a gradient (SPEC 4).

**The accumulation window.** SPEC 7 defines the global batch of one optimizer
step as all processes *and* all gradient-accumulation micro-batches.
:func:`aggregate_window` takes the detached per-sample losses of the ``K``
micro-batches of a window (a no-grad pre-pass: one extra forward per
micro-batch), gathers them over the ``W`` processes, computes the coefficients
once with the same formula, and :meth:`WindowAggregate.loss` gives micro-batch
``k`` the loss ``K W sum_{i in (r, k)} c_i l_i`` (shifted to the objective's
value): after the trainer's division by ``K`` and DDP's averaging over ``W``
the accumulated gradient is ``sum_{i in window} c_i grad l_i``, the gradient of
the objective on the concatenated window. :func:`aggregate` is the window of a
single micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._validation import check_nonnegative, check_positive
from .distributed import GlobalBatch

__all__ = ["AGGREGATIONS", "Aggregate", "WindowAggregate", "aggregate", "aggregate_window",
           "aggregation_params", "check_tensor", "dpo_losses", "dpo_margins", "weight_summary"]

AGGREGATIONS = ("dpo", "kldpo-tau", "kldpo-clip", "kl-var", "chi2-var", "drdpo")
# The variance forms use the DPO coefficients when sd(l) is at round-off level, sd <=
# _SD_ROUNDOFF * eps * max|l|: forward-pass noise in the losses (about beta * eps * |log-prob|,
# log-probabilities of a few hundred nats) stays below it in float64 and float32.
_SD_ROUNDOFF = 1024


def check_tensor(t, name: str, ndim: int | None = None) -> torch.Tensor:
    """Return ``t`` after checking it is a floating tensor of ``ndim`` dims with no NaN/inf."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name} must be finite (no NaN or inf), got {t.detach()[idx].item()!r} "
                         f"at index {idx if len(idx) > 1 else idx[0]}")
    return t


def dpo_margins(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                beta: float) -> torch.Tensor:
    """Margins ``m_i = beta ((pc_i - rc_i) - (pr_i - rr_i))`` (the implicit reward margin).

    Raises
    ------
    ValueError
        On tensors that are not 1-D, of different lengths, or hold NaN/inf; on ``beta <= 0``.
    """
    beta = check_positive(beta, "beta")
    names = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
             "reference_rejected_logps")
    ts = [check_tensor(t, n, ndim=1) for t, n in zip(
        (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
         reference_rejected_logps), names, strict=True)]
    shapes = {n: tuple(t.shape) for n, t in zip(names, ts, strict=True)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"log-probability tensors must have the same shape, got {shapes}")
    pc, pr, rc, rr = ts
    return beta * ((pc - rc) - (pr - rr))


def dpo_losses(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
               beta: float = 0.1) -> torch.Tensor:
    """Per-sample DPO losses ``l_i = -logsigmoid(m_i)`` (SPEC 1, 7), shape ``(B,)``."""
    m = dpo_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps, beta)
    return -F.logsigmoid(m)


@dataclass
class Aggregate:
    """Result of :func:`aggregate`.

    Attributes
    ----------
    loss : Tensor
        Scalar to call ``backward`` on: value = the objective, gradient (after DDP
        averaging) = ``sum_{global i} c_i grad l_i``.
    value : Tensor
        The objective on the global batch (detached scalar).
    weights : Tensor
        This process's coefficients ``c_i`` (detached); over the global batch they
        sum to one except for ``kldpo-clip`` (``w_i / N``).
    global_losses : Tensor
        Detached per-sample losses of the global batch.
    """

    loss: torch.Tensor
    value: torch.Tensor
    weights: torch.Tensor
    global_losses: torch.Tensor


def _coefficients(l: torch.Tensor, method: str, prm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective value and coefficients ``c`` on the global losses ``l`` (SPEC 4)."""
    n = l.shape[0]
    if method == "dpo":
        return l.mean(), torch.full_like(l, 1.0 / n)
    if method in ("kldpo-tau", "drdpo"):
        t = prm["tau"] if method == "kldpo-tau" else -prm["beta_prime"]
        z = l / t
        return t * (torch.logsumexp(z, 0) - math.log(n)), torch.softmax(z, 0)
    if method == "kldpo-clip":
        z = (l - l.mean()) / prm["tau"]
        w = torch.exp(torch.clamp(z, max=math.log(prm["clip"])))
        return (w * l).mean(), w / n
    coef = 2.0 * prm["rho"] if method == "kl-var" else prm["rho"]
    mean = l.mean()
    dev = l - mean
    sd = torch.sqrt(torch.clamp((dev**2).mean(), min=0.0))
    if float(sd) <= _SD_ROUNDOFF * torch.finfo(l.dtype).eps * float(l.abs().max()):
        # round-off spread (e.g. the first step, policy = reference: every l_i = log 2):
        # sqrt(Var) is not differentiable there and dev / sd would be noise
        return mean + math.sqrt(coef) * sd, torch.full_like(l, 1.0 / n)
    return mean + math.sqrt(coef) * sd, (1.0 + math.sqrt(coef) * dev / sd) / n


def aggregation_params(method: str, tau=None, clip=10.0, rho=None, beta_prime=None) -> dict:
    """Validated parameters of an aggregation method (ValueError naming the bad one)."""
    if method not in AGGREGATIONS:
        raise ValueError(f"method must be one of {AGGREGATIONS}, got {method!r}")
    if method in ("kldpo-tau", "kldpo-clip"):
        return {"tau": check_positive(tau, "tau"), "clip": check_positive(clip, "clip")}
    if method in ("kl-var", "chi2-var"):
        return {"rho": check_nonnegative(rho, "rho")}
    if method == "drdpo":
        return {"beta_prime": check_positive(beta_prime, "beta_prime")}
    return {}


def weight_summary(coefficients: torch.Tensor) -> dict[str, float]:
    """Robust-weight statistics of the coefficients ``c`` of a global batch of ``N`` samples.

    ``weight_max`` and ``weight_min`` of ``N c_i`` (1 for DPO) and the effective
    sample size share ``weight_ess = (sum c)^2 / (N sum c^2)`` (1 for uniform weights).
    """
    c = coefficients.detach().double()
    w = c * c.shape[0]
    return {"weight_max": float(w.max()), "weight_min": float(w.min()),
            "weight_ess": float(c.sum() ** 2 / (c**2).sum() / c.shape[0])}


@dataclass
class WindowAggregate:
    """Coefficients of one optimizer step's window (:func:`aggregate_window`).

    Attributes
    ----------
    value : Tensor
        The objective on the global window (detached scalar).
    weights : list of Tensor
        This process's coefficients ``c_i`` of each micro-batch (detached).
    global_weights : Tensor
        The coefficients of the whole global window (every process, every micro-batch).
    global_losses : Tensor
        The detached per-sample losses of the global window.
    scale : int
        ``W K``: processes times micro-batches.
    """

    value: torch.Tensor
    weights: list[torch.Tensor]
    global_weights: torch.Tensor
    global_losses: torch.Tensor
    scale: int

    def loss(self, k: int, losses: torch.Tensor) -> torch.Tensor:
        """Loss to backpropagate for micro-batch ``k`` (its losses ``l`` in the graph).

        ``W K sum_i c_i l_i`` shifted by a constant so that its value is :attr:`value`;
        divided by ``K`` by the trainer and averaged over processes by DDP, the
        accumulated gradient is that of the objective on the whole window.

        Raises
        ------
        ValueError
            On a micro-batch index out of range or losses of another length than
            the pre-pass gave for that micro-batch.
        """
        if not 0 <= k < len(self.weights):
            raise ValueError(f"k must be in [0, {len(self.weights)}), got {k!r}")
        c = self.weights[k]
        if tuple(losses.shape) != tuple(c.shape):
            raise ValueError(f"losses of micro-batch {k} must have shape {tuple(c.shape)} (the "
                             f"pre-pass), got {tuple(losses.shape)}")
        local = self.scale * (c.to(losses.dtype) * losses).sum()
        return local - local.detach() + self.value.to(losses.dtype)


def aggregate_window(window: Sequence[torch.Tensor], method: str = "dpo", *,
                     tau: float | None = None, clip: float = 10.0, rho: float | None = None,
                     beta_prime: float | None = None, batch: GlobalBatch | None = None
                     ) -> WindowAggregate:
    """Coefficients over the global window: every process and every micro-batch (SPEC 7).

    Parameters
    ----------
    window : sequence of Tensor (B_k,)
        This process's per-sample losses of each micro-batch of the optimizer step
        (detached; e.g. from a no-grad pre-pass).
    method, tau, clip, rho, beta_prime, batch
        As in :func:`aggregate`.

    Returns
    -------
    WindowAggregate

    Raises
    ------
    ValueError
        As :func:`aggregate`, for an empty window or an empty micro-batch.
    """
    prm = aggregation_params(method, tau, clip, rho, beta_prime)
    if len(window) == 0:
        raise ValueError("window must hold at least one micro-batch, got none")
    for k, l in enumerate(window):
        check_tensor(l, f"losses of micro-batch {k}", ndim=1)
        if l.shape[0] == 0:
            raise ValueError(f"losses of micro-batch {k} must hold at least one sample, "
                             "got shape (0,)")
    batch = batch or GlobalBatch()
    sizes = [int(l.shape[0]) for l in window]
    full, mine = batch.gather(torch.cat([l.detach() for l in window]))
    work = full if full.dtype in (torch.float32, torch.float64) else full.float()
    value, c = _coefficients(work, method, prm)
    return WindowAggregate(value.detach(), list(c[mine].split(sizes)), c.detach(), full,
                           batch.world_size * len(window))


def aggregate(losses: torch.Tensor, method: str = "dpo", *, tau: float | None = None,
              clip: float = 10.0, rho: float | None = None, beta_prime: float | None = None,
              batch: GlobalBatch | None = None) -> Aggregate:
    """Aggregate per-sample losses into a robust objective over the global batch.

    The window of one micro-batch (:func:`aggregate_window`).

    Parameters
    ----------
    losses : Tensor (B,)
        Per-sample losses of this process (e.g. :func:`dpo_losses`), in the graph.
    method : str
        One of :data:`AGGREGATIONS` (module docstring for the formulas).
    tau, clip, rho, beta_prime
        The method's parameters (``tau`` for the KLDPO forms, ``clip`` for
        ``kldpo-clip``, ``rho`` for the variance forms, ``beta_prime`` for Dr. DPO).
    batch : GlobalBatch, optional
        The data-parallel group (default: the initialised default group, if any).

    Returns
    -------
    Aggregate

    Raises
    ------
    ValueError
        On an unknown method, a missing or invalid parameter, or losses that are
        not a finite 1-D tensor.
    """
    if isinstance(losses, torch.Tensor) and losses.ndim == 1 and losses.shape[0] == 0:
        raise ValueError("losses must hold at least one sample, got shape (0,)")
    check_tensor(losses, "losses", ndim=1)
    win = aggregate_window([losses], method, tau=tau, clip=clip, rho=rho, beta_prime=beta_prime,
                           batch=batch)
    return Aggregate(win.loss(0, losses), win.value, win.weights[0].to(losses.dtype),
                     win.global_losses)
