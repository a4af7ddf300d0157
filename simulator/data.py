"""Weighted preference data sets (SPEC section 1).

A data set is a weighted list of atoms ``(x_i, y_i, w_i)`` with feature
differences ``x_i = phi(s, a1) - phi(s, a2)``, labels ``y_i in {0, 1}`` (1 means
``a1`` was preferred) and probability weights ``w_i >= 0`` summing to one. An
empirical sample has ``w_i = 1/n``; the exact population of a finite
environment lists every atom with its probability. Every solver takes weights,
so population optima and empirical optima come from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._validation import check_finite_array, check_labels, check_weights

__all__ = ["PreferenceData"]

#: Rows hashed (and checked) per block by :meth:`PreferenceData.merged`: 8192 rows of 9
#: doubles (d = 8) are 0.6 MB, so each block's temporaries stay in a core's 1 MB L2 cache
#: instead of paging in fresh n x (d + 1) arrays.
_HASH_BLOCK = 8192


def _hash_multipliers(k: int) -> np.ndarray:
    """``k`` odd 64-bit multipliers, one per column of the row key of
    :meth:`PreferenceData.merged` (fixed seed: the same keys in every run; distinct odd
    constants, so that no two columns' contributions cancel by symmetry)."""
    draws = np.random.default_rng(0x5EED).integers(0, 2**63, size=k, dtype=np.uint64)
    return draws * np.uint64(2) + np.uint64(1)


@dataclass(frozen=True, eq=False)
class PreferenceData:
    """A weighted set of preference atoms.

    Parameters
    ----------
    x : array of shape (n, d)
        Feature differences ``phi(s, a1) - phi(s, a2)``; finite.
    y : array of shape (n,)
        Labels in ``{0, 1}``.
    weights : array of shape (n,), optional
        Non-negative probability weights summing to one (``1/n`` each when
        omitted). They are renormalised to sum exactly to one.
    states, actions : arrays, optional
        Bookkeeping for data drawn from a :class:`~simulator.FiniteEnv`: the
        state index ``(n,)`` and the action pair ``(n, 2)`` of each atom.

    Raises
    ------
    ValueError
        On NaN or infinite features, labels outside ``{0, 1}``, negative
        weights or weights not summing to one, or mismatched shapes.
    """

    x: np.ndarray
    y: np.ndarray
    weights: np.ndarray | None = None
    states: np.ndarray | None = field(default=None, repr=False)
    actions: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        x = check_finite_array(self.x, "x", ndim=2)
        n = x.shape[0]
        if n == 0:
            raise ValueError("x must have at least one row, got shape (0, d)")
        y = check_labels(self.y, "y", n=n)
        w = check_weights(self.weights, n, "weights")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "weights", w)
        for name, width in (("states", None), ("actions", 2)):
            v = getattr(self, name)
            if v is None:
                continue
            v = np.asarray(v, dtype=np.int64)
            want = (n,) if width is None else (n, width)
            if v.shape != want:
                raise ValueError(f"{name} must have shape {want}, got {v.shape}")
            object.__setattr__(self, name, v)

    @property
    def n(self) -> int:
        """Number of atoms."""
        return self.x.shape[0]

    @property
    def d(self) -> int:
        """Feature dimension."""
        return self.x.shape[1]

    @property
    def ytil(self) -> np.ndarray:
        """Signed labels ``2 y - 1`` in ``{-1, +1}``."""
        return 2.0 * self.y - 1.0

    def coverage(self) -> np.ndarray:
        """Second-moment matrix ``Sigma = E_P[x x^T] = sum_i w_i x_i x_i^T``."""
        return (self.x * self.weights[:, None]).T @ self.x

    def lambda_min(self) -> float:
        """Coverage ``lambda_min(Sigma)`` (SPEC 2)."""
        return float(np.linalg.eigvalsh(self.coverage())[0])

    def subset(self, idx) -> PreferenceData:
        """The atoms ``idx`` with their weights renormalised."""
        idx = np.asarray(idx)
        w = self.weights[idx]
        return PreferenceData(
            self.x[idx], self.y[idx], w / w.sum(),
            states=None if self.states is None else self.states[idx],
            actions=None if self.actions is None else self.actions[idx],
        )

    def merged(self) -> tuple[PreferenceData, np.ndarray]:
        """The distribution on the distinct atoms: repeated ``(x, y)`` rows merged exactly.

        Every objective of the simulator is a function of the weighted distribution, so the
        merged data (each distinct atom once, carrying the summed weight of its copies;
        ``states`` / ``actions`` dropped) define the same problem. Each row's bit pattern is
        mixed (``b ^ (b >> 29)``, so that rows differing only in their sign bits do not
        cancel) and summed with odd 64-bit multipliers into one key (``O(n d)``); the keys
        are grouped by a hash table (``pandas.factorize``, ``O(n)``: a third of the time of
        a sort of ``n`` keys at n = 1e6), and every row is checked against its group's first
        row: a key collision (distinct rows, one key) is thereby detected, and the rows are
        then merged by sorting them (``np.unique``) instead. The distinct atoms come in the
        order of their first appearance. Data without repeated atoms are returned as they
        are.

        Returns
        -------
        merged : PreferenceData
        inverse : ndarray of int (n,)
            ``merged`` atom of each of this data set's atoms.
        """
        keys = np.empty(self.n, dtype=np.uint64)
        mult = _hash_multipliers(self.d + 1)
        with np.errstate(over="ignore"):
            for lo in range(0, self.n, _HASH_BLOCK):  # blocks: the temporaries stay in cache
                bits = self._rows(slice(lo, lo + _HASH_BLOCK)).view(np.uint64)
                np.matmul(bits ^ (bits >> np.uint64(29)), mult, out=keys[lo:lo + _HASH_BLOCK])
        inverse, _ = pd.factorize(keys)
        # codes are numbered in order of first appearance: a row is its group's first where
        # the running maximum of the codes grows
        top = np.maximum.accumulate(inverse)
        new = np.empty(self.n, dtype=bool)
        new[0] = True
        np.greater(top[1:], top[:-1], out=new[1:])
        first = np.flatnonzero(new)
        if first.size == self.n:  # distinct keys: distinct atoms
            return self, np.arange(self.n)
        x0, y0 = self.x[first], self.y[first]
        if not self._grouped_exactly(x0, y0, inverse):  # a key collision: sort instead
            _, first, inverse = np.unique(self._rows(slice(None)), axis=0, return_index=True,
                                          return_inverse=True)
            inverse = inverse.ravel()
            x0, y0 = self.x[first], self.y[first]
        w = np.bincount(inverse, self.weights, minlength=first.size)
        return PreferenceData(x0, y0, w / w.sum()), inverse

    def _rows(self, rows: slice) -> np.ndarray:
        """The rows ``(x, y)`` as one array, with -0.0 made 0.0 (``-0.0 + 0.0 = 0.0``: the
        same feature value, which must merge)."""
        out = np.column_stack([self.x[rows], self.y[rows]])
        out += 0.0
        return out

    def _grouped_exactly(self, x0: np.ndarray, y0: np.ndarray, inverse: np.ndarray) -> bool:
        """Whether every row equals its group's first row ``(x0, y0)[inverse]`` (compared as
        values, so that -0.0 equals 0.0), in blocks."""
        for lo in range(0, self.n, _HASH_BLOCK):
            g = inverse[lo:lo + _HASH_BLOCK]
            if not (np.array_equal(self.x[lo:lo + _HASH_BLOCK], x0[g])
                    and np.array_equal(self.y[lo:lo + _HASH_BLOCK], y0[g])):
                return False
        return True

    def flipped(self) -> PreferenceData:
        """The same atoms with every label flipped."""
        return PreferenceData(self.x, 1.0 - self.y, self.weights,
                              states=self.states, actions=self.actions)

    @staticmethod
    def concatenate(parts: list[PreferenceData], mix: list[float] | None = None) -> PreferenceData:
        """Mixture ``sum_k mix_k P_k`` of data sets (equal mixing when omitted)."""
        if not parts:
            raise ValueError("parts must hold at least one PreferenceData")
        mix = np.full(len(parts), 1.0 / len(parts)) if mix is None else check_weights(
            mix, len(parts), "mix")
        keep_meta = all(p.states is not None and p.actions is not None for p in parts)
        return PreferenceData(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([m * p.weights for m, p in zip(mix, parts, strict=True)]),
            states=np.concatenate([p.states for p in parts]) if keep_meta else None,
            actions=np.concatenate([p.actions for p in parts]) if keep_meta else None,
        )
