"""Input validation shared by the whole library.

Every public entry point checks its arguments here, so that bad input raises a
``ValueError`` that names the argument and the offending value instead of
returning a silent wrong answer (DEVELOPERS.md, "Standards").
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "check_data",
    "check_finite_array",
    "check_positive_int",
    "check_labels",
    "check_weights",
    "check_nonnegative",
    "check_positive",
    "check_theta",
]


def _first_bad(a: np.ndarray, mask: np.ndarray) -> str:
    idx = tuple(int(i) for i in np.argwhere(mask)[0])
    return f"{a[idx]!r} at index {idx if len(idx) > 1 else idx[0]}"


def check_finite_array(a, name: str, ndim: int | None = None) -> np.ndarray:
    """Return ``a`` as a float64 array after checking dimension and finiteness."""
    arr = np.asarray(a, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite (no NaN or inf), got {_first_bad(arr, bad)}")
    return arr


def check_labels(y, name: str = "y", n: int | None = None) -> np.ndarray:
    """Return labels as a float64 array of zeros and ones, or raise."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but x has {n} rows")
    arr = arr.astype(np.float64)
    bad = (arr != 0.0) & (arr != 1.0)
    if bad.any():
        raise ValueError(f"{name} must contain only 0 and 1, got {_first_bad(arr, bad)}")
    return arr


def check_weights(w, n: int, name: str = "weights", atol: float = 1e-9) -> np.ndarray:
    """Return probability weights of length ``n``; ``None`` gives ``1/n`` each."""
    if w is None:
        return np.full(n, 1.0 / n)
    arr = check_finite_array(w, name, ndim=1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but x has {n} rows")
    neg = arr < 0
    if neg.any():
        raise ValueError(f"{name} must be non-negative, got {_first_bad(arr, neg)}")
    total = float(arr.sum())
    if abs(total - 1.0) > atol * max(1, n) ** 0.5 + atol:
        raise ValueError(f"{name} must sum to one, got sum {total!r}")
    return arr / total


def _as_float(value, name: str, bound: str) -> float:
    """``float(value)``, or a ``ValueError`` naming ``name`` for ``None``, text, ..."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {bound}, got {value!r}") from None


def check_nonnegative(value, name: str) -> float:
    """Return ``value`` as a float after checking it is finite and >= 0."""
    v = _as_float(value, name, "a finite number >= 0")
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_positive(value, name: str, allow_inf: bool = False) -> float:
    """Return ``value`` as a float after checking it is > 0 (and finite unless allowed)."""
    bound = "> 0" if allow_inf else "a finite number > 0"
    v = _as_float(value, name, bound)
    if np.isnan(v) or v <= 0 or (np.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def check_theta(theta, d: int, name: str = "theta") -> np.ndarray:
    """Return a finite parameter vector of length ``d`` (``None`` gives zeros)."""
    if theta is None:
        return np.zeros(d)
    arr = check_finite_array(theta, name, ndim=1)
    if arr.shape[0] != d:
        raise ValueError(f"{name} must have length {d} (the feature dimension), got {arr.shape[0]}")
    return arr


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int after checking it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if not (isinstance(value, float | np.floating) and float(value).is_integer()):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return v


def check_data(data, name: str = "data"):
    """Return ``data`` after checking it is a :class:`~simulator.PreferenceData` with at
    least one feature (``d >= 1``) and one atom of positive weight."""
    from .data import PreferenceData  # deferred: data.py imports this module

    if not isinstance(data, PreferenceData):
        raise ValueError(f"{name} must be a PreferenceData, got {type(data).__name__}")
    if data.d < 1:
        raise ValueError(f"{name} must have at least one feature (d >= 1), got x of shape "
                         f"{data.x.shape}")
    return data
