"""The ``llm`` experiment on real (tiny, random, saved) Hugging Face models (SPEC 7).

The paper's Emotion pipeline (``--model --reward-model``): reward = sigmoid of the
classifier's label logits, convex and geometric mixtures; ``--model --data``: every
TrainConfig field from the command line, missing paths, refused resumes.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_hf  # noqa: E402

from experiments import llm  # noqa: E402
from experiments.__main__ import main  # noqa: E402
from experiments.config import load_defaults  # noqa: E402
from simulator.torch_backend.trainer import TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_hf.save(tiny_hf.policy(), root / "policy")
    tiny_hf.save(tiny_hf.classifier(("joy", "anger")), root / "clf")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(tiny_hf.WORDS, rng.integers(2, 8))) for _ in range(40)]
    (root / "prompts.txt").write_text("\n".join(lines) + "\n\n")
    return root


def test_mixtures_are_the_papers_formulas():
    r1, r2 = np.array([0.2, 0.9, 0.0, 0.5]), np.array([0.8, 0.1, 0.3, 0.0])
    np.testing.assert_allclose(llm.mixture(r1, r2, 0.25), 0.25 * r1 + 0.75 * r2)
    np.testing.assert_allclose(llm.mixture(r1, r2, 0.5, "geometric"), np.sqrt(r1 * r2))
    np.testing.assert_allclose(llm.mixture(r1, r2, 0.3, "geometric"),
                               np.exp(0.3 * np.log(r1[:2]) + 0.7 * np.log(r2[:2])).tolist()
                               + [0.0, 0.0])
    for mixing in llm.MIXINGS:  # the end points are the single rewards (0^0 = 1)
        np.testing.assert_array_equal(llm.mixture(r1, r2, 1.0, mixing), r1)
        np.testing.assert_array_equal(llm.mixture(r1, r2, 0.0, mixing), r2)
    with pytest.raises(ValueError, match="mixing"):
        llm.mixture(r1, r2, 0.5, "harmonic")


def test_classifier_rewards_are_label_sigmoids(models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(models / "clf")
    tok = AutoTokenizer.from_pretrained(models / "clf")
    texts = ["the sun is very happy", "mad", "rain and anger was not calm day", "joy joy"]
    idx = llm.label_indices(clf, ["anger", "joy"])
    assert idx == [1, 0] and llm.label_indices(clf, ["0", "1"]) == [0, 1]
    got = llm.classifier_rewards(clf, tok, texts, idx, torch.device("cpu"), batch_size=3)
    with torch.no_grad():  # one unpadded text at a time
        want = [torch.sigmoid(clf(input_ids=torch.tensor([tok.encode(t)])).logits[0, [1, 0]])
                .double().numpy() for t in texts]
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6)
    assert len(np.unique(got[:, 0].round(4))) == len(texts)  # the texts are told apart
    with pytest.raises(ValueError, match=r"reward_labels: 'fear' is not a label .*'joy', 'anger'"):
        llm.label_indices(clf, ["fear"])


def test_prompts_from_text_and_jsonl(tmp_path):
    tok = tiny_hf.word_tokenizer()
    txt = tmp_path / "p.txt"
    txt.write_text("the sun is very happy\n\nmad\n")
    assert llm.load_prompts(txt, tok, 3) == [tok.encode("the sun is"), tok.encode("mad")]
    js = tmp_path / "p.jsonl"
    js.write_text(json.dumps({"prompt": "rain was"}) + "\n" + json.dumps({"prompt": [3, 4, 5]}))
    assert llm.load_prompts(js, tok, 0) == [tok.encode("rain was"), [3, 4, 5]]
    js.write_text(json.dumps({"prompt": [3, 1.5]}))
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'prompt' holds 1.5"):
        llm.load_prompts(js, tok, 4)


def _emotion_argv(models, out, *extra):
    return ["llm", "--model", str(models / "policy"), "--reward-model", str(models / "clf"),
            "--reward-labels", "joy,anger", "--prompts", str(models / "prompts.txt"),
            "--n-pairs", "16", "--n-eval", "12", "--steps", "3", "--batch-size", "8",
            "--lr", "0.05", "--response-len", "5", "--prompt-len", "4", "--n-seeds", "1",
            "--methods", "dpo,kldpo", "--alpha-test", "0,0.5,1", "--alpha-train", "0.1",
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def test_emotion_pipeline_end_to_end(models, tmp_path):
    out = tmp_path / "res"
    assert main(_emotion_argv(models, out, "--mixing", "geometric", "--top-k", "8")) == 0
    df = pd.read_csv(out / "llm.csv")
    assert (df["status"] == "ok").all() and set(df["method"]) == {"dpo", "kldpo"}
    cols = ["method", "seed", "alpha_test", "reward", "reward_ref", "r1", "r2", "r1_ref",
            "r2_ref", "train_loss", "train_accuracy", "train_margin", "train_time_s"]
    assert set(cols) <= set(df.columns) and len(df) == 2 * 3
    for col in ("reward", "reward_ref", "r1", "r2"):
        assert df[col].between(0, 1, inclusive="neither").all()
    # geometric mixture: the end points are the single rewards; in between below the convex one
    for a, r in ((0.0, "r2"), (1.0, "r1")):
        sub = df[df["alpha_test"] == a]
        np.testing.assert_allclose(sub["reward"], sub[r], rtol=1e-12)
        np.testing.assert_allclose(sub["reward_ref"], sub[r + "_ref"], rtol=1e-12)
    mid = df[df["alpha_test"] == 0.5]
    assert (mid["reward"] <= (mid["r1"] + mid["r2"]) / 2 + 1e-12).all()
    assert df.groupby("alpha_test")["reward_ref"].nunique().eq(1).all()  # one shared reference
    assert (df["r1"] != df["r1_ref"]).all()  # training moved the policy
    # the reference rewards are the classifier's on the reference's evaluation generations
    cfg = dict(load_defaults(llm)[0], n_pairs=16, n_eval=12, response_len=5, prompt_len=4,
               batch_size=8, top_k=8, device="cpu", prompts=str(models / "prompts.txt"))
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = tiny_hf.word_tokenizer()
    pol = AutoModelForCausalLM.from_pretrained(models / "policy")
    prompts = llm.load_prompts(models / "prompts.txt", tok, 4)
    order = np.random.default_rng([0, 3]).permutation(len(prompts))
    ev = [prompts[i] for i in order[16:28]]
    resp = llm.generate_responses(pol, ev, cfg, 0, 0, 3, torch.device("cpu"))
    assert all(1 <= len(r) <= 5 for r in resp)
    clf = AutoModelForSequenceClassification.from_pretrained(models / "clf")
    texts = tok.batch_decode([p + r for p, r in zip(ev, resp, strict=True)],
                             skip_special_tokens=True)
    r = llm.classifier_rewards(clf, tok, texts, [0, 1], torch.device("cpu"))
    np.testing.assert_allclose(df["r1_ref"].iloc[0], r[:, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(df["r2_ref"].iloc[0], r[:, 1].mean(), rtol=1e-6)
    from figures.llm import plot

    assert plot(out, tmp_path / "fig")[0].stat().st_size > 10_000


def test_emotion_pipeline_errors_name_the_key(models, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(_emotion_argv(models, out, "--reward-labels", "joy")) == 2
    assert "reward_labels must name two labels" in capsys.readouterr().err
    argv = _emotion_argv(models, out)
    argv[argv.index("--reward-model") + 1] = "/nonexistent/clf"
    assert main(argv) == 2
    assert "reward_model: model path '/nonexistent/clf' does not exist" in capsys.readouterr().err
    assert main(_emotion_argv(models, out, "--n-pairs", "100")) == 2  # before any cell
    assert "holds 40 prompts, fewer than n_pairs + n_eval = 112" in capsys.readouterr().err
    argv = _emotion_argv(models, out)
    argv[argv.index("--prompts") + 1] = str(tmp_path)
    assert main(argv) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (out / "llm.csv").exists()


def _pairs_file(path, n=16):
    g, vocab = torch.Generator().manual_seed(0), tiny_hf.vocab_size()
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({k: torch.randint(0, vocab, (m,), generator=g).tolist()
                                 for k, m in (("prompt", 3), ("chosen", 4), ("rejected", 5))})
                     + "\n")
    return path


def test_missing_model_path_is_one_line(tmp_path, capsys):
    data = _pairs_file(tmp_path / "d.jsonl")
    assert main(["llm", "--model", "/nonexistent", "--data", str(data), "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr()
    assert "model: model path '/nonexistent' does not exist" in err.err
    assert "Traceback" not in err.err + err.out and "no tokenizer" not in err.out


def test_every_train_config_field_is_a_key():
    cfg, _ = load_defaults(llm)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "progress"}
    keys = {llm.TRAIN_KEYS.get(k, k) for k in set(llm.TRAIN_FIELDS) | set(llm.TRAIN_KEYS)}
    assert fields == keys | {"seed"}
    over = {"grad_accum": 3, "max_grad_norm": 1.5, "weight_decay": 0.01, "fd_eps": 1e-3,
            "checkpoint_every": 7, "schedule": "cosine", "clip": 4.0, "beta_prime": 0.3,
            "fd_scheme": "central", "tensorboard": True, "save_model": False, "steps": 9}
    tc = llm.train_config(dict(cfg, **over), "wdpo", 0)
    for key, value in over.items():
        assert getattr(tc, llm.TRAIN_KEYS.get(key, key)) == value


def test_model_data_run_options_save_and_refused_resume(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = _pairs_file(tmp_path / "d.jsonl")
    out = tmp_path / "res"
    argv = ["llm", "--model", str(models / "policy"), "--data", str(data), "--methods", "kldpo",
            "--steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--grad-accum", "2",
            "--schedule", "cosine",
            "--max-grad-norm", "1.0", "--weight-decay", "0.01", "--append-eos", "true",
            "--checkpoint-every", "2", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    run = out / "llm_model" / "kldpo"
    rec = json.loads((run / "train_config.json").read_text())
    assert (rec["grad_accum"], rec["schedule"], rec["max_grad_norm"], rec["weight_decay"],
            rec["checkpoint_every"], rec["global_batch"]) == (2, "cosine", 1.0, 0.01, 2, 8)
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    assert (run / "model" / "tokenizer.json").exists()
    ref = AutoModelForCausalLM.from_pretrained(models / "policy")
    assert not torch.equal(trained.transformer.wte.weight, ref.transformer.wte.weight)
    m = pd.read_csv(run / "metrics.csv")
    assert m["lr"].iloc[-1] < m["lr"].iloc[1]  # cosine decay
    capsys.readouterr()
    assert main(argv + ["--tau", "0.5", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "another configuration (lr: saved 0.003, now 0.01; tau: saved 1.0, now 0.5)" in err
    assert json.loads((run / "train_config.json").read_text()) == rec
    assert main(argv + ["--tau", "0.5", "--restart"]) == 0  # --restart starts over
    assert json.loads((run / "train_config.json").read_text())["tau"] == 0.5
