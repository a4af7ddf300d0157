"""Ambiguity sets around the nominal preference distribution (SPEC section 3).

Each set is a small immutable description; the exact inner supremum and the
solvers live in :mod:`simulator.solvers`.

* :class:`Nominal` -- no robustness, plain DPO.
* :class:`KL` -- ``{Q << P : KL(Q || P) <= rho}`` (KLDPO, SPEC 3.1).
* :class:`ChiSquare` -- ``{Q << P : E_P[(dQ/dP - 1)^2] <= rho}`` (SPEC 3.2).
* :class:`Wasserstein` -- ``{Q : W_p(Q, P) <= rho}`` with ground cost
  ``||x - x'||_2^p + kappa 1[y != y']`` on ``R^d x {0, 1}`` (WDPO, SPEC 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._validation import check_nonnegative, check_positive

__all__ = ["AmbiguitySet", "Nominal", "KL", "ChiSquare", "Wasserstein", "METHOD_NAMES"]

#: The method names of the sets, in the order tables list them (``AmbiguitySet.name``).
METHOD_NAMES = ("dpo", "kldpo", "chi2dpo", "wdpo1", "wdpo2")


class AmbiguitySet:
    """Base class of the ambiguity sets; ``rho`` is the radius."""

    rho: float = 0.0

    @property
    def name(self) -> str:
        """Short method name used in experiment tables (one of :data:`METHOD_NAMES`)."""
        raise NotImplementedError

    @staticmethod
    def from_name(name: str, rho: float = 0.0, **options) -> AmbiguitySet:
        """The set called ``name`` (see :data:`METHOD_NAMES`) with radius ``rho``.

        ``AmbiguitySet.from_name(s.name, s.rho, ...)`` rebuilds ``s``: ``"dpo"`` is
        :class:`Nominal` (``rho`` must be 0), ``"kldpo"`` :class:`KL`, ``"chi2dpo"``
        :class:`ChiSquare`, ``"wdpo1"`` / ``"wdpo2"`` :class:`Wasserstein` with ``p = 1`` /
        ``2``; ``options`` (only ``kappa``, Wasserstein only) are passed on.

        Raises
        ------
        ValueError
            On an unknown name, an option the set does not take, or a bad radius.
        """
        makers = {"dpo": Nominal, "kldpo": KL, "chi2dpo": ChiSquare,
                  "wdpo1": lambda rho, **kw: Wasserstein(rho, p=1, **kw),
                  "wdpo2": lambda rho, **kw: Wasserstein(rho, p=2, **kw)}
        if name not in makers:
            raise ValueError(f"name must be one of {METHOD_NAMES}, got {name!r}")
        allowed = {"kappa"} if name.startswith("wdpo") else set()
        extra = sorted(set(options) - allowed)
        if extra:
            raise ValueError(f"{name} takes no option {extra[0]!r} (options: {sorted(allowed)})")
        return makers[name](rho, **options)


@dataclass(frozen=True)
class Nominal(AmbiguitySet):
    """The singleton ``{P}``: the robust objective is the plain DPO risk."""

    rho: float = 0.0

    def __post_init__(self) -> None:
        if self.rho != 0.0:
            raise ValueError(f"rho must be 0 for Nominal, got {self.rho!r}")

    @property
    def name(self) -> str:
        return "dpo"


@dataclass(frozen=True)
class KL(AmbiguitySet):
    """KL ball ``{Q << P : KL(Q || P) <= rho}`` (SPEC 3.1).

    Dual: ``L = min_{lambda > 0} lambda rho + lambda log E_P exp(l / lambda)``.
    """

    rho: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_nonnegative(self.rho, "rho"))

    @property
    def name(self) -> str:
        return "kldpo"


@dataclass(frozen=True)
class ChiSquare(AmbiguitySet):
    """Chi-square ball ``{Q << P : E_P[(dQ/dP - 1)^2] <= rho}`` (SPEC 3.2).

    Dual: ``L = min_eta eta + sqrt(1 + rho) sqrt(E_P (l - eta)_+^2)``.
    """

    rho: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_nonnegative(self.rho, "rho"))

    @property
    def name(self) -> str:
        return "chi2dpo"


@dataclass(frozen=True)
class Wasserstein(AmbiguitySet):
    """Wasserstein-p ball of radius ``rho`` (SPEC 3.3).

    Parameters
    ----------
    rho : float
        Radius, ``>= 0``; the transport budget is ``rho**p``.
    p : {1, 2}
        Order of the ground cost ``||x - x'||_2^p + kappa 1[y != y']``.
    kappa : float
        Price of a label flip, ``> 0``; ``inf`` forbids label changes.
    """

    rho: float
    p: int = 2
    kappa: float = float("inf")

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_nonnegative(self.rho, "rho"))
        if self.p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {self.p!r}")
        object.__setattr__(self, "p", int(self.p))
        object.__setattr__(self, "kappa", check_positive(self.kappa, "kappa", allow_inf=True))

    @property
    def name(self) -> str:
        return f"wdpo{self.p}"
