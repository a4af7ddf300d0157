"""Reference simulator for distributionally robust DPO (arXiv 2502.01930).

See ``../shared/SPEC.md`` (mirrored in docs/) for the mathematics.
"""

from . import theory
from .ambiguity import KL, METHOD_NAMES, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from .approx_check import ApproximationReport, check_approximation
from .asymptotics import (
    Asymptotics,
    asymptotic_covariance,
    collapse_influence,
    collapse_probability,
    collapse_radius,
)
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
from .optim import TrainResult, batch_fixed_point, solve_surrogate, train
from .policy import LogLinearPolicy
from .solvers import robust_objective, solve
from .solvers.conic import ConicSolveError, solve_cvxpy
from .solvers.result import Evaluation, Solution, WorstCase
from .surrogates import (
    SURROGATES,
    surrogate_grad,
    surrogate_loss,
    surrogate_value_and_grad,
    surrogate_weights,
)

__all__ = [
    "AmbiguitySet", "Nominal", "KL", "ChiSquare", "Wasserstein", "METHOD_NAMES",
    "PreferenceData", "FiniteEnv", "realizable_reward", "LogLinearPolicy",
    "softplus", "sigmoid", "log_sigmoid", "margins", "dpo_loss", "dpo_grad_theta",
    "dpo_grad_x", "dpo_hessian_theta",
    "Evaluation", "Solution", "WorstCase",
    "theory",
    "solve_cvxpy", "ConicSolveError",
    "solve", "robust_objective",
    "SURROGATES", "surrogate_loss", "surrogate_grad", "surrogate_value_and_grad",
    "surrogate_weights", "train", "solve_surrogate", "batch_fixed_point", "TrainResult",
    "check_approximation", "ApproximationReport",
    "Asymptotics", "asymptotic_covariance", "collapse_radius", "collapse_influence",
    "collapse_probability",
]

__version__ = "0.1.0"
