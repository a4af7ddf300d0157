"""The ``llm`` experiment: DPO, KLDPO and WDPO on a causal language model (SPEC 7).

**The miniature** (default, fully offline). A randomly initialised GPT-2
(``GPT2Config`` from the configuration, no download; ``dtype`` float32 by default)
is the reference policy. Two rewards score a generated response: ``r_1`` = share
of its tokens in ``[0, V/4)``, ``r_2`` = share in ``[V/4, V/2)``. For ``n_pairs``
random prompts the reference generates two responses; the label follows the
Bradley-Terry model on the mixture ``r_alpha`` at ``alpha = alpha_train`` with
temperature ``reward_scale``, where ``r_alpha = alpha r_1 + (1 - alpha) r_2``
(``mixing = "convex"``) or ``r_1^alpha r_2^(1 - alpha)`` (``"geometric"``). Each
method is trained from the reference with
:class:`simulator.torch_backend.trainer.Trainer` and evaluated on ``n_eval``
fresh generations (new prompts): the mean of ``r_1``, ``r_2`` and of ``r_alpha``
for every ``alpha`` in ``alpha_test``.

**The paper's Emotion pipeline** (``--model PATH --reward-model PATH``): the same
cells on local Hugging Face models. ``model`` is the policy and the reference,
prompts come from ``prompts`` (a JSONL file with a ``prompt`` field, or a text
file: one prompt per non-empty line) cut to their first ``prompt_len`` tokens,
responses are sampled (``response_len`` new tokens, ``temperature``, ``top_k``),
and ``r_1``, ``r_2`` are the sigmoids of the reward classifier's logits for the
two ``reward_labels`` (multi-label) on the decoded ``prompt + response``.

A cell is one ``(method, seed)``; the seed fixes the model initialisation (the
miniature), the data, the training order and the evaluation draws, so all
methods of one seed share the reference, the data and the evaluation prompts.
Rows: one per ``alpha_test`` with ``reward`` (mean ``r_alpha`` of the trained
policy), ``reward_ref`` (of the reference), ``r1``, ``r2``, ``r1_ref``,
``r2_ref`` (means), ``train_loss``, ``train_accuracy``, ``train_margin`` (last
step) and ``train_time_s``. Summary ``llm_summary.csv``: per method, the mean
over seeds of the in-distribution reward (``alpha_test`` closest to
``alpha_train``), the worst reward over ``alpha_test``, and the gains over the
reference.

``--model PATH --data FILE.jsonl`` instead trains every configured method on a
real model and preference data set (see :func:`run_special`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from simulator.torch_backend.pairs import TokenizedPairs, iter_lines, json_line, token_ids
from simulator.torch_backend.trainer import SCHEDULES, TrainConfig, Trainer

NAME = "llm"
DESCRIPTION = ("Torch backend on a causal LM (SPEC 7): two rewards (token shares on a small "
               "random GPT-2, or a reward classifier's labels with --model/--reward-model), "
               "preferences from a convex or geometric mixture at alpha_train over reference "
               "generations; DPO, KLDPO and WDPO trained and evaluated on fresh generations "
               "under every mixture of alpha_test.")

METHOD_ARGS = {"dpo": {"method": "dpo"}, "kldpo": {"method": "kldpo-tau"},
               "kldpo-clip": {"method": "kldpo-clip"}, "chi2": {"method": "chi2-var"},
               "klvar": {"method": "kl-var"}, "drdpo": {"method": "drdpo"},
               "wdpo": {"method": "wdpo"}}
MIXINGS = ("convex", "geometric")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: configuration key -> TrainConfig field, for the keys whose names differ
TRAIN_KEYS = {"steps": "max_steps"}
#: TrainConfig fields taken from the configuration under their own name
TRAIN_FIELDS = ("beta", "tau", "clip", "rho", "beta_prime", "wdpo_form", "wdpo_mode", "fd_eps",
                "fd_scheme", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "batch_size",
                "grad_accum", "schedule", "checkpoint_every", "tensorboard", "save_model",
                "bf16", "device")


def cells(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per ``(method, seed)`` (the keys are checked by :func:`validate`)."""
    return [{"method": m, "seed": s} for m in cfg["methods"]
            for s in range(cfg["seed"], cfg["seed"] + cfg["n_seeds"])]


