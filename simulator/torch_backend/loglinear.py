"""The log-linear policy as a torch module (SPEC 1, 7).

``log pi_theta(a | s) = theta . phi(s, a) - logsumexp_a' theta . phi(s, a')``. The
*embedding* of a response is its feature vector ``phi(s, a)``, so the Wasserstein
penalty of :mod:`.wasserstein` perturbs ``phi(s, a1)`` and ``phi(s, a2)`` (the
pair view of SPEC 3.3): the log-probabilities are computed as
``theta . e - log Z_theta(s)`` with the partition function taken from the
unperturbed feature table, so ``grad_e log pi_theta = theta`` and the DPO loss
depends on the pair only through ``e_chosen - e_rejected``. The reference
log-probabilities are recomputed from the same (perturbed) embeddings with
``theta_ref``, so on this policy ``||grad_e l||^2 = 2 b^2 sigmoid(-m)^2`` with
``b = beta ||theta - theta_ref||`` for any ``theta_ref`` -- exactly the
``wdpo-sq`` (``view='pair'``) quantity of :mod:`simulator.surrogates`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._validation import check_finite_array, check_theta
from ..data import PreferenceData
from .losses import dpo_losses

__all__ = ["TorchLogLinearPolicy", "PairBatch"]


class PairBatch:
    """Indices of a batch of preference pairs, oriented chosen / rejected.

    Parameters
    ----------
    states : array (B,)
    chosen, rejected : arrays (B,)
        Action indices of the preferred and the other response.
    """

    def __init__(self, states, chosen, rejected) -> None:
        self.states = torch.as_tensor(np.asarray(states), dtype=torch.long)
        self.chosen = torch.as_tensor(np.asarray(chosen), dtype=torch.long)
        self.rejected = torch.as_tensor(np.asarray(rejected), dtype=torch.long)
        if not (self.states.shape == self.chosen.shape == self.rejected.shape) or \
                self.states.ndim != 1:
            raise ValueError("states, chosen and rejected must be 1-D of one length, got shapes "
                             f"{tuple(self.states.shape)}, {tuple(self.chosen.shape)}, "
                             f"{tuple(self.rejected.shape)}")

    @classmethod
    def from_data(cls, data: PreferenceData, idx=None) -> PairBatch:
        """The atoms ``idx`` (all by default) of data drawn from a :class:`~simulator.FiniteEnv`.

        ``y = 1`` makes ``a1`` the chosen action, ``y = 0`` makes it ``a2``.
        """
        if data.states is None or data.actions is None:
            raise ValueError("data must carry states and actions (drawn from a FiniteEnv)")
        idx = np.arange(data.n) if idx is None else np.asarray(idx)
        a1, a2 = data.actions[idx, 0], data.actions[idx, 1]
        y = data.y[idx] == 1.0
        return cls(data.states[idx], np.where(y, a1, a2), np.where(y, a2, a1))

    def __len__(self) -> int:
        return int(self.states.shape[0])


class TorchLogLinearPolicy(nn.Module):
    """Log-linear policy with ``theta`` as an ``nn.Parameter``.

    Parameters
    ----------
    features : array (S, A, d)
        ``phi(s, a)``.
    theta, theta_ref : arrays (d,), optional
        Initial parameter (``theta_ref``) and reference parameter (zeros).
    dtype : torch.dtype
        float64 by default (agreement with numpy to 1e-10).
    """

    def __init__(self, features, theta=None, theta_ref=None, dtype=torch.float64) -> None:
        super().__init__()
        phi = check_finite_array(features, "features", ndim=3)
        d = phi.shape[2]
        ref = check_theta(theta_ref, d, "theta_ref")
        th = ref if theta is None else check_theta(theta, d, "theta")
        self.register_buffer("features", torch.as_tensor(phi, dtype=dtype))
        self.register_buffer("theta_ref", torch.as_tensor(ref, dtype=dtype))
        self.theta = nn.Parameter(torch.as_tensor(th.copy(), dtype=dtype))

    def embed(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The embeddings ``phi(s_i, a_i)``, shape ``(B, d)``."""
        return self.features[states, actions]

    def _log_probs(self, param, states, e):
        log_z = torch.logsumexp(self.features[states] @ param, dim=1)
        return e @ param - log_z

    def log_probs(self, states: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``log pi_theta(a | s)`` of responses with embeddings ``e`` (B, d)."""
        return self._log_probs(self.theta, states, e)

    def reference_log_probs(self, states: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``log pi_ref(a | s)`` of responses with embeddings ``e`` (B, d)."""
        return self._log_probs(self.theta_ref, states, e)

    def embeddings(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected embeddings of a batch (for :func:`wasserstein_loss`)."""
        return self.embed(batch.states, batch.chosen), self.embed(batch.states, batch.rejected)

    def pair_losses(self, batch: PairBatch, beta: float, e_chosen: torch.Tensor | None = None,
                    e_rejected: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample DPO losses of a batch, optionally at given (moved) embeddings."""
        if e_chosen is None or e_rejected is None:
            e_chosen, e_rejected = self.embeddings(batch)
        s = batch.states
        return dpo_losses(self.log_probs(s, e_chosen), self.log_probs(s, e_rejected),
                          self.reference_log_probs(s, e_chosen),
                          self.reference_log_probs(s, e_rejected), beta)
