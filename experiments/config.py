"""Experiment configurations: TOML defaults, ``--quick``, ``--config FILE`` and flags.

Every experiment has a flat default configuration, ``experiments/configs/<name>.toml``
(or a ``DEFAULT_CONFIG`` dict on the module, for experiments living outside this
package). Its top-level keys are the experiment's parameters; an optional ``[quick]``
table holds the overrides applied by ``--quick`` (a grid small enough for CI).

Precedence, lowest first::

    TOML defaults  <  [quick] (with --quick)  <  --config FILE  <  --<key> flags

A ``--config`` file is TOML with the same flat keys (and optionally its own
``[quick]`` table, applied after it when ``--quick`` is given). Every value is
checked against the type of its default: ints, floats, bools, strings and lists of
those. On the command line a list is written comma-separated (``--n 100,1000``)
and a bool as ``true``/``false``.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "load_defaults",
    "add_config_flags",
    "resolve_config",
    "coerce",
    "flag_name",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
QUICK = "quick"


def flag_name(key: str) -> str:
    """Command-line flag of a configuration key: ``n_seeds`` -> ``--n-seeds``."""
    return "--" + key.replace("_", "-")


def load_defaults(module: ModuleType) -> tuple[dict[str, Any], dict[str, Any]]:
    """Default configuration and ``[quick]`` overrides of an experiment module.

    Uses ``module.DEFAULT_CONFIG`` when the module defines it, otherwise
    ``experiments/configs/<module.NAME>.toml``.
    """
    raw = getattr(module, "DEFAULT_CONFIG", None)
    if raw is None:
        path = CONFIG_DIR / f"{module.NAME}.toml"
        if not path.exists():
            raise ValueError(f"experiment {module.NAME!r} has no default configuration {path}")
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    raw = dict(raw)
    quick = dict(raw.pop(QUICK, {}))
    for key, value in raw.items():
        if isinstance(value, dict):
            raise ValueError(f"configuration key {key!r} is a table; only [quick] may be one")
    bad = sorted(set(quick) - set(raw))
    if bad:
        raise ValueError(f"[quick] sets unknown keys {bad}")
    return raw, {k: coerce(k, v, raw[k]) for k, v in quick.items()}


def _kind(like: Any) -> str:
    if isinstance(like, bool):
        return "true or false"
    return {int: "an integer", float: "a number"}.get(type(like), "a string")


def _parse_scalar(key: str, text: str, like: Any) -> Any:
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{key} must be true or false, got {text!r}")
    try:
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise ValueError(f"{key} must be {_kind(like)}, got {text!r}") from None
    return text


def coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` (strings are parsed), or ValueError."""
    if isinstance(default, list):
        like = default[0] if default else ""
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [coerce(key, v, like) for v in value]
    if isinstance(value, str):
        return _parse_scalar(key, value, default)
    if isinstance(default, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(default, bool):
            raise ValueError(f"{key} must be {_kind(default)}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int | float):
        return float(value)
    if isinstance(default, int) and isinstance(value, int):
        return value
    if isinstance(default, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    raise ValueError(f"{key} must be {_kind(default)}, got {value!r}")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any],
                     quick: dict[str, Any], source: str) -> None:
    """Add one ``--<key-with-dashes>`` flag per configuration key (``--<key>`` too).

    The value is stored as ``cfg_<key>`` when given; the TOML spelling ``--n_seeds``
    is accepted as well as ``--n-seeds``.
    """
    group = parser.add_argument_group(
        f"experiment parameters (defaults from {source}; lists comma-separated)")
    for key, value in defaults.items():
        help_ = f"default {_show(value)}"
        if key in quick:
            help_ += f"; --quick: {_show(quick[key])}"
        spellings = dict.fromkeys([flag_name(key), f"--{key}"])  # --n-seeds and --n_seeds
        group.add_argument(*spellings, dest=f"cfg_{key}", default=argparse.SUPPRESS,
                           metavar=type(value[0] if isinstance(value, list) and value
                                        else value).__name__.upper()
                           + ("[,...]" if isinstance(value, list) else ""),
                           help=help_)


def _read_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config file {str(path)!r} is not valid TOML: {exc}") from None
    return raw, dict(raw.pop(QUICK, {}))


def _apply(cfg: dict[str, Any], updates: dict[str, Any], defaults: dict[str, Any],
           where: str) -> None:
    unknown = sorted(set(updates) - set(defaults))
    if unknown:
        raise ValueError(f"{where} sets unknown keys {unknown}; known keys: {sorted(defaults)}")
    for key, value in updates.items():
        cfg[key] = coerce(key, value, defaults[key])


def resolve_config(defaults: dict[str, Any], quick: dict[str, Any], *,
                   use_quick: bool = False, config_file: str | Path | None = None,
                   flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The configuration used by a run (precedence: TOML < quick < --config < flags).

    Parameters
    ----------
    defaults, quick
        From :func:`load_defaults`.
    use_quick
        Apply the ``[quick]`` overrides.
    config_file
        A TOML file of flat overrides (its own ``[quick]`` table applies with ``use_quick``).
    flags
        ``{key: value}`` given on the command line (strings are parsed by type).

    Raises
    ------
    ValueError
        On an unknown key or a value that does not match the default's type.
    """
    cfg = dict(defaults)
    if use_quick:
        _apply(cfg, quick, defaults, "[quick]")
    if config_file is not None:
        body, file_quick = _read_file(config_file)
        _apply(cfg, body, defaults, f"--config {config_file}")
        if use_quick:
            _apply(cfg, file_quick, defaults, f"[quick] of --config {config_file}")
    _apply(cfg, dict(flags or {}), defaults, "the command line")
    return cfg
