"""The ``llm`` experiment: DPO, KLDPO and WDPO on a small causal language model (SPEC 7).

The paper's Emotion experiment in miniature, fully offline. A randomly
initialised GPT-2 (``GPT2Config`` from the configuration, no download) is the
reference policy. Two rewards score a generated response: ``r_1`` = share of
its tokens in ``[0, V/4)``, ``r_2`` = share in ``[V/4, V/2)``. For ``n_pairs``
random prompts the reference generates two responses; the label follows the
Bradley-Terry model on the mixture ``r_alpha = alpha r_1 + (1 - alpha) r_2`` at
``alpha = alpha_train`` with temperature ``reward_scale``. Each method is
trained from the reference with :class:`simulator.torch_backend.trainer.Trainer`
and evaluated on ``n_eval`` fresh generations (new prompts): the mean of
``r_1``, ``r_2`` and of every mixture in ``alpha_test``.

A cell is one ``(method, seed)``; the seed fixes the model initialisation, the
data, the training order and the evaluation draws, so all methods of one seed
share the reference, the data and the evaluation prompts. Rows: one per
``alpha_test`` with ``reward`` (mean ``r_alpha`` of the trained policy),
``reward_ref`` (of the reference), ``r1``, ``r2``, ``r1_ref``, ``r2_ref``,
``train_loss``, ``train_accuracy``, ``train_margin`` (last step) and
``train_time_s``. Summary ``llm_summary.csv``: per method, the mean over seeds
of the in-distribution reward (``alpha_test`` closest to ``alpha_train``), the
worst reward over ``alpha_test``, and the gains over the reference.

``--model PATH --data FILE.jsonl`` instead trains every configured method on a
real model and data set (see :func:`run_special`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from simulator.torch_backend.pairs import TokenizedPairs
from simulator.torch_backend.trainer import TrainConfig, Trainer

NAME = "llm"
DESCRIPTION = ("Torch backend on a small GPT-2 (SPEC 7): two token-share rewards, preferences "
               "from a mixture at alpha_train over reference generations; DPO, KLDPO and WDPO "
               "trained and evaluated on fresh generations under every reward mixture.")

METHOD_ARGS = {"dpo": {"method": "dpo"}, "kldpo": {"method": "kldpo-tau"},
               "kldpo-clip": {"method": "kldpo-clip"}, "chi2": {"method": "chi2-var"},
               "wdpo": {"method": "wdpo"}}


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per ``(method, seed)``."""
    bad = [m for m in cfg["methods"] if m not in METHOD_ARGS]
    if bad:
        raise ValueError(f"methods must be among {sorted(METHOD_ARGS)}, got {bad}")
    if not 0 <= cfg["alpha_train"] <= 1 or any(not 0 <= a <= 1 for a in cfg["alpha_test"]):
        raise ValueError(f"alpha_train and alpha_test must lie in [0, 1], got "
                         f"{cfg['alpha_train']} and {cfg['alpha_test']}")
    return [{"method": m, "seed": s} for m in cfg["methods"]
            for s in range(cfg["seed"], cfg["seed"] + cfg["n_seeds"])]


def build_model(cfg: dict[str, Any], seed: int):
    """The reference GPT-2 of a seed (random initialisation, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    conf = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["prompt_len"] +
                      cfg["response_len"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
                      n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(conf).double()


def rewards(responses: torch.Tensor, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``r_1`` and ``r_2``: shares of tokens in ``[0, V/4)`` and ``[V/4, V/2)`` per row."""
    q = vocab_size // 4
    r = responses.cpu().numpy()
    return (r < q).mean(axis=1), ((r >= q) & (r < 2 * q)).mean(axis=1)


@torch.no_grad()
def generate(model, prompts: torch.Tensor, length: int, generator: torch.Generator
             ) -> torch.Tensor:
    """Sample ``length`` tokens after each prompt (ancestral sampling, temperature 1)."""
    model.eval()
    ids = prompts
    for _ in range(length):
        logits = model(input_ids=ids).logits[:, -1].double()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, prompts.shape[1]:]


