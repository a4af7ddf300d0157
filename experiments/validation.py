"""Up-front checks of an experiment's configuration, each error naming its key.

The runner checks a configuration before it computes any cell or writes any file:
first the generic rules below (every experiment), then the module's own
``validate(cfg)`` when it defines one. A module states its rules declaratively::

    from experiments.validation import POSITIVE_INT, PROBABILITY, check, one_of

    def validate(cfg):
        check(cfg, {"n_seeds": POSITIVE_INT, "delta": PROBABILITY,
                    "solver": one_of("dual", "cvxpy")})

A rule applies to a scalar, or to every element of a list (and then the list must
not be empty unless the rule says ``allow_empty``). The first violation raises
``ValueError("--n-grid (n_grid): every value must be an integer >= 1, got [0, 300]
(bad: [0])")``.

Generic rules (:func:`check_generic`): every float is finite (``nan`` and ``inf``
are refused), ``seed`` is an integer ``>= 0`` and ``n_seeds`` an integer ``>= 1``
when the configuration has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Rule", "check", "check_generic", "one_of", "at_least", "in_range",
           "POSITIVE", "NONNEGATIVE", "POSITIVE_INT", "NONNEGATIVE_INT", "PROBABILITY",
           "UNIT_INTERVAL", "FINITE", "SOLVERS", "ENV_SCHEMA"]


@dataclass(frozen=True)
class Rule:
    """A predicate on one value and the phrase that completes "must be ..."."""

    ok: Callable[[Any], bool]
    what: str
    allow_empty: bool = False

    def __call__(self, value: Any) -> bool:
        return bool(self.ok(value))

    def or_empty(self) -> Rule:
        """The same rule on a list that may be empty."""
        return Rule(self.ok, self.what, allow_empty=True)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(low: float, *, integer: bool = False) -> Rule:
    """``value >= low`` (an integer when ``integer``)."""
    if integer:
        return Rule(lambda v: _integer(v) and v >= low, f"an integer >= {low:g}")
    return Rule(lambda v: _number(v) and v >= low, f"a finite number >= {low:g}")


def in_range(low: float, high: float, *, closed: bool = False) -> Rule:
    """``low < value < high`` (``<=`` at both ends when ``closed``)."""
    if closed:
        return Rule(lambda v: _number(v) and low <= v <= high, f"in [{low:g}, {high:g}]")
    return Rule(lambda v: _number(v) and low < v < high, f"in ({low:g}, {high:g})")


def one_of(*choices: Any) -> Rule:
    """``value in choices``."""
    return Rule(lambda v: v in choices, f"one of {list(choices)}")


FINITE = Rule(_number, "a finite number")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "a finite number > 0")
NONNEGATIVE = at_least(0)
POSITIVE_INT = at_least(1, integer=True)
NONNEGATIVE_INT = at_least(0, integer=True)
PROBABILITY = in_range(0, 1)
UNIT_INTERVAL = in_range(0, 1, closed=True)

#: the ``solver`` choices of :func:`simulator.solve`
SOLVERS = ("dual", "cvxpy")
#: the keys of ``FiniteEnv.random(n_states, n_actions, dim, beta, seed=env_seed, theta_norm)``
#: shared by the rates, shift and approx experiments (a preference pair needs 2 actions)
ENV_SCHEMA: dict[str, Rule] = {"n_states": POSITIVE_INT, "n_actions": at_least(2, integer=True),
                               "dim": POSITIVE_INT, "beta": POSITIVE, "theta_norm": NONNEGATIVE,
                               "env_seed": NONNEGATIVE_INT}


def _name(key: str) -> str:
    return f"--{key.replace('_', '-')} ({key})"


def check(cfg: dict[str, Any], schema: dict[str, Rule]) -> None:
    """Check ``cfg[key]`` against ``schema[key]`` for every key of the schema.

    Raises
    ------
    ValueError
        Naming the flag and the key, the rule and the value, at the first violation.
    """
    for key, rule in schema.items():
        value = cfg[key]
        if isinstance(value, list):
            if not value and not rule.allow_empty:
                raise ValueError(f"{_name(key)} must not be empty, got []")
            bad = [v for v in value if not rule(v)]
            if bad:
                raise ValueError(f"{_name(key)}: every value must be {rule.what}, "
                                 f"got {value!r} (bad: {bad!r})")
        elif not rule(value):
            raise ValueError(f"{_name(key)} must be {rule.what}, got {value!r}")


def _floats(value: Any) -> Iterable[float]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, float)]


def check_generic(cfg: dict[str, Any]) -> None:
    """The rules every experiment shares (module docstring)."""
    for key, value in cfg.items():
        if any(not math.isfinite(v) for v in _floats(value)):
            raise ValueError(f"{_name(key)} must be finite, got {value!r}")
    check(cfg, {k: r for k, r in (("seed", NONNEGATIVE_INT), ("n_seeds", POSITIVE_INT))
                if k in cfg})
