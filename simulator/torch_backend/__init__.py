"""Torch backend of the simulator (SPEC section 7); needs the ``torch`` extra.

``import simulator`` never imports this package; import it explicitly
(``import simulator.torch_backend as tb``). The Hugging Face trainer lives in
:mod:`simulator.torch_backend.trainer` (needs ``transformers``) and is imported lazily.
"""

from .distributed import GlobalBatch
from .loglinear import PairBatch, TorchLogLinearPolicy
from .losses import AGGREGATIONS, Aggregate, aggregate, dpo_losses, dpo_margins
from .wasserstein import (
    WASSERSTEIN_FORMS,
    WASSERSTEIN_MODES,
    WassersteinResult,
    default_fd_eps,
    wasserstein_loss,
)

__all__ = [
    "GlobalBatch", "PairBatch", "TorchLogLinearPolicy", "AGGREGATIONS", "Aggregate",
    "aggregate", "dpo_losses", "dpo_margins", "WASSERSTEIN_FORMS", "WASSERSTEIN_MODES",
    "WassersteinResult", "default_fd_eps", "wasserstein_loss",
]
