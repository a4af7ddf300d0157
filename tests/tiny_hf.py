"""Tiny randomly initialised Hugging Face models and a word-level tokenizer, built offline.

Shared by the trainer and ``llm`` tests (no downloads): a ``PreTrainedTokenizerFast``
over a fixed word list, a ``GPT2LMHeadModel`` policy and a two-label
``GPT2ForSequenceClassification`` reward model (``multi_label_classification``).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["joy", "anger", "sad", "calm", "sun", "rain", "happy", "mad", "the", "a", "is", "was",
         "very", "not", "and", "day"]
SPECIALS = ["<eos>", "<unk>"]


def word_tokenizer():
    """A whitespace word-level ``PreTrainedTokenizerFast``: ``<eos>`` = 0 (also padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>")


def vocab_size() -> int:
    """Size of :func:`word_tokenizer`'s vocabulary."""
    return len(SPECIALS) + len(WORDS)


def _config(**kw):
    from transformers import GPT2Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    return GPT2Config(vocab_size=vocab_size(), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, **kw)


def policy(seed: int = 0):
    """A random ``GPT2LMHeadModel`` (float32), weights spread so that it is not uniform."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def classifier(labels=("joy", "anger"), seed: int = 1):
    """A random multi-label ``GPT2ForSequenceClassification`` with the given labels."""
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    conf = _config(num_labels=len(labels), id2label=dict(enumerate(labels)),
                   label2id={name: i for i, name in enumerate(labels)},
                   problem_type="multi_label_classification")
    model = GPT2ForSequenceClassification(conf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def save(model, path: Path, tokenizer=True) -> Path:
    """``save_pretrained`` the model (and :func:`word_tokenizer`) to ``path``."""
    model.save_pretrained(path)
    if tokenizer:
        word_tokenizer().save_pretrained(path)
    return path
