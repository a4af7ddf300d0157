"""The cvxpy reference solver: conic forms of the robust DPO problems (SPEC 3.1-3.4).

Every problem is written in the margins ``m = A delta`` with
``A_i = ytil_i beta x_i`` and ``delta = theta - theta_ref``, and the loss enters
through the epigraph ``s_i >= softplus(-m_i)`` (``cp.logistic``, an exponential
cone):

* Nominal (plain DPO): ``min sum_i w_i softplus(-m_i)``.
* KL, ``rho > 0`` (SPEC 3.1): ``min t + lambda rho`` subject to
  ``sum_i w_i u_i <= lambda`` and ``(s_i - t, lambda, u_i)`` in the exponential
  cone ``{(a, b, c): b exp(a / b) <= c}``; so ``t >= lambda log E exp(s / lambda)``.
* Chi-square, ``rho > 0`` (SPEC 3.2): ``min eta + sqrt(1 + rho) ||sqrt(w) r||_2``
  subject to ``r >= s - eta``, ``r >= 0`` (a second-order cone).
* Wasserstein ``p = 1``, ``kappa = inf`` (SPEC 3.3): ``min E l + rho beta ||delta||``.
* Wasserstein ``p = 1``, finite ``kappa`` (Shafieezadeh-Abadeh et al. 2015):
  ``min lambda rho + sum_i w_i s_i`` subject to ``s_i >= softplus(-m_i)``,
  ``s_i >= softplus(m_i) - lambda kappa``, ``beta ||delta|| <= lambda``.

``rho = 0`` reduces KL and chi-square to plain DPO (their dual variable is then
``inf`` and ``-inf``: the minimising ``lambda`` / ``eta`` runs off to infinity).
Wasserstein ``p = 2`` has no conic form here and is refused in favour of
``solver="dual"``.

The solver chain (Clarabel at tight then looser tolerances, SCS at tight
tolerances, Clarabel at its defaults, then any other installed exponential-cone
solver) is tried on the problem as written, then on
a rescaled copy (equilibrated parameter columns, objective and weight rows
multiplied by ``n``). A status other than ``optimal`` never produces an answer:
when the whole chain fails :class:`ConicSolveError` (a ``ValueError``) names
every status. The certificate (worst-case distribution, its primal value
``E_{Q*} l``, the gap to the conic optimum and the Danskin gradient) is built
from the conic solution with the closed forms of docs/formulations.md, not from
the dual solver, so that the two solvers check each other.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linprog
from scipy.special import logsumexp

from .._validation import check_positive, check_theta
from ..ambiguity import KL, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from ..data import PreferenceData
from ..losses import dpo_grad_theta, dpo_loss, margins
from .result import Solution, WorstCase

__all__ = ["solve_cvxpy", "ConicSolveError", "DEFAULT_SOLVERS"]

#: Solver chain tried in order (then once more on the rescaled problem). An interior
#: point method stops on the objective gap, and the error in theta scales like its
#: square root, so Clarabel is asked for 1e-12 first and the tolerance is loosened
#: only when it stalls (status ``optimal_inaccurate``); a shorter maximal step and a
#: smaller static regularisation make it stall less often on the exponential cones.
_SHORT_STEP = {"max_step_fraction": 0.9}
DEFAULT_SOLVERS: tuple[tuple[str, dict], ...] = (
    ("CLARABEL", {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, **_SHORT_STEP}),
    ("CLARABEL", {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, **_SHORT_STEP}),
    ("CLARABEL", {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10,
                  "static_regularization_constant": 1e-10}),
    ("SCS", {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000}),
    ("CLARABEL", {}),
    ("ECOS", {"abstol": 1e-9, "reltol": 1e-9, "feastol": 1e-9, "max_iters": 500}),
    ("MOSEK", {}),
)

#: Mass moved to infinity by the Wasserstein ``p = 1`` certificate is chosen so
#: that the unattained part of the supremum costs at most this (absolute) value.
_MOVE_TOL = 1e-11

#: ``||theta - theta_ref||`` below this is read as ``theta = theta_ref`` (solver noise).
_ZERO_DELTA = 1e-9


class ConicSolveError(ValueError):
    """No solver of the chain reached ``optimal``; ``attempts`` lists what was tried."""

    def __init__(self, attempts: list[dict]) -> None:
        self.attempts = attempts
        tried = ", ".join(
            f"{a['solver']}{' (rescaled)' if a['rescaled'] else ''}: {a['status']}"
            for a in attempts)
        super().__init__(f"cvxpy did not reach optimality with any solver; statuses: {tried}")


def _chain(solvers) -> list[tuple[str, dict]]:
    """Normalise ``solvers`` (names or ``(name, options)`` pairs) to a list of pairs."""
    if solvers is None:
        return [(name, dict(opts)) for name, opts in DEFAULT_SOLVERS]
    if isinstance(solvers, str) or not isinstance(solvers, Sequence) or not solvers:
        raise ValueError(f"solvers must be a non-empty list of names or (name, options) pairs, "
                         f"got {solvers!r}")
    out = []
    for item in solvers:
        pair = (item, {}) if isinstance(item, str) else tuple(item) if isinstance(
            item, Sequence) else ()
        name, opts = pair if len(pair) == 2 else (None, None)
        if not isinstance(name, str) or not isinstance(opts, dict):
            raise ValueError(f"solvers entries must be a name or (name, dict), got {item!r}")
        out.append((name.upper(), dict(opts)))
    return out


def _reduce(ambiguity: AmbiguitySet) -> str:
    """The conic form that solves ``ambiguity``: nominal, kl, chi2, w1 or w1kappa."""
    if isinstance(ambiguity, Nominal):
        return "nominal"
    if isinstance(ambiguity, KL | ChiSquare):
        if ambiguity.rho == 0.0:
            return "nominal"
        return "kl" if isinstance(ambiguity, KL) else "chi2"
    if isinstance(ambiguity, Wasserstein):
        if ambiguity.p != 1:
            raise ValueError(
                f"ambiguity Wasserstein(p={ambiguity.p!r}) has no conic form in the cvxpy "
                "solver; use solver='dual' for p = 2")
        return "w1" if math.isinf(ambiguity.kappa) else "w1kappa"
    raise ValueError(f"ambiguity must be Nominal, KL, ChiSquare or Wasserstein, "
                     f"got {ambiguity!r}")


def _build(form: str, amb: AmbiguitySet, A: np.ndarray, w: np.ndarray, beta: float,
           rescale: bool):
    """The cvxpy problem of ``form``; returns ``(problem, delta_of, handles)``.

    ``delta_of()`` maps the solved variable back to ``theta - theta_ref``.
    With ``rescale`` the columns of ``A`` are equilibrated (``delta = v / c``)
    and objective and weight rows are multiplied by ``n``.
    """
    import cvxpy as cp  # deferred: importing cvxpy costs ~0.4 s per process

    n, d = A.shape
    col = np.sqrt(w @ A**2) if rescale else np.ones(d)
    col = np.where(col > 0, col, 1.0)
    k = float(n) if rescale else 1.0
    v = cp.Variable(d)
    m = (A / col) @ v
    delta_norm = beta * cp.norm(cp.multiply(1.0 / col, v), 2)
    rho = amb.rho
    wk = k * w
    h: dict = {}
    if form in ("nominal", "w1"):
        obj = wk @ cp.logistic(-m)
        if form == "w1":
            obj = obj + k * rho * delta_norm
        cons = []
    else:
        s = cp.Variable(n)
        cons = [cp.logistic(-m) <= s]
        if form == "kl":
            t, lam, u = cp.Variable(), cp.Variable(nonneg=True), cp.Variable(n)
            cons += [wk @ u <= k * lam, cp.ExpCone(s - t, lam * np.ones(n), u)]
            obj = k * (t + lam * rho)
            h["dual"] = lam
        elif form == "chi2":
            eta, r = cp.Variable(), cp.Variable(n, nonneg=True)
            cons += [r >= s - eta]
            obj = k * eta + math.sqrt(k * (1 + rho)) * cp.norm(cp.multiply(np.sqrt(wk), r), 2)
            h["dual"] = eta
        else:  # w1kappa
            lam = cp.Variable(nonneg=True)
            cons += [cp.logistic(m) - lam * amb.kappa <= s, delta_norm <= lam]
            obj = k * lam * rho + wk @ s
            h["dual"] = lam
        h["cons"] = cons
    h["scale"] = k
    return cp.Problem(cp.Minimize(obj), cons), (lambda: v.value / col), h


def _attempt(form, amb, A, w, beta, chain, rescales, verbose):
    """Run the chain on each of ``rescales``; return the first optimal problem and the log."""
    import cvxpy as cp

    installed = set(cp.installed_solvers())
    log: list[dict] = []
    for rescale in rescales:
        for name, opts in chain:
            entry = {"solver": name, "rescaled": rescale, "options": opts}
            log.append(entry)
            if name not in installed:
                entry.update(status="not installed", time_s=0.0)
                continue
            prob, delta_of, h = _build(form, amb, A, w, beta, rescale)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # the status is recorded instead
                    warnings.simplefilter("ignore", UserWarning)
                    prob.solve(solver=name, verbose=verbose, **opts)
                status = prob.status
            except (cp.error.SolverError, ValueError, TypeError, ArithmeticError) as exc:
                status = f"error ({type(exc).__name__}: {exc})"
            entry.update(status=status, time_s=time.perf_counter() - t0)
            if status == cp.OPTIMAL:
                return prob, delta_of, h, entry, log
    raise ConicSolveError(log)


def _check_attained(A: np.ndarray, w: np.ndarray, q: np.ndarray, delta: np.ndarray) -> None:
    """Raise if the objective decreases forever along a separating direction.

    Without a norm term (DPO, KL, chi-square) the infimum is not attained when some
    direction ``e`` has ``A e >= 0`` on the support of ``P`` and ``A e > 0`` on atoms
    that the worst case ``Q*`` charges: along ``theta_ref + t e`` those losses fall
    to 0 and the robust objective with them. The LP
    ``max sum_i q_i (A e)_i`` s.t. ``A e >= 0`` (where ``w > 0``), ``|e|_inf <= 1``
    finds such a direction; conic solvers then stop at a large ``theta`` and call it
    optimal, which must not be returned as a minimiser.
    """
    rows = A[w > 0]
    res = linprog(-(q @ A), A_ub=-rows, b_ub=np.zeros(rows.shape[0]), bounds=(-1.0, 1.0),
                  method="highs")
    scale = float(np.abs(A).sum(axis=1).max())
    if res.status == 0 and -res.fun > 1e-6 * scale:
        e = res.x / np.linalg.norm(res.x)
        raise ValueError(
            f"data are linearly separable along theta - theta_ref = t * {np.round(e, 4)!r}: "
            "the objective keeps decreasing as t -> inf and has no minimiser (the conic "
            f"solver stopped at ||theta - theta_ref|| = {np.linalg.norm(delta):.3g}); use "
            "more data or a Wasserstein set")


# ---------------------------------------------------------------------- certificates
def _reweighted(data: PreferenceData, q: np.ndarray) -> WorstCase:
    return WorstCase(q, data.x, data.y, np.arange(data.n))


def _top_atoms(loss, w, s_dual):
    """Worst case on the max-loss atoms, weighted by the conic multipliers of ``s >= l``.

    Used where the dual variable sits at its kink (``lambda* = 0`` for KL, no atom
    above ``eta*`` for chi-square): every ``Q`` on the argmax set is then a
    maximiser, and the conic multipliers pick the one that makes the Danskin
    gradient vanish. Weights ``∝ w`` on the argmax set when they are unusable.
    """
    scale = max(1.0, float(loss.max()))
    top = loss >= loss.max() - 1e-6 * scale
    top &= w > 0
    q = np.where(top, np.clip(s_dual, 0.0, None), 0.0)
    return q if q.sum() > 0.5 else np.where(top, w, 0.0)


def _kl_certificate(data, loss, lam, s_dual):
    """``Q* ∝ w exp(l / lambda*)``, or the max-loss atoms when ``lambda* ~ 0`` (SPEC 3.1)."""
    w = data.weights
    if lam <= 1e-7 * max(1.0, float(loss.max())):
        q = _top_atoms(loss, w, s_dual)
    else:
        q = np.exp(np.log(np.where(w > 0, w, 1.0)) + loss / lam
                   - logsumexp(loss / lam, b=w)) * (w > 0)
    q = q / q.sum()
    pos = q > 0
    divergence = float(np.sum(q[pos] * np.log(q[pos] / w[pos])))
    return _reweighted(data, q), {"divergence": divergence}


def _chi2_certificate(data, loss, eta, s_dual):
    """``q_i = w_i (l_i - eta*)_+ / E_P (l - eta*)_+``, or the max-loss atoms if that is ~0."""
    w = data.weights
    excess = np.maximum(loss - eta, 0.0)
    if w @ excess <= 1e-9 * max(1.0, float(loss.max())):
        q = _top_atoms(loss, w, s_dual)
    else:
        q = w * excess
    q = q / q.sum()
    pos = w > 0
    divergence = float(np.sum(w[pos] * (q[pos] / w[pos] - 1.0) ** 2))
    return _reweighted(data, q), {"divergence": divergence}


def _w1_certificate(data, m, delta, beta, rho, kappa, flip):
    """Worst case of the ``p = 1`` Wasserstein ball (SPEC 3.3).

    Mass ``flip_i`` of atom ``i`` has its label flipped (cost ``kappa`` per unit
    mass; ``flip = 0`` when ``kappa = inf``), the rest stays; the remaining budget
    ``mu = rho - kappa sum flip`` moves a mass ``eps`` of the atom of smallest
    margin (largest ``||grad_x l||``) by ``t = mu / eps`` along ``-ytil u``,
    ``u = delta / ||delta||``, which gains ``mu b`` up to ``eps softplus(m_k)``.
    """
    n = data.n
    w = data.weights
    flip = np.clip(flip, 0.0, w)
    spent = kappa * flip.sum() if flip.any() else 0.0
    if spent > rho:
        flip = flip * (rho / spent)
        spent = rho
    mu = max(rho - spent, 0.0)
    keep = w - flip
    mass = np.concatenate([keep, flip])
    marg = np.concatenate([m, -m])
    xs = np.concatenate([data.x, data.x])
    ys = np.concatenate([data.y, 1.0 - data.y])
    src = np.concatenate([np.arange(n), np.arange(n)])
    dnorm = float(np.linalg.norm(delta))
    if dnorm <= _ZERO_DELTA:  # theta = theta_ref up to solver accuracy: no direction to move
        dnorm = 0.0
    cost = spent
    if mu > 0 and dnorm > 0:
        cand = np.flatnonzero(mass > 0)
        k = cand[np.argmin(marg[cand])]
        eps = min(mass[k], _MOVE_TOL / max(float(dpo_loss(-marg[k])), 1e-300))
        step = mu / eps
        mass[k] -= eps
        ytil_k = 2.0 * ys[k] - 1.0
        x_new = xs[k] - ytil_k * step * delta / dnorm
        mass = np.append(mass, eps)
        xs = np.vstack([xs, x_new])
        ys = np.append(ys, ys[k])
        src = np.append(src, src[k])
        cost += eps * float(np.linalg.norm(x_new - xs[k]))
    keep_atoms = mass > 0
    wc = WorstCase(mass[keep_atoms], xs[keep_atoms], ys[keep_atoms], src[keep_atoms],
                   transport_cost=float(cost), budget=float(rho))
    # Danskin: gradient of sum keep l + sum flip l_flipped + mu b at the fixed inner solution.
    grad = (keep @ dpo_grad_theta(m, data.x, data.y, beta)
            + flip @ dpo_grad_theta(-m, data.x, 1.0 - data.y, beta))
    if dnorm > 0:
        grad = grad + mu * beta * delta / dnorm
    else:  # minimum-norm subgradient of mu * beta * ||delta|| at 0
        g = float(np.linalg.norm(grad))
        grad = grad * max(0.0, 1.0 - mu * beta / g) if g > 0 else grad
    return wc, grad, {"flipped_mass": float(flip.sum()), "moved_budget": float(mu)}


def solve_cvxpy(data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0,
                theta_ref: np.ndarray | None = None, solvers=None,
                verbose: bool = False, rescale: bool | None = None) -> Solution:
    """Minimise the robust DPO objective with cvxpy (the reference solver, SPEC 3.4).

    Parameters
    ----------
    data : PreferenceData
        Weighted atoms ``(x_i, y_i, w_i)``.
    ambiguity : Nominal, KL, ChiSquare or Wasserstein(p=1, any kappa)
        The ambiguity set; ``Wasserstein(p=2)`` raises (use ``solver="dual"``).
    beta : float
        DPO temperature ``> 0``.
    theta_ref : array (d,), optional
        Reference parameter (zeros by default).
    solvers : list of str or (str, dict), optional
        The solver chain with cvxpy options; default :data:`DEFAULT_SOLVERS`
        (Clarabel at tolerance 1e-12 then 1e-10, SCS at ``eps = 1e-9``, Clarabel
        at its defaults, ECOS, MOSEK; uninstalled ones are skipped). Each is
        tried on the plain problem, then on the rescaled one.
    verbose : bool
        Passed to ``cvxpy.Problem.solve``.
    rescale : bool, optional
        ``None`` (default): the chain on the problem as written, then on the
        rescaled problem; ``False`` / ``True``: only the plain / rescaled one.

    Returns
    -------
    Solution
        ``value`` is the conic optimum; ``dual`` is ``lambda*`` (KL, Wasserstein)
        or ``eta*`` (chi-square), ``inf`` / ``-inf`` for KL / chi-square at
        ``rho = 0`` and ``None`` for Nominal; ``worst_case``, ``primal_value =
        E_{Q*} l`` and ``gap = |value - primal_value| / max(1, |value|)`` are the
        certificate; ``grad_norm`` is the Danskin gradient norm at ``theta``.
        ``info["attempts"]`` records every solver tried with its status and time.

    Raises
    ------
    ValueError
        On bad arguments, on ``Wasserstein(p=2)``, and (:class:`ConicSolveError`)
        when no solver of the chain reports ``optimal``.
    """
    t_start = time.perf_counter()
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")
    beta = check_positive(beta, "beta")
    theta_ref = check_theta(theta_ref, data.d, "theta_ref")
    form = _reduce(ambiguity)
    chain = _chain(solvers)
    if rescale not in (None, False, True):
        raise ValueError(f"rescale must be None, False or True, got {rescale!r}")
    rescales = (False, True) if rescale is None else (bool(rescale),)
    A = (data.ytil * beta)[:, None] * data.x
    prob, delta_of, h, used, log = _attempt(form, ambiguity, A, data.weights, beta, chain,
                                            rescales, verbose)
    delta = np.asarray(delta_of(), dtype=np.float64)
    theta = theta_ref + delta
    value = float(prob.value) / h["scale"]
    m = margins(theta, data.x, data.y, beta, theta_ref)
    loss = dpo_loss(m)
    w = data.weights
    rho = ambiguity.rho
    extra: dict = {}
    if form in ("w1", "w1kappa"):
        if form == "w1":
            flip = np.zeros(data.n)
            dual = beta * float(np.linalg.norm(delta))
        else:
            flip = np.asarray(h["cons"][1].dual_value, dtype=np.float64) / h["scale"]
            dual = float(h["dual"].value)
        wc, grad, extra = _w1_certificate(data, m, delta, beta, rho,
                                          getattr(ambiguity, "kappa", math.inf), flip)
    else:
        if form == "nominal":
            wc = _reweighted(data, w)
            dual = None if isinstance(ambiguity, Nominal) else (
                math.inf if isinstance(ambiguity, KL) else -math.inf)
        else:
            dual = float(h["dual"].value)
            s_dual = np.asarray(h["cons"][0].dual_value, dtype=np.float64) / h["scale"]
            certificate = _kl_certificate if form == "kl" else _chi2_certificate
            wc, extra = certificate(data, loss, dual, s_dual)
        grad = wc.weights @ dpo_grad_theta(m, data.x, data.y, beta)
    if form in ("nominal", "kl", "chi2") or rho == 0.0:  # no norm term keeps theta bounded
        _check_attained(A, w, w if rho == 0.0 else wc.weights, delta)
    primal = float(wc.weights @ dpo_loss(margins(theta, wc.x, wc.y, beta, theta_ref)))
    info = {"attempts": log, "form": form, "rescaled": used["rescaled"], **extra}
    return Solution(
        theta=theta, value=value, dual=dual, worst_case=wc, primal_value=primal,
        gap=abs(value - primal) / max(1.0, abs(value)), status="optimal",
        solver=f"cvxpy:{used['solver']}", ambiguity=ambiguity, beta=beta, theta_ref=theta_ref,
        grad_norm=float(np.linalg.norm(grad)),
        iterations=int(prob.solver_stats.num_iters or 0),
        solve_time_s=time.perf_counter() - t_start, info=info,
    )
