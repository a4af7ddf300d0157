"""Log-linear policies (SPEC section 1).

``pi_theta(a | s) = exp(theta . phi(s, a)) / sum_a' exp(theta . phi(s, a'))``
over a finite action set, with features ``phi`` of shape ``(S, A, d)``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from ._validation import check_finite_array, check_theta

__all__ = ["LogLinearPolicy"]


class LogLinearPolicy:
    """The log-linear policy ``pi_theta`` on a finite state-action space.

    Parameters
    ----------
    features : array of shape (S, A, d)
        ``phi(s, a)``.
    theta : array of shape (d,)
        Policy parameter.
    """

    def __init__(self, features, theta) -> None:
        self.features = check_finite_array(features, "features", ndim=3)
        self.theta = check_theta(theta, self.features.shape[2], "theta")

    def logits(self) -> np.ndarray:
        """``theta . phi(s, a)``, shape ``(S, A)``."""
        return self.features @ self.theta

    def log_probs(self) -> np.ndarray:
        """``log pi_theta(a | s)`` by log-sum-exp, shape ``(S, A)``."""
        z = self.logits()
        return z - logsumexp(z, axis=1, keepdims=True)

    def probs(self) -> np.ndarray:
        """``pi_theta(a | s)``, shape ``(S, A)``; rows sum to one."""
        return np.exp(self.log_probs())

    def expected_reward(self, reward, state_dist) -> float:
        """``E_{s ~ mu, a ~ pi_theta(.|s)} r(s, a)`` for a reward table ``(S, A)``."""
        r = check_finite_array(reward, "reward", ndim=2)
        mu = np.asarray(state_dist, dtype=np.float64)
        if r.shape != self.features.shape[:2]:
            raise ValueError(f"reward must have shape {self.features.shape[:2]}, got {r.shape}")
        return float(mu @ np.sum(self.probs() * r, axis=1))
