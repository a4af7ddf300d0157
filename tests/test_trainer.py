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


@pytest.mark.parametrize(("value", "shown"), [(1.7, "1.7"), (True, "True"), ("a", "'a'"),
                                              ([1, 2], r"\[1, 2\]"), (1.0, "1.0")])
def test_jsonl_token_ids_must_be_integers(tmp_path, value, shown):
    ok = {"prompt": [1, 2], "chosen": [3], "rejected": [4, 5]}
    path = _write(tmp_path, [ok, dict(ok, chosen=[3, value])])
    with pytest.raises(ValueError, match=rf"d.jsonl:2: field 'chosen' holds {shown}, not an "
                                         "integer token id"):
        TokenizedPairs(path)


def test_jsonl_utf8_directory_and_vocabulary_errors_name_the_place(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": [1], "chosen": [2], "rejected": [3]}\n'
                  b'{"prompt": "caf\xe9", "chosen": [2], "rejected": [3]}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid UTF-8 in field 'prompt' "
                                         r"\(byte 0xe9 at column 16\)"):
        TokenizedPairs(p)
    with pytest.raises(ValueError, match=r"is a directory"):
        TokenizedPairs(tmp_path)
    ok = {"prompt": [1, 2], "chosen": [3], "rejected": [4, 5]}
    path = _write(tmp_path, [ok, ok, dict(ok, rejected=[4, V + 3])])
    # no vocab_size given: the trainer checks the ids against the model's embedding table
    with pytest.raises(ValueError, match=rf"d.jsonl:3: field 'rejected' holds token id "
                                         rf"{V + 3}, outside the vocabulary of the model "
                                         rf"\(vocab_size {V}\)"):
        Trainer(_model(), TokenizedPairs(path), TrainConfig(batch_size=2, device="cpu"))


def test_resume_with_another_configuration_is_refused(tmp_path):
    data = TokenizedPairs(_records(16))
    kw = dict(method="kldpo-tau", tau=0.5, beta=0.5, lr=5e-3, batch_size=4, max_steps=4,
              progress=False, device="cpu", save_model=False)
    Trainer(_model(), data, TrainConfig(**kw), out_dir=tmp_path).train(stop_after=2)
    saved = (tmp_path / "train_config.json").read_text()
    changed = Trainer(_model(), data, TrainConfig(**dict(kw, tau=1.0, lr=1e-3)), out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"another configuration \(lr: saved 0.005, now 0.001; "
                                         r"tau: saved 0.5, now 1.0\)"):
        changed.train()
    other_data = TokenizedPairs(_records(16, seed=1))
    with pytest.raises(ValueError, match=r"data_sha256"):
        Trainer(_model(), other_data, TrainConfig(**kw), out_dir=tmp_path).train()
    with pytest.raises(ValueError, match=r"model_sha256"):
        Trainer(_model(seed=3), data, TrainConfig(**kw), out_dir=tmp_path).train()
    assert (tmp_path / "train_config.json").read_text() == saved  # nothing overwritten
    # keys that do not change the results may differ; the run then completes
    rows = Trainer(_model(), data, TrainConfig(**dict(kw, checkpoint_every=1)),
                   out_dir=tmp_path).train()
    assert [r["step"] for r in rows] == [3, 4]


def test_cosine_schedule_matches_hugging_face(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    kw = dict(beta=0.5, lr=1e-2, batch_size=4, max_steps=7, warmup_steps=2, progress=False,
              device="cpu", schedule="cosine", save_model=False)
    rows = Trainer(_model(), TokenizedPairs(_records(16)), TrainConfig(**kw)).train()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=7)
    want = []
    for _ in range(7):
        want.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    lrs = [r["lr"] for r in rows]
    # after the warm-up Hugging Face's cosine; the warm-up is the trainer's (s + 1) / w
    # (Hugging Face's s / w spends the first step at learning rate 0)
    np.testing.assert_allclose(lrs[2:], want[2:], rtol=1e-12)
    np.testing.assert_allclose(lrs[:2], [0.5e-2, 1e-2], rtol=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear-ish")


def test_save_pretrained_and_run_record(tmp_path):
    from tiny_hf import word_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = word_tokenizer()
    data = TokenizedPairs(_records(16))
    cfg = TrainConfig(beta=0.5, lr=1e-2, batch_size=2, grad_accum=3, max_steps=2,
                      progress=False, device="cpu")
    tr = Trainer(_model(), data, cfg, out_dir=tmp_path, tokenizer=tok)
    tr.train()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64)
    for (name, a), b in zip(tr.model.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(loaded.transformer.wte.weight, _model().transformer.wte.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "model").encode("the sun") == \
        tok.encode("the sun")
    rec = json.loads((tmp_path / "train_config.json").read_text())
    assert rec["world_size"] == 1 and rec["global_batch"] == 6 and rec["n_pairs"] == 16
    assert rec["grad_accum"] == 3 and rec["schedule"] == "constant"


def test_append_eos_adds_the_eos_log_probability():
    model = _model()
    recs = _records(6)
    eos = 0
    plain, with_eos = TokenizedPairs(recs), TokenizedPairs(recs, eos_id=eos)
    b0, b1 = plain.collate(range(6)), with_eos.collate(range(6))
    assert (b1.loss_mask.sum(1) - b0.loss_mask.sum(1)).tolist() == [1] * 12
    with torch.no_grad():
        lp0 = sequence_logps(model, b0.input_ids, b0.attention_mask, b0.loss_mask)
        lp1 = sequence_logps(model, b1.input_ids, b1.attention_mask, b1.loss_mask)
    # the difference is log p(EOS | prompt + response), by the token loop on the unpadded rows
    want = [_token_loop_logp(model, r["prompt"], r[f] + [eos]) - _token_loop_logp(
        model, r["prompt"], r[f]) for f in ("chosen", "rejected") for r in recs]
    np.testing.assert_allclose((lp1 - lp0).numpy(), want, rtol=1e-10)
    assert (lp1 < lp0).all()


def test_tensorboard_logs_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(beta=0.5, lr=1e-2, batch_size=4, max_steps=3, progress=False,
                      device="cpu", tensorboard=True, save_model=False)
    rows = Trainer(_model(), TokenizedPairs(_records(16)), cfg, out_dir=tmp_path).train()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in events], [r["loss"] for r in rows], rtol=1e-6)
    assert "train/weight_ess" in acc.Tags()["scalars"]
