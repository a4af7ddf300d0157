r"""The Wasserstein (WDPO) penalty through the gradient w.r.t. the input embeddings (SPEC 4, 7).

With per-sample losses ``l_i`` that depend on input embeddings ``e_i`` (the
chosen and the rejected response of sample ``i``: the *pair view* of SPEC 3.3)
write ``g_i = grad_e l_i`` and ``q_i = ||g_i||^2`` (summed over both responses,
every token, every embedding coordinate). Over a (global) batch of ``N`` samples
two surrogates are offered:

* ``form="squared"`` (the released WDPO code): ``L = mean_i (l_i + rho q_i)``;
* ``form="gr"`` (gradient regularisation, Gao, Chen and Kleywegt, p = 2):
  ``L = mean_i l_i + rho sqrt(mean_i q_i)``.

Both need ``grad_theta q_i``, and two ways to get it are implemented:

``mode="double-backward"``
    ``g = autograd.grad(l, e, create_graph=True)`` and a backward through
    ``q`` (as the released code does). Needs second derivatives of every kernel,
    which fused attention kernels may not provide.

``mode="finite-difference"``
    No double backward. Because mixed partials commute,

    .. math::  \tfrac12 \nabla_\theta q_i = (\partial_\theta g_i)^\top g_i
               = \frac{d}{d\varepsilon}\, \nabla_\theta\, l_i(\theta, e_i + \varepsilon g_i)
               \Big|_{\varepsilon = 0} =: D_i ,

    with ``g_i`` held fixed. (When the embeddings are themselves a function
    ``e(theta)`` of the embedding table, the total derivative of ``q_i`` picks
    up ``(de/dtheta)^T grad_e^2 l_i g_i``; moving ``e(theta) + eps g_i`` with the
    table in the graph reproduces exactly that term.) The penalty gradient is
    ``a sum_i D_i`` with ``a = 2 rho / N`` (squared) or ``a = rho / (N sqrt(mean q))``
    (gr), and ``D_i`` is replaced by a difference quotient:

    - ``fd_scheme="forward"`` (default): ``D_i ~ [grad l_i(e + eps g) - grad l_i(e)] / eps``,
      error ``O(eps)``; one extra forward and backward: the first pass gives
      ``g`` and ``G_1 = sum_i grad l_i(e)`` in one backward, the second pass
      backpropagates ``(a / eps) sum_i l_i(e + eps g)``, and ``(1/N - a/eps) G_1``
      enters through a linear term ``<c G_1, theta>`` so that a single
      ``loss.backward()`` (and DDP's gradient hooks) sees the whole gradient;
    - ``fd_scheme="central"``: ``[grad l_i(e + eps g) - grad l_i(e - eps g)] / (2 eps)``,
      error ``O(eps^2)``, one more forward and backward.

    The step is one scalar for the whole (global) batch:
    ``eps = fd_eps * rms_t ||e_t|| / max_t ||g_t||`` over the embedding vectors
    ``t`` (tokens), so the largest move is ``fd_eps`` times the typical embedding
    norm. Default ``fd_eps`` (:func:`default_fd_eps`) by the *coarsest* precision of the
    embeddings, the per-sample losses (a float32 LM head under a float64 model rounds
    at float32) and an active ``torch.autocast``: ``1e-4`` in float64; in float32 ``3e-4``
    (forward) and ``1e-3`` (central); ``1e-2`` in half precision (round-off of the
    difference grows like ``unit roundoff / fd_eps``, truncation like ``fd_eps`` or
    ``fd_eps^2``).
    The random-number state is restored before each pass so that dropout masks agree.

Under ``torch.distributed`` every batch statistic (``N``, ``mean q``, ``eps``)
is global and the returned loss is scaled by the world size, so DDP's averaging
yields the concatenated-batch gradient (see :mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .._validation import check_nonnegative, check_positive
from .distributed import GlobalBatch
from .losses import check_tensor

__all__ = ["WASSERSTEIN_MODES", "WASSERSTEIN_FORMS", "WassersteinResult", "wasserstein_loss",
           "wasserstein_value", "wasserstein_window", "WassersteinWindow", "default_fd_eps",
           "SecondDerivativeError", "lacks_second_derivative"]

WASSERSTEIN_MODES = ("double-backward", "finite-difference")
WASSERSTEIN_FORMS = ("squared", "gr")


@dataclass
class WassersteinResult:
    """Result of :func:`wasserstein_loss`.

    Attributes
    ----------
    loss : Tensor
        Scalar for ``backward``: value = the surrogate, gradient (after DDP
        averaging) = its gradient (exact, or the finite-difference estimate).
    value : Tensor
        The surrogate on the global batch (detached).
    penalty : Tensor
        ``rho mean q`` (squared) or ``rho sqrt(mean q)`` (gr), detached.
    losses : Tensor
        This process's per-sample losses ``l_i`` (detached).
    grad_sq : Tensor
        This process's ``q_i = ||grad_e l_i||^2`` (detached).
    eps : float
        Finite-difference step (``nan`` in double-backward mode).
    stats : WassersteinWindow
        The batch statistics used (global over processes; over the window when one was given).
    """

    loss: torch.Tensor
    value: torch.Tensor
    penalty: torch.Tensor
    losses: torch.Tensor
    grad_sq: torch.Tensor
    eps: float
    stats: WassersteinWindow


@dataclass
class WassersteinWindow:
    """Batch statistics of the surrogate, global over processes (float64 scalars).

    Over one micro-batch (``micro_batches = 1``) or, combined by
    :func:`wasserstein_window`, over the accumulation window of one optimizer step:
    sample count ``n``, sums of ``l_i`` and ``q_i``, the largest embedding-gradient
    norm ``gmax`` and the sum of squares and count of the embedding vectors (the
    finite-difference step).
    """

    n: torch.Tensor
    sum_l: torch.Tensor
    sum_q: torch.Tensor
    gmax: torch.Tensor
    e_sq: torch.Tensor
    e_count: torch.Tensor
    micro_batches: int = 1

    @property
    def mean_l(self) -> torch.Tensor:
        return self.sum_l / self.n

    @property
    def mean_q(self) -> torch.Tensor:
        return self.sum_q / self.n


def wasserstein_window(micro: Sequence[WassersteinWindow]) -> WassersteinWindow:
    """The statistics of an accumulation window from those of its micro-batches.

    ``micro``: the ``stats`` of :func:`wasserstein_value` on every micro-batch of one
    optimizer step (the no-grad pre-pass: one forward and one backward to the
    embeddings per micro-batch). Passed as ``window`` to :func:`wasserstein_loss`, the
    ``gr`` normaliser ``sqrt(mean q)``, ``N`` and the finite-difference step are those
    of the window, and the loss is scaled by ``K W`` (the trainer divides by ``K``).
    """
    if not micro:
        raise ValueError("micro must hold the statistics of at least one micro-batch, got none")
    return WassersteinWindow(sum(m.n for m in micro), sum(m.sum_l for m in micro),
                             sum(m.sum_q for m in micro),
                             torch.stack([m.gmax for m in micro]).max(),
                             sum(m.e_sq for m in micro), sum(m.e_count for m in micro),
                             sum(m.micro_batches for m in micro))


# Default relative steps per precision and scheme. float32: near the optima sqrt(u) (forward)
# and u^(1/3) (central), u = 6e-8; measured on two small GPT-2s against float64 double
# backward (relative error of the penalty gradient): forward 9e-4-1.3e-3 at 3e-4 (the former
# 1e-2: 6e-3-3.6e-2), central 6e-5-1.5e-4 at 1e-3. Half precision keeps 1e-2 (u = 4e-3).
_FD_EPS = {torch.float64: {"forward": 1e-4, "central": 1e-4},
           torch.float32: {"forward": 3e-4, "central": 1e-3}}
_FD_EPS_HALF = 1e-2


def default_fd_eps(dtype: torch.dtype, scheme: str = "forward") -> float:
    """Default relative finite-difference step for a computation in ``dtype``.

    ``1e-4`` in float64; in float32 ``3e-4`` (``forward``) or ``1e-3`` (``central``);
    ``1e-2`` in bfloat16/float16.
    """
    return _FD_EPS.get(dtype, {}).get(scheme, _FD_EPS_HALF)


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class SecondDerivativeError(RuntimeError):
    """A kernel of the model has no second derivative, which double-backward mode needs."""


# Fragments of torch's messages when a kernel cannot be differentiated twice: an op without a
# derivative formula (fused attention backward), an ``out=`` op inside a custom backward (TRL's
# chunked log-prob head), ``@once_differentiable`` functions.
_SECOND_DERIVATIVE_MESSAGES = ("derivative for", "don't support automatic differentiation",
                               "once_differentiable", "differentiate twice")


def lacks_second_derivative(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's error for a kernel that cannot be differentiated twice."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _SECOND_DERIVATIVE_MESSAGES)


def second_derivative_error(detail: str) -> SecondDerivativeError:
    """The error for a model whose kernels lack the second derivative double backward needs."""
    return SecondDerivativeError(
        "wdpo mode 'double-backward' needs second derivatives of every kernel of the model, but "
        f"one has none ({detail}); fused kernels such as TRL's fused LM head or flash/sdpa "
        "attention do not provide them: use mode 'finite-difference' (no second derivatives)")


def _first_pass(embed_fn, loss_fn, create_graph: bool, extra: list[torch.Tensor]):
    emb = tuple(embed_fn())
    if not emb:
        raise ValueError("embed_fn must return at least one embedding tensor, got none")
    emb = tuple(e if e.requires_grad else e.detach().requires_grad_(True) for e in emb)
    l = check_tensor(loss_fn(*emb), "loss_fn(*embeddings)", ndim=1)
    for k, e in enumerate(emb):
        if e.shape[0] != l.shape[0]:
            raise ValueError(f"embedding {k} has leading dimension {e.shape[0]} but loss_fn "
                             f"returned {l.shape[0]} per-sample losses")
    try:
        grads = torch.autograd.grad(l.sum(), list(emb) + extra, create_graph=create_graph,
                                    allow_unused=True)
    except RuntimeError as exc:
        if create_graph and lacks_second_derivative(exc):
            raise second_derivative_error(str(exc)) from exc
        raise ValueError(f"the loss cannot be differentiated w.r.t. the embeddings: {exc}") \
            from exc
    g = grads[: len(emb)]
    if any(gk is None for gk in g):
        raise ValueError("the embeddings cannot be reached: loss_fn does not depend on every "
                         "tensor returned by embed_fn (does the model use inputs_embeds?)")
    if create_graph and not all(gk.requires_grad for gk in g):
        # a backward that ran outside autograd (e.g. a custom kernel): the penalty would get
        # no parameter gradient, silently
        raise second_derivative_error("the embedding gradient is not differentiable")
    return emb, l, g, grads[len(emb):]


def _per_sample_sq(g) -> torch.Tensor:
    return sum(gk.pow(2).flatten(1).sum(1) for gk in g)


def _shifted(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return surrogate - surrogate.detach() + value.to(surrogate.dtype)


def wasserstein_loss(embed_fn: Callable[[], tuple[torch.Tensor, ...]],
                     loss_fn: Callable[..., torch.Tensor], rho: float, *,
                     form: str = "squared", mode: str = "finite-difference",
                     params: Iterable[torch.Tensor] | None = None, fd_eps: float | None = None,
                     fd_scheme: str = "forward", batch: GlobalBatch | None = None,
                     no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                     window: WassersteinWindow | None = None) -> WassersteinResult:
    """WDPO surrogate with the embedding-gradient penalty (module docstring for the maths).

    Parameters
    ----------
    embed_fn : callable
        ``embed_fn() -> (e_1, ..., e_k)``: the input embeddings, each with leading
        dimension ``B`` (sample ``i`` owns row ``i`` of every tensor), computed
        afresh at each call (for an LLM: ``model.get_input_embeddings()(ids)``,
        split into chosen and rejected). Tensors that do not require grad are
        made leaves that do.
    loss_fn : callable
        ``loss_fn(e_1, ..., e_k) -> l`` of shape ``(B,)``; sample ``i`` must
        depend on row ``i`` only.
    rho : float
        Penalty weight ``>= 0``.
    form : {'squared', 'gr'}
    mode : {'finite-difference', 'double-backward'}
    params : iterable of Tensor
        The trainable parameters (required in finite-difference mode).
    fd_eps : float, optional
        Relative step (:func:`default_fd_eps` by default).
    fd_scheme : {'forward', 'central'}
    batch : GlobalBatch, optional
        The data-parallel group.
    no_sync : callable, optional
        Context manager factory entered around the first pass in
        finite-difference mode (``ddp_model.no_sync``), whose gradients are
        folded into the loss instead of being reduced.
    window : WassersteinWindow, optional
        Statistics of the whole accumulation window (:func:`wasserstein_window`);
        default: this micro-batch's.

    Returns
    -------
    WassersteinResult

    Raises
    ------
    ValueError
        On bad arguments, NaN losses, or embeddings the loss does not depend on.
    """
    rho = _check_rho_form(rho, form)
    if mode not in WASSERSTEIN_MODES:
        raise ValueError(f"mode must be one of {WASSERSTEIN_MODES}, got {mode!r}")
    if fd_scheme not in ("forward", "central"):
        raise ValueError(f"fd_scheme must be 'forward' or 'central', got {fd_scheme!r}")
    batch = batch or GlobalBatch()
    if mode == "double-backward":
        return _double_backward(embed_fn, loss_fn, rho, form, batch, window)
    if params is None:
        raise ValueError("params must list the trainable parameters in finite-difference mode")
    params = [p for p in params if p.requires_grad]
    return _finite_difference(embed_fn, loss_fn, rho, form, params, fd_eps, fd_scheme, batch,
                              no_sync or contextlib.nullcontext, window)


def _check_rho_form(rho, form: str) -> float:
    rho = check_nonnegative(rho, "rho")
    if form not in WASSERSTEIN_FORMS:
        raise ValueError(f"form must be one of {WASSERSTEIN_FORMS}, got {form!r}")
    return rho


def _penalty(rho: float, form: str, mean_q: torch.Tensor) -> torch.Tensor:
    return rho * mean_q if form == "squared" else rho * torch.sqrt(mean_q)


def wasserstein_value(embed_fn: Callable[[], tuple[torch.Tensor, ...]],
                      loss_fn: Callable[..., torch.Tensor], rho: float, *,
                      form: str = "squared", batch: GlobalBatch | None = None
                      ) -> WassersteinResult:
    """The WDPO surrogate's value, without any parameter gradient (evaluation).

    Runs one forward and one backward to the embeddings only (``g_i``, hence
    ``q_i``), under ``torch.enable_grad`` so that it works inside ``torch.no_grad``
    (an evaluation loop); no parameter's ``.grad`` is touched. Arguments as
    :func:`wasserstein_loss`; ``loss`` of the result is the detached value.
    """
    rho = _check_rho_form(rho, form)
    batch = batch or GlobalBatch()
    with torch.enable_grad():
        emb, l, g, _ = _first_pass(embed_fn, loss_fn, False, [])
    g = tuple(gk.detach() for gk in g)
    q = _per_sample_sq(g)
    st = _stats(emb, l, q, g, batch)
    penalty = _penalty(rho, form, st.mean_q)
    value = st.mean_l + penalty
    return WassersteinResult(value.to(l.dtype), value, penalty, l.detach(), q, float("nan"), st)


def _stats(emb, l, q, g, batch: GlobalBatch) -> WassersteinWindow:
    """This micro-batch's statistics, reduced over the processes."""
    f64 = {"dtype": torch.float64, "device": l.device}
    return WassersteinWindow(
        batch.sum(torch.tensor(float(l.shape[0]), **f64)), batch.sum(l.detach().double().sum()),
        batch.sum(q.detach().double().sum()),
        batch.max(max(gk.detach().double().norm(dim=-1).max() for gk in g)),
        batch.sum(sum(e.detach().double().pow(2).sum() for e in emb)),
        batch.sum(torch.tensor(float(sum(e[..., 0].numel() for e in emb)), **f64)))


