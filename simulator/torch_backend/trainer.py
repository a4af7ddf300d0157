"""DPO / KLDPO / WDPO training of a Hugging Face causal language model (SPEC 4, 7).

* Sequence log-probabilities ``log pi(response | prompt) = sum_t log p(y_t | y_<t)``
  over response tokens only (the loss mask of :mod:`.pairs`; prompt and padding
  tokens contribute nothing).
* Reference log-probabilities are computed once, before training, with a frozen
  copy of the initial model (or a given reference model) and cached (also on
  disk as ``reference_logps.pt``).
* AdamW with a linear warm-up, gradient accumulation (the robust weights span the
  whole accumulation window and every process: a no-grad pre-pass feeds
  :func:`.losses.aggregate_window`, SPEC 7; the gradient is that of the window),
  optional gradient clipping, a tqdm progress bar, one CSV row of metrics per
  optimizer step, checkpoints (model, optimizer, scheduler, random state) and
  exact resume: the data order is a function of ``(seed, epoch)`` only.
* After the warm-up a constant or cosine schedule; metrics optionally to
  TensorBoard; a resume under another configuration is refused (naming the keys);
  the trained model is saved in Hugging Face format at the end.
* Device: CUDA when present (else CPU); ``bf16=True`` runs the forward passes
  under ``torch.autocast`` in bfloat16.
* Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  ``DistributedDataParallel``, each rank reads its shard of every batch through a
  ``DistributedSampler``, and the robust weights are computed over the global
  batch (:mod:`.distributed`); ``batch_size`` is per process.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from .._validation import check_nonnegative, check_positive, check_positive_int
from .distributed import GlobalBatch
from .losses import (
    AGGREGATIONS,
    WindowAggregate,
    aggregate_window,
    aggregation_params,
    dpo_losses,
    weight_summary,
)
from .pairs import PairTensors, TokenizedPairs
from .wasserstein import (
    WASSERSTEIN_FORMS,
    WASSERSTEIN_MODES,
    WassersteinWindow,
    wasserstein_loss,
    wasserstein_value,
    wasserstein_window,
)

__all__ = ["METHODS", "SCHEDULES", "TrainConfig", "lr_factor", "Trainer", "sequence_logps",
           "pick_device", "init_distributed", "METRIC_COLUMNS"]

METHODS = AGGREGATIONS + ("wdpo",)
SCHEDULES = ("constant", "cosine")
#: TrainConfig fields that do not change the computed results: they may differ on resume
RESUME_FREE = ("device", "progress", "checkpoint_every", "tensorboard", "save_model")
METRIC_COLUMNS = ("step", "epoch", "loss", "dpo_loss", "penalty", "reward_margin", "accuracy",
                  "weight_max", "weight_min", "weight_ess", "grad_norm", "lr", "time_s")


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed(device: str | None = None) -> bool:
    """Join the ``torchrun`` process group (``WORLD_SIZE > 1``) unless already joined.

    Backend ``nccl`` on CUDA (each rank on GPU ``LOCAL_RANK``), else ``gloo``.
    Returns whether a multi-process group is active.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dist.is_initialized()
    if not dist.is_initialized():
        cuda = pick_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str = "constant"
              ) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based; :class:`TrainConfig`).

    Linear warm-up ``(step + 1) / warmup_steps`` while ``step < warmup_steps``, then
    ``1`` (``constant``) or ``(1 + cos(pi (step - w) / (max_steps - w))) / 2``
    (``cosine``, ``w = warmup_steps``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor, inputs_embeds: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``sum_t loss_mask[t] log p(input_ids[t] | input_ids[<t])`` per row, shape ``(N,)``.

    The first token of a row has no prefix and never counts. Log-softmax is
    evaluated in float32 at least (``gather - logsumexp``).
    """
    if inputs_embeds is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    else:
        out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    logits = out.logits[:, :-1]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    target = input_ids[:, 1:].unsqueeze(-1)
    token_lp = torch.gather(logits, -1, target).squeeze(-1) - torch.logsumexp(logits, -1)
    return (token_lp * loss_mask[:, 1:].to(token_lp.dtype)).sum(-1)


@dataclass
class TrainConfig:
    """Training options.

    Attributes
    ----------
    method : str
        ``dpo``, ``kldpo-tau``, ``kldpo-clip``, ``kl-var``, ``chi2-var``, ``drdpo`` or ``wdpo``.
    beta : float
        DPO temperature.
    tau, clip, rho, beta_prime : float
        Robust parameters (:func:`.losses.aggregate`; ``rho`` is the WDPO weight too).
    wdpo_form, wdpo_mode, fd_eps, fd_scheme
        WDPO surrogate options (:func:`.wasserstein.wasserstein_loss`).
    lr, weight_decay, warmup_steps, max_grad_norm
        AdamW; ``max_grad_norm = 0``: no clipping.
    schedule : str
        Learning-rate factor after a linear warm-up over ``warmup_steps`` (step ``s``
        counted from 0: ``(s + 1) / warmup_steps``): ``constant`` (1) or ``cosine``
        (``(1 + cos(pi (s - w) / (max_steps - w))) / 2``, ``w = warmup_steps``: Hugging
        Face's ``get_cosine_schedule_with_warmup`` after the warm-up, 0 at ``max_steps``;
        its warm-up ``s / w`` would spend the first step at learning rate 0).
    batch_size, grad_accum
        Pairs per micro-batch per process, micro-batches per optimizer step.
    max_steps : int
        Optimizer steps (the data are cycled through epochs).
    seed : int
        Seeds the data order and ``torch``.
    bf16 : bool
        bfloat16 autocast for the forward passes.
    device : str, optional
        Overrides the automatic choice.
    checkpoint_every : int
        Steps between checkpoints (0: only at the end).
    progress : bool
        Show a tqdm bar (rank 0).
    tensorboard : bool
        Also log the metrics with ``torch.utils.tensorboard.SummaryWriter`` to
        ``out_dir/tensorboard`` (needs the ``tensorboard`` package).
    save_model : bool
        At the end, ``save_pretrained`` the trained model (and the tokenizer given to
        the trainer) to ``out_dir/model`` (Hugging Face format).
    """

    method: str = "dpo"
    beta: float = 0.1
    tau: float | None = None
    clip: float = 10.0
    rho: float | None = None
    beta_prime: float | None = None
    wdpo_form: str = "squared"
    wdpo_mode: str = "finite-difference"
    fd_eps: float | None = None
    fd_scheme: str = "forward"
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    seed: int = 0
    bf16: bool = False
    device: str | None = None
    checkpoint_every: int = 0
    progress: bool = True
    schedule: str = "constant"
    tensorboard: bool = False
    save_model: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.wdpo_form not in WASSERSTEIN_FORMS:
            raise ValueError(f"wdpo_form must be one of {WASSERSTEIN_FORMS}, "
                             f"got {self.wdpo_form!r}")
        if self.wdpo_mode not in WASSERSTEIN_MODES:
            raise ValueError(f"wdpo_mode must be one of {WASSERSTEIN_MODES}, "
                             f"got {self.wdpo_mode!r}")
        if self.method == "wdpo" and self.rho is None:
            raise ValueError("rho must be given for method 'wdpo', got None")
        if self.method != "wdpo":  # the aggregation's own parameter checks, up front
            aggregation_params(self.method, self.tau, self.clip, self.rho, self.beta_prime)
        for name in ("batch_size", "grad_accum", "max_steps"):
            check_positive_int(getattr(self, name), name)
        for name in ("warmup_steps", "checkpoint_every"):
            check_positive_int(getattr(self, name), name, minimum=0)
        for name in ("beta", "lr"):
            check_positive(getattr(self, name), name)
        for name in ("weight_decay", "max_grad_norm"):
            check_nonnegative(getattr(self, name), name)
        if self.fd_eps is not None:
            check_positive(self.fd_eps, "fd_eps")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


class Trainer:
    """Preference training of a causal LM (module docstring).

    Parameters
    ----------
    model : nn.Module or str
        An ``AutoModelForCausalLM``-style model (called with ``input_ids`` or
        ``inputs_embeds`` and ``attention_mask``, returning ``.logits``), or a
        path for ``AutoModelForCausalLM.from_pretrained``.
    data : TokenizedPairs
    config : TrainConfig
    out_dir : path, optional
        Where ``metrics.csv``, ``checkpoint.pt``, ``reference_logps.pt`` and
        ``train_config.json`` go (nothing is written when ``None``).
    reference_model : nn.Module, optional
        Frozen reference (default: a copy of ``model`` before training).
    tokenizer : optional
        Saved with the trained model (``save_pretrained``) when ``config.save_model``.

    Raises
    ------
    ValueError
        When a token id of ``data`` is outside the model's embedding table (naming the
        file, line, field and id), or when ``out_dir`` holds a checkpoint of another
        configuration (at :meth:`train` with ``resume``; naming the keys).
    """

    def __init__(self, model, data: TokenizedPairs, config: TrainConfig, out_dir=None,
                 reference_model=None, tokenizer=None) -> None:
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        if not isinstance(data, TokenizedPairs):
            raise ValueError(f"data must be a TokenizedPairs, got {type(data).__name__}")
        self.cfg = config
        self.data = data
        self.tokenizer = tokenizer
        self.out_dir = None if out_dir is None else Path(out_dir)
        init_distributed(config.device)
        self.batch = GlobalBatch()
        self.rank, self.world = self.batch.rank, self.batch.world_size
        self.device = pick_device(config.device)
        if self.device.type == "cuda" and self.batch.active:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(config.seed)
        self.model = model.to(self.device)
        self.model_sha = _fingerprint(self.model)  # of the initial model (train_config.json)
        table = getattr(self.model, "get_input_embeddings", lambda: None)()
        if isinstance(getattr(table, "num_embeddings", None), int):
            data.check_vocab(table.num_embeddings)
        if config.method == "wdpo" and not isinstance(table, torch.nn.Module):
            raise ValueError("method 'wdpo' needs a model whose input embeddings can be "
                             "reached (model.get_input_embeddings() returned "
                             f"{type(table).__name__})")
        ref = copy.deepcopy(self.model) if reference_model is None else reference_model
        self.ref_logps = self._reference_logps(ref.to(self.device))
        del ref
        self.ddp = None
        if self.batch.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, config.warmup_steps, config.max_steps,
                                          config.schedule))
        self.sampler = DistributedSampler(range(len(data)), num_replicas=self.world,
                                          rank=self.rank, shuffle=True, seed=config.seed,
                                          drop_last=True)
        self.per_epoch = len(self.sampler) // config.batch_size
        if self.per_epoch < 1:
            raise ValueError(f"batch_size {config.batch_size} x {self.world} processes exceeds "
                             f"the {len(data)} pairs of the data set")
        self.step = 0

    # ----------------------------------------------------------------- helpers
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    @torch.no_grad()
    def _reference_logps(self, ref) -> torch.Tensor:
        cache = None if self.out_dir is None else self.out_dir / "reference_logps.pt"
        # the cache is valid for these pairs and this reference only
        key = None if cache is None else {"data_sha256": self._data_sha(),
                                          "reference": _fingerprint(ref)}
        if cache is not None and cache.exists():
            saved = torch.load(cache, map_location=self.device)
            if isinstance(saved, dict) and saved.get("key") == key:
                return saved["logps"]
        ref.eval()
        out = torch.empty(len(self.data), 2, dtype=torch.float64, device=self.device)
        step = max(self.cfg.batch_size, 1)
        for start in range(0, len(self.data), step):
            idx = list(range(start, min(start + step, len(self.data))))
            b = self.data.collate(idx).to(self.device)
            with self._autocast():
                lp = sequence_logps(ref, b.input_ids, b.attention_mask, b.loss_mask)
            out[idx, 0], out[idx, 1] = lp[: len(idx)].double(), lp[len(idx):].double()
        if cache is not None and self.rank == 0:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"logps": out.cpu(), "key": key}, cache)
        return out

    def _indices(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.per_epoch)
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        bs = self.cfg.batch_size
        return order[pos * bs:(pos + 1) * bs]

    def _net(self):
        return self.ddp if self.ddp is not None else self.model

    def micro_batch_loss(self, b: PairTensors,
                         window: WindowAggregate | WassersteinWindow | None = None,
                         k: int = 0) -> dict:
        """Loss (for ``backward``) and statistics of one micro-batch.

        ``window``: the coefficients of the whole accumulation window from the
        pre-pass of :meth:`train` (micro-batch ``k`` of it; for ``wdpo`` its
        :class:`.wasserstein.WassersteinWindow`); ``None``: the micro-batch is its
        own aggregation batch. Under ``torch.no_grad`` (the pre-pass) ``wdpo`` gives
        its value only. The returned ``losses`` and ``wdpo_stats`` are what the
        pre-pass collects.
        """
        cfg, net, n = self.cfg, self._net(), b.index.shape[0]
        ref = self.ref_logps[b.index].to(torch.float32 if cfg.bf16 else torch.float64)
        ref_c, ref_r = ref[:, 0], ref[:, 1]

        def losses_at(embeds=None):
            with self._autocast():
                lp = sequence_logps(net, b.input_ids, b.attention_mask, b.loss_mask, embeds)
            lp = lp.to(ref.dtype)
            return dpo_losses(lp[:n], lp[n:], ref_c, ref_r, cfg.beta), lp

        if cfg.method == "wdpo":
            table = self.model.get_input_embeddings()
            saved = {}

            def embed_fn():
                e = table(b.input_ids)
                return e[:n], e[n:]

            def loss_fn(ec, er):
                l, lp = losses_at(torch.cat([ec, er]))
                saved.setdefault("lp", lp.detach())
                return l

            if torch.is_grad_enabled():
                res = wasserstein_loss(embed_fn, loss_fn, cfg.rho, form=cfg.wdpo_form,
                                       mode=cfg.wdpo_mode, params=self.model.parameters(),
                                       fd_eps=cfg.fd_eps, fd_scheme=cfg.fd_scheme,
                                       batch=self.batch, window=window,
                                       no_sync=None if self.ddp is None else self.ddp.no_sync)
            else:  # the pre-pass (or an evaluation): value and statistics, no parameter grad
                res = wasserstein_value(embed_fn, loss_fn, cfg.rho, form=cfg.wdpo_form,
                                        batch=self.batch)
            weights = torch.full((n,), 1.0 / (n * self.world), device=self.device)  # drop_last
            lp, value, dpo_l = saved["lp"], res.value, res.losses
            penalty = float(res.penalty)
            loss, summary = res.loss, weight_summary(self.batch.gather(weights)[0])
            stats = res.stats
        else:
            l, lp = losses_at()
            if window is None:
                window = aggregate_window([l.detach()], cfg.method, tau=cfg.tau, clip=cfg.clip,
                                          rho=cfg.rho, beta_prime=cfg.beta_prime,
                                          batch=self.batch)
                k = 0
            loss, value, dpo_l, penalty = window.loss(k, l), window.value, l.detach(), 0.0
            summary, stats = weight_summary(window.global_weights), None
            lp = lp.detach()
        # statistics of the global batch (identical on every rank)
        margin = self.batch.gather(cfg.beta * ((lp[:n] - ref_c) - (lp[n:] - ref_r)))[0].double()
        return {"loss": loss, "losses": dpo_l, "wdpo_stats": stats, "value": float(value),
                "dpo_loss": float(self.batch.gather(dpo_l.double())[0].mean()),
                "penalty": penalty, "reward_margin": float(margin.mean()),
                "accuracy": float((margin > 0).double().mean()), **summary}

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume: model, optimizer, scheduler, step, random state."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step,
                "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg)}

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint.pt`` atomically (rank 0); returns its path."""
        if self.out_dir is None or self.rank != 0:
            return None
        path = self.out_dir / "checkpoint.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self, path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"].cpu())

    def run_record(self) -> dict:
        """What ``train_config.json`` holds: the :class:`TrainConfig`, ``world_size``,
        ``global_batch`` (pairs per optimizer step: ``batch_size x grad_accum x world_size``),
        ``n_pairs``, ``data_sha256`` (of the tokenised pairs) and ``model_sha256`` (of the
        initial parameters)."""
        return {**asdict(self.cfg), "world_size": self.world,
                "global_batch": self.cfg.batch_size * self.cfg.grad_accum * self.world,
                "n_pairs": len(self.data), "data_sha256": self._data_sha(),
                "model_sha256": self.model_sha}

    def _data_sha(self) -> str:
        return hashlib.sha256(json.dumps(self.data.examples).encode()).hexdigest()

    def check_resume(self) -> None:
        """Refuse to resume ``out_dir`` when it was trained with another configuration.

        Compares :meth:`run_record` with the saved ``train_config.json`` on every key
        but :data:`RESUME_FREE`; raises ``ValueError`` naming the keys that differ.
        """
        saved_path = None if self.out_dir is None else self.out_dir / "train_config.json"
        if saved_path is None or not saved_path.exists():
            return
        saved, now = json.loads(saved_path.read_text()), self.run_record()
        keys = sorted(k for k in set(saved) | set(now)
                      if k not in RESUME_FREE and saved.get(k) != now.get(k))
        if keys:
            diff = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys)
            raise ValueError(f"{self.out_dir} holds a run with another configuration ({diff}); "
                             "refusing to resume it with this one: restore the configuration, "
                             "choose another output directory, or start over (resume=False, "
                             "--restart)")

    def save_pretrained(self, path=None) -> Path | None:
        """``save_pretrained`` the model (and tokenizer) to ``path`` (default ``out_dir/model``).

        Rank 0 only; returns the directory, or ``None`` when nothing was written.
        """
        if self.rank != 0 or (path is None and self.out_dir is None):
            return None
        path = self.out_dir / "model" if path is None else Path(path)
        if not hasattr(self.model, "save_pretrained"):
            raise ValueError(f"save_model: the model ({type(self.model).__name__}) has no "
                             "save_pretrained; set save_model=False")
        self.model.save_pretrained(path)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
        return path

    def _metrics_writer(self, resume: bool):
        if self.out_dir is None or self.rank != 0:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "train_config.json").write_text(json.dumps(self.run_record(), indent=2))
        path = self.out_dir / "metrics.csv"
        rows = []
        if resume and path.exists():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= self.step]
        return _MetricLog(path, rows, self.out_dir / "tensorboard" if self.cfg.tensorboard
                          else None)

    # ---------------------------------------------------------------- training
    def train(self, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        """Run until ``max_steps`` (or ``stop_after`` more steps); returns the metric rows.

        With ``resume`` and an existing ``out_dir/checkpoint.pt`` training continues
        from it, and ``metrics.csv`` keeps the rows up to the checkpoint.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        ckpt = None if self.out_dir is None else self.out_dir / "checkpoint.pt"
        if resume and ckpt is not None and ckpt.exists():
            self.check_resume()
            self.load_checkpoint(ckpt)
        out = self._metrics_writer(resume)
        last = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {cfg.method}",
                   disable=not cfg.progress or self.rank != 0, leave=False)
        rows, t0 = [], time.perf_counter()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        while self.step < last:
            self.opt.zero_grad(set_to_none=True)
            stats = []
            batches = [self.data.collate(self._indices(self.step * cfg.grad_accum + k))
                       .to(self.device) for k in range(cfg.grad_accum)]
            window = None
            if cfg.grad_accum > 1 and (cfg.method not in ("dpo", "wdpo") or
                                       (cfg.method, cfg.wdpo_form) == ("wdpo", "gr")):
                # pre-pass: the robust weights (the gr normaliser) span the whole window
                with torch.no_grad():
                    pre = [self.micro_batch_loss(b) for b in batches]
                window = wasserstein_window([p["wdpo_stats"] for p in pre]) \
                    if cfg.method == "wdpo" else aggregate_window(
                        [p["losses"] for p in pre], cfg.method, tau=cfg.tau, clip=cfg.clip,
                        rho=cfg.rho, beta_prime=cfg.beta_prime, batch=self.batch)
            for k, b in enumerate(batches):
                sync = k == cfg.grad_accum - 1 or self.ddp is None
                ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
                with ctx:
                    st = self.micro_batch_loss(b, window, k)
                    del st["losses"], st["wdpo_stats"]
                    _backward(st.pop("loss") / cfg.grad_accum)
                stats.append(st)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            lr = self.sched.get_last_lr()[0]
            self.opt.step()
            self.sched.step()
            self.step += 1
            row = {"step": self.step, "epoch": (self.step * cfg.grad_accum - 1) // self.per_epoch,
                   "loss": _mean(stats, "value"), "grad_norm": float(grad_norm), "lr": lr,
                   "time_s": time.perf_counter() - t0}
            row.update({c: _mean(stats, c) for c in METRIC_COLUMNS if c not in row})
            rows.append(row)
            if out is not None:
                out.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.step >= cfg.max_steps or stop_after is not None:
            self.save_checkpoint()
        if self.step >= cfg.max_steps and cfg.save_model:
            self.save_pretrained()
        if out is not None:
            out.close()
        if self.batch.active:
            dist.barrier()
        return rows


def _fingerprint(model) -> str:
    """SHA-256 of the parameters' names, shapes and float64 sums (tells models apart cheaply)."""
    parts = [(name, list(p.shape), float(p.detach().double().sum()))
             for name, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class _MetricLog:
    """``metrics.csv`` (rewritten with the ``rows`` kept on resume) and optional TensorBoard."""

    def __init__(self, path: Path, rows: list[dict], tensorboard_dir: Path | None) -> None:
        self.fh = path.open("w", newline="")
        self.csv = csv.DictWriter(self.fh, fieldnames=METRIC_COLUMNS)
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.fh.flush()
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("tensorboard=True needs the tensorboard package "
                                 f"(pip install tensorboard): {exc}") from exc
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict) -> None:
        """One optimizer step: a CSV row, and scalars ``train/<column>`` at ``step``."""
        self.csv.writerow(row)
        self.fh.flush()
        if self.tb is not None:
            for key in METRIC_COLUMNS[1:]:
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])
            self.tb.flush()

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, turning a missing double-backward kernel into a clear error."""
    try:
        loss.backward()
    except RuntimeError as exc:
        if "derivative for" not in str(exc):
            raise
        raise RuntimeError(f"{exc}: a kernel of the model (e.g. fused sdpa attention) has no "
                           "second derivative; use wdpo_mode='finite-difference' or load the "
                           "model with attn_implementation='eager'") from exc


def _mean(stats: list[dict], key: str) -> float:
    return sum(s[key] for s in stats) / len(stats)
