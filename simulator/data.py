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

from ._validation import check_finite_array, check_labels, check_weights

__all__ = ["PreferenceData"]

#: Odd 64-bit multipliers of the row hash of :meth:`PreferenceData.merged` (splitmix64's
#: constants and golden-ratio relatives: any odd constants with mixed bits serve).
_HASH_MULT = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
                       0xD6E8FEB86659FD93, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9],
                      dtype=np.uint64)


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
        ``states`` / ``actions`` dropped) define the same problem. The bit patterns of the
        rows are hashed to one 64-bit key each (multiply-xorshift, ``O(n d)``), the keys are
        grouped (a sort of ``n`` integers) and every row is checked against its group's first
        row; a hash collision (distinct rows, one key) is thereby detected, and the rows are
        then merged by sorting them (``np.unique``) instead. Data without repeated atoms are
        returned as they are (at once when the first feature alone is distinct, as for
        continuous features).

        Returns
        -------
        merged : PreferenceData
        inverse : ndarray of int (n,)
            ``merged`` atom of each of this data set's atoms.
        """
        if self.d and np.unique(self.x[:, 0]).size == self.n:  # one distinct column suffices
            return self, np.arange(self.n)
        rows = np.ascontiguousarray(np.column_stack([self.x, self.y]))
        rows[rows == 0.0] = 0.0  # -0.0 and 0.0 are the same feature value
        keys = np.zeros(self.n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j, bits in enumerate(rows.view(np.uint64).T):  # d + 1 passes of n words
                h = bits * _HASH_MULT[j % _HASH_MULT.size]
                keys = (keys ^ (h ^ (h >> np.uint64(29)))) * _HASH_MULT[-1]
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        if first.size == self.n:  # distinct keys: distinct atoms
            return self, np.arange(self.n)
        inverse = inverse.ravel()
        if not np.array_equal(rows, rows[first[inverse]]):  # a hash collision: sort instead
            _, first, inverse = np.unique(rows, axis=0, return_index=True,
                                          return_inverse=True)
            inverse = inverse.ravel()
        w = np.bincount(inverse, self.weights, minlength=first.size)
        return PreferenceData(self.x[first], self.y[first], w / w.sum()), inverse

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
