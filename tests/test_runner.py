"""The generic runner: resume after interruption, errors, parallel determinism, dask."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from experiments.__main__ import main
from experiments.runner import ConfigMismatchError, cell_id, run_experiment

FAKE = '''
import os
import time

import numpy as np

NAME = "fake"
DESCRIPTION = "A fake experiment for the runner tests."
DEFAULT_CONFIG = {"n_cells": 6, "marker": "", "sleep": 0.0, "scale": 1.5,
                  "quick": {"n_cells": 3}}


def cells(cfg):
    return [{"i": i, "seed": 100 + i} for i in range(cfg["n_cells"])]


def run_cell(cell, cfg):
    if cfg["marker"]:
        with open(cfg["marker"], "a") as fh:
            fh.write(f"{cell['i']}\\n")
        n_done = len(open(cfg["marker"]).read().split())
        if n_done > int(os.environ.get("FAKE_INTERRUPT_AFTER", "1000000")):
            raise KeyboardInterrupt
    if cell["i"] == int(os.environ.get("FAKE_FAIL", "-1")):
        raise ArithmeticError("boom in cell")
    time.sleep(cfg["sleep"])
    rng = np.random.default_rng(cell["seed"])
    return [{"value": float(rng.standard_normal() * cfg["scale"]), "k": k} for k in range(2)]


def summarize(df, cfg):
    return {"fake_summary": df.groupby("i", as_index=False)["value"].mean()}
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake experiment module importable here and in subprocesses."""
    pkg = f"fake_pkg_{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    (src / pkg).mkdir(parents=True)
    (src / pkg / "__init__.py").write_text("")
    (src / pkg / "exp.py").write_text(FAKE)
    name = f"{pkg}.exp"
    monkeypatch.syspath_prepend(str(src))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    return name, env


def _marker(path: Path) -> list[int]:
    return [int(v) for v in path.read_text().split()] if path.exists() else []


