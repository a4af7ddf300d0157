"""The ``llm`` experiment end to end (--quick) and its pieces (SPEC 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from experiments import llm  # noqa: E402
from experiments.__main__ import main  # noqa: E402


def test_rewards_are_token_shares():
    resp = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [4, 4, 4, 4, 15, 15, 15, 15]])
    r1, r2 = llm.rewards(resp, 16)  # r_1: tokens 0-3, r_2: tokens 4-7
    np.testing.assert_allclose(r1, [0.5, 0.0])
    np.testing.assert_allclose(r2, [0.5, 0.5])


def test_preferences_follow_the_training_mixture():
    from experiments.config import load_defaults

    cfg, _ = load_defaults(llm)
    cfg = dict(cfg, n_pairs=200, alpha_train=1.0, reward_scale=50.0)
    model = llm.build_model(cfg, 0)
    recs = llm.preference_records(cfg, model, 0)
    r_c = llm.rewards(torch.tensor([r["chosen"] for r in recs]), cfg["vocab_size"])[0]
    r_r = llm.rewards(torch.tensor([r["rejected"] for r in recs]), cfg["vocab_size"])[0]
    differ = r_c != r_r
    # with a sharp Bradley-Terry model the chosen response nearly always has the larger r_1
    assert (r_c[differ] > r_r[differ]).mean() > 0.9
    assert llm.preference_records(cfg, model, 0) == recs  # seeded


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "res"
    assert main(["llm", "--quick", "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "llm.csv")
    assert (df["status"] == "ok").all()
    assert set(df["method"]) == {"dpo", "kldpo", "wdpo"}
    assert len(df) == 3 * 3  # methods x alpha_test of the quick configuration
    for col in ("reward", "reward_ref", "r1", "r2"):
        assert df[col].between(0, 1).all()
    # mixture rewards are the mixtures of the two rewards
    np.testing.assert_allclose(df["reward"], df["alpha_test"] * df["r1"] +
                               (1 - df["alpha_test"]) * df["r2"])
    # all methods share the reference of the seed
    assert df.groupby("alpha_test")["reward_ref"].nunique().eq(1).all()
    summary = pd.read_csv(out / "llm_summary.csv")
    assert set(summary["method"]) == {"dpo", "kldpo", "wdpo"}
    # resume: a second run recomputes nothing and leaves the rows unchanged
    assert main(["llm", "--quick", "--out", str(out), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "llm.csv"), df)
    from figures.llm import plot

    paths = plot(out, tmp_path / "fig")
    assert paths[0].exists() and paths[0].stat().st_size > 10_000


def test_bad_method_is_rejected():
    from experiments.config import load_defaults

    cfg, _ = load_defaults(llm)
    with pytest.raises(ValueError, match=r"--methods \(methods\).*'ppo'"):
        llm.validate(dict(cfg, methods=["ppo"]))
    with pytest.raises(ValueError, match=r"--mixing \(mixing\)"):
        llm.validate(dict(cfg, mixing="harmonic"))
    with pytest.raises(ValueError, match=r"--grad-accum \(grad_accum\)"):
        llm.validate(dict(cfg, grad_accum=0))


def test_model_and_data_mode_trains_a_saved_model(tmp_path):
    import json

    model = llm.build_model({"vocab_size": 16, "prompt_len": 4, "response_len": 8,
                             "n_embd": 16, "n_layer": 1, "n_head": 2, "dtype": "float32"}, 0)
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "d.jsonl", "w") as fh:
        for _ in range(16):
            rec = {k: torch.randint(0, 16, (n,), generator=g).tolist()
                   for k, n in (("prompt", 3), ("chosen", 4), ("rejected", 5))}
            fh.write(json.dumps(rec) + "\n")
    out = tmp_path / "res"
    argv = ["llm", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"),
            "--methods", "dpo,wdpo", "--steps", "3", "--batch-size", "4", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    for method in ("dpo", "wdpo"):
        m = pd.read_csv(out / "llm_model" / method / "metrics.csv")
        assert list(m["step"]) == [1, 2, 3]
        assert m["loss"].notna().all()
    dpo = pd.read_csv(out / "llm_model" / "dpo" / "metrics.csv")
    assert dpo["loss"].iloc[0] == pytest.approx(np.log(2), rel=1e-5)  # starts at the reference


def test_miniature_geometric_labels_and_dtype():
    from experiments.config import load_defaults

    cfg, _ = load_defaults(llm)
    assert llm.build_model(cfg, 0).transformer.wte.weight.dtype == torch.float32  # default
    cfg = dict(cfg, n_pairs=128, alpha_train=0.5, reward_scale=500.0, mixing="geometric",
               dtype="float64")
    model = llm.build_model(cfg, 0)
    assert model.transformer.wte.weight.dtype == torch.float64
    recs = llm.preference_records(cfg, model, 0)
    rc = llm.rewards(torch.tensor([r["chosen"] for r in recs]), cfg["vocab_size"])
    rr = llm.rewards(torch.tensor([r["rejected"] for r in recs]), cfg["vocab_size"])
    geo_c, geo_r = np.sqrt(rc[0] * rc[1]), np.sqrt(rr[0] * rr[1])
    differ = np.abs(geo_c - geo_r) > 0.05  # sigmoid(500 x 0.05) = 1 - 1e-11
    assert differ.sum() > 20 and (geo_c[differ] > geo_r[differ]).all()
    # the convex mixture would label some of these pairs the other way
    con_c, con_r = (rc[0] + rc[1]) / 2, (rr[0] + rr[1]) / 2
    assert (con_c[differ] < con_r[differ]).any()
