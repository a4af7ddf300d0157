"""Asymptotic law of the robust DPO estimators (SPEC 5.1).

Away from kinks and boundaries every estimator here is a smooth M-estimator on the
joint parameter ``xi = (theta, nu)`` (``nu`` the dual variable), and

    sqrt(n) (xi_hat_n - xi*)  ->  N(0, H^-1 V H^-1).

Every objective is written in one form (docs/theory.md, "Asymptotic law"):

    F(xi; P) = Phi(xi, mu(xi)),   mu(xi) = E_P h(z; xi)   (a scalar mean)

* DPO: ``h = l``, ``Phi = mu``;
* Wasserstein p = 1, ``kappa = inf``: ``h = l``, ``Phi = mu + rho b``
  (``b = beta ||theta - theta_ref||``);
* Wasserstein p = 1, finite ``kappa``, when the constraint ``b <= lambda`` binds:
  ``h = max(l(m), l(-m) - b kappa)``, ``Phi = mu + rho b``;
* Wasserstein p = 2, ``kappa = inf``: ``h = sup_t softplus(b t - m) - lambda t^2``
  (Danskin and the implicit-function theorem at the per-atom maximiser),
  ``Phi = lambda rho^2 + mu``;
* KL: ``h = exp((l - L0) / lambda)``, ``Phi = lambda rho + lambda log mu + L0``
  (``L0`` a constant shift, the largest loss at ``xi*``, so ``h <= 1``);
* chi-square: ``h = (l - eta)_+^2``, ``Phi = eta + sqrt(1 + rho) sqrt(mu)``.

The estimating equation is ``Psi(xi; P) = grad_xi F = 0``. Its Hessian ``H`` and the
influence function of ``Psi`` at fixed ``xi*`` (delta method in the mean ``mu`` and
``E h_xi``) give ``IF(z) = -H^-1 IF_Psi(z)`` and ``V = Cov IF_Psi``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit
from scipy.stats import chi2

from ._validation import check_positive
from .ambiguity import KL, AmbiguitySet, ChiSquare, Nominal, Wasserstein
from .data import PreferenceData
from .losses import softplus

__all__ = ["Asymptotics", "asymptotic_covariance", "collapse_radius", "collapse_influence",
           "collapse_probability", "zero_gradient_mixture"]

#: Draws of the fixed-seed Monte Carlo for the law of the Gaussian quadratic forms
#: ``||Z||^2``, ``Z ~ N(0, Sigma)``: the relative standard error of a median is about
#: ``1.25 / sqrt(draws) * spread`` -- below 0.5% at 2e5 draws.
QUADRATIC_FORM_DRAWS = 200_000
#: Seed of that Monte Carlo (fixed, so that predictions are deterministic).
QUADRATIC_FORM_SEED = 20240501
#: ``||theta* - theta_ref|| <= KINK_TOL * max(1, ||theta_ref||)`` counts as theta_ref
#: (the dual solver returns theta_ref exactly when it certifies the kink).
KINK_TOL = 1e-8
#: A dual variable ``<= DUAL_TOL * scale`` is on the boundary of its range
#: (``lambda* = 0`` for KL and Wasserstein).
DUAL_TOL = 1e-9
#: An atom whose two branches differ by less than this (relative to the loss scale)
#: sits at a kink of ``(l - eta)_+`` or of the W1 flip ``max``: non-regular.
BRANCH_TOL = 1e-7
#: Relative eigenvalue floor below which ``H`` is treated as singular.
SINGULAR_TOL = 1e-10
#: Grid points per atom for the global maximiser of the W2 per-atom problem, then
#: polished by Newton; the three stationary points of the non-concave regime
#: (``lambda < b^2/8``) are separated by more than 1/64 of ``[0, b/(2 lambda)]``
#: except at a tie, which is reported as non-regular.
W2_GRID = 64
W2_NEWTON_STEPS = 30


@dataclass(frozen=True, eq=False)
class Asymptotics:
    """Limit law of ``sqrt(n) (theta_hat_n - theta*)`` for one population and set.

    Attributes
    ----------
    cov : ndarray (d, d)
        ``Sigma_theta``, the theta block of ``H^-1 V H^-1`` (NaN when not regular).
    joint_cov : ndarray (k, k)
        Covariance of the limit of ``sqrt(n) (xi_hat - xi*)``, ``xi = (theta, dual)``
        (``k = d + 1`` with a dual variable, ``d`` otherwise).
    hessian, score_cov : ndarray (k, k)
        ``H`` and ``V``.
    influence : ndarray (n_atoms, k)
        Influence function ``IF(z_i)`` at every atom of the population.
    theta_star, dual_star
        The population optimum (``dual_star`` None for DPO and W1 with ``kappa = inf``).
    regular : bool
        Whether the conditions of the Gaussian limit hold; ``reason`` says why not.
    sigma_p : ndarray (d, d)
        ``Sigma_P = E_P x x^T`` (for the ``sigma`` norm).
    stationarity : float
        ``||Psi(xi*; P)||``, the residual of the estimating equation at the optimum.
    """

    ambiguity: AmbiguitySet
    beta: float
    theta_star: np.ndarray
    dual_star: float | None
    cov: np.ndarray
    joint_cov: np.ndarray
    hessian: np.ndarray
    score_cov: np.ndarray
    influence: np.ndarray
    regular: bool
    reason: str
    sigma_p: np.ndarray
    stationarity: float
    _draws: dict = field(default_factory=dict, repr=False)

    @property
    def d(self) -> int:
        return self.theta_star.shape[0]

    def _squared_norms(self, norm: str) -> np.ndarray:
        """Fixed-seed draws of ``||Z||^2`` (``Z ~ N(0, cov)``) in the chosen norm, sorted."""
        if norm not in ("l2", "sigma"):
            raise ValueError(f"norm must be 'l2' or 'sigma', got {norm!r}")
        if norm not in self._draws:
            if not self.regular:
                self._draws[norm] = np.full(1, math.nan)
            else:
                c = self.cov
                if norm == "sigma":
                    r = np.linalg.cholesky(self.sigma_p + 0.0 * np.eye(self.d))
                    c = r.T @ c @ r
                eig = np.clip(np.linalg.eigvalsh((c + c.T) / 2), 0.0, None)
                rng = np.random.default_rng(QUADRATIC_FORM_SEED)
                z = rng.standard_normal((QUADRATIC_FORM_DRAWS, self.d))
                self._draws[norm] = np.sort((z**2) @ eig)
        return self._draws[norm]

    def error_quantile(self, q, n: float = 1.0, norm: str = "l2"):
        """Predicted ``q``-quantile of ``||theta_hat_n - theta*||`` at sample size ``n``.

        The limit law of ``n ||theta_hat - theta*||^2`` is the Gaussian quadratic form
        ``Z^T A Z`` (``A = I`` for ``norm="l2"``, ``Sigma_P`` for ``"sigma"``),
        a weighted sum of ``chi^2_1`` variables with the eigenvalues of
        ``A^{1/2} Sigma_theta A^{1/2}``; its quantiles come from a fixed-seed Monte
        Carlo of ``QUADRATIC_FORM_DRAWS`` draws. NaN when not regular.
        """
        n = check_positive(n, "n")
        qs = np.asarray(q, dtype=np.float64)
        if np.any((qs < 0) | (qs > 1)):
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        draws = self._squared_norms(norm)
        out = np.sqrt(np.quantile(draws, qs)) / math.sqrt(n)
        return float(out) if out.ndim == 0 else out

    def wald_statistic(self, theta_hat, n: float) -> float:
        """``n (theta_hat - theta*)^T Sigma_theta^-1 (theta_hat - theta*)``."""
        diff = np.asarray(theta_hat, dtype=np.float64) - self.theta_star
        if not self.regular:
            return math.nan
        return float(n * diff @ np.linalg.solve(self.cov, diff))

    def in_ellipsoid(self, theta_hat, n: float, level: float = 0.95) -> bool:
        """Whether ``theta*`` lies in the Wald ellipsoid of level ``level`` around
        ``theta_hat``: ``wald_statistic <= chi^2_d(level)`` (False when not regular)."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        stat = self.wald_statistic(theta_hat, n)
        return bool(stat <= chi2.ppf(level, self.d))