def mixture(r1, r2, alpha: float, mixing: str = "convex"):
    """``alpha r_1 + (1 - alpha) r_2`` (convex) or ``r_1^alpha r_2^(1 - alpha)`` (geometric).

    Rewards lie in ``[0, 1]``; in the geometric form ``0^0 = 1`` (``alpha = 0`` or 1
    gives exactly ``r_2`` or ``r_1``).
    """
    r1, r2 = np.asarray(r1, dtype=float), np.asarray(r2, dtype=float)
    if mixing == "convex":
        return alpha * r1 + (1 - alpha) * r2
    if mixing == "geometric":
        return np.power(r1, alpha) * np.power(r2, 1 - alpha)
    raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")


def bradley_terry_labels(ra: np.ndarray, rb: np.ndarray, scale: float,
                         rng: np.random.Generator) -> np.ndarray:
    """``a`` preferred with probability ``sigmoid(scale (r_a - r_b))`` (one draw per pair)."""
    p = 1.0 / (1.0 + np.exp(-scale * (np.asarray(ra) - np.asarray(rb))))
    return rng.random(len(p)) < p


# ----------------------------------------------------------------------- the miniature
def build_model(cfg: dict[str, Any], seed: int):
    """The reference GPT-2 of a seed (random initialisation, no dropout, ``cfg["dtype"]``)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    conf = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["prompt_len"] +
                      cfg["response_len"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
                      n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(conf).to(DTYPES[cfg["dtype"]])


def rewards(responses: torch.Tensor, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``r_1`` and ``r_2``: shares of tokens in ``[0, V/4)`` and ``[V/4, V/2)`` per row."""
    q = vocab_size // 4
    r = responses.cpu().numpy()
    return (r < q).mean(axis=1), ((r >= q) & (r < 2 * q)).mean(axis=1)


def sample_next(logits: torch.Tensor, generator: torch.Generator | None = None,
                temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)``, restricted to the top ``k``."""
    logits = logits.double() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


@torch.no_grad()
def generate(model, prompts: torch.Tensor, length: int, generator: torch.Generator,
             temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Sample ``length`` tokens after each prompt (ancestral sampling, :func:`sample_next`)."""
    model.eval()
    ids = prompts
    for _ in range(length):
        nxt = sample_next(model(input_ids=ids).logits[:, -1], generator, temperature, top_k)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, prompts.shape[1]:]


def _prompts(cfg, n, gen):
    return torch.randint(0, cfg["vocab_size"], (n, cfg["prompt_len"]), generator=gen)


def _generate(cfg, model, prompts, gen):
    return generate(model, prompts, cfg["response_len"], gen, cfg["temperature"], cfg["top_k"])


def preference_records(cfg: dict[str, Any], model, seed: int) -> list[dict]:
    """Training pairs from the reference with Bradley-Terry labels on ``r_alpha_train``."""
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    prompts = _prompts(cfg, cfg["n_pairs"], gen)
    a = _generate(cfg, model, prompts, gen)
    b = _generate(cfg, model, prompts, gen)
    ra, rb = (mixture(*rewards(x, cfg["vocab_size"]), cfg["alpha_train"], cfg["mixing"])
              for x in (a, b))
    y = bradley_terry_labels(ra, rb, cfg["reward_scale"], np.random.default_rng([seed, 2]))
    return [{"prompt": prompts[i].tolist(), "chosen": (a if y[i] else b)[i].tolist(),
             "rejected": (b if y[i] else a)[i].tolist()} for i in range(len(y))]


def train_config(cfg: dict[str, Any], method: str, seed: int, **over) -> TrainConfig:
    """The :class:`TrainConfig` of a method under the experiment's configuration.

    Every field is a configuration key of the same name, except ``max_steps``
    (``steps``), ``method`` (from ``methods``: :data:`METHOD_ARGS`) and ``progress``
    (``--no-progress``); ``fd_eps = 0`` means the dtype's default, ``device = ""`` the
    automatic choice.
    """
    kw = {f: cfg[f] for f in TRAIN_FIELDS}
    kw.update({field: cfg[key] for key, field in TRAIN_KEYS.items()})
    kw.update(METHOD_ARGS[method], seed=seed, progress=False,
              fd_eps=cfg["fd_eps"] or None, device=cfg["device"] or None)
    kw.update(over)
    return TrainConfig(**kw)


