"""Step time and peak memory of each torch loss relative to DPO on a small GPT-2.

One training step = forward, loss, backward and AdamW update of
:class:`simulator.torch_backend.trainer.Trainer` (its ``micro_batch_loss``), on a
randomly initialised GPT-2 (default: 4 layers, width 128, 4 heads, vocabulary
4096) with a batch of 16 pairs of length 48 (16 prompt + 32 response tokens).

Time: all losses share one process and one model; the repetitions are
interleaved (rep 1 of every loss, then rep 2, ...) and the median per loss is
divided by DPO's median. Memory on CUDA: ``torch.cuda.max_memory_allocated``
during one step minus the memory allocated before it, in the same process.
On CPU: one fresh subprocess per loss, run with
``MALLOC_MMAP_THRESHOLD_=65536`` (large buffers are mmap-ed and returned to the
system when freed, so the resident set follows live memory), does one warm-up
step, resets the kernel's high-water mark (``/proc/self/clear_refs``), and
reports ``VmHWM - VmRSS`` over the next step: the extra resident memory the
step needs above the model, optimizer state and data.

``--trl``: the same model under :class:`simulator.torch_backend.trl.RobustDPOTrainer`
and TRL's own ``DPOTrainer`` (``loss_type="sigmoid"``), ``--accum`` micro-batches of
``--batch / --accum`` pairs per optimizer step (default 4 x 4), the reference a frozen
copy of the model (TRL's default, no precomputed log-probabilities). One step is what
``transformers.Trainer`` runs per optimizer step: ``get_batch_samples`` (with the robust
window pre-pass), ``training_step`` per micro-batch, the optimizer step; the
repetitions are interleaved and each median is divided by TRL's sigmoid DPO's.

Usage::

    python benchmarks/torch_losses.py                   # CPU, float32, eager attention
    python benchmarks/torch_losses.py --device cuda --dtype bf16 --attn sdpa --out t.md
    python benchmarks/torch_losses.py --trl --accum 4   # TRL trainers, time / TRL sigmoid DPO
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

LOSSES = {
    "dpo": {"method": "dpo"},
    "kldpo-tau": {"method": "kldpo-tau", "tau": 1.0},
    "kldpo-clip": {"method": "kldpo-clip", "tau": 1.0},
    "chi2-var": {"method": "chi2-var", "rho": 0.1},
    "wdpo-fd": {"method": "wdpo", "rho": 0.1, "wdpo_mode": "finite-difference"},
    "wdpo-double-backward": {"method": "wdpo", "rho": 0.1, "wdpo_mode": "double-backward"},
}


def build(args, loss: str):
    """A trainer for ``loss`` and one padded batch on the chosen device."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from simulator.torch_backend.pairs import TokenizedPairs
    from simulator.torch_backend.trainer import TrainConfig, Trainer

    logging.set_verbosity_error()
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=args.vocab, n_positions=args.length, n_embd=args.width,
                      n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                      attn_implementation=args.attn)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = GPT2LMHeadModel(conf).to(dtype)
    g = torch.Generator().manual_seed(1)
    p_len = args.length // 3
    recs = [{"prompt": torch.randint(0, args.vocab, (p_len,), generator=g).tolist(),
             "chosen": torch.randint(0, args.vocab, (args.length - p_len,), generator=g).tolist(),
             "rejected": torch.randint(0, args.vocab, (args.length - p_len,),
                                       generator=g).tolist()} for _ in range(args.batch)]
    data = TokenizedPairs(recs)
    cfg = TrainConfig(beta=0.1, lr=1e-5, batch_size=args.batch, max_steps=1, progress=False,
                      device=args.device, bf16=args.dtype == "bf16", **LOSSES[loss])
    trainer = Trainer(model, data, cfg)
    return trainer, data.collate(range(args.batch)).to(trainer.device)