# ----------------------------------------------------------------------------- per-set parts
@dataclass
class _Parts:
    """``h`` (n,), ``h_xi`` (n, k), ``E_w h_xixi`` (k, k) and the derivatives of ``Phi``."""

    h: np.ndarray
    h_xi: np.ndarray
    e_hxx: np.ndarray
    phi_xi: np.ndarray
    phi_xixi: np.ndarray
    phi_mu: float
    phi_mumu: float
    phi_ximu: np.ndarray
    reason: str = ""


def _margins(data, theta, theta_ref, beta):
    delta = theta - theta_ref
    v = (data.ytil * beta)[:, None] * data.x  # dm/dtheta
    return v, v @ delta, delta


def _norm_parts(delta, beta):
    """``b``, ``db/dtheta = beta u``, ``d2b/dtheta2 = beta (I - u u^T) / ||delta||``."""
    r = float(np.linalg.norm(delta))
    u = delta / r
    return beta * r, beta * u, beta * (np.eye(delta.size) - np.outer(u, u)) / r


def _dpo_parts(data, v, m, w, d, penalty=None):
    s = expit(-m)
    h = softplus(-m)
    h_xi = -s[:, None] * v
    e_hxx = (v * (w * s * (1 - s))[:, None]).T @ v
    phi_xi, phi_xixi = (np.zeros(d), np.zeros((d, d))) if penalty is None else penalty
    return _Parts(h, h_xi, e_hxx, phi_xi, phi_xixi, 1.0, 0.0, np.zeros(d))