def _double_backward(embed_fn, loss_fn, rho, form, batch, window):
    emb, l, g, _ = _first_pass(embed_fn, loss_fn, True, [])
    q = _per_sample_sq(g)
    st = _stats(emb, l, q, g, batch) if window is None else window
    n, mean_l, mean_q = st.n, st.mean_l, st.mean_q
    w = batch.world_size * st.micro_batches
    penalty = _penalty(rho, form, mean_q)
    if form == "squared":
        surrogate = w * (l + rho * q).sum() / n
    else:
        coef = rho / (2.0 * torch.sqrt(mean_q)) if float(mean_q) > 0 else 0.0 * mean_q
        surrogate = w * (l.sum() + coef * q.sum()) / n
    value = mean_l + penalty
    return WassersteinResult(_shifted(surrogate.to(l.dtype), value), value, penalty,
                             l.detach(), q.detach(), float("nan"), st)


def _finite_difference(embed_fn, loss_fn, rho, form, params, fd_eps, scheme, batch, no_sync,
                       window):
    rng = _rng_state()
    with no_sync():
        emb, l, g, g_params = _first_pass(embed_fn, loss_fn, False, params)
    g = tuple(gk.detach() for gk in g)
    q = _per_sample_sq(g)
    st = _stats(emb, l, q, g, batch) if window is None else window
    n, mean_l, mean_q = st.n, st.mean_l, st.mean_q
    dtype = l.dtype
    # the step follows the coarsest precision of the computation: the embeddings, the
    # log-probabilities (a float32 LM head under a float64 model rounds at float32) and an
    # active autocast (TRL's default bf16 mixed precision computes in bf16 on float32 tensors)
    device = emb[0].device.type
    dtypes = [emb[0].dtype, dtype] + ([torch.get_autocast_dtype(device)]
                                      if torch.is_autocast_enabled(device) else [])
    coarse = max(dtypes, key=lambda d: torch.finfo(d).eps)
    fd_eps = default_fd_eps(coarse, scheme) if fd_eps is None else check_positive(fd_eps, "fd_eps")
    penalty = _penalty(rho, form, mean_q)
    if form == "squared":
        a = 2.0 * rho / n
    else:
        a = rho / (n * torch.sqrt(mean_q)) if float(mean_q) > 0 else 0.0 * n
    value = mean_l + penalty
    gmax = st.gmax
    w = batch.world_size * st.micro_batches
    if float(a) == 0.0 or float(gmax) == 0.0:
        eps, first, terms = float("nan"), 1.0 / n, []
    else:
        eps = float(fd_eps * torch.sqrt(st.e_sq / st.e_count) / gmax)
        if eps == 0.0:
            eps = fd_eps / float(gmax)
        if scheme == "forward":
            first, terms = 1.0 / n - a / eps, [(eps, a / eps)]
        else:
            first, terms = 1.0 / n, [(eps, a / (2 * eps)), (-eps, -a / (2 * eps))]
    surrogate = 0.0
    for step, coef in terms:
        _set_rng_state(rng)
        moved = tuple(e + step * gk.to(e.dtype) for e, gk in zip(embed_fn(), g, strict=True))
        surrogate = surrogate + float(coef) * loss_fn(*moved).sum()
    first = float(first)
    linear = sum((first * gp.detach() * p).sum() for gp, p in zip(g_params, params, strict=True)
                 if gp is not None)
    surrogate = w * (surrogate + linear)
    if not isinstance(surrogate, torch.Tensor):
        raise ValueError("params must hold at least one tensor the loss depends on")
    return WassersteinResult(_shifted(surrogate.to(dtype), value), value, penalty,
                             l.detach(), q.detach(), eps, st)
