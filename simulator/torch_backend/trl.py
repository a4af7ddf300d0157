"""Robust DPO inside Hugging Face TRL: ``RobustDPOConfig`` and ``RobustDPOTrainer`` (SPEC 4, 7).

Needs the ``trl`` extra (tested with trl 1.16, transformers 5.2, peft 0.21). Switching
a TRL DPO script to a robust objective is one class name and one config field::

    from simulator.torch_backend.trl import RobustDPOConfig, RobustDPOTrainer

    args = RobustDPOConfig(output_dir="out", robust_method="kldpo-tau", tau=1.0, ...)
    trainer = RobustDPOTrainer(model, args=args, train_dataset=ds, processing_class=tok)

What is overridden (the narrowest hooks of ``DPOTrainer`` and ``transformers.Trainer``):

* ``compute_loss``: the per-sample DPO losses ``l_i = -logsigmoid(beta h_i)`` from
  TRL's fused LM head (``model(..., labels=..., fused_lm_head=True).log_probs``
  summed over the completion, TRL's ``sigmoid`` loss with ``f_divergence_type =
  "reverse_kl"``) and the reference log-probabilities of TRL's own
  ``compute_ref_log_probs`` (or the precomputed ones), aggregated by
  :func:`.losses.aggregate_window` or, for ``wdpo``, by
  :func:`.wasserstein.wasserstein_loss`;
* ``get_batch_samples`` (where ``transformers.Trainer`` fetches the micro-batches of one
  optimizer step) runs the **pre-pass of the accumulation window**: a no-grad forward
  of every micro-batch gives its detached per-sample losses, gathered over all
  processes, and the robust coefficients are computed once for the whole global
  window; each micro-batch's loss then uses them (:class:`.losses.WindowAggregate`),
  and the reference log-probabilities of the pre-pass are reused, so the window costs
  one extra policy forward per micro-batch, and nothing when there is one micro-batch
  (``wdpo`` with ``wdpo_form="gr"``: a forward and a backward to the embeddings per
  micro-batch give the window's normaliser ``sqrt(mean q)`` and finite-difference step,
  :func:`.wasserstein.wasserstein_window`; ``dpo`` and ``wdpo`` ``squared`` need none);
* ``training_step``: attaches the micro-batch's window entry, and turns torch's error
  for a kernel without second derivatives into :class:`.wasserstein.SecondDerivativeError`.

Logged metrics: TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``num_tokens`` (global over
processes), plus ``robust/objective`` (the robust objective), ``robust/weight_max``,
``robust/weight_min``, ``robust/weight_ess`` (:func:`.losses.weight_summary`) and, for
``wdpo``, ``robust/penalty``. TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy``
are not logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .._validation import check_nonnegative, check_positive
from .distributed import GlobalBatch
from .losses import AGGREGATIONS, aggregate_window, aggregation_params, dpo_losses, weight_summary
from .wasserstein import (
    WASSERSTEIN_FORMS,
    WASSERSTEIN_MODES,
    lacks_second_derivative,
    second_derivative_error,
    wasserstein_loss,
    wasserstein_value,
    wasserstein_window,
)

__all__ = ["ROBUST_METHODS", "RobustDPOConfig", "RobustDPOTrainer"]

ROBUST_METHODS = AGGREGATIONS + ("wdpo",)
# batch keys that are not model inputs (TRL's own list in DPOTrainer._compute_loss)
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass
class RobustDPOConfig(DPOConfig):
    """``DPOConfig`` plus the robust objective (:mod:`.losses`, :mod:`.wasserstein`).

    Attributes
    ----------
    robust_method : str
        ``dpo`` (TRL's ``sigmoid`` loss), ``kldpo-tau``, ``kldpo-clip``, ``kl-var``,
        ``chi2-var``, ``drdpo`` or ``wdpo``.
    tau, clip : float
        KLDPO temperature and clip (``kldpo-tau``, ``kldpo-clip``).
    rho : float
        Radius of ``kl-var``/``chi2-var``, the WDPO penalty weight.
    beta_prime : float
        Dr. DPO temperature.
    wdpo_form, wdpo_mode, fd_eps, fd_scheme
        WDPO options of :func:`.wasserstein.wasserstein_loss`.

    TRL's ``beta`` is the DPO temperature. Only TRL's plain sigmoid loss is robustified:
    ``loss_type=["sigmoid"]``, ``f_divergence_type="reverse_kl"``, no ``ld_alpha``, no
    ``use_weighting``.
    """

    robust_method: str = field(default="dpo", metadata={"help": f"One of {ROBUST_METHODS}."})
    tau: float | None = field(default=None, metadata={"help": "KLDPO temperature."})
    clip: float = field(default=10.0, metadata={"help": "kldpo-clip weight cap."})
    rho: float | None = field(default=None,
                              metadata={"help": "kl-var/chi2-var radius, WDPO weight."})
    beta_prime: float | None = field(default=None, metadata={"help": "Dr. DPO temperature."})
    wdpo_form: str = field(default="squared", metadata={"help": f"One of {WASSERSTEIN_FORMS}."})
    wdpo_mode: str = field(default="finite-difference",
                           metadata={"help": f"One of {WASSERSTEIN_MODES}."})
    fd_eps: float | None = field(default=None,
                                 metadata={"help": "Relative finite-difference step."})
    fd_scheme: str = field(default="forward", metadata={"help": "'forward' or 'central'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.robust_method not in ROBUST_METHODS:
            raise ValueError(f"robust_method must be one of {ROBUST_METHODS}, "
                             f"got {self.robust_method!r}")
        if self.robust_method == "wdpo":
            check_nonnegative(self.rho, "rho")
            for name, allowed in (("wdpo_form", WASSERSTEIN_FORMS),
                                  ("wdpo_mode", WASSERSTEIN_MODES),
                                  ("fd_scheme", ("forward", "central"))):
                value = getattr(self, name)
                if value not in allowed:
                    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
            if self.fd_eps is not None:
                check_positive(self.fd_eps, "fd_eps")
        else:
            aggregation_params(self.robust_method, self.tau, self.clip, self.rho, self.beta_prime)
        for name, plain in (("loss_type", ["sigmoid"]), ("f_divergence_type", "reverse_kl"),
                            ("ld_alpha", None), ("use_weighting", False)):
            if getattr(self, name) != plain:
                raise ValueError(f"RobustDPOConfig robustifies TRL's plain DPO loss: {name} must "
                                 f"be {plain!r}, got {getattr(self, name)!r}")


class RobustDPOTrainer(DPOTrainer):
    """``DPOTrainer`` with the robust objective of ``args.robust_method`` (module docstring).

    Takes exactly ``DPOTrainer``'s arguments; ``args`` must be a :class:`RobustDPOConfig`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RobustDPOConfig):
            raise ValueError(f"args must be a RobustDPOConfig, got {type(self.args).__name__}")
        if self.aux_loss_enabled:
            raise ValueError("RobustDPOTrainer does not support the MoE router auxiliary loss "
                             "(router_aux_loss_coef must be 0)")
        if self.args.robust_method == "wdpo" and not isinstance(
                getattr(self.model, "get_input_embeddings", lambda: None)(), torch.nn.Module):
            raise ValueError("robust_method 'wdpo' needs a model whose input embeddings can be "
                             "reached (model.get_input_embeddings())")
        self.robust_batch = GlobalBatch()
        self._windows: dict[int, tuple] = {}
        self._micro: tuple | None = None

    # ------------------------------------------------------------ the window
    @property
    def _window_method(self) -> bool:
        """Whether the weights depend on the batch (then the window needs a pre-pass)."""
        a = self.args
        return a.robust_method not in ("dpo", "wdpo") or (a.robust_method, a.wdpo_form) == (
            "wdpo", "gr")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """TRL/transformers' window of micro-batches, plus the robust pre-pass over it."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._windows = {}
        if self._window_method and len(batches) > 1:
            self._windows = self._window_pre_pass(batches)
        return batches, num_items

    @torch.no_grad()
    def _window_pre_pass(self, batches: list[dict]) -> dict[int, tuple]:
        """Detached losses of every micro-batch, the window's coefficients, reused references."""
        a = self.args
        self.model.train()
        pre, refs = [], []
        for raw in batches:
            inputs = self._prepare_inputs(raw)
            with self.compute_loss_context_manager(), \
                    disable_gradient_checkpointing(self.model, a.gradient_checkpointing_kwargs):
                ref = self._reference_logps(inputs)
                if a.robust_method == "wdpo":  # the gr normaliser: value and statistics
                    pre.append(self._wdpo(self.model, inputs, ref)[0].stats)
                else:
                    pc, pr = self._policy_logps(self.model, inputs)
                    pre.append(dpo_losses(pc, pr, ref[0].to(pc.dtype), ref[1].to(pc.dtype),
                                          a.beta))
            refs.append(ref)
        window = wasserstein_window(pre) if a.robust_method == "wdpo" else aggregate_window(
            pre, a.robust_method, tau=a.tau, clip=a.clip, rho=a.rho, beta_prime=a.beta_prime,
            batch=self.robust_batch)
        return {id(raw): (window, k, refs[k]) for k, raw in enumerate(batches)}

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch: its window entry is attached for :meth:`compute_loss`."""
        self._micro = self._windows.pop(id(inputs), None)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except RuntimeError as exc:
            if self.args.robust_method == "wdpo" and lacks_second_derivative(exc):
                raise second_derivative_error(str(exc)) from exc
            raise
        finally:
            self._micro = None

    # ------------------------------------------------------------ log-probs
    def _policy_logps(self, model, inputs: dict, inputs_embeds: torch.Tensor | None = None):
        """Chosen and rejected sequence log-probabilities through TRL's fused LM head."""
        kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        if inputs_embeds is not None:
            kwargs.pop("input_ids")
            kwargs["inputs_embeds"] = inputs_embeds
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        out = model(**kwargs, labels=labels, fused_lm_head=True)
        # prompt-learning PEFT prepends virtual tokens: keep the real positions (as TRL does)
        logps = out.log_probs[:, -(completion_mask.shape[1] - 1):].sum(1)
        return logps.chunk(2)

    def _reference_logps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None
                                          else self.model, inputs)

    # ------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The robust loss of one micro-batch (module docstring) and TRL's metrics."""
        a = self.args
        mode = "train" if self.model.training else "eval"
        micro, self._micro = self._micro, None
        ref = micro[2] if micro is not None else self._reference_logps(inputs)
        if a.robust_method == "wdpo":
            res, (pc, pr) = self._wdpo(model, inputs, ref, None if micro is None else micro[0])
            uniform = self.robust_batch.gather(torch.ones(pc.shape[0], dtype=torch.float64,
                                                          device=pc.device))[0]
            loss = res.loss
            extra = {"objective": float(res.value), "penalty": float(res.penalty),
                     **weight_summary(uniform / uniform.shape[0])}
        else:
            pc, pr = self._policy_logps(model, inputs)
            l = dpo_losses(pc, pr, ref[0].to(pc.dtype), ref[1].to(pc.dtype), a.beta)
            if micro is None:
                window, k = aggregate_window([l.detach()], a.robust_method, tau=a.tau,
                                             clip=a.clip, rho=a.rho, beta_prime=a.beta_prime,
                                             batch=self.robust_batch), 0
            else:
                window, k = micro[0], micro[1]
            loss = window.loss(k, l)
            extra = {"objective": float(window.value), **weight_summary(window.global_weights)}
        self._log_metrics(mode, inputs, pc.detach(), pr.detach(), ref, extra)
        if return_outputs:  # DPOTrainer's convention: logits from an extra no-grad forward
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS})
            return loss, outputs
        return loss

    def _wdpo(self, model, inputs: dict, ref, window=None):
        """WDPO result and the policy log-probabilities (the value only under ``no_grad``)."""
        a = self.args
        ids = inputs["input_ids"]
        n = ids.shape[0] // 2
        table = self.accelerator.unwrap_model(model).get_input_embeddings()
        saved = {}

        def embed_fn():
            return table(ids).split(n)  # chosen rows, then rejected rows (the pair view)

        def loss_fn(e_chosen, e_rejected):
            pc, pr = self._policy_logps(model, inputs, torch.cat([e_chosen, e_rejected]))
            saved.setdefault("logps", (pc.detach(), pr.detach()))
            return dpo_losses(pc, pr, ref[0].to(pc.dtype), ref[1].to(pc.dtype), a.beta)

        if torch.is_grad_enabled():
            res = wasserstein_loss(embed_fn, loss_fn, a.rho, form=a.wdpo_form, mode=a.wdpo_mode,
                                   params=model.parameters(), fd_eps=a.fd_eps,
                                   fd_scheme=a.fd_scheme, batch=self.robust_batch,
                                   no_sync=getattr(model, "no_sync", None), window=window)
        else:  # evaluation or the window pre-pass: embedding gradient under enable_grad
            res = wasserstein_value(embed_fn, loss_fn, a.rho, form=a.wdpo_form,
                                    batch=self.robust_batch)
        return res, saved["logps"]

    def _log_metrics(self, mode: str, inputs: dict, pc, pr, ref, extra: dict) -> None:
        gather = self.robust_batch.gather
        chosen = self.args.beta * (pc - ref[0].to(pc.dtype))
        rejected = self.args.beta * (pr - ref[1].to(pc.dtype))
        m = self._metrics[mode]
        for key, v in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                       ("rewards/accuracies", (chosen > rejected).to(pc.dtype)),
                       ("rewards/margins", chosen - rejected), ("logps/chosen", pc),
                       ("logps/rejected", pr)):
            m[key].append(float(gather(v)[0].double().mean()))
        if mode == "train":
            self._total_train_tokens += int(self.robust_batch.sum(inputs["attention_mask"].sum()))
        m["num_tokens"] = [self._total_train_tokens]
        for key, v in extra.items():
            m[f"robust/{key}"].append(v)
