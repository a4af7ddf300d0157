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
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FIELDS", "TokenizedPairs", "PairTensors", "load_jsonl", "tokenize_records",
           "check_vocab", "token_ids", "iter_lines", "json_line"]

FIELDS = ("prompt", "chosen", "rejected")


def load_jsonl(path) -> list[dict]:
    """Read preference records from a JSONL file (one JSON object per line).

    Raises
    ------
    ValueError
        Naming the file and line, on invalid UTF-8 or JSON, a missing field, or an
        empty ``chosen`` / ``rejected`` response; naming the file when it does not
        exist, is a directory, or holds no records.
    """
    return _read_jsonl(path)[0]


def iter_lines(path, what: str = "data file") -> Iterator[tuple[str, str]]:
    """``("file:line", text)`` for every non-blank line of a UTF-8 text file.

    Raises ``ValueError`` naming ``what`` and the file when it is a directory or does
    not exist, and the file and line (with the byte, column and, for a JSON object,
    the field) on invalid UTF-8.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: invalid UTF-8{_field_of_bad_byte(raw)} (byte "
                                 f"{raw[exc.start]:#04x} at column {exc.start + 1})") from None
            if line.strip():
                yield where, line


def json_line(line: str, where: str):
    """``json.loads(line)``; ``ValueError`` naming ``where`` on invalid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None


def _read_jsonl(path) -> tuple[list[dict], list[str]]:
    """Records of a JSONL file and their locations ``"file:line"``."""
    records, wheres = [], []
    for where, line in iter_lines(path):
        rec = json_line(line, where)
        _check_record(rec, where)
        records.append(rec)
        wheres.append(where)
    if not records:
        raise ValueError(f"data file {str(path)!r} holds no records")
    return records, wheres


def _field_of_bad_byte(raw: bytes) -> str:
    """`` in field 'f'`` for the field holding an undecodable byte, when one can be named."""
    try:
        rec = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return ""
    if not isinstance(rec, dict):
        return ""
    bad = [f for f, v in rec.items() if "\ufffd" in json.dumps(v, ensure_ascii=False)]
    return f" in field {bad[0]!r}" if bad else ""


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


def token_ids(value, tokenizer, where: str, field: str) -> list[int]:
    """Validated token ids of a field: text through ``tokenizer`` or a list of integers.

    Raises ``ValueError`` naming ``where`` (``file:line``), the field and the value on
    text without tokenizer, an entry that is not an integer (``1.7``, ``true``,
    ``"a"``, a nested list) or a negative id.
    """
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}: field {field!r} is text but no tokenizer was given "
                             "(pass a tokenizer or pre-tokenised lists of ids)")
        enc = tokenizer.encode(value, add_special_tokens=False) if hasattr(
            tokenizer, "encode") else tokenizer(value)
        value = list(enc)
    for t in value:
        # bool is an int subclass and 1.0 == 1: only true integers are token ids
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{where}: field {field!r} holds {t!r}, not an integer token id "
                             "(a list of token ids must hold integers only)")
        if t < 0:
            raise ValueError(f"{where}: field {field!r} holds the negative token id {t}")
    return [int(t) for t in value]


def check_vocab(triple: Sequence[list[int]], vocab_size: int, where: str) -> None:
    """Raise naming ``where``, the field and the id when an id is outside ``[0, vocab_size)``."""
    for f, ids in zip(FIELDS, triple, strict=True):
        top = max(ids, default=-1)
        if top >= vocab_size:
            raise ValueError(f"{where}: field {f!r} holds token id {top}, outside the "
                             f"vocabulary of the model (vocab_size {vocab_size})")


def tokenize_records(records: Sequence[dict], tokenizer=None, vocab_size: int | None = None,
                     wheres: Sequence[str] | None = None, eos_id: int | None = None
                     ) -> list[tuple[list[int], list[int], list[int]]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` per record, validated.

    ``wheres`` names the records in errors (default ``"record k"``); ``eos_id``, when
    given, is appended to both responses (TRL's convention).

    Raises
    ------
    ValueError
        On a missing field, an empty response (before or after tokenisation),
        text without a tokenizer, a token id that is not a non-negative integer
        (``1.7``, ``true``, ``"a"``, a nested list), or one outside ``[0, vocab_size)``.
    """
    out = []
    for k, rec in enumerate(records):
        where = f"record {k}" if wheres is None else wheres[k]
        _check_record(rec, where)
        triple = tuple(token_ids(rec[f], tokenizer, where, f) for f in FIELDS)
        for f, ids in zip(FIELDS[1:], triple[1:], strict=True):
            if not ids:
                raise ValueError(f"{where}: field {f!r} is empty after tokenisation")
        if eos_id is not None:
            triple = (triple[0], triple[1] + [int(eos_id)], triple[2] + [int(eos_id)])
        if vocab_size is not None:
            check_vocab(triple, vocab_size, where)
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
        Checks token ids (the trainer checks them against the model's embedding table
        in any case, :meth:`check_vocab`).
    eos_id : int, optional
        Appended to every chosen and rejected response (TRL's convention: the
        end-of-sequence token is part of the response and its log-probability counts).
    """

    def __init__(self, records, tokenizer=None, max_length: int | None = None, pad_id: int = 0,
                 vocab_size: int | None = None, eos_id: int | None = None) -> None:
        if isinstance(records, (str, Path)):
            records, self.wheres = _read_jsonl(records)
        else:
            self.wheres = [f"record {k}" for k in range(len(records))]
        self.examples = tokenize_records(records, tokenizer, vocab_size, self.wheres, eos_id)
        self.max_length = max_length
        self.pad_id = int(pad_id)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise naming the file, line, field and id of the first id ``>= vocab_size``."""
        for ex, where in zip(self.examples, self.wheres, strict=True):
            check_vocab(ex, vocab_size, where)

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
