"""Reference simulator for distributionally robust DPO (arXiv 2502.01930).

See ``../shared/SPEC.md`` (mirrored in docs/) for the mathematics.
"""

from .ambiguity import KL, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from .data import PreferenceData
from .env import FiniteEnv, realizable_reward
from .losses import (
    dpo_grad_theta,
    dpo_grad_x,
    dpo_hessian_theta,
    dpo_loss,
    log_sigmoid,
    margins,
    sigmoid,
    softplus,
)
from .policy import LogLinearPolicy
from .solvers.result import Evaluation, Solution, WorstCase

__all__ = [
    "AmbiguitySet", "Nominal", "KL", "ChiSquare", "Wasserstein",
    "PreferenceData", "FiniteEnv", "realizable_reward", "LogLinearPolicy",
    "softplus", "sigmoid", "log_sigmoid", "margins", "dpo_loss", "dpo_grad_theta",
    "dpo_grad_x", "dpo_hessian_theta",
    "Evaluation", "Solution", "WorstCase",
]

__version__ = "0.1.0"
