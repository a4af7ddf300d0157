"""How far a scalable surrogate lands from the exact robust optimum (SPEC 3 against SPEC 4).

:func:`check_approximation` solves the exact robust problem (``sim.solve``,
``solver="dual"``) and the surrogate to full-batch precision
(:func:`simulator.optim.solve_surrogate`), then reports

* ``param_distance = ||theta_approx - theta*||_2``;
* ``price = L_U(theta_approx) - L_U(theta*) >= 0``: what using the surrogate's
  solution costs on the exact robust objective (``sim.robust_objective``);
* ``value_gap = L_U(theta*) - S(theta*)``: the surrogate's error as an
  approximation of the objective at the exact optimum (``S`` the surrogate loss);
* the exact dual variable (``lambda*`` for KL / Wasserstein, ``eta*`` for chi-square);
* the surrogate's *implied radius* where one exists: a weight-form surrogate
  tilts ``P`` into ``Q ∝ c`` (its gradient weights, :func:`surrogate_weights`);
  the implied radius is ``KL(Q || P)`` for the KL surrogates and
  ``E_P (dQ/dP - 1)^2`` for ``chi2-var``, at the surrogate's solution. For
  ``kldpo-tau`` this is the radius whose optimal dual variable is ``tau``
  (SPEC 3.1: ``Q_tau`` is the worst case of the ball of that radius).

Parameters the surrogate needs and that are not given come from the ambiguity
set: ``rho`` (and ``p``) from the radius, and for ``kldpo-tau`` / ``kldpo-clip``
the temperature ``tau = lambda*(rho)`` calibrated to the exact dual variable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ._validation import check_positive, check_theta
from .ambiguity import KL, AmbiguitySet, Wasserstein
from .data import PreferenceData
from .optim import solve_surrogate
from .surrogates import get_surrogate, surrogate_loss, surrogate_weights

__all__ = ["ApproximationReport", "check_approximation", "implied_radius",
           "surrogate_params_for"]


@dataclass(frozen=True, eq=False)
class ApproximationReport:
    """Result of :func:`check_approximation` (see the module docstring for each field)."""

    surrogate: str
    params: dict
    ambiguity: str
    rho: float
    theta_exact: np.ndarray
    theta_approx: np.ndarray
    param_distance: float
    exact_value: float
    value_at_approx: float
    price: float
    surrogate_value_at_exact: float
    value_gap: float
    dual_exact: float | None
    implied_radius: float | None
    converged: bool
    extras: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        """Flat dict of the scalar fields (one CSV row); parameters as ``param_<key>``."""
        row = {k: v for k, v in asdict(self).items()
               if k not in ("params", "theta_exact", "theta_approx", "extras")}
        row.update({f"param_{k}": v for k, v in self.params.items()})
        return row

    def __str__(self) -> str:
        prm = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in self.params.items())
        rows = [
            ("||theta_approx - theta*||_2", f"{self.param_distance:.6e}"),
            ("L(theta*)", f"{self.exact_value:.10f}"),
            ("L(theta_approx)", f"{self.value_at_approx:.10f}"),
            ("price L(theta_approx) - L(theta*)", f"{self.price:.6e}"),
            ("value gap L(theta*) - S(theta*)", f"{self.value_gap:.6e}"),
            ("exact dual variable", _fmt(self.dual_exact)),
            ("implied radius", _fmt(self.implied_radius)),
            ("surrogate converged", str(self.converged)),
        ]
        lines = [f"surrogate {self.surrogate} ({prm}) against exact {self.ambiguity}"
                 f" at rho = {self.rho:.6g}"] + [f"  {k:<36}{v}" for k, v in rows]
        return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def surrogate_params_for(surrogate: str, ambiguity: AmbiguitySet, dual: float | None,
                         given: dict) -> dict:
    """The surrogate's parameters: ``given`` completed from the ambiguity set.

    ``rho`` is the radius; ``p`` (``wdpo-gr``) the Wasserstein order; ``tau``
    (``kldpo-tau``, ``kldpo-clip``) the exact KL dual variable ``dual``.

    Raises
    ------
    ValueError
        When a needed parameter cannot be derived (e.g. ``tau`` with a non-KL set,
        or ``lambda* = 0`` at a radius past the finite-support threshold).
    """
    sur = get_surrogate(surrogate)
    out = dict(given)
    if "rho" in sur.defaults:
        out.setdefault("rho", ambiguity.rho)
    if "p" in sur.defaults and isinstance(ambiguity, Wasserstein):
        out.setdefault("p", float(ambiguity.p))
    if "tau" in sur.defaults and "tau" not in out:
        if not isinstance(ambiguity, KL) or dual is None or not dual > 0:
            raise ValueError(f"tau must be given for surrogate {surrogate!r}: it can only be "
                             f"calibrated to a positive KL dual variable, got ambiguity "
                             f"{ambiguity!r} with dual {dual!r}")
        out["tau"] = float(dual)
    return sur.params(out)


def implied_radius(surrogate: str, theta, data: PreferenceData, beta: float = 1.0,
                   theta_ref=None, **params) -> float | None:
    """Divergence of the surrogate's tilted distribution ``Q ∝ c`` from ``P``.

    ``KL(Q || P)`` for ``kldpo-tau``, ``kldpo-clip`` and ``kl-var``;
    ``E_P (dQ/dP - 1)^2`` for ``chi2-var``; ``None`` for the others. ``nan``
    when some weight is negative (a variance expansion past its valid range).
    """
    sur = get_surrogate(surrogate)
    if sur.robust_to not in ("KL", "ChiSquare"):
        return None
    c = surrogate_weights(surrogate, theta, data, beta, theta_ref, **params)
    if (c < 0).any():
        return float("nan")
    q, p = c / c.sum(), data.weights
    pos = q > 0
    if sur.robust_to == "ChiSquare":
        return float(np.sum(q[pos] ** 2 / p[pos]) - 1.0)
    return float(q[pos] @ (np.log(q[pos]) - np.log(p[pos])))


def check_approximation(data: PreferenceData, ambiguity: AmbiguitySet, surrogate: str,
                        beta: float = 1.0, theta_ref=None, **params) -> ApproximationReport:
    """Solve the exact robust problem and a surrogate; report how far apart they land.

    Parameters
    ----------
    data : PreferenceData
        Empirical sample or population.
    ambiguity : AmbiguitySet
        The exact problem: ``KL``, ``ChiSquare`` or ``Wasserstein`` (or ``Nominal``).
    surrogate : str
        A key of :data:`simulator.surrogates.SURROGATES`.
    beta, theta_ref
        DPO temperature and reference parameter.
    **params
        Surrogate parameters; missing ones come from :func:`surrogate_params_for`.

    Returns
    -------
    ApproximationReport

    Raises
    ------
    ValueError
        On bad input, an unknown surrogate, a parameter that cannot be derived, or an
        exact solve that does not reach optimality.

    Examples
    --------
    >>> env = sim.FiniteEnv.random(10, 5, 3, seed=0)                   # doctest: +SKIP
    >>> print(sim.check_approximation(env.sample(500, seed=1), sim.KL(0.1),
    ...                               "kldpo-tau"))                     # doctest: +SKIP
    """
    from . import robust_objective, solve  # package re-exports, imported late (import cycle)

    if not isinstance(ambiguity, AmbiguitySet):
        raise ValueError(f"ambiguity must be an AmbiguitySet, got {ambiguity!r}")
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")
    beta = check_positive(beta, "beta")
    ref = check_theta(theta_ref, data.d, "theta_ref")
    exact = solve(data, ambiguity, beta=beta, theta_ref=ref, solver="dual")
    prm = surrogate_params_for(surrogate, ambiguity, exact.dual, params)
    approx = solve_surrogate(data, surrogate, beta, ref, **prm)
    at_approx = robust_objective(approx.theta, data, ambiguity, beta=beta, theta_ref=ref)
    s_star = surrogate_loss(surrogate, exact.theta, data, beta, ref, **prm)
    return ApproximationReport(
        surrogate=surrogate, params=prm, ambiguity=ambiguity.name, rho=float(ambiguity.rho),
        theta_exact=exact.theta, theta_approx=approx.theta,
        param_distance=float(np.linalg.norm(approx.theta - exact.theta)),
        exact_value=float(exact.value), value_at_approx=float(at_approx.value),
        price=float(at_approx.value - exact.value), surrogate_value_at_exact=s_star,
        value_gap=float(exact.value - s_star),
        dual_exact=None if exact.dual is None else float(exact.dual),
        implied_radius=implied_radius(surrogate, approx.theta, data, beta, ref, **prm),
        converged=bool(approx.converged),
        extras={"surrogate_grad_norm": approx.grad_norm, "exact_grad_norm": exact.grad_norm},
    )