def evaluate(cfg: dict[str, Any], model, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``r_1`` and ``r_2`` of ``n_eval`` fresh generations (evaluation prompts of the seed)."""
    gen = torch.Generator().manual_seed(seed * 1000 + 2)
    prompts = _prompts(cfg, cfg["n_eval"], gen)
    return rewards(_generate(cfg, model, prompts, gen), cfg["vocab_size"])


def _rows(cfg, trained, reference, log) -> list[dict[str, Any]]:
    """One row per ``alpha_test`` from per-response rewards ``(r_1, r_2)`` of both policies."""
    last = log[-1]
    base = {"r1": trained[0].mean(), "r2": trained[1].mean(), "r1_ref": reference[0].mean(),
            "r2_ref": reference[1].mean(), "train_loss": last["loss"],
            "train_accuracy": last["accuracy"], "train_margin": last["reward_margin"],
            "train_time_s": last["time_s"]}
    return [{"alpha_test": float(a), "reward": float(mixture(*trained, a, cfg["mixing"]).mean()),
             "reward_ref": float(mixture(*reference, a, cfg["mixing"]).mean()),
             **{k: float(v) for k, v in base.items()}} for a in cfg["alpha_test"]]


def run_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one method on one seed's data; one row per ``alpha_test``."""
    torch.set_num_threads(int(cfg["torch_threads"]))
    if cfg["reward_model"]:
        return run_reward_model_cell(cell, cfg)
    seed = int(cell["seed"])
    ref = build_model(cfg, seed)
    data = TokenizedPairs(preference_records(cfg, ref, seed), vocab_size=cfg["vocab_size"])
    r_ref = evaluate(cfg, ref, seed)
    policy = build_model(cfg, seed)
    trainer = Trainer(policy, data, train_config(cfg, cell["method"], seed,
                                                 device=cfg["device"] or "cpu"))
    log = trainer.train()
    return _rows(cfg, evaluate(cfg, trainer.model, seed), r_ref, log)


# ------------------------------------------------------- the Emotion pipeline (models)
def _check_model_path(path: str, key: str) -> None:
    """A path-like ``path`` (absolute, ``./``, ``~``) must exist; hub names are not checked."""
    p = Path(path).expanduser()
    if not p.exists() and (p.is_absolute() or path.startswith((".", "~"))):
        raise ValueError(f"{key}: model path {path!r} does not exist")


def _from_pretrained(loader, path: str, key: str, **kw):
    """``loader.from_pretrained(path)`` with an error naming ``key`` for a missing model."""
    from transformers.utils import logging

    _check_model_path(path, key)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return loader.from_pretrained(str(Path(path).expanduser()) if Path(path).expanduser()
                                      .exists() else path, **kw)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{key}: cannot load {path!r}: it is not an existing directory nor a "
                         f"model in the local Hugging Face cache ({first})") from None


def _tokenizer(path: str, key: str):
    """The tokenizer saved with a model, or ``None`` when the directory has none."""
    from transformers import AutoTokenizer

    _check_model_path(path, key)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def _check_reward_setup(cfg: dict[str, Any]) -> None:
    if not cfg["model"]:
        raise ValueError("reward_model needs model (--model PATH): the policy to train")
    if len(cfg["reward_labels"]) != 2:
        raise ValueError(f"reward_labels must name two labels of the reward model "
                         f"(--reward-labels a,b), got {cfg['reward_labels']!r}")
    if not cfg["prompts"]:
        raise ValueError("reward_model needs prompts (--prompts FILE: .jsonl with a 'prompt' "
                         "field, or a text file with one prompt per line)")
    n_prompts = sum(1 for _ in iter_lines(cfg["prompts"], "prompts: file"))  # one per line
    _check_prompt_count(cfg, n_prompts)
    for key in ("model", "reward_model"):
        _check_model_path(cfg[key], key)


def _check_prompt_count(cfg: dict[str, Any], n: int) -> None:
    need = cfg["n_pairs"] + cfg["n_eval"]
    if n < need:
        raise ValueError(f"prompts: {cfg['prompts']!r} holds {n} prompts, fewer than "
                         f"n_pairs + n_eval = {need}")


def load_prompts(path, tokenizer, prompt_len: int) -> list[list[int]]:
    """Prompt token ids: the first ``prompt_len`` tokens (0: all) of every prompt of ``path``.

    A ``.jsonl`` file holds one object per line with a ``prompt`` field (text, or a list
    of token ids); any other file is text with one prompt per non-empty line. Errors
    name the file and line.
    """
    out = []
    jsonl = Path(path).suffix == ".jsonl"
    for where, line in iter_lines(path, "prompts: file"):
        if jsonl:
            rec = json_line(line, where)
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise ValueError(f"{where}: a prompt record must be an object with a 'prompt' "
                                 "field")
            value = rec["prompt"]
        else:
            value = line.strip()
        ids = token_ids(value, tokenizer, where, "prompt")
        if not ids:
            raise ValueError(f"{where}: the prompt is empty after tokenisation")
        out.append(ids[:prompt_len] if prompt_len > 0 else ids)
    if not out:
        raise ValueError(f"prompts: file {str(path)!r} holds no prompts")
    return out