def _w1_flip_parts(data, v, m, w, delta, beta, rho, kappa):
    """W1 with finite kappa on the face ``lambda = b``: ``h = max(l(m), l(-m) - b kappa)``."""
    d = delta.size
    b, db, d2b = _norm_parts(delta, beta)
    keep, flip = softplus(-m), softplus(m) - b * kappa
    gap = np.abs(keep - flip)
    reason = ""
    if np.any((w > 0) & (gap <= BRANCH_TOL * max(1.0, float(np.max(keep))))):
        reason = "an atom is at the flip threshold l(m) = l(-m) - b kappa (kink)"
    fl = flip > keep
    h = np.where(fl, flip, keep)
    s = expit(-m)
    sig_m = s * (1 - s)
    grad_keep = -s[:, None] * v
    grad_flip = (1 - s)[:, None] * v - kappa * db[None, :]
    h_xi = np.where(fl[:, None], grad_flip, grad_keep)
    e_hxx = (v * (w * sig_m)[:, None]).T @ v - kappa * float(w[fl].sum()) * d2b
    return _Parts(h, h_xi, e_hxx, rho * db, rho * d2b, 1.0, 0.0, np.zeros(d), reason)


def _kl_parts(data, v, m, w, lam, rho):
    d = v.shape[1]
    s = expit(-m)
    l = softplus(-m)
    L0 = float(l[w > 0].max())
    a = l - L0
    h = np.exp(a / lam)
    g = -s[:, None] * v
    h_xi = np.concatenate([h[:, None] * g / lam, (-h * a / lam**2)[:, None]], axis=1)
    hw = w * h
    e_hxx = np.zeros((d + 1, d + 1))
    e_hxx[:d, :d] = (g * hw[:, None]).T @ g / lam**2 + (v * (hw * s * (1 - s))[:, None]).T @ v / lam
    e_hxx[:d, d] = e_hxx[d, :d] = -(hw * (a / lam**3 + 1 / lam**2)) @ g
    e_hxx[d, d] = float(hw @ (a**2 / lam**4 + 2 * a / lam**3))
    mu = float(w @ h)
    phi_xi = np.zeros(d + 1)
    phi_xi[d] = rho + math.log(mu)
    phi_ximu = np.zeros(d + 1)
    phi_ximu[d] = 1.0 / mu
    return _Parts(h, h_xi, e_hxx, phi_xi, np.zeros((d + 1, d + 1)), lam / mu, -lam / mu**2,
                  phi_ximu)