def _prompts(cfg, n, gen):
    return torch.randint(0, cfg["vocab_size"], (n, cfg["prompt_len"]), generator=gen)


def preference_records(cfg: dict[str, Any], model, seed: int) -> list[dict]:
    """Training pairs from the reference with Bradley-Terry labels on ``r_alpha_train``."""
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    prompts = _prompts(cfg, cfg["n_pairs"], gen)
    a = generate(model, prompts, cfg["response_len"], gen)
    b = generate(model, prompts, cfg["response_len"], gen)
    alpha = cfg["alpha_train"]
    ra, rb = (alpha * r1 + (1 - alpha) * r2 for r1, r2 in
              (rewards(a, cfg["vocab_size"]), rewards(b, cfg["vocab_size"])))
    p = 1.0 / (1.0 + np.exp(-cfg["reward_scale"] * (ra - rb)))
    y = np.random.default_rng([seed, 2]).random(len(p)) < p
    return [{"prompt": prompts[i].tolist(), "chosen": (a if y[i] else b)[i].tolist(),
             "rejected": (b if y[i] else a)[i].tolist()} for i in range(len(p))]


def train_config(cfg: dict[str, Any], method: str, seed: int, **over) -> TrainConfig:
    """The :class:`TrainConfig` of a method under the experiment's configuration."""
    kw = dict(METHOD_ARGS[method], beta=cfg["beta"], tau=cfg["tau"], rho=cfg["rho"],
              wdpo_form=cfg["wdpo_form"], wdpo_mode=cfg["wdpo_mode"], lr=cfg["lr"],
              warmup_steps=cfg["warmup_steps"], batch_size=cfg["batch_size"],
              max_steps=cfg["steps"], seed=seed, progress=False)
    kw.update(over)
    return TrainConfig(**kw)