def label_indices(model, labels) -> list[int]:
    """Output indices of ``labels`` (names of ``config.label2id``, or integer indices)."""
    names = {str(k).lower(): int(v) for k, v in (model.config.label2id or {}).items()}
    n = model.config.num_labels
    out = []
    for lab in labels:
        if lab.lower() in names:
            out.append(names[lab.lower()])
        elif lab.isdigit() and int(lab) < n:
            out.append(int(lab))
        else:
            raise ValueError(f"reward_labels: {lab!r} is not a label of the reward model "
                             f"(labels {sorted(names, key=names.get)} or indices 0..{n - 1})")
    return out


@torch.no_grad()
def classifier_rewards(model, tokenizer, texts: list[str], indices: list[int], device,
                       batch_size: int = 64) -> np.ndarray:
    """``sigmoid(logits[:, k])`` of the sequence classifier for each label index ``k``.

    Shape ``(len(texts), len(indices))``; multi-label scores (each in ``(0, 1)``), the
    paper's emotion rewards.
    """
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True).to(device)
        logits = model(**enc).logits.double()
        out.append(torch.sigmoid(logits[:, indices]).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def generate_responses(model, prompts: list[list[int]], cfg: dict[str, Any], pad_id: int,
                       eos_id: int | None, seed: int, device) -> list[list[int]]:
    """Sampled responses (``response_len`` new tokens, cut after the first EOS) per prompt.

    Prompts are left-padded per batch of ``batch_size``; ``torch`` is seeded with
    ``seed`` first, so a seed gives the same responses.
    """
    model.eval()
    torch.manual_seed(seed)
    out = []
    bs = cfg["batch_size"]
    for start in range(0, len(prompts), bs):
        chunk = prompts[start:start + bs]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["bf16"]):
            seq = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 do_sample=True, temperature=cfg["temperature"],
                                 top_k=cfg["top_k"], max_new_tokens=cfg["response_len"],
                                 min_new_tokens=1, pad_token_id=pad_id, eos_token_id=eos_id)
        for row in seq[:, width:].tolist():
            cut = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row)
            out.append(row[:cut])
    return out