def step(trainer, batch) -> None:
    """One optimizer step of the trainer on ``batch``."""
    trainer.opt.zero_grad(set_to_none=True)
    trainer.micro_batch_loss(batch)["loss"].backward()
    trainer.opt.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_losses(args, losses) -> tuple[dict, dict, dict]:
    """Median step time per loss (interleaved repetitions), failures, CUDA peak memory."""
    setups, failed, times = {}, {}, {}
    for loss in losses:
        try:
            setups[loss] = build(args, loss)
            step(*setups[loss])  # warm-up (and a check that the loss runs at all)
        except Exception as exc:  # noqa: BLE001 -- reported, e.g. no double backward in sdpa
            failed[loss] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            setups.pop(loss, None)
    for _ in range(args.reps):
        for loss, (trainer, batch) in setups.items():
            _sync(args.device)
            t0 = time.perf_counter()
            step(trainer, batch)
            _sync(args.device)
            times.setdefault(loss, []).append(time.perf_counter() - t0)
    mem = {}
    if args.device.startswith("cuda"):
        mem = {loss: cuda_memory(*setup) for loss, setup in setups.items()}
    return {k: statistics.median(v) for k, v in times.items()}, failed, mem


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def cuda_memory(trainer, batch) -> int:
    """Peak CUDA bytes allocated during one step above those allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(trainer, batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory_one(args, loss: str) -> int:
    """Peak extra resident bytes of one CPU step (module docstring), in this process."""
    trainer, batch = build(args, loss)
    step(trainer, batch)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS")
    step(trainer, batch)
    return (_status("VmHWM") - base) * 1024


def memory_losses(args, losses) -> dict:
    """Peak memory per loss, each in a fresh subprocess (``None`` when it failed)."""
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for loss in losses:
        cmd = [sys.executable, __file__, "--memory-only", loss] + _passthrough(args)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        out[loss] = json.loads(lines[-1])["bytes"] if res.returncode == 0 and lines else None
    return out


def _passthrough(args) -> list[str]:
    keys = ("device", "dtype", "attn", "layers", "width", "heads", "vocab", "batch", "length",
            "threads")
    return [a for k in keys for a in (f"--{k}", str(getattr(args, k)))]


def table(args, times, failed, mem) -> str:
    """Markdown table of the results."""
    base_t, base_m = times.get("dpo"), (mem or {}).get("dpo")
    head = (f"GPT-2 {args.layers} layers, width {args.width}, vocab {args.vocab}, batch "
            f"{args.batch} pairs x length {args.length}; device {args.device}, dtype "
            f"{args.dtype}, attention {args.attn}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; median of {args.reps} interleaved steps\n\n")
    rows = ["| loss | step time (ms) | time / DPO | peak step memory (MiB) | memory / DPO |",
            "|---|---|---|---|---|"]
    for loss in LOSSES:
        if loss not in times and loss not in failed:
            continue
        if loss in failed or base_t is None:
            rows.append(f"| {loss} | failed: {failed.get(loss, 'dpo failed')} | | | |")
            continue
        m = (mem or {}).get(loss)
        rows.append(f"| {loss} | {1e3 * times[loss]:.1f} | {times[loss] / base_t:.2f}x | "
                    + (f"{m / 2**20:.1f} | {m / base_m:.2f}x |" if m and base_m else "n/a | |"))
    return head + "\n".join(rows) + "\n"


TRL_LOSSES = {
    "trl-sigmoid": None,  # TRL's own DPOTrainer
    "dpo": {"robust_method": "dpo"},
    "kldpo-tau": {"robust_method": "kldpo-tau", "tau": 1.0},
    "kldpo-clip": {"robust_method": "kldpo-clip", "tau": 1.0},
    "kl-var": {"robust_method": "kl-var", "rho": 0.1},
    "chi2-var": {"robust_method": "chi2-var", "rho": 0.1},
    "drdpo": {"robust_method": "drdpo", "beta_prime": 1.0},
    "wdpo-fd": {"robust_method": "wdpo", "rho": 0.1},
    "wdpo-fd-central": {"robust_method": "wdpo", "rho": 0.1, "fd_scheme": "central"},
}


def build_trl(args, loss: str):
    """A TRL trainer for ``loss`` and an endless iterator over its micro-batches."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging
    from trl import DPOConfig, DPOTrainer

    from simulator.torch_backend.trl import RobustDPOConfig, RobustDPOTrainer

    logging.set_verbosity_error()
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(args.vocab - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>")
    g = torch.Generator().manual_seed(1)
    p_len = args.length // 3

    def text(k):
        return " ".join(words[int(i)] for i in torch.randint(2, args.vocab, (k,), generator=g))

    n = args.batch
    ds = Dataset.from_dict({"prompt": [text(p_len) for _ in range(n)],
                            "chosen": [" " + text(args.length - p_len - 1) for _ in range(n)],
                            "rejected": [" " + text(args.length - p_len - 1) for _ in range(n)]})
    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=args.vocab, n_positions=args.length, n_embd=args.width,
                      n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                      attn_implementation=args.attn)
    model = GPT2LMHeadModel(conf).to(torch.float64 if args.dtype == "float64" else torch.float32)
    extra = TRL_LOSSES[loss]
    cls_args, cls = (DPOConfig, DPOTrainer) if extra is None else (RobustDPOConfig,
                                                                   RobustDPOTrainer)
    targs = cls_args(output_dir="unused", per_device_train_batch_size=n // args.accum,
                     gradient_accumulation_steps=args.accum, learning_rate=1e-5, beta=0.1,
                     report_to="none", save_strategy="no", disable_tqdm=True,
                     use_cpu=not args.device.startswith("cuda"), bf16=args.dtype == "bf16",
                     **(extra or {}))
    tr = cls(model, ref_model=copy.deepcopy(model), args=targs, train_dataset=ds,
             processing_class=tokenizer)
    tr.create_optimizer()
    tr.model.train()
    return tr, itertools.cycle(list(tr.get_train_dataloader()))


