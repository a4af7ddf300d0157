"""Finite preference environments with Bradley-Terry labels (SPEC section 2).

A :class:`FiniteEnv` holds ``|S|`` states with distribution ``mu``, ``|A|``
actions with features ``phi`` of shape ``(S, A, d)`` (``||phi|| <= 1``), a pair
sampler ``q(a1, a2 | s)``, a reward table ``r(s, a)``, the DPO temperature
``beta`` and the reference parameter ``theta_ref``. Labels follow the
Bradley-Terry model ``P(y = 1 | s, a1, a2) = sigmoid(r(s, a1) - r(s, a2))``,
optionally flipped with probability ``eta`` (label noise).

The environment samples i.i.d. data, lists its exact population, reports its
coverage ``lambda_min(Sigma_P)`` and builds shifted copies (reward mixtures,
state shift, pair-sampler shift, label noise).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ._validation import (
    check_finite_array,
    check_nonnegative,
    check_positive,
    check_theta,
    check_weights,
)
from .data import PreferenceData
from .losses import sigmoid
from .policy import LogLinearPolicy

__all__ = ["FiniteEnv", "realizable_reward"]


def realizable_reward(features: np.ndarray, theta_true: np.ndarray, beta: float,
                      theta_ref: np.ndarray | None = None) -> np.ndarray:
    """Reward table ``r(s, a) = beta (theta_true - theta_ref) . phi(s, a)`` (SPEC 1)."""
    delta = theta_true if theta_ref is None else theta_true - theta_ref
    return beta * (features @ delta)


def _pair_table(kind, features: np.ndarray, theta_ref: np.ndarray) -> np.ndarray:
    """Pair sampler ``q(a1, a2 | s)`` as an ``(S, A, A)`` table."""
    S, A, _ = features.shape
    if isinstance(kind, str):
        if kind == "uniform":
            q = np.ones((S, A, A)) - np.eye(A)[None]
            return q / q.sum(axis=(1, 2), keepdims=True)
        if kind == "ref":
            p = LogLinearPolicy(features, theta_ref).probs()
            return p[:, :, None] * p[:, None, :]
        raise ValueError(
            f"pair_sampler must be 'uniform', 'ref' or an (S, A, A) array, got {kind!r}")
    q = check_finite_array(kind, "pair_sampler", ndim=3)
    if q.shape != (S, A, A):
        raise ValueError(f"pair_sampler must have shape {(S, A, A)}, got {q.shape}")
    for s in range(S):
        check_weights(q[s].ravel(), A * A, f"pair_sampler[{s}]", atol=1e-8)
    return q / q.sum(axis=(1, 2), keepdims=True)


@dataclass(frozen=True, eq=False)
class FiniteEnv:
    """A finite preference world (SPEC 2).

    Parameters
    ----------
    features : array (S, A, d)
        ``phi(s, a)`` with ``||phi(s, a)||_2 <= 1``.
    reward : array (S, A)
        Reward table of the Bradley-Terry generator. Use
        :meth:`from_parameter` for the realizable reward
        ``beta (theta_true - theta_ref) . phi``.
    state_dist : array (S,), optional
        ``mu``; uniform when omitted.
    pair_sampler : {'uniform', 'ref'} or array (S, A, A)
        ``q(a1, a2 | s)``: uniform over ordered pairs of distinct actions,
        two independent draws from ``pi_ref``, or an explicit table.
    beta : float
        DPO temperature, ``> 0``.
    theta_ref : array (d,), optional
        Reference parameter (zeros: uniform ``pi_ref``).
    label_noise : float
        Probability ``eta in [0, 1/2]`` that a Bradley-Terry label is flipped.
    theta_true : array (d,), optional
        The generating parameter when the reward is realizable (metadata).
    """

    features: np.ndarray
    reward: np.ndarray
    state_dist: np.ndarray | None = None
    pair_sampler: object = "uniform"
    beta: float = 1.0
    theta_ref: np.ndarray | None = None
    label_noise: float = 0.0
    theta_true: np.ndarray | None = None

    def __post_init__(self) -> None:
        phi = check_finite_array(self.features, "features", ndim=3)
        S, A, d = phi.shape
        if A < 2:
            raise ValueError(f"features must have at least 2 actions, got shape {phi.shape}")
        norms = np.linalg.norm(phi, axis=2)
        if norms.max() > 1 + 1e-9:
            raise ValueError(
                f"features must satisfy ||phi(s, a)|| <= 1, got max norm {norms.max()!r}")
        r = check_finite_array(self.reward, "reward", ndim=2)
        if r.shape != (S, A):
            raise ValueError(f"reward must have shape {(S, A)}, got {r.shape}")
        mu = check_weights(self.state_dist, S, "state_dist", atol=1e-8)
        beta = check_positive(self.beta, "beta")
        theta_ref = check_theta(self.theta_ref, d, "theta_ref")
        eta = check_nonnegative(self.label_noise, "label_noise")
        if eta > 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise!r}")
        q = _pair_table(self.pair_sampler, phi, theta_ref)
        theta_true = (None if self.theta_true is None
                      else check_theta(self.theta_true, d, "theta_true"))
        for k, v in dict(features=phi, reward=r, state_dist=mu, beta=beta, theta_ref=theta_ref,
                         label_noise=eta, pair_sampler=q, theta_true=theta_true).items():
            object.__setattr__(self, k, v)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_parameter(cls, features, theta_true, beta: float = 1.0, theta_ref=None,
                       **kwargs) -> FiniteEnv:
        """Realizable environment with ``r = beta (theta_true - theta_ref) . phi``."""
        phi = check_finite_array(features, "features", ndim=3)
        theta_true = check_theta(theta_true, phi.shape[2], "theta_true")
        ref = check_theta(theta_ref, phi.shape[2], "theta_ref")
        r = realizable_reward(phi, theta_true, check_positive(beta, "beta"), ref)
        return cls(phi, r, beta=beta, theta_ref=ref, theta_true=theta_true, **kwargs)

    @classmethod
    def random(cls, n_states: int = 20, n_actions: int = 6, dim: int = 4, beta: float = 1.0,
               seed: int | None = 0, theta_norm: float = 2.0, feature_norm: float = 1.0,
               coverage_scale: float = 1.0, **kwargs) -> FiniteEnv:
        """Random realizable environment.

        Features are drawn uniformly in direction with norms uniform in
        ``[feature_norm / 2, feature_norm]``; ``theta_true`` is a random
        direction scaled to ``theta_norm``; ``theta_ref = 0`` unless given.
        ``coverage_scale`` in ``(0, 1]`` multiplies the last feature coordinate (after
        the draw, so the world is otherwise the same): the coverage
        ``lambda_min(Sigma_P)`` shrinks roughly like ``coverage_scale^2`` while
        ``||phi|| <= 1`` still holds.
        """
        for name, v in (("n_states", n_states), ("n_actions", n_actions), ("dim", dim)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if n_actions < 2:
            raise ValueError(f"n_actions must be at least 2, got {n_actions!r}")
        if not 0 < feature_norm <= 1:
            raise ValueError(f"feature_norm must be in (0, 1], got {feature_norm!r}")
        rng = np.random.default_rng(seed)
        g = rng.standard_normal((n_states, n_actions, dim))
        g /= np.linalg.norm(g, axis=2, keepdims=True)
        phi = g * rng.uniform(feature_norm / 2, feature_norm, (n_states, n_actions, 1))
        if not 0 < coverage_scale <= 1:
            raise ValueError(f"coverage_scale must be in (0, 1], got {coverage_scale!r}")
        phi[..., -1] *= coverage_scale
        u = rng.standard_normal(dim)
        theta_true = check_nonnegative(theta_norm, "theta_norm") * u / np.linalg.norm(u)
        return cls.from_parameter(phi, theta_true, beta=beta, **kwargs)

    # ------------------------------------------------------------------ shapes
    @property
    def n_states(self) -> int:
        return self.features.shape[0]

    @property
    def n_actions(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    # ------------------------------------------------------------------ preferences
    def preference_prob(self) -> np.ndarray:
        """``P(y = 1 | s, a1, a2)`` including label noise, shape ``(S, A, A)``."""
        p = sigmoid(self.reward[:, :, None] - self.reward[:, None, :])
        return (1 - self.label_noise) * p + self.label_noise * (1 - p)

    def _pairs(self):
        """Every (s, a1, a2) with positive probability and that probability."""
        joint = self.state_dist[:, None, None] * self.pair_sampler
        s, a1, a2 = np.nonzero(joint > 0)
        return s, a1, a2, joint[s, a1, a2]

    def _atoms(self, s, a1, a2, y, w) -> PreferenceData:
        x = self.features[s, a1] - self.features[s, a2]
        return PreferenceData(x, y, w, states=s, actions=np.stack([a1, a2], axis=1))

    def population(self) -> PreferenceData:
        """Exact population: every ``(s, a1, a2, y)`` atom with its probability.

        Atoms of probability zero are left out.
        """
        s, a1, a2, pw = self._pairs()
        p1 = self.preference_prob()[s, a1, a2]
        w = np.concatenate([pw * p1, pw * (1 - p1)])
        keep = w > 0
        ss, aa1, aa2 = (np.concatenate([v, v])[keep] for v in (s, a1, a2))
        y = np.concatenate([np.ones_like(pw), np.zeros_like(pw)])[keep]
        return self._atoms(ss, aa1, aa2, y, w[keep] / w[keep].sum())

    def sample(self, n: int, seed: int | np.random.Generator | None = None,
               merged: bool = False) -> PreferenceData:
        """``n`` i.i.d. preference samples.

        Parameters
        ----------
        n : int
            Number of pairs.
        seed : int, Generator or None
            Randomness.
        merged : bool
            ``False``: the ``n`` draws themselves, weights ``1/n`` (cost ``O(n)``).
            ``True``: the same law, drawn as distinct atoms: the counts of ``n`` i.i.d.
            draws over the population atoms are exactly ``Multinomial(n, P)``, so the
            sample is the population atoms with ``count > 0`` and weights ``count / n``
            (cost ``O(|atoms|)`` whatever ``n``; every objective is a function of the
            weighted distribution, so the estimators are the same as on the unmerged
            draws). The random streams differ, so the two modes give different
            (equally distributed) samples for one seed.
        """
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed)
        if merged:
            return self.sample_counts(int(n), rng)
        s, a1, a2, pw = self._pairs()
        k = rng.choice(pw.shape[0], size=int(n), p=pw / pw.sum())
        s, a1, a2 = s[k], a1[k], a2[k]
        y = (rng.random(int(n)) < self.preference_prob()[s, a1, a2]).astype(np.float64)
        return self._atoms(s, a1, a2, y, None)

    def sample_counts(self, n: int, seed: int | np.random.Generator | None = None
                      ) -> PreferenceData:
        """``n`` i.i.d. pairs as distinct atoms with weights ``count / n`` (``O(|atoms|)``).

        ``count ~ Multinomial(n, P)`` over the atoms of :meth:`population`; atoms drawn
        zero times are left out. See :meth:`sample` with ``merged=True``.
        """
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed)
        pop = self.population()
        counts = rng.multinomial(int(n), pop.weights)
        keep = np.flatnonzero(counts)
        return PreferenceData(pop.x[keep], pop.y[keep], counts[keep] / float(n),
                              states=pop.states[keep], actions=pop.actions[keep])

    def coverage(self) -> np.ndarray:
        """``Sigma_P = E_P[x x^T]`` on the population."""
        return self.population().coverage()

    def lambda_min(self) -> float:
        """Data coverage ``lambda_min(Sigma_P)`` (SPEC 2)."""
        return float(np.linalg.eigvalsh(self.coverage())[0])

    # ------------------------------------------------------------------ policies
    def policy(self, theta) -> LogLinearPolicy:
        """The log-linear policy ``pi_theta`` on this environment's features."""
        return LogLinearPolicy(self.features, theta)

    def expected_reward(self, theta, reward=None) -> float:
        """``E_{s ~ mu, a ~ pi_theta} r(s, a)`` (this environment's reward by default)."""
        return self.policy(theta).expected_reward(self.reward if reward is None else reward,
                                                  self.state_dist)

    # ------------------------------------------------------------------ shifts
    def with_reward(self, reward) -> FiniteEnv:
        """Same world, another reward table (misspecified in general)."""
        return replace(self, reward=reward, theta_true=None)

    def reward_mixture(self, other_reward, alpha: float) -> FiniteEnv:
        """Reward ``alpha r + (1 - alpha) r_other`` (the paper's mixture shift)."""
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        other = check_finite_array(other_reward, "other_reward", ndim=2)
        return self.with_reward(alpha * self.reward + (1 - alpha) * other)

    def with_state_dist(self, state_dist) -> FiniteEnv:
        """Shifted state distribution ``mu'``."""
        return replace(self, state_dist=state_dist)

    def with_pair_sampler(self, pair_sampler) -> FiniteEnv:
        """Shifted pair sampler ``q'(a1, a2 | s)`` ('uniform', 'ref' or a table)."""
        return replace(self, pair_sampler=pair_sampler)

    def with_label_noise(self, eta: float) -> FiniteEnv:
        """Each Bradley-Terry label flipped with probability ``eta``."""
        return replace(self, label_noise=eta)