def _chi2_parts(data, v, m, w, eta, rho):
    d = v.shape[1]
    s = expit(-m)
    l = softplus(-m)
    reason = ""
    if np.any((w > 0) & (np.abs(l - eta) <= BRANCH_TOL * max(1.0, float(np.max(l))))):
        reason = "an atom has l = eta: the non-negativity of the worst-case weights binds there"
    r = np.maximum(l - eta, 0.0)
    on = (r > 0).astype(np.float64)
    g = -s[:, None] * v
    h = r**2
    h_xi = np.concatenate([2 * r[:, None] * g, (-2 * r)[:, None]], axis=1)
    e_hxx = np.zeros((d + 1, d + 1))
    e_hxx[:d, :d] = 2 * ((g * (w * on)[:, None]).T @ g + (v * (w * r * s * (1 - s))[:, None]).T @ v)
    e_hxx[:d, d] = e_hxx[d, :d] = -2 * (w * on) @ g
    e_hxx[d, d] = 2 * float(w @ on)
    mu = float(w @ h)
    c = math.sqrt(1 + rho)
    phi_xi = np.zeros(d + 1)
    phi_xi[d] = 1.0
    return _Parts(h, h_xi, e_hxx, phi_xi, np.zeros((d + 1, d + 1)), c / (2 * math.sqrt(mu)),
                  -c / (4 * mu**1.5), np.zeros(d + 1), reason)