def run_reward_model_cell(cell: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The Emotion pipeline for one ``(method, seed)`` (module docstring)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    seed = int(cell["seed"])
    device = torch.device(cfg["device"]) if cfg["device"] else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    tok = _tokenizer(cfg["model"], "model")
    if tok is None:
        raise ValueError(f"model: {cfg['model']!r} has no tokenizer (the reward model reads "
                         "decoded text)")
    policy = _from_pretrained(AutoModelForCausalLM, cfg["model"], "model").to(device)
    clf = _from_pretrained(AutoModelForSequenceClassification, cfg["reward_model"],
                           "reward_model").to(device)
    clf_tok = _tokenizer(cfg["reward_model"], "reward_model") or tok
    eos = tok.eos_token_id if tok.eos_token_id is not None else policy.config.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
    if clf_tok.pad_token is None:
        clf_tok.pad_token = clf_tok.eos_token
    if clf.config.pad_token_id is None:
        clf.config.pad_token_id = clf_tok.pad_token_id
    indices = label_indices(clf, cfg["reward_labels"])
    prompts = load_prompts(cfg["prompts"], tok, cfg["prompt_len"])
    _check_prompt_count(cfg, len(prompts))
    need = cfg["n_pairs"] + cfg["n_eval"]
    order = np.random.default_rng([seed, 3]).permutation(len(prompts))
    train_p = [prompts[i] for i in order[:cfg["n_pairs"]]]
    eval_p = [prompts[i] for i in order[cfg["n_pairs"]:need]]

    def score(model, ps, gen_seed):
        resp = generate_responses(model, ps, cfg, pad, eos, gen_seed, device)
        texts = tok.batch_decode([p + r for p, r in zip(ps, resp, strict=True)],
                                 skip_special_tokens=True)
        r = classifier_rewards(clf, clf_tok, texts, indices, device, cfg["batch_size"])
        return resp, (r[:, 0], r[:, 1])

    a, ra = score(policy, train_p, seed * 1000 + 1)
    b, rb = score(policy, train_p, seed * 1000 + 2)
    y = bradley_terry_labels(mixture(*ra, cfg["alpha_train"], cfg["mixing"]),
                             mixture(*rb, cfg["alpha_train"], cfg["mixing"]),
                             cfg["reward_scale"], np.random.default_rng([seed, 2]))
    records = [{"prompt": p, "chosen": (a if y[i] else b)[i], "rejected": (b if y[i] else a)[i]}
               for i, p in enumerate(train_p)]
    r_ref = score(policy, eval_p, seed * 1000 + 3)[1]
    data = TokenizedPairs(records, pad_id=pad)
    trainer = Trainer(policy, data, train_config(cfg, cell["method"], seed))
    log = trainer.train()
    return _rows(cfg, score(trainer.model, eval_p, seed * 1000 + 3)[1], r_ref, log)


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


def run_special(args, cfg: dict[str, Any]) -> bool:
    """``--model PATH --data FILE.jsonl``: train every configured method on a preference set.

    Writes ``<out>/llm_model/<method>/``: ``metrics.csv``, ``train_config.json``, a
    resumable ``checkpoint.pt`` (every ``checkpoint_every`` steps) and the trained
    model (``model/``, Hugging Face format, with the tokenizer; ``save_model``). Text
    fields are tokenised with the model's tokenizer (a model directory without one
    needs token ids in the data); ``append_eos`` appends its EOS token to every
    response. A rerun resumes; one with another configuration is refused (naming the
    keys) unless ``--restart``. ``--model`` with ``--reward-model`` is the Emotion
    pipeline instead (the runner's cells); returns whether this function handled the run.
    """
    if cfg["reward_model"]:
        if cfg["data"]:
            raise ValueError("data and reward_model exclude each other: --data trains on given "
                             "pairs, --reward-model generates and labels them")
        return False
    if not cfg["model"] and not cfg["data"]:
        return False
    if not cfg["model"] or not cfg["data"]:
        raise ValueError("--model needs --data FILE.jsonl (preference pairs) or --reward-model "
                         "PATH --prompts FILE (the Emotion pipeline); --data needs --model")
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(cfg["model"], "model")
    if tok is None:
        print(f"no tokenizer found at {cfg['model']}: the data must hold token ids")
    eos = None
    if cfg["append_eos"]:
        eos = getattr(tok, "eos_token_id", None)
        if eos is None:
            eos = _from_pretrained(AutoModelForCausalLM, cfg["model"], "model").config.eos_token_id
        if eos is None:
            raise ValueError("append_eos: the model has no eos token (tokenizer and config)")
    if tok is None:
        data = TokenizedPairs(cfg["data"], eos_id=eos)
    else:
        data = TokenizedPairs(cfg["data"], tokenizer=tok, pad_id=tok.pad_token_id or 0,
                              max_length=tok.model_max_length if tok.model_max_length < 10**6
                              else None, eos_id=eos)
    for method in cfg["methods"]:
        model = _from_pretrained(AutoModelForCausalLM, cfg["model"], "model")
        conf = train_config(cfg, method, cfg["seed"], progress=not args.no_progress)
        out = Path(args.out) / "llm_model" / method
        Trainer(model, data, conf, out_dir=out, tokenizer=tok).train(resume=not args.restart)
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
                  "batch_size": count, "torch_threads": count, "grad_accum": count,
                  "warmup_steps": v.NONNEGATIVE_INT, "checkpoint_every": v.NONNEGATIVE_INT,
                  "top_k": v.NONNEGATIVE_INT, "alpha_train": v.UNIT_INTERVAL,
                  "alpha_test": v.UNIT_INTERVAL, "reward_scale": v.POSITIVE,
                  "temperature": v.POSITIVE, "beta": v.POSITIVE, "lr": v.POSITIVE,
                  "tau": v.POSITIVE, "rho": v.POSITIVE, "clip": v.POSITIVE,
                  "beta_prime": v.POSITIVE, "weight_decay": v.NONNEGATIVE,
                  "max_grad_norm": v.NONNEGATIVE, "fd_eps": v.NONNEGATIVE,
                  "mixing": v.one_of(*MIXINGS), "dtype": v.one_of(*DTYPES),
                  "schedule": v.one_of(*SCHEDULES),
                  "wdpo_form": v.one_of(*WASSERSTEIN_FORMS),
                  "wdpo_mode": v.one_of(*WASSERSTEIN_MODES)})
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"--n-embd (n_embd) must be a multiple of --n-head (n_head), got "
                         f"{cfg['n_embd']} and {cfg['n_head']}")
    if cfg["reward_model"]:
        _check_reward_setup(cfg)
    for m in dict.fromkeys(cfg["methods"]):  # the trainer's own checks, before any cell runs
        train_config(cfg, m, cfg["seed"])
