"""Command line and configuration: precedence, typed flags, help, error messages."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from experiments import __main__ as cli
from experiments.config import coerce, load_defaults, resolve_config

DEFAULTS = {"n_grid": [100, 1000], "rho": 0.1, "n_seeds": 3, "solver": "dual", "flag": False,
            "methods": ["dpo", "kldpo"]}
QUICK = {"n_seeds": 2, "rho": 0.2}


def test_precedence_toml_quick_file_flags(tmp_path):
    cfg_file = tmp_path / "over.toml"
    cfg_file.write_text('rho = 0.3\nsolver = "cvxpy"\nn_grid = [10, 20, 30]\n'
                        "[quick]\nn_seeds = 7\n")
    assert resolve_config(DEFAULTS, QUICK) == DEFAULTS
    assert resolve_config(DEFAULTS, QUICK, use_quick=True) == {**DEFAULTS, **QUICK}
    got = resolve_config(DEFAULTS, QUICK, use_quick=True, config_file=cfg_file)
    assert got == {**DEFAULTS, "n_seeds": 7, "rho": 0.3, "solver": "cvxpy",
                   "n_grid": [10, 20, 30]}
    got = resolve_config(DEFAULTS, QUICK, use_quick=True, config_file=cfg_file,
                         flags={"rho": "0.5", "n_grid": "1,2", "flag": "true",
                                "methods": "wdpo2"})
    assert got == {**DEFAULTS, "n_seeds": 7, "rho": 0.5, "solver": "cvxpy", "n_grid": [1, 2],
                   "flag": True, "methods": ["wdpo2"]}
    assert resolve_config(DEFAULTS, QUICK, config_file=cfg_file)["n_seeds"] == 3


def test_types_are_checked():
    assert coerce("rho", 1, 0.5) == 1.0 and isinstance(coerce("rho", 1, 0.5), float)
    assert coerce("n", "7", 3) == 7
    with pytest.raises(ValueError, match="n must be an integer"):
        coerce("n", "7.5", 3)
    with pytest.raises(ValueError, match="n must be an integer"):
        coerce("n", 7.5, 3)
    with pytest.raises(ValueError, match="flag must be true or false"):
        coerce("flag", "maybe", False)
    with pytest.raises(ValueError, match="rhos must be a number"):
        coerce("rhos", "0.1,abc", [0.1])
    with pytest.raises(ValueError, match="unknown keys \\['nope'\\]"):
        resolve_config(DEFAULTS, QUICK, flags={"nope": 1})


def test_bad_config_file_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rho = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        resolve_config(DEFAULTS, QUICK, config_file=bad)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_config(DEFAULTS, QUICK, config_file=tmp_path / "missing.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("radius = 1.0\n")
    with pytest.raises(ValueError, match="unknown keys \\['radius'\\]"):
        resolve_config(DEFAULTS, QUICK, config_file=unknown)


@pytest.mark.parametrize("name", ["rates", "shift"])
def test_shipped_configs_load_and_help_lists_every_key(name, capsys):
    module = cli.load_experiment(name)
    defaults, quick = load_defaults(module)
    assert set(quick) <= set(defaults)
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for key in defaults:
        assert "--" + key.replace("_", "-") in text
    for option in ("--quick", "--config", "--out", "--jobs", "--backend", "--scheduler",
                   "--restart", "--keep-errors"):
        assert option in text
    assert "default " in text


def test_unknown_and_unavailable_experiments(monkeypatch, capsys):
    assert cli.main(["nonsense"]) == 2
    assert "unknown experiment 'nonsense'" in capsys.readouterr().err
    monkeypatch.setitem(cli.EXPERIMENTS, "ghost", ("experiments.ghost_missing", None, "x"))
    assert cli.main(["ghost"]) == 2
    assert "module experiments.ghost_missing is not installed" in capsys.readouterr().err
    # a module whose own import needs a missing package names the extra to install
    fake = types.ModuleType("experiments._needs_extra")

    def fail_import(name, *args, **kwargs):
        if name == "experiments._needs_extra":
            raise ModuleNotFoundError("No module named 'torchy'", name="torchy")
        return real_import(name, *args, **kwargs)

    real_import = cli.importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module", fail_import)
    monkeypatch.setitem(cli.EXPERIMENTS, "needy", (fake.__name__, "torch", "x"))
    assert cli.main(["needy"]) == 2
    err = capsys.readouterr().err
    assert "torchy" in err and "drdpo-simulator[torch]" in err
    assert cli.main([]) == 2
    assert "rates" in capsys.readouterr().err


def test_dask_needs_scheduler_and_bad_flag_values(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["rates", "--backend", "dask", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--scheduler" in capsys.readouterr().err
    assert cli.main(["rates", "--n-seeds", "many", "--out", str(tmp_path)]) == 2
    assert "n_seeds must be an integer, got 'many'" in capsys.readouterr().err
    assert not (tmp_path / "rates.csv").exists()


@pytest.mark.parametrize(("name", "flags", "key"), [
    ("rates", ["--dim", "0"], "dim"),
    ("rates", ["--beta", "-1"], "beta"),
    ("rates", ["--solver", "foo"], "solver"),
    ("rates", ["--delta", "2"], "delta"),
    ("rates", ["--theta-norm", "nan"], "theta_norm"),
    ("rates", ["--n-grid", "0,300"], "n_grid"),
    ("rates", ["--n-boot", "0"], "n_boot"),
    ("rates", ["--n-seeds", "0"], "n_seeds"),
    ("rates", ["--methods", "dpo,kl"], "methods"),
    ("shift", ["--alpha-test", "0,1.5"], "alpha_test"),
    ("shift", ["--n-train", "-5"], "n_train"),
    ("approx", ["--batch-sizes", "8,-1"], "batch_sizes"),
    ("approx", ["--tau-surrogates", "wdpo-gr"], "tau_surrogates"),
    ("llm", ["--rho", "-1"], "rho"),
    ("llm", ["--mixing", "harmonic"], "mixing"),
    ("llm", ["--grad-accum", "0"], "grad_accum"),
    ("rates", ["--coverage-scale", "0"], "coverage_scale"),
    ("regimes", ["--ratios", "0,1"], "ratios"),
    ("regimes", ["--methods", "kl"], "methods"),
    ("constants", ["--n", "0"], "n"),
    ("constants", ["--beta-values", "1,-2"], "beta_values"),
    ("llm", ["--n-embd", "30", "--n-head", "4"], "n_embd"),
])
def test_bad_values_are_refused_up_front_naming_the_key(name, flags, key, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([name, *flags, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --{key.replace('_', '-')} ({key})") and "\n" not in err
    assert not out.exists()  # nothing computed, no <name>_config.json


def test_dry_run_prints_grid_size_and_checked_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["rates", "--quick", "--n_seeds", "3", "--rhos", "0.03,0.1", "--dry-run",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # 4 robust methods x 2 radii + dpo at rho = 0, times 3 seeds
    assert text.startswith("rates: 27 cells; configuration (checked):")
    cfg = json.loads(text.split("\n", 1)[1])
    assert cfg["n_seeds"] == 3 and cfg["rhos"] == [0.03, 0.1] and cfg["n_boot"] == 300
    assert not out.exists()


def test_toml_spelling_of_flags_is_accepted(capsys):
    for spelling in ("--n_seeds", "--n-seeds"):
        assert cli.main(["shift", spelling, "4", "--alpha_train", "0.5", "--dry-run"]) == 0
        cfg = json.loads(capsys.readouterr().out.split("\n", 1)[1])
        assert cfg["n_seeds"] == 4 and cfg["alpha_train"] == 0.5


@pytest.mark.parametrize("where", ["file", "below_file", "unwritable"])
def test_unusable_out_is_a_one_line_error(where, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    out = {"file": target, "below_file": target / "sub",
           "unwritable": Path("/sys/drdpo-test-results")}[where]  # sysfs refuses mkdir
    assert cli.main(["rates", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out '{out}' cannot be used as a results directory")
    assert "\n" not in err
    assert target.read_text() == "not a directory"
