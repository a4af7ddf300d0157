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

Before any conic solve, a scale-free linear program decides whether the data are
linearly separable (then DPO, KL and chi-square have no minimiser and a
``ValueError`` says so at once). The solver chain (Clarabel at tight then looser
tolerances, SCS at tight tolerances, Clarabel at its defaults, then any other
installed exponential-cone solver) is tried on a rescaled copy (equilibrated
parameter columns, objective and weight rows multiplied by ``n``: invariant under
a scaling of the features or of beta), then on the problem as written; every
attempt runs under a time and iteration budget. A status other than ``optimal``
never produces an answer: when the whole chain fails :class:`ConicSolveError`
(a ``ValueError``) names every status and every budget that ran out. The
certificate (worst-case distribution, its primal value ``E_{Q*} l``, the gap to
the conic optimum and the Danskin gradient) is built from the conic solution with
the closed forms of docs/formulations.md, not from the dual solver, so that the
two solvers check each other.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp

from .._validation import check_positive, check_theta
from ..ambiguity import KL, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from ..data import PreferenceData
from ..losses import dpo_grad_theta, dpo_loss, margins
from .core import separating_direction
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
    ("SCS", {"eps_abs": 1e-9, "eps_rel": 1e-9}),
    ("CLARABEL", {}),
    ("ECOS", {"abstol": 1e-9, "reltol": 1e-9, "feastol": 1e-9}),
    ("MOSEK", {}),
)

#: Default budget of one attempt (one solver of the chain on one scaling). 120 s is
#: about 3x the slowest successful attempt measured on a KL or chi-square problem at
#: n = 1e4 (about 45 s), so it stops only solves that were not going to finish: a
#: stalled interior-point method or SCS crawling on a problem without a minimiser.
DEFAULT_TIME_LIMIT = 120.0
#: Interior-point solvers converge in 20-80 iterations here; 500 (ECOS's old chain
#: setting) leaves room for the slow exponential-cone problems and stops the stalls.
DEFAULT_MAX_ITER = 500
#: SCS is a first-order method: about 400 of its iterations per interior-point
#: iteration (200,000 at the default budget, the old chain's SCS setting).
_SCS_ITERS_PER_IPM_ITER = 400

#: Each solver's own option names for ``(time limit in s, iteration limit)`` and the
#: factor applied to ``max_iter``; ECOS has no time limit, MOSEK takes its parameters
#: in one dictionary (see :func:`_budget_options`).
_BUDGET_KEYS = {
    "CLARABEL": ("time_limit", "max_iter", 1),
    "SCS": ("time_limit_secs", "max_iters", _SCS_ITERS_PER_IPM_ITER),
    "ECOS": (None, "max_iters", 1),
}
_MOSEK_KEYS = ("MSK_DPAR_OPTIMIZER_MAX_TIME", "MSK_IPAR_INTPNT_MAX_ITERATIONS")

#: An attempt that stopped at or above this fraction of its time limit is reported as
#: having run out of time (the solver's clock starts after cvxpy's compilation).
_TIME_USED = 0.95


#: Mass moved to infinity by the Wasserstein ``p = 1`` certificate is chosen so
#: that the unattained part of the supremum costs at most this (absolute) value.
_MOVE_TOL = 1e-11

#: ``max_i |m_i| = beta ||theta - theta_ref|| max_i ||x_i||`` below this is read as
#: ``theta = theta_ref`` (solver noise); measured on the margins, so scale-free.
_ZERO_MARGIN = 1e-9


class ConicSolveError(ValueError):
    """No solver of the chain reached ``optimal``; ``attempts`` lists what was tried.

    Each attempt whose budget ran out says which one (``budget`` of its record:
    ``"time limit 120 s"`` or ``"iteration limit 500"``); ``note`` is appended.
    """

    def __init__(self, attempts: list[dict], note: str = "") -> None:
        self.attempts = attempts
        tried = ", ".join(
            f"{a['solver']}{' (rescaled)' if a['rescaled'] else ''}: {a['status']}"
            + (f" ({a['budget']} ran out)" if a.get("budget") else "")
            for a in attempts)
        msg = f"cvxpy did not reach optimality with any solver; statuses: {tried}"
        if any(a.get("budget") for a in attempts):
            msg += "; raise time_limit / max_iter of solve_cvxpy to give each attempt more"
        super().__init__(msg + (f"; {note}" if note else ""))


