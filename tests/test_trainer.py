"""The Hugging Face trainer: masking, reference cache, resume, JSONL errors (SPEC 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from simulator.torch_backend.pairs import TokenizedPairs, load_jsonl  # noqa: E402
from simulator.torch_backend.trainer import TrainConfig, Trainer, sequence_logps  # noqa: E402

V = 12


def _model(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    conf = GPT2Config(vocab_size=V, n_positions=24, n_embd=16, n_layer=1, n_head=2,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0)
    model = GPT2LMHeadModel(conf).double()
    for p in model.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    return model


def _records(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": torch.randint(0, V, (2 + i % 3,), generator=g).tolist(),
             "chosen": torch.randint(0, V, (3 + i % 4,), generator=g).tolist(),
             "rejected": torch.randint(0, V, (4,), generator=g).tolist()} for i in range(n)]


def _token_loop_logp(model, prompt, response):
    """Independent reference: one forward per response token on the unpadded sequence."""
    total = 0.0
    seq = prompt + response
    for t in range(len(prompt), len(seq)):
        if t == 0:
            continue
        logits = model(input_ids=torch.tensor([seq[:t]])).logits[0, -1]
        total += torch.log_softmax(logits, -1)[seq[t]].item()
    return total


def test_sequence_logps_masks_prompt_and_padding():
    model = _model()
    recs = _records(5)
    data = TokenizedPairs(recs)
    b = data.collate(range(5))
    with torch.no_grad():
        lp = sequence_logps(model, b.input_ids, b.attention_mask, b.loss_mask)
    want = [_token_loop_logp(model, r["prompt"], r[f]) for f in ("chosen", "rejected")
            for r in recs]
    np.testing.assert_allclose(lp.numpy(), want, rtol=1e-10)
    # the loss mask is 0 on prompt tokens and 1 on exactly the response tokens
    for row, r in enumerate(recs):
        assert b.loss_mask[row, : len(r["prompt"])].sum() == 0
        assert b.loss_mask[row].sum() == len(r["chosen"])
    # padding does not leak: a pair alone gives the same values as inside a padded batch
    with torch.no_grad():
        alone = data.collate([2])
        lp2 = sequence_logps(model, alone.input_ids, alone.attention_mask, alone.loss_mask)
    np.testing.assert_allclose(lp2.numpy(), lp[[2, 7]].numpy(), rtol=1e-10)


def test_reference_cache_is_the_initial_model():
    model = _model()
    data = TokenizedPairs(_records(16))
    tr = Trainer(model, data, TrainConfig(method="dpo", beta=0.5, lr=1e-2, batch_size=4,
                                          max_steps=3, progress=False, device="cpu"))
    b = data.collate(range(16))
    with torch.no_grad():
        lp = sequence_logps(_model(), b.input_ids, b.attention_mask, b.loss_mask)
    np.testing.assert_allclose(tr.ref_logps[:, 0].numpy(), lp[:16].numpy(), rtol=1e-12)
    rows = tr.train()
    assert rows[0]["loss"] == pytest.approx(np.log(2), rel=1e-12)  # policy == reference
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(tr.ref_logps[:, 1].numpy(), lp[16:].numpy(), rtol=1e-12)


@pytest.mark.parametrize(("method", "extra"), [("kldpo-tau", {"tau": 0.5}),
                                               ("wdpo", {"rho": 0.1})])
def test_resume_reproduces_uninterrupted_run(tmp_path, method, extra):
    data = TokenizedPairs(_records(24))
    kw = dict(method=method, beta=0.5, lr=5e-3, batch_size=4, grad_accum=2, max_steps=5,
              warmup_steps=2, progress=False, device="cpu", seed=1, **extra)
    full = Trainer(_model(), data, TrainConfig(**kw), out_dir=tmp_path / "full")
    rows_full = full.train()
    first = Trainer(_model(), data, TrainConfig(**kw), out_dir=tmp_path / "split")
    first.train(stop_after=2)
    second = Trainer(_model(), data, TrainConfig(**kw), out_dir=tmp_path / "split")
    second.train()
    for a, b in zip(full.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    import pandas as pd

    m_full = pd.read_csv(tmp_path / "full" / "metrics.csv")
    m_split = pd.read_csv(tmp_path / "split" / "metrics.csv")
    assert list(m_split["step"]) == list(range(1, 6))
    np.testing.assert_allclose(m_split["loss"], m_full["loss"], rtol=1e-12)
    np.testing.assert_allclose(m_full["loss"], [r["loss"] for r in rows_full])
    assert m_full["loss"].iloc[-1] < m_full["loss"].iloc[0]


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
    return p


def test_jsonl_errors_are_clear(tmp_path):
    ok = {"prompt": [1, 2], "chosen": [3], "rejected": [4, 5]}
    assert len(load_jsonl(_write(tmp_path, [ok, ok]))) == 2
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing field 'rejected'"):
        load_jsonl(_write(tmp_path, [ok, {"prompt": "a", "chosen": "b"}]))
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'chosen' is empty"):
        load_jsonl(_write(tmp_path, [dict(ok, chosen=[])]))
    with pytest.raises(ValueError, match="invalid JSON"):
        load_jsonl(_write(tmp_path, ["{not json"]))
    with pytest.raises(ValueError, match="no tokenizer"):
        TokenizedPairs([{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TokenizedPairs([dict(ok, chosen=[V + 3])], vocab_size=V)
    with pytest.raises(ValueError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_text_records_with_a_tokenizer_object():
    class CharTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % V for c in text]

    data = TokenizedPairs([{"prompt": "ab", "chosen": "cd", "rejected": "e"}],
                          tokenizer=CharTokenizer())
    b = data.collate([0])
    assert b.input_ids[0, :4].tolist() == [ord(c) % V for c in "abcd"]
    assert b.loss_mask[1].tolist() == [0, 0, 1, 0]


def test_bad_config_and_unreachable_embeddings():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="ppo")
    with pytest.raises(ValueError, match="rho"):
        TrainConfig(method="wdpo")
    with pytest.raises(ValueError, match="tau"):
        TrainConfig(method="kldpo-tau")

    class NoEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def get_input_embeddings(self):
            return None

    with pytest.raises(ValueError, match="input embeddings"):
        Trainer(NoEmbeddings(), TokenizedPairs(_records(4)),
                TrainConfig(method="wdpo", rho=0.1, batch_size=2, device="cpu"))