def trl_step(trainer, batches) -> None:
    """One optimizer step as ``transformers.Trainer`` runs it (module docstring)."""
    window, n_items = trainer.get_batch_samples(batches, trainer.args.gradient_accumulation_steps,
                                                trainer.args.device)
    trainer.current_gradient_accumulation_steps = len(window)
    for inputs in window:
        trainer.training_step(trainer.model, inputs, n_items)
    trainer.optimizer.step()
    trainer.model.zero_grad()


def time_trl(args, losses) -> tuple[dict, dict]:
    """Median optimizer-step time per TRL trainer (interleaved repetitions), failures."""
    setups, failed, times = {}, {}, {}
    for loss in losses:
        try:
            setups[loss] = build_trl(args, loss)
            trl_step(*setups[loss])  # warm-up
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            failed[loss] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            setups.pop(loss, None)
    for _ in range(args.reps):
        for loss, setup in setups.items():
            _sync(args.device)
            t0 = time.perf_counter()
            trl_step(*setup)
            _sync(args.device)
            times.setdefault(loss, []).append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, failed


def trl_table(args, times, failed) -> str:
    """Markdown table of the TRL timings, relative to TRL's sigmoid DPO."""
    import trl

    base = times.get("trl-sigmoid")
    head = (f"TRL {trl.__version__}: GPT-2 {args.layers} layers, width {args.width}, vocab "
            f"{args.vocab}, {args.accum} micro-batches x {args.batch // args.accum} pairs x "
            f"length {args.length} per step; device {args.device}, dtype {args.dtype}, "
            f"attention {args.attn}, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads; median of {args.reps} interleaved optimizer steps\n\n")
    rows = ["| trainer / robust_method | step time (ms) | time / TRL sigmoid DPO |",
            "|---|---|---|"]
    for loss in TRL_LOSSES:
        if loss in failed or (loss in times and base is None):
            rows.append(f"| {loss} | failed: {failed.get(loss, 'trl-sigmoid failed')} | |")
        elif loss in times:
            rows.append(f"| {loss} | {1e3 * times[loss]:.1f} | {times[loss] / base:.2f}x |")
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bf16"],
                   help="parameter dtype; bf16 = float32 weights under bfloat16 autocast")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="attention implementation (sdpa may use fused kernels)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    p.add_argument("--length", type=int, default=48, help="tokens per sequence")
    p.add_argument("--reps", type=int, default=15, help="timed steps per loss")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--trl", action="store_true",
                   help="time the TRL trainers instead (needs the trl extra)")
    p.add_argument("--accum", type=int, default=4,
                   help="--trl: micro-batches per optimizer step (must divide --batch)")
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps({"bytes": memory_one(args, args.memory_only)}))
        return 0
    if args.trl:
        if args.accum < 1 or args.batch % args.accum:
            p.error(f"--accum must be >= 1 and divide --batch {args.batch}, got {args.accum}")
        chosen = list(TRL_LOSSES) if args.losses == ",".join(LOSSES) else \
            ["trl-sigmoid"] + [s for s in args.losses.split(",") if s and s != "trl-sigmoid"]
        unknown = sorted(set(chosen) - set(TRL_LOSSES))
        if unknown:
            p.error(f"--losses with --trl must be among {list(TRL_LOSSES)}, got {unknown}")
        text = trl_table(args, *time_trl(args, chosen))
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text)
        return 0
    losses = [s for s in args.losses.split(",") if s]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown or "dpo" not in losses:
        p.error(f"--losses must include dpo and be among {list(LOSSES)}, got {losses}")
    times, failed, mem = time_losses(args, losses)
    if not args.device.startswith("cuda"):
        mem = None if args.no_memory else memory_losses(
            args, [x for x in losses if x not in failed])
    text = table(args, times, failed, mem)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