def _budget_options(name: str, time_limit: float, max_iter: int) -> dict:
    """The per-attempt budget in solver ``name``'s own option names (none if unknown)."""
    if name == "MOSEK":
        return {"mosek_params": dict(zip(_MOSEK_KEYS, (time_limit, max_iter), strict=True))}
    if name not in _BUDGET_KEYS:
        return {}
    time_key, iter_key, factor = _BUDGET_KEYS[name]
    opts = {iter_key: max_iter * factor}
    if time_key is not None:
        opts[time_key] = time_limit
    return opts


def _budget_ran_out(name: str, opts: dict, time_s: float, iterations: int | None) -> str:
    """Which budget of ``opts`` an unsuccessful attempt exhausted, ``""`` if none."""
    if name == "MOSEK":
        params = opts.get("mosek_params", {})
        time_limit, iter_limit = (params.get(k) for k in _MOSEK_KEYS)
    elif name in _BUDGET_KEYS:
        time_key, iter_key, _ = _BUDGET_KEYS[name]
        time_limit, iter_limit = opts.get(time_key), opts.get(iter_key)
    else:
        return ""
    if time_limit is not None and time_s >= _TIME_USED * time_limit:
        return f"time limit {time_limit:g} s"
    if iter_limit is not None and iterations is not None and iterations >= iter_limit:
        return f"iteration limit {iter_limit}"
    return ""


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

    ``delta_of()`` maps the solved variable back to ``theta - theta_ref`` and
    ``h["dual_scale"]`` the Wasserstein multiplier back to ``lambda``.
    With ``rescale`` the columns of ``A`` are equilibrated (``delta = v / c``),
    objective and weight rows are multiplied by ``n``, and the transport terms are
    measured in units of the RMS row norm ``g = sqrt(E ||A_i||^2)`` (``rho / g``,
    ``kappa / g``, ``lambda g``): scaling the features, ``rho`` and ``kappa`` by any
    ``c`` leaves the rescaled problem unchanged.
    """
    import cvxpy as cp  # deferred: importing cvxpy costs ~0.4 s per process

    n, d = A.shape
    col = np.sqrt(w @ A**2) if rescale else np.ones(d)
    col = np.where(col > 0, col, 1.0)
    g = float(np.linalg.norm(col)) if rescale else 1.0
    k = float(n) if rescale else 1.0
    v = cp.Variable(d)
    m = (A / col) @ v
    delta_norm = beta * cp.norm(cp.multiply(g / col, v), 2)  # g beta ||delta||
    rho = amb.rho / g if form in ("w1", "w1kappa") else amb.rho  # a transport radius
    wk = k * w
    h: dict = {"dual_scale": g}
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
            cons += [cp.logistic(m) - lam * (amb.kappa / g) <= s, delta_norm <= lam]
            obj = k * lam * rho + wk @ s
            h["dual"] = lam
        h["cons"] = cons
    h["scale"] = k
    return cp.Problem(cp.Minimize(obj), cons), (lambda: v.value / col), h


def _attempt(form, amb, A, w, beta, chain, rescales, verbose, time_limit, max_iter, note=""):
    """Run the chain on each of ``rescales``; return the first optimal problem and the log.

    Every attempt gets the budget ``time_limit`` / ``max_iter`` in its solver's own
    option names (options given in ``chain`` take precedence); an unsuccessful
    attempt records in ``budget`` which of them ran out.
    """
    import cvxpy as cp

    installed = set(cp.installed_solvers())
    log: list[dict] = []
    for rescale in rescales:
        built = None
        for name, chain_opts in chain:
            opts = {**_budget_options(name, time_limit, max_iter), **chain_opts}
            entry = {"solver": name, "rescaled": rescale, "options": opts}
            log.append(entry)
            if name not in installed:
                entry.update(status="not installed", time_s=0.0)
                continue
            if built is None:  # one compilation per scaling, shared by its solvers
                built = _build(form, amb, A, w, beta, rescale)
            prob, delta_of, h = built
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
            stats = prob.solver_stats
            entry["budget"] = _budget_ran_out(name, opts, entry["time_s"],
                                              stats.num_iters if stats is not None else None)
    raise ConicSolveError(log, note)


def _separable_error(e: np.ndarray, delta: np.ndarray | None = None) -> ValueError:
    """The documented error for data without a minimiser along ``theta_ref + t e``."""
    where = "" if delta is None else (
        f" (the conic solver stopped at ||theta - theta_ref|| = {np.linalg.norm(delta):.3g})")
    return ValueError(
        f"data are linearly separable along theta - theta_ref = t * {np.round(e, 4)!r}: "
        f"the objective keeps decreasing as t -> inf and has no minimiser{where}; use "
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
    xmax = float(np.sqrt(np.max(np.einsum("ij,ij->i", data.x, data.x))))
    if beta * dnorm * xmax <= _ZERO_MARGIN:  # theta = theta_ref up to solver accuracy
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
                verbose: bool = False, rescale: bool | None = None,
                time_limit: float = DEFAULT_TIME_LIMIT,
                max_iter: int = DEFAULT_MAX_ITER) -> Solution:
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
        tried on the rescaled problem, then on the plain one.
    verbose : bool
        Passed to ``cvxpy.Problem.solve``.
    rescale : bool, optional
        ``None`` (default): the chain on the rescaled problem (equilibrated
        columns, invariant under a scaling of the features or of beta), then on
        the problem as written; ``True`` / ``False``: only the rescaled / plain one.
    time_limit : float
        Wall-clock budget in seconds of each attempt (one solver on one scaling),
        default :data:`DEFAULT_TIME_LIMIT` = 120 s: Clarabel ``time_limit``, SCS
        ``time_limit_secs``, MOSEK ``MSK_DPAR_OPTIMIZER_MAX_TIME`` (ECOS has none).
    max_iter : int
        Iteration budget of each attempt, default :data:`DEFAULT_MAX_ITER` = 500:
        Clarabel ``max_iter``, ECOS ``max_iters``, MOSEK
        ``MSK_IPAR_INTPNT_MAX_ITERATIONS``; SCS, a first-order method, gets
        ``max_iters = 400 * max_iter``. Options given in ``solvers`` override both.

    Returns
    -------
    Solution
        ``value`` is the conic optimum; ``dual`` is ``lambda*`` (KL, Wasserstein)
        or ``eta*`` (chi-square), ``inf`` / ``-inf`` for KL / chi-square at
        ``rho = 0`` and ``None`` for Nominal; ``worst_case``, ``primal_value =
        E_{Q*} l`` and ``gap = |value - primal_value| / max(1, |value|)`` are the
        certificate; ``grad_norm`` is the Danskin gradient norm at ``theta``.
        ``info["attempts"]`` records every solver tried with its status, time,
        options and (unsuccessful attempts) the ``budget`` that ran out.

    Raises
    ------
    ValueError
        On bad arguments, on ``Wasserstein(p=2)``; before any conic solve when
        the data are linearly separable and the set has no norm term (DPO, KL,
        chi-square, ``rho = 0``), so that no minimiser exists; and
        (:class:`ConicSolveError`) when no solver of the chain reports
        ``optimal``, naming each status and each budget that ran out.
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
    rescales = (True, False) if rescale is None else (bool(rescale),)
    time_limit = check_positive(time_limit, "time_limit")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    A = (data.ytil * beta)[:, None] * data.x
    w = data.weights
    rho = ambiguity.rho
    dpo_like = form == "nominal" or rho == 0.0
    # Once, before any conic solve (a conic solver does not notice a missing minimiser
    # and may run for its whole budget): strict separation leaves no minimiser for
    # any set without a norm term, weak separation none for DPO; for KL and
    # chi-square a weak one matters only if the worst case charges it (checked after).
    weak = None
    if form in ("nominal", "kl", "chi2") or rho == 0.0:
        weak = separating_direction(A, w, w)
        if weak is not None:
            strict = weak if dpo_like else separating_direction(A, w)
            if strict is not None:
                raise _separable_error(strict)
    note = "" if weak is None else (
        f"the data are weakly separable along {np.round(weak, 4)!r}, so the minimiser "
        "may not exist")
    prob, delta_of, h, used, log = _attempt(form, ambiguity, A, w, beta, chain, rescales,
                                            verbose, time_limit, int(max_iter), note)
    delta = np.asarray(delta_of(), dtype=np.float64)
    theta = theta_ref + delta
    value = float(prob.value) / h["scale"]
    m = margins(theta, data.x, data.y, beta, theta_ref)
    loss = dpo_loss(m)
    extra: dict = {}
    if form in ("w1", "w1kappa"):
        if form == "w1":
            flip = np.zeros(data.n)
            dual = beta * float(np.linalg.norm(delta))
        else:
            flip = np.asarray(h["cons"][1].dual_value, dtype=np.float64) / h["scale"]
            dual = float(h["dual"].value) / h["dual_scale"]
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
    if weak is not None:  # KL / chi-square, weakly separable: does Q* charge the direction?
        e = separating_direction(A, w, wc.weights)
        if e is not None:
            raise _separable_error(e, delta)
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
