"""Preference data for causal language models: JSONL records and padded batches (SPEC 7).

A record has three fields, ``prompt``, ``chosen`` and ``rejected``: strings (then a
tokenizer object with a ``__call__``/``encode`` returning token ids is needed)
or lists of token ids (pre-tokenised; no tokenizer). A batch of ``B`` pairs is
one padded tensor of ``2B`` sequences, the chosen responses first, each
``prompt + response`` with a loss mask that is 1 on response tokens only, so
that prompt tokens contribute nothing to the sequence log-probability.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FIELDS", "TokenizedPairs", "PairTensors", "load_jsonl", "tokenize_records"]

FIELDS = ("prompt", "chosen", "rejected")


def load_jsonl(path) -> list[dict]:
    """Read preference records from a JSONL file (one JSON object per line).

    Raises
    ------
    ValueError
        Naming the file and line, on invalid JSON, a missing field, or an empty
        ``chosen`` / ``rejected`` response.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            _check_record(rec, f"{path}:{lineno}")
            records.append(rec)
    if not records:
        raise ValueError(f"data file {str(path)!r} holds no records")
    return records


def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for f in FIELDS:
        if f not in rec:
            raise ValueError(f"{where}: missing field {f!r} (need {list(FIELDS)})")
        v = rec[f]
        if not isinstance(v, (str, list)):
            raise ValueError(f"{where}: field {f!r} must be a string or a list of token ids, "
                             f"got {type(v).__name__}")
        if f != "prompt" and len(v) == 0:
            raise ValueError(f"{where}: field {f!r} is empty (a response needs at least one token)")


def _ids(value, tokenizer, where: str, field: str) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}: field {field!r} is text but no tokenizer was given "
                             "(pass a tokenizer or pre-tokenised lists of ids)")
        enc = tokenizer.encode(value, add_special_tokens=False) if hasattr(
            tokenizer, "encode") else tokenizer(value)
        value = list(enc)
    ids = [int(t) for t in value]
    if any(t < 0 for t in ids):
        raise ValueError(f"{where}: field {field!r} holds a negative token id")
    return ids


def tokenize_records(records: Sequence[dict], tokenizer=None,
                     vocab_size: int | None = None) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` per record, validated.

    Raises
    ------
    ValueError
        On a missing field, an empty response (before or after tokenisation),
        text without a tokenizer, or token ids outside ``[0, vocab_size)``.
    """
    out = []
    for k, rec in enumerate(records):
        where = f"record {k}"
        _check_record(rec, where)
        triple = tuple(_ids(rec[f], tokenizer, where, f) for f in FIELDS)
        for f, ids in zip(FIELDS[1:], triple[1:], strict=True):
            if not ids:
                raise ValueError(f"{where}: field {f!r} is empty after tokenisation")
        if vocab_size is not None:
            top = max(max(ids, default=0) for ids in triple)
            if top >= vocab_size:
                raise ValueError(f"{where}: token id {top} is outside the vocabulary "
                                 f"(vocab_size {vocab_size})")
        out.append(triple)
    if not out:
        raise ValueError("records must hold at least one preference pair")
    return out


@dataclass
class PairTensors:
    """A padded batch of ``B`` pairs: ``2B`` rows, chosen first.

    Attributes
    ----------
    input_ids, attention_mask, loss_mask : LongTensor (2B, T)
        ``loss_mask`` is 1 on response tokens (the tokens whose log-probability counts).
    index : LongTensor (B,)
        Positions of the pairs in the data set (keys of the reference cache).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    index: torch.Tensor

    def to(self, device) -> PairTensors:
        """The batch on ``device``."""
        return PairTensors(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                    self.loss_mask, self.index)))


class TokenizedPairs:
    """A preference data set of token ids, from records or a JSONL file.

    Parameters
    ----------
    records : sequence of dict, or path of a JSONL file
    tokenizer : optional
        Needed only when fields are text.
    max_length : int, optional
        Sequences longer than this are cut from the left of the prompt first,
        then from the end of the response.
    pad_id : int
        Padding token (masked out everywhere).
    vocab_size : int, optional
        Checks token ids.
    """

    def __init__(self, records, tokenizer=None, max_length: int | None = None, pad_id: int = 0,
                 vocab_size: int | None = None) -> None:
        if isinstance(records, (str, Path)):
            records = load_jsonl(records)
        self.examples = tokenize_records(records, tokenizer, vocab_size)
        self.max_length = max_length
        self.pad_id = int(pad_id)

    def __len__(self) -> int:
        return len(self.examples)

    def _sequence(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is not None and len(prompt) + len(response) > self.max_length:
            keep_prompt = max(1, self.max_length - len(response)) if prompt else 0
            prompt = prompt[-keep_prompt:] if keep_prompt else []
            response = response[: self.max_length - len(prompt)]
        return prompt + response, [0] * len(prompt) + [1] * len(response)

    def collate(self, index) -> PairTensors:
        """Pad the pairs ``index`` into one :class:`PairTensors` (right padding)."""
        index = [int(i) for i in index]
        rows = []
        for pos in (1, 2):
            for i in index:
                ex = self.examples[i]
                rows.append(self._sequence(ex[0], ex[pos]))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for r, (seq, lm) in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq)
            attn[r, : len(seq)] = 1
            mask[r, : len(seq)] = torch.tensor(lm)
        return PairTensors(ids, attn, mask, torch.tensor(index, dtype=torch.long))