def evaluate(cfg: dict[str, Any], model, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``r_1`` and ``r_2`` of ``n_eval`` fresh generations (evaluation prompts of the seed)."""
    gen = torch.Generator().manual_seed(seed * 1000 + 2)
    prompts = _prompts(cfg, cfg["n_eval"], gen)
    return rewards(generate(model, prompts, cfg["response_len"], gen), cfg["vocab_size"])


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one method on one seed's data; one row per ``alpha_test``."""
    torch.set_num_threads(int(cfg["torch_threads"]))
    seed = int(cell["seed"])
    ref = build_model(cfg, seed)
    data = TokenizedPairs(preference_records(cfg, ref, seed), vocab_size=cfg["vocab_size"])
    r1_ref, r2_ref = evaluate(cfg, ref, seed)
    policy = build_model(cfg, seed)
    trainer = Trainer(policy, data, train_config(cfg, cell["method"], seed, device="cpu"))
    log = trainer.train()
    r1, r2 = evaluate(cfg, trainer.model, seed)
    last = log[-1]
    base = {"r1": r1.mean(), "r2": r2.mean(), "r1_ref": r1_ref.mean(), "r2_ref": r2_ref.mean(),
            "train_loss": last["loss"], "train_accuracy": last["accuracy"],
            "train_margin": last["reward_margin"], "train_time_s": last["time_s"]}
    return [{"alpha_test": float(a), "reward": a * base["r1"] + (1 - a) * base["r2"],
             "reward_ref": a * base["r1_ref"] + (1 - a) * base["r2_ref"],
             **{k: float(v) for k, v in base.items()}} for a in cfg["alpha_test"]]


def summarize(df: pd.DataFrame, cfg: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``llm_summary``: in-distribution and worst-case reward per method (means over seeds)."""
    alphas = np.asarray(sorted(df["alpha_test"].unique()))
    a_in = float(alphas[np.argmin(np.abs(alphas - cfg["alpha_train"]))])
    per_seed = df.groupby(["method", "seed"], sort=False)
    worst = per_seed.agg(worst_reward=("reward", "min"), worst_reward_ref=("reward_ref", "min"),
                         train_accuracy=("train_accuracy", "first"),
                         train_time_s=("train_time_s", "first"))
    ind = df[np.isclose(df["alpha_test"], a_in)].set_index(["method", "seed"])[
        ["reward", "reward_ref"]].rename(columns={"reward": "in_reward",
                                                  "reward_ref": "in_reward_ref"})
    t = ind.join(worst)
    t["in_gain"] = t["in_reward"] - t["in_reward_ref"]
    t["worst_gain"] = t["worst_reward"] - t["worst_reward_ref"]
    table = t.groupby(level="method", sort=False).mean().reset_index()
    table.insert(1, "alpha_in", a_in)
    table["n_seeds"] = per_seed.size().groupby(level="method", sort=False).size().values
    return {"llm_summary": table}


def add_arguments(parser) -> None:
    """``--model PATH``, ``--data FILE.jsonl``, ``--bf16``, ``--device``."""
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="train on this AutoModelForCausalLM (path or hub name available "
                             "offline) instead of the synthetic grid; needs --data")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="JSONL preference data (prompt, chosen, rejected) for --model")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (--model runs)")
    parser.add_argument("--device", default=None, help="device for --model runs (auto)")


def run_special(args, cfg: dict[str, Any]) -> bool:
    """``--model`` / ``--data``: train every configured method on a real model and data set.

    Writes ``<out>/llm_model/<method>/metrics.csv`` and a checkpoint per method
    (resumable); text fields are tokenised with the model's tokenizer (a model
    directory without one needs token ids in the data).
    """
    if args.model is None and args.data is None:
        return False
    if args.model is None or args.data is None:
        raise ValueError("--model and --data must be given together")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):  # a model directory without tokenizer files
        tok = None
        print(f"no tokenizer found at {args.model}: the data must hold token ids")
    if tok is None:
        data = TokenizedPairs(args.data)
    else:
        data = TokenizedPairs(args.data, tokenizer=tok, pad_id=tok.pad_token_id or 0,
                              max_length=tok.model_max_length if tok.model_max_length < 10**6
                              else None)
    for method in cfg["methods"]:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        conf = train_config(cfg, method, cfg["seed"], bf16=args.bf16, device=args.device,
                            progress=not args.no_progress, checkpoint_every=50)
        out = Path(args.out) / "llm_model" / method
        Trainer(model, data, conf, out_dir=out).train()
        print(f"{method}: metrics in {out / 'metrics.csv'}")
    return True



def validate(cfg: dict[str, Any]) -> None:
    """Check every key before any cell or ``--model`` run (:mod:`experiments.validation`)."""
    from simulator.torch_backend import WASSERSTEIN_FORMS, WASSERSTEIN_MODES

    from . import validation as v

    count = v.POSITIVE_INT
    v.check(cfg, {"methods": v.one_of(*METHOD_ARGS), "vocab_size": v.at_least(4, integer=True),
                  "n_layer": count, "n_embd": count, "n_head": count, "prompt_len": count,
                  "response_len": count, "n_pairs": count, "n_eval": count, "steps": count,
                  "batch_size": count, "torch_threads": count,
                  "warmup_steps": v.NONNEGATIVE_INT, "alpha_train": v.UNIT_INTERVAL,
                  "alpha_test": v.UNIT_INTERVAL, "reward_scale": v.POSITIVE,
                  "beta": v.POSITIVE, "lr": v.POSITIVE, "tau": v.POSITIVE, "rho": v.POSITIVE,
                  "wdpo_form": v.one_of(*WASSERSTEIN_FORMS),
                  "wdpo_mode": v.one_of(*WASSERSTEIN_MODES)})
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"--n-embd (n_embd) must be a multiple of --n-head (n_head), got "
                         f"{cfg['n_embd']} and {cfg['n_head']}")