def w2_maximiser(m: np.ndarray, b: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Global maximiser ``t*`` of ``softplus(b t - m) - lam t^2`` over ``t >= 0``, per atom.

    Stationary points solve ``b sigmoid(b t - m) = 2 lam t`` and lie in
    ``(0, b / (2 lam)]`` (SPEC 3.3). When ``lam >= b^2 / 8`` the problem is concave and
    that interval brackets the one root; otherwise each atom's interval is scanned on
    ``W2_GRID`` points for maxima (the derivative changing sign from + to -). Every
    bracket is polished by safeguarded Newton steps and the best maximum is kept.
    Returns ``t*`` and the gap between the best and the second-best local maximum
    (``inf`` when unique).
    """
    n = m.shape[0]
    top = b / (2 * lam)
    if lam >= b**2 / 8:
        atom = np.arange(n)
        lo, hi = np.zeros(n), np.full(n, top)
    else:
        grid = np.linspace(0.0, top, W2_GRID + 1)
        deriv = b * expit(b * grid[None, :] - m[:, None]) - 2 * lam * grid[None, :]
        atom, k = np.nonzero((deriv[:, :-1] > 0) & (deriv[:, 1:] <= 0))
        lo, hi = grid[k], grid[k + 1]
    mm = m[atom]
    x = (lo + hi) / 2
    for _ in range(W2_NEWTON_STEPS):  # safeguarded Newton inside each bracket
        s = expit(b * x - mm)
        f1 = b * s - 2 * lam * x
        f2 = b**2 * s * (1 - s) - 2 * lam
        lo = np.where(f1 > 0, x, lo)
        hi = np.where(f1 > 0, hi, x)
        step = x - f1 / np.where(f2 < 0, f2, -np.inf)
        x = np.where((step > lo) & (step < hi), step, (lo + hi) / 2)
    val = softplus(b * x - mm) - lam * x**2
    order = np.lexsort((-val, atom))  # by atom, best first
    atom, x, val = atom[order], x[order], val[order]
    first = np.r_[True, atom[1:] != atom[:-1]]
    tstar = np.zeros(n)
    tstar[atom[first]] = x[first]
    gap = np.full(n, np.inf)
    second = np.flatnonzero(~first & np.r_[False, first[:-1]])
    gap[atom[second]] = val[second - 1] - val[second]
    return tstar, gap


def _w2_parts(data, v, m, w, delta, beta, lam, rho):
    d = delta.size
    b, db, d2b = _norm_parts(delta, beta)
    t, gap = w2_maximiser(m, b, lam)
    reason = ""
    if np.any((w > 0) & (gap <= BRANCH_TOL)):
        reason = "two global maximisers of the per-atom W2 problem tie (kink)"
    a = b * t - m
    s = expit(a)
    ss = s * (1 - s)
    wv = t[:, None] * db[None, :] - v  # da/dtheta at fixed t
    h = softplus(a) - lam * t**2
    h_xi = np.concatenate([s[:, None] * wv, (-t**2)[:, None]], axis=1)
    ftt = ss * b**2 - 2 * lam
    if np.any((w > 0) & (ftt >= -BRANCH_TOL * lam)):
        reason = reason or "a per-atom W2 maximiser is degenerate (f_tt = 0)"
    ft_xi = np.concatenate([(ss * b)[:, None] * wv + s[:, None] * db[None, :], (-2 * t)[:, None]],
                           axis=1)
    e_hxx = np.zeros((d + 1, d + 1))
    e_hxx[:d, :d] = (wv * (w * ss)[:, None]).T @ wv + float(w @ (s * t)) * d2b
    e_hxx -= (ft_xi * (w / ftt)[:, None]).T @ ft_xi
    phi_xi = np.zeros(d + 1)
    phi_xi[d] = rho**2
    return _Parts(h, h_xi, e_hxx, phi_xi, np.zeros((d + 1, d + 1)), 1.0, 0.0,
                  np.zeros(d + 1), reason)


def _assemble(p: _Parts, w: np.ndarray):
    """``H``, ``V``, the influence function and the stationarity residual."""
    mu = float(w @ p.h)
    jm = w @ p.h_xi
    H = (p.phi_xixi + np.outer(p.phi_ximu, jm) + np.outer(jm, p.phi_ximu)
         + p.phi_mumu * np.outer(jm, jm) + p.phi_mu * p.e_hxx)
    H = (H + H.T) / 2
    psi = p.phi_xi + p.phi_mu * jm
    if_psi = ((p.h - mu)[:, None] * (p.phi_ximu + p.phi_mumu * jm)[None, :]
              + p.phi_mu * (p.h_xi - jm[None, :]))
    V = (if_psi * w[:, None]).T @ if_psi
    return H, V, if_psi, float(np.linalg.norm(psi))


def collapse_radius(data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0) -> float:
    """The radius ``rho_0`` at which the robust optimum collapses to ``theta_ref``.

    At ``theta_ref`` every margin is 0 and every per-atom gradient is
    ``g0 = -ytil beta x / 2``; ``theta_ref`` is optimal iff 0 is in the subdifferential
    there (docs/theory.md, "Collapse radius"):

    * Wasserstein p = 1, ``kappa = inf``: ``rho_0 = ||E_P ytil x|| / 2``;
    * Wasserstein p = 2, ``kappa = inf``: ``rho_0 = ||E_P ytil x||`` (first-order
      penalty ``rho sqrt(E ||grad_x l||^2) = rho b / 2`` at ``theta_ref``);
    * Wasserstein p = 1, finite ``kappa``:
      ``rho_0 = max_{||e|| <= 1} E_P[ytil e.x / 2 - (ytil e.x - kappa)_+]`` (concave);
    * KL: ``rho_0 = min {KL(Q || P) : E_Q ytil x = 0} = -min_a log E_P exp(a . ytil x)``
      (the I-projection; ``inf`` if 0 is not in the relative interior of the hull);
    * chi-square: ``rho_0 = min {E_P (q - 1)^2 : q >= 0, E_P q = 1, E_P q ytil x = 0}``.

    The radius does not depend on ``beta`` (kept for a uniform signature).
    """
    check_positive(beta, "beta")
    z = data.ytil[:, None] * data.x
    w = data.weights
    mean = w @ z
    if isinstance(ambiguity, Wasserstein):
        if math.isinf(ambiguity.kappa):
            return float(np.linalg.norm(mean) / (2.0 if ambiguity.p == 1 else 1.0))
        if ambiguity.p != 1:
            raise ValueError("collapse_radius: no closed form for Wasserstein p = 2 with finite "
                             f"kappa, got {ambiguity!r}")
        return _w1_flip_collapse(z, w, ambiguity.kappa)[0]
    if isinstance(ambiguity, KL | ChiSquare):
        return zero_gradient_mixture(data, ambiguity)[0]
    raise ValueError(f"collapse_radius: ambiguity must be KL, ChiSquare or Wasserstein, "
                     f"got {ambiguity!r}")


def _w1_flip_collapse(z: np.ndarray, w: np.ndarray, kappa: float) -> tuple[float, np.ndarray]:
    """``max_{||e|| <= 1} E_w[z.e / 2 - (z.e - kappa)_+]`` and its maximiser (Clarabel)."""
    import cvxpy as cp

    e = cp.Variable(z.shape[1])
    obj = cp.Maximize(w @ (z @ e) / 2 - w @ cp.pos(z @ e - kappa))
    prob = cp.Problem(obj, [cp.norm(e, 2) <= 1])
    prob.solve(solver=cp.CLARABEL)
    return float(prob.value), np.asarray(e.value, dtype=np.float64)


def collapse_influence(data: PreferenceData, ambiguity: AmbiguitySet) -> tuple[float, np.ndarray]:
    """``rho_0(P)`` and its influence function at every atom (docs/theory.md section 10).

    ``theta_hat_n = theta_ref`` exactly when the *sample* collapse radius
    ``rho_0(P_n) <= rho``, and ``sqrt(n)(rho_0(P_n) - rho_0) -> N(0, E IF^2)``, so the
    share of samples that collapse is about ``Phi(sqrt(n) (rho - rho_0) / sd)``,
    ``sd = sqrt(E_P IF^2)`` (:func:`collapse_probability`). By the envelope theorem:

    * W1 / W2 with ``kappa = inf``: ``IF = u . (ytil x - E ytil x) / c``, ``u`` the direction
      of ``E ytil x``, ``c = 2`` (p = 1) or 1 (p = 2);
    * W1 with finite ``kappa``: ``IF = h_e*(z) - rho_0`` with
      ``h_e(z) = ytil e.x / 2 - (ytil e.x - kappa)_+`` at the maximiser ``e*``;
    * KL and chi-square (``rho_0 = min E_P phi(q)`` subject to ``E_P q = 1``,
      ``E_P q ytil x = 0``): ``IF = phi(q0) - a (q0 - 1) - b . q0 ytil x - rho_0``, where the
      multipliers solve ``phi'(q0) = a + b . ytil x`` on the atoms with ``q0 > 0``
      (``phi(q) = q log q`` gives ``IF = 1 - q0``; ``phi(q) = (q - 1)^2``).
    """
    z = data.ytil[:, None] * data.x
    w = data.weights
    mean = w @ z
    if isinstance(ambiguity, Wasserstein):
        if math.isinf(ambiguity.kappa):
            c = 2.0 if ambiguity.p == 1 else 1.0
            norm = float(np.linalg.norm(mean))
            return norm / c, (z - mean) @ (mean / norm) / c
        if ambiguity.p != 1:
            raise ValueError("collapse_influence: not derived for Wasserstein p = 2 with finite "
                             f"kappa, got {ambiguity!r}")
        rho0, e = _w1_flip_collapse(z, w, ambiguity.kappa)
        h = z @ e / 2 - np.maximum(z @ e - ambiguity.kappa, 0.0)
        return rho0, h - rho0
    rho0, q0w = zero_gradient_mixture(data, ambiguity)
    if q0w is None:
        return rho0, np.full(data.n, math.nan)
    q0 = np.where(w > 0, q0w / np.where(w > 0, w, 1.0), 0.0)
    if isinstance(ambiguity, KL):
        return rho0, 1.0 - q0
    pos = q0 > BRANCH_TOL
    design = np.column_stack([np.ones(int(pos.sum())), z[pos]])
    coef = np.linalg.lstsq(design, 2 * (q0[pos] - 1), rcond=None)[0]
    a, b = coef[0], coef[1:]
    return rho0, (q0 - 1) ** 2 - a * (q0 - 1) - q0 * (z @ b) - rho0


def collapse_probability(data: PreferenceData, ambiguity: AmbiguitySet, n: float) -> float:
    """Predicted ``P(theta_hat_n = theta_ref) = Phi(sqrt(n) (rho - rho_0) / sd)``.

    ``rho = ambiguity.rho``; ``rho_0`` and ``sd`` from :func:`collapse_influence`. The
    first-order normal approximation of the law of the sample collapse radius.
    """
    from scipy.stats import norm

    rho0, infl = collapse_influence(data, ambiguity)
    sd = math.sqrt(float(data.weights @ infl**2))
    if not sd > 0:
        return float(ambiguity.rho >= rho0)
    return float(norm.cdf(math.sqrt(check_positive(n, "n")) * (ambiguity.rho - rho0) / sd))


def zero_gradient_mixture(data: PreferenceData, ambiguity: AmbiguitySet
                          ) -> tuple[float, np.ndarray | None]:
    """The reweighting ``Q0`` of ``P`` closest to ``P`` with ``E_Q0 ytil x = 0``.

    At ``theta_ref`` every loss is ``log 2``, so every ``Q`` of a reweighting ball is a
    worst case, and ``E_Q grad l(theta_ref) = -beta E_Q[ytil x] / 2``: ``Q0`` is the
    worst case whose gradient vanishes (docs/theory.md section 3). Returns its divergence
    from ``P`` (KL: the I-projection ``Q0 ∝ P exp(a . ytil x)``; chi-square: the
    quadratic programme of :func:`collapse_radius`), which is ``rho_0``, and its weights
    (``None`` and ``inf`` when no such ``Q0`` exists).
    """
    z = data.ytil[:, None] * data.x
    w = data.weights
    if isinstance(ambiguity, KL):
        return _kl_projection(z, w)
    if not isinstance(ambiguity, ChiSquare):
        raise ValueError(f"zero_gradient_mixture: ambiguity must be KL or ChiSquare, "
                         f"got {ambiguity!r}")
    import cvxpy as cp

    q = cp.Variable(z.shape[0], nonneg=True)
    prob = cp.Problem(cp.Minimize(w @ cp.square(q - 1)),
                      [w @ q == 1, (z * w[:, None]).T @ q == 0])
    prob.solve(solver=cp.CLARABEL)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        return math.inf, None
    qw = np.clip(q.value, 0.0, None) * w
    return float(prob.value), qw / qw.sum()


def _kl_projection(z: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray | None]:
    """``-min_a log E_w exp(a . z)`` by damped Newton (convex; ``inf`` if unbounded),
    and the weights ``Q0 ∝ w exp(a* . z)``."""
    from scipy.special import logsumexp

    a = np.zeros(z.shape[1])
    logw = np.log(np.where(w > 0, w, 1.0)) + np.where(w > 0, 0.0, -np.inf)

    def f(a):
        return float(logsumexp(logw + z @ a))

    val = f(a)
    for _ in range(200):
        lp = logw + z @ a
        q = np.exp(lp - logsumexp(lp))
        g = q @ z
        H = (z * q[:, None]).T @ z - np.outer(g, g)
        try:
            step = np.linalg.solve(H + 1e-14 * np.eye(z.shape[1]), g)
        except np.linalg.LinAlgError:
            return math.inf, None
        t = 1.0
        while t > 1e-12:
            new = f(a - t * step)
            if new <= val - 1e-4 * t * g @ step or new <= val:
                break
            t /= 2
        a, old, val = a - t * step, val, new
        if np.linalg.norm(a) > 1e6:
            return math.inf, None
        if abs(old - val) <= 1e-15 * max(1.0, abs(val)) and np.linalg.norm(g) < 1e-10:
            break
    lp = logw + z @ a
    return float(-val), np.exp(lp - logsumexp(lp))


def asymptotic_covariance(data: PreferenceData, ambiguity: AmbiguitySet, beta: float = 1.0,
                          theta_ref=None, solution=None) -> Asymptotics:
    """Sandwich covariance of ``sqrt(n)(theta_hat_n - theta*)`` (SPEC 5.1).

    Parameters
    ----------
    data : PreferenceData
        The population ``P`` (weighted atoms).
    ambiguity : Nominal, KL, ChiSquare or Wasserstein
        The set (Wasserstein p = 2 only with ``kappa = inf``).
    beta : float
        DPO temperature.
    theta_ref : array (d,), optional
        Reference parameter (zeros by default).
    solution : Solution, optional
        The population optimum, if already solved (``sim.solve(data, ambiguity, beta,
        theta_ref)`` otherwise).

    Returns
    -------
    Asymptotics
        ``cov = [H^-1 V H^-1]_{theta theta}``; ``regular=False`` with a ``reason`` (and
        NaN covariances) at ``theta* = theta_ref`` (a kink), ``lambda* = 0`` (boundary),
        an atom on a kink of its per-atom function, W1 with finite kappa off the face
        ``lambda = b`` (a breakpoint of the weighted flip quantile), or a singular ``H``.
    """
    from .solvers import solve

    beta = check_positive(beta, "beta")
    d = data.d
    ref = np.zeros(d) if theta_ref is None else np.asarray(theta_ref, dtype=np.float64)
    sol = solution if solution is not None else solve(data, ambiguity, beta=beta, theta_ref=ref)
    theta = np.asarray(sol.theta, dtype=np.float64)
    dual = None if sol.dual is None or not math.isfinite(sol.dual) else float(sol.dual)
    w = data.weights
    v, m, delta = _margins(data, theta, ref, beta)
    rho = float(ambiguity.rho)
    kink = float(np.linalg.norm(delta)) <= KINK_TOL * max(1.0, float(np.linalg.norm(ref)))
    reason = ""
    parts = None
    if isinstance(ambiguity, Nominal) or rho == 0:
        parts = _dpo_parts(data, v, m, w, d)
        dual = None
    elif kink:
        reason = ("theta* = theta_ref: the robust objective has a kink there "
                  "(theta_hat = theta_ref with positive probability)")
    elif isinstance(ambiguity, Wasserstein) and ambiguity.p == 1:
        b, db, d2b = _norm_parts(delta, beta)
        if math.isinf(ambiguity.kappa):
            parts = _dpo_parts(data, v, m, w, d, penalty=(rho * db, rho * d2b))
            dual = None
        elif dual is not None and abs(dual - b) <= 1e-6 * max(1.0, b):
            parts = _w1_flip_parts(data, v, m, w, delta, beta, rho, ambiguity.kappa)
            dual = None
        else:
            reason = ("W1 with finite kappa and lambda* > b: lambda* sits at a breakpoint of "
                      "the weighted flip quantile (a partially flipped atom)")
    elif isinstance(ambiguity, Wasserstein):
        if not math.isinf(ambiguity.kappa):
            reason = "Wasserstein p = 2 with finite kappa: not derived"
        elif dual is None or dual <= DUAL_TOL:
            reason = "lambda* = 0: the dual variable is on the boundary of its range"
        else:
            parts = _w2_parts(data, v, m, w, delta, beta, dual, rho)
    elif isinstance(ambiguity, KL):
        scale = float(softplus(-m).max())
        if dual is None or dual <= DUAL_TOL * max(1.0, scale):
            reason = "lambda* = 0: the KL dual variable is on the boundary (rho >= rho_0)"
        else:
            parts = _kl_parts(data, v, m, w, dual, rho)
    elif isinstance(ambiguity, ChiSquare):
        parts = _chi2_parts(data, v, m, w, float(sol.dual), rho)
    else:
        raise ValueError(f"ambiguity must be Nominal, KL, ChiSquare or Wasserstein, got "
                         f"{ambiguity!r}")
    k = d + (0 if dual is None else 1)
    nan = np.full((k, k), math.nan)
    if parts is None:
        return Asymptotics(ambiguity, beta, theta, dual, np.full((d, d), math.nan), nan, nan, nan,
                           np.full((data.n, k), math.nan), False, reason, data.coverage(),
                           math.nan)
    H, V, if_psi, stat = _assemble(parts, w)
    reason = reason or parts.reason
    eig = np.linalg.eigvalsh(H)
    if eig[0] <= SINGULAR_TOL * max(abs(eig[-1]), 1e-300) and not reason:
        reason = f"H is singular or indefinite (eigenvalues {eig[0]:.3g} .. {eig[-1]:.3g})"
    if reason:
        return Asymptotics(ambiguity, beta, theta, dual, np.full((d, d), math.nan), nan, H, V,
                           np.full((data.n, k), math.nan), False, reason, data.coverage(), stat)
    hinv = np.linalg.inv(H)
    joint = hinv @ V @ hinv.T
    joint = (joint + joint.T) / 2
    influence = -if_psi @ hinv.T
    return Asymptotics(ambiguity, beta, theta, dual, joint[:d, :d].copy(), joint, H, V, influence,
                       True, "", data.coverage(), stat)
