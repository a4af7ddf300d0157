"""The registry of ambiguity sets: ``AmbiguitySet.name`` -> the module that solves it.

Each set module (:mod:`.nominal`, :mod:`.kl`, :mod:`.chi2`, :mod:`.wasserstein1`,
:mod:`.wasserstein2`) exports a :class:`~.core.SetMethods` named ``METHODS``; the front
ends (:mod:`.inner`, :mod:`.dual`) look the set up here instead of testing its type.
"""

from __future__ import annotations

from ..ambiguity import AmbiguitySet
from . import chi2, kl, nominal, wasserstein1, wasserstein2
from .core import SetMethods

__all__ = ["SETS", "methods"]

#: Every set the dual solver knows, by method name. A set module without a certificate of
#: its own (``certify=None``) gets the generic weak-duality bound
#: :func:`~.core.worst_case_gap`.
SETS: dict[str, SetMethods] = {mod.METHODS.name: mod.METHODS
                               for mod in (nominal, kl, chi2, wasserstein1, wasserstein2)}


def methods(ambiguity: AmbiguitySet) -> SetMethods:
    """The module of ``ambiguity``'s set, or ``ValueError`` naming the bad argument."""
    if not isinstance(ambiguity, AmbiguitySet) or ambiguity.name not in SETS:
        raise ValueError(f"ambiguity must be Nominal, KL, ChiSquare or Wasserstein, "
                         f"got {ambiguity!r}")
    return SETS[ambiguity.name]