def _cli(name, out, *extra, env=None, **kw):
    cmd = [sys.executable, "-m", "experiments", name, "--out", str(out), "--no-progress",
           *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_interrupted_run_resumes_without_recomputing(fake, tmp_path, monkeypatch):
    name, _ = fake
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([name, "--out", str(ref), "--no-progress"]) == 0
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("FAKE_INTERRUPT_AFTER", "3")
    args = [name, "--out", str(out), "--no-progress", "--marker", str(marker)]
    assert main(args) == 130
    first = pd.read_csv(out / "fake.csv")
    assert sorted(first["i"].unique()) == [0, 1, 2]
    monkeypatch.delenv("FAKE_INTERRUPT_AFTER")
    assert main(args) == 0
    calls = _marker(marker)
    # cells 0-2 ran once; cell 3 was interrupted before it finished, so it ran again
    assert calls == [0, 1, 2, 3, 3, 4, 5]
    a = pd.read_csv(out / "fake.csv")
    b = pd.read_csv(ref / "fake.csv")
    pd.testing.assert_frame_equal(a, b)
    assert (out / "fake_summary.csv").exists()
    # a third run finds everything done
    assert main(args) == 0
    assert len(_marker(marker)) == 7


def test_sigkill_mid_run_loses_nothing(fake, tmp_path):
    name, env = fake
    out, ref = tmp_path / "out", tmp_path / "ref"
    marker = tmp_path / "marker.txt"
    args = ["--marker", str(marker), "--sleep", "0.25", "--n-cells", "12"]
    cmd = [sys.executable, "-m", "experiments", name, "--out", str(out), "--no-progress", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(_marker(marker)) < 4 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = set(pd.read_csv(out / "fake.csv")["i"])
    assert 2 <= len(saved) < 12
    n_before = len(_marker(marker))
    assert _cli(name, out, *args, env=env).returncode == 0
    rerun = _marker(marker)[n_before:]
    assert not saved & set(rerun)
    assert sorted(saved | set(rerun)) == list(range(12))
    assert _cli(name, ref, *args, env=env).returncode == 0
    a = pd.read_csv(out / "fake.csv")
    b = pd.read_csv(ref / "fake.csv")
    pd.testing.assert_frame_equal(a, b)


def test_error_cell_recorded_others_finish_and_retried(fake, tmp_path, monkeypatch):
    name, _ = fake
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_FAIL", "2")
    assert main([name, "--out", str(out), "--no-progress"]) == 1
    df = pd.read_csv(out / "fake.csv")
    err = df[df["status"] == "error"]
    assert list(err["i"]) == [2]
    assert err["error"].iloc[0] == "ArithmeticError: boom in cell"
    assert sorted(df.loc[df["status"] == "ok", "i"].unique()) == [0, 1, 3, 4, 5]
    summary = pd.read_csv(out / "fake_summary.csv")
    assert list(summary["i"]) == [0, 1, 3, 4, 5]
    # keeping errors leaves them; the default retries them
    assert main([name, "--out", str(out), "--no-progress", "--keep-errors"]) == 1
    monkeypatch.delenv("FAKE_FAIL")
    assert main([name, "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "fake.csv")
    assert (df["status"] == "ok").all() and len(df) == 12
    assert list(df["i"]) == sorted(df["i"])


def test_jobs_1_and_2_give_identical_files(fake, tmp_path):
    name, env = fake
    for jobs in (1, 2):
        res = _cli(name, tmp_path / f"j{jobs}", "--jobs", str(jobs), "--n-cells", "8", env=env)
        assert res.returncode == 0, res.stderr
    a = (tmp_path / "j1" / "fake.csv").read_bytes()
    assert a == (tmp_path / "j2" / "fake.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "j1" / "fake.csv")) == 16


def test_changed_config_is_refused_and_restart_discards(fake, tmp_path):
    name, _ = fake
    out = tmp_path / "out"
    assert main([name, "--out", str(out), "--no-progress"]) == 0
    assert main([name, "--out", str(out), "--no-progress", "--scale", "2.0"]) == 2
    module = importlib.import_module(name)
    with pytest.raises(ConfigMismatchError, match="scale"):
        run_experiment(module, {**module.DEFAULT_CONFIG, "scale": 2.0}, out, progress=False)
    assert main([name, "--out", str(out), "--no-progress", "--scale", "2.0", "--restart"]) == 0
    df = pd.read_csv(out / "fake.csv")
    ref = pd.read_csv(out / "fake_summary.csv")
    assert len(df) == 12 and len(ref) == 6


def test_truncated_last_line_is_dropped(fake, tmp_path):
    name, _ = fake
    out = tmp_path / "out"
    assert main([name, "--out", str(out), "--no-progress"]) == 0
    path = out / "fake.csv"
    full = path.read_bytes()
    path.write_bytes(full[: full.rfind(b"\n", 0, len(full) - 1) + 5])  # cut into the last row
    module = importlib.import_module(name)
    cfg = {k: v for k, v in module.DEFAULT_CONFIG.items() if k != "quick"}
    report = run_experiment(module, cfg, out, progress=False, echo=None)
    assert report.n_run == 1 and path.read_bytes() == full


def test_dask_backend_matches_local(fake, tmp_path):
    distributed = pytest.importorskip("distributed")
    name, _ = fake
    module = importlib.import_module(name)
    cfg = {k: v for k, v in module.DEFAULT_CONFIG.items() if k != "quick"}
    run_experiment(module, cfg, tmp_path / "local", progress=False, echo=None)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        report = run_experiment(module, cfg, tmp_path / "dask", backend="dask",
                                scheduler=cluster.scheduler_address, progress=False, echo=None)
    assert report.n_run == 6 and report.n_errors == 0
    a = (tmp_path / "local" / "fake.csv").read_bytes()
    assert a == (tmp_path / "dask" / "fake.csv").read_bytes()


def test_cell_id_is_stable_and_order_free():
    assert cell_id({"a": 1, "b": [1, 2]}) == cell_id({"b": [1, 2], "a": 1})
    assert cell_id({"a": 1}) != cell_id({"a": 2})
    assert len(cell_id({"a": 1})) == 12
