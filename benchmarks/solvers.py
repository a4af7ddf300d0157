"""Benchmark: the ``dual`` solver against cvxpy and the obvious peers, side by side in one run.

For each data kind, dimension ``d``, sample size ``n`` and ambiguity set it times
``sim.solve(..., solver="dual")`` and then, on the same data in the same process, every
peer that solves the same problem:

* ``cvxpy``: ``sim.solve(..., solver="cvxpy")`` (Clarabel; DPO, KL, chi-square, W1);
* ``scipy-lbfgsb``: scipy's L-BFGS-B on the smooth dual, ``(theta, log lambda)`` for KL and
  ``(theta, eta)`` for chi-square, and on DPO + ``rho beta ||theta||`` for Wasserstein
  p = 1, kappa = inf, with analytic gradients (:func:`kl_dual`, :func:`chi2_dual`,
  :func:`w1_penalised`);
* ``sklearn-newton-cholesky`` / ``sklearn-lbfgs``: unpenalised ``LogisticRegression`` on
  ``(beta x, y)`` with the sample weights (DPO is logistic regression, SPEC 1);
* ``dro``: the ``dro`` package's ``KLDRO``, ``Chi2DRO`` and ``WassersteinDRO`` (logistic loss,
  no intercept), when that package is importable (it is kept out of the project's
  environment: see benchmarks/README.md).

Each row reports the solve time, ``ratio = time / dual time`` (above 1: the dual solver is
faster), ``passes = time / (time of one data pass)`` where a pass is ``m = A @ delta``, a
softplus and a weighted sum over the ``n x d`` matrix ``A = ytil beta x``, timed in the same
run, and the agreement of the peer's optimum with the dual solver's: ``theta_diff_inf`` and
``value_rel_diff = (L_U(theta_peer) - L_U(theta_dual)) / max(1, |L_U(theta_dual)|)``, both
objectives evaluated exactly by :func:`simulator.robust_objective` (positive: the peer's point is
worse). Rows are printed as they finish and, with ``--csv``, appended to a CSV file.

Usage::

    python benchmarks/solvers.py --quick               # n = 1e4, d = 8, every set (minutes)
    python benchmarks/solvers.py --sizes 10000 100000 --d 8 64 --sets dpo kldpo
    python benchmarks/solvers.py --sizes 1000000 --sets kldpo --profile   # where the time goes
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import importlib
import importlib.util
import math
import pathlib
import pstats
import sys
import time
import tracemalloc
import types
import warnings

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logsumexp

import simulator as sim

SETS = {
    "dpo": lambda: sim.Nominal(),
    "kldpo": lambda: sim.KL(0.1),
    "chi2dpo": lambda: sim.ChiSquare(0.1),
    "wdpo1": lambda: sim.Wasserstein(0.05, p=1),
    "wdpo1_kappa": lambda: sim.Wasserstein(0.05, p=1, kappa=1.0),
    "wdpo2": lambda: sim.Wasserstein(0.05, p=2),
    "wdpo2_kappa": lambda: sim.Wasserstein(0.05, p=2, kappa=1.0),
}
#: The peers that solve each set's problem.
PEERS = {
    "dpo": ("cvxpy", "sklearn-newton-cholesky", "sklearn-lbfgs"),
    "kldpo": ("cvxpy", "scipy-lbfgsb", "dro"),
    "chi2dpo": ("cvxpy", "scipy-lbfgsb", "dro"),
    "wdpo1": ("cvxpy", "scipy-lbfgsb", "dro"),
    "wdpo1_kappa": ("cvxpy", "dro"),
    "wdpo2": (),
    "wdpo2_kappa": (),
}
#: Interior-point peers, run only up to ``--cvxpy-max-n`` atoms (about 45 s per KL or
#: chi-square solve at n = 1e4, d = 8 here, growing superlinearly in n and with d).
CONIC = ("cvxpy", "dro")
COLUMNS = ["data", "n", "d", "set", "solver", "time_s", "ratio", "passes", "iters", "peak_mb",
           "gap", "opt_gap", "status", "theta_diff_inf", "value_rel_diff"]

#: L-BFGS-B run to its attainable precision (``ftol`` at the rounding level of the objective,
#: ``gtol`` on the projected gradient) so that its optimum can be compared with the dual
#: solver's at 1e-6; 20 stored pairs instead of 10 (fewer iterations here, same cost per pass).
LBFGS_OPTIONS = {"maxiter": 20_000, "maxcor": 20, "ftol": 1e-15, "gtol": 1e-10}
#: scikit-learn's stopping tolerance (newton-cholesky: gradient; lbfgs: projected gradient).
SKLEARN_TOL = 1e-10
#: The clock of every timing, set by ``--clock``: process CPU time by default. On this
#: shared 2-core machine (load averages of 8 to 12 while other engineers' jobs run) wall
#: time measured the scheduler: a 0.6 ms pass took 0.6 to 30 ms, and a d = 64 DPO solve
#: with two BLAS threads 4.5 s (a thread waiting for its descheduled partner). CPU time
#: of a single-threaded run (``--threads 1``) counts only the work of the solver.
clock = time.process_time

#: Chunks of the one-pass timing and their least duration (s): long enough to span
#: several scheduler time slices, short enough to cost under a second per set.
PASS_REPS = 4
PASS_CHUNK_S = 0.1


def make_data(n: int, d: int, seed: int, kind: str = "env") -> sim.PreferenceData:
    """``n`` preference pairs with ``d`` features.

    ``kind="env"``: a sample of a random realizable environment (500 states, 6 actions:
    at most 30,000 distinct atoms, as in every experiment of this project);
    ``kind="gaussian"``: ``x ~ N(0, I_d)`` and Bradley-Terry labels with a random
    ``theta* ~ N(0, (8 / d) I_d)`` (``||theta*|| ~ sqrt(8)`` for every ``d``, the same
    Bayes error; every atom distinct: the hardest case for the finite-kappa sets, whose
    flip thresholds then fall between atoms ``1/n`` apart).
    """
    if kind == "gaussian":
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, d))
        theta = rng.standard_normal(d) * math.sqrt(8.0 / d)
        y = (rng.random(n) < expit(x @ theta)).astype(float)
        return sim.PreferenceData(x, y)
    env = sim.FiniteEnv.random(n_states=500, n_actions=6, dim=d, beta=1.0, seed=seed,
                               theta_norm=3.0)
    return env.sample(n, seed=seed + 1)


# ----------------------------------------------------------------------------- one pass
def time_pass(A: np.ndarray, w: np.ndarray) -> float:
    """Time of one data pass: ``m = A @ delta``, ``softplus(-m)``, ``w @ l``.

    Passes are timed in ``PASS_REPS`` chunks of at least ``PASS_CHUNK_S`` each and the
    fastest chunk's time per pass is returned: the same least-disturbed estimate as the
    fastest of ``--repeat`` solves (a single pass of a few ms is easily stretched tenfold
    by the scheduler on a loaded machine).
    """
    delta = np.full(A.shape[1], 0.1 / math.sqrt(A.shape[1]))
    t0 = clock()
    float(w @ sim.softplus(-(A @ delta)))
    per_chunk = max(1, math.ceil(PASS_CHUNK_S / max(clock() - t0, 1e-9)))
    best = math.inf
    for _ in range(PASS_REPS):
        t0 = clock()
        for _ in range(per_chunk):
            float(w @ sim.softplus(-(A @ delta)))
        best = min(best, (clock() - t0) / per_chunk)
    return best


# ------------------------------------------------------------------------- scipy duals
def kl_dual(z: np.ndarray, A: np.ndarray, w: np.ndarray, rho: float):
    """KL dual ``F = lambda (rho + log E_w exp(l / lambda))`` in ``z = (theta, log lambda)``.

    SPEC 3.1 with ``lambda = exp(s)``; ``l_i = softplus(-a_i . theta)``,
    ``q = w exp(l / lambda - lse)`` (the tilted weights),
    ``dF/dtheta = -A^T (q sigmoid(-m))`` and ``dF/ds = F - E_q l``.
    """
    theta, lam = z[:-1], math.exp(z[-1])
    m = A @ theta
    loss = sim.softplus(-m)
    u = loss / lam
    lse = float(logsumexp(u, b=w))
    q = w * np.exp(u - lse)
    f = lam * (rho + lse)
    grad = np.empty_like(z)
    grad[:-1] = -(A.T @ (q * expit(-m)))
    grad[-1] = f - q @ loss
    return f, grad


def chi2_dual(z: np.ndarray, A: np.ndarray, w: np.ndarray, rho: float):
    """Chi-square dual ``F = eta + sqrt(1 + rho) sqrt(E_w (l - eta)_+^2)`` in ``z = (theta, eta)``.

    SPEC 3.2; with ``r = (l - eta)_+`` and ``S = E_w r^2``:
    ``dF/dtheta = -sqrt((1 + rho) / S) A^T (w r sigmoid(-m))``,
    ``dF/deta = 1 - sqrt((1 + rho) / S) E_w r`` (``F`` is C^1 while ``S > 0``).
    """
    theta, eta = z[:-1], z[-1]
    m = A @ theta
    r = np.maximum(sim.softplus(-m) - eta, 0.0)
    root = math.sqrt(float(w @ (r * r)))
    c = math.sqrt(1.0 + rho)
    grad = np.zeros_like(z)
    if root == 0.0:  # eta above every loss: F = eta, slope 1 in eta
        grad[-1] = 1.0
        return float(eta), grad
    wr = w * r
    grad[:-1] = -(c / root) * (A.T @ (wr * expit(-m)))
    grad[-1] = 1.0 - c * wr.sum() / root
    return float(eta + c * root), grad


def w1_penalised(theta: np.ndarray, A: np.ndarray, w: np.ndarray, rho_beta: float):
    """Wasserstein p = 1, kappa = inf: ``F = E_w softplus(-A theta) + rho beta ||theta||``.

    SPEC 3.3; ``dF/dtheta = -A^T (w sigmoid(-m)) + rho beta theta / ||theta||`` (the norm
    is smooth away from ``theta = 0``, where the minimiser is not unless it is ``0``).
    """
    m = A @ theta
    nrm = float(np.linalg.norm(theta))
    grad = -(A.T @ (w * expit(-m)))
    if nrm > 0:
        grad += rho_beta * theta / nrm
    return float(w @ sim.softplus(-m)) + rho_beta * nrm, grad


def scipy_lbfgsb(name, data, amb, beta):
    """L-BFGS-B on the KL or chi-square dual from ``theta = 0``, ``lambda = 1`` / ``eta = 0``,
    or on the penalised W1 objective from the first Newton step of DPO at ``theta = 0``."""
    A = (data.ytil * beta)[:, None] * data.x
    w = data.weights
    if name == "wdpo1":  # F is not differentiable at 0: start from -H^-1 g of E l at 0
        z0 = np.linalg.lstsq(0.25 * (A * w[:, None]).T @ A, 0.5 * (w @ A), rcond=None)[0]
        res = minimize(w1_penalised, z0, args=(A, w, amb.rho * beta), jac=True,
                       method="L-BFGS-B", options=LBFGS_OPTIONS)
        return res.x, int(res.nit), "ok" if res.success else f"stopped: {res.message}"
    fun = kl_dual if name == "kldpo" else chi2_dual
    z0 = np.zeros(data.d + 1)
    res = minimize(fun, z0, args=(A, w, amb.rho), jac=True, method="L-BFGS-B",
                   options=LBFGS_OPTIONS)
    return res.x[:-1], int(res.nit), "ok" if res.success else f"stopped: {res.message}"


# ------------------------------------------------------------------------ scikit-learn
def sklearn_logreg(solver, data, beta):
    """Unpenalised logistic regression on ``(beta x, y)`` with weights ``w`` (= DPO)."""
    from sklearn.linear_model import LogisticRegression

    # C = inf is scikit-learn's penalty=None since 1.8 (where penalty= is deprecated)
    model = LogisticRegression(C=np.inf, fit_intercept=False, solver=solver, tol=SKLEARN_TOL,
                               max_iter=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning is reported through n_iter_
        model.fit(beta * data.x, data.y.astype(int), sample_weight=data.weights)
    iters = int(np.max(model.n_iter_))
    return model.coef_.ravel(), iters, "ok" if iters < 10_000 else "max_iter"


# --------------------------------------------------------------------------------- dro
def import_dro_linear():
    """``dro.linear_model`` if the ``dro`` package is installed, else ``None``.

    ``dro/__init__.py`` also imports its neural models, hence torchvision, which does not
    load against torch 2.13 (``operator torchvision::nms does not exist``); only the
    linear models are needed, so the package is registered without running its
    ``__init__`` and ``dro.linear_model`` (numpy, cvxpy, scikit-learn) is imported alone.
    """
    try:
        spec = importlib.util.find_spec("dro")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    if "dro" not in sys.modules:
        pkg = types.ModuleType("dro")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["dro"] = pkg
    try:
        return importlib.import_module("dro.linear_model")
    except ImportError:
        return None


def dro_model(lm, name, amb, d, beta):
    """The ``dro`` model of set ``name`` on features ``X = beta x`` and labels ``ytil``.

    ``KLDRO(eps=rho)`` and ``Chi2DRO`` (``eps = rho``) are SPEC 3.1 / 3.2 with uniform
    weights. ``WassersteinDRO`` is type-1 Wasserstein with ground cost
    ``||X - X'||_p + kappa 1[y != y']`` (its ``p`` is the norm of the feature cost, so
    ``p = 2`` is SPEC 3.3's Euclidean cost); in ``X = beta x`` coordinates the radius and
    the flip cost are ``beta rho`` and ``beta kappa``.
    """
    common = {"input_dim": d, "model_type": "logistic", "fit_intercept": False}
    if name == "kldpo":
        return lm.KLDRO(eps=amb.rho, **common)
    if name == "chi2dpo":
        model = lm.Chi2DRO(**common)
        model.update({"eps": amb.rho})
        return model
    model = lm.WassersteinDRO(**common)
    kappa = "inf" if math.isinf(amb.kappa) else beta * amb.kappa
    model.update({"eps": beta * amb.rho, "p": 2, "kappa": kappa})
    return model


def dro_fit(lm, name, data, amb, beta):
    if np.ptp(data.weights) > 0:
        raise ValueError("dro takes unweighted samples only")
    model = dro_model(lm, name, amb, data.d, beta)
    model.fit(beta * data.x, data.ytil)
    return np.asarray(model.theta, dtype=float).ravel(), 0, "ok"


# -------------------------------------------------------------------------------- rows
def run_peer(peer, name, data, amb, beta, lm):
    """``(theta, seconds, iterations, status)`` of ``peer`` on the problem, or ``theta=None``."""
    t0 = clock()
    try:
        if peer == "cvxpy":
            sol = sim.solve(data, amb, beta=beta, solver="cvxpy")
            theta, iters, status = sol.theta, sol.iterations, "optimal"
        elif peer == "scipy-lbfgsb":
            theta, iters, status = scipy_lbfgsb(name, data, amb, beta)
        elif peer.startswith("sklearn-"):
            theta, iters, status = sklearn_logreg(peer.removeprefix("sklearn-"), data, beta)
        else:
            theta, iters, status = dro_fit(lm, name, data, amb, beta)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure as a row
        return None, clock() - t0, 0, f"failed: {type(exc).__name__}: {str(exc)[:60]}"
    return theta, clock() - t0, iters, status


def fmt(v) -> str:
    return f"{v:>11.4g}" if isinstance(v, float) else f"{v!s:>11}"


def profile_dual(data, amb, beta, merge: bool = True, top: int = 20) -> None:
    """Print where one dual solve spends its time, by function (cProfile on ``clock``)."""
    prof = cProfile.Profile(clock)
    prof.enable()
    sim.solve(data, amb, beta=beta, solver="dual", merge=merge)
    prof.disable()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def bench_one(kind, n, d, name, data, A, args, lm, emit) -> None:
    """The rows of one set: the dual solver, then each of its peers on the same data.

    Each is solved once first; then each of the ``--repeat - 1`` rounds solves the dual
    again, then every non-conic peer, then times a pass, so that every fastest time is
    taken over the same stretch of the machine's drift (one ratio is not a dual time of
    one minute against a peer time of the next).

    The pass time is measured for each set (the machine is shared, so its speed drifts
    between sets), just before its dual solve and again after each solve of the repeats;
    the fastest is kept, as the fastest solve is (timed only once, a pass on a loaded
    machine varied twofold within minutes while the solve varied by 15%). ``passes`` of
    every row of the set uses it.
    """
    amb = SETS[name]()
    base = {"data": kind, "n": n, "d": d, "set": name}
    pass_s = time_pass(A, data.weights)
    if args.memory:
        tracemalloc.start()
    t0 = clock()
    try:
        sol = sim.solve(data, amb, beta=args.beta, solver="dual", merge=args.merge)
    except (RuntimeError, ValueError) as exc:
        emit({**base, "solver": "one pass", "time_s": pass_s, "passes": 1.0})
        emit({**base, "solver": "dual", "time_s": clock() - t0,
              "status": f"failed: {str(exc)[:60]}"})
        return
    t_dual = clock() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if args.memory else math.nan
    if args.memory:
        tracemalloc.stop()
    pass_s = min(pass_s, time_pass(A, data.weights))
    peers = {}  # peer -> (theta, fastest seconds, iterations, status)
    rows = {}
    for peer in PEERS[name]:
        if peer not in args.peers:
            continue
        rows[peer] = {**base, "solver": peer}
        if peer in CONIC and n > args.cvxpy_max_n:
            rows[peer]["status"] = f"skipped (n > {args.cvxpy_max_n})"
        elif peer == "dro" and lm is None:
            rows[peer]["status"] = "not installed"
        else:
            peers[peer] = run_peer(peer, name, data, amb, args.beta, lm)
    # the repeats alternate the dual solve with every non-conic peer (and a pass), so that
    # each fastest time is taken over the same stretch of the machine's drift
    again = [p for p, run in peers.items() if p not in CONIC and run[0] is not None]
    for _ in range(args.repeat - 1):
        t0 = clock()
        sim.solve(data, amb, beta=args.beta, solver="dual", merge=args.merge)
        t_dual = min(t_dual, clock() - t0)
        for peer in again:
            theta, t_peer, iters, status = peers[peer]
            peers[peer] = (theta, min(t_peer, run_peer(peer, name, data, amb, args.beta, lm)[1]),
                           iters, status)
        pass_s = min(pass_s, time_pass(A, data.weights))
    emit({**base, "solver": "one pass", "time_s": pass_s, "passes": 1.0})
    emit({**base, "solver": "dual", "time_s": t_dual, "ratio": 1.0, "passes": t_dual / pass_s,
          "iters": sol.iterations, "peak_mb": peak, "gap": sol.gap,
          "opt_gap": sol.info.get("optimality_gap", math.nan), "status": sol.status})
    if args.profile:
        profile_dual(data, amb, args.beta, args.merge)
    for peer, row in rows.items():
        if peer in peers:
            theta, t_peer, iters, status = peers[peer]
            row.update(time_s=t_peer, ratio=t_peer / t_dual, passes=t_peer / pass_s,
                       iters=iters, status=status)
            if theta is not None:
                value = sim.robust_objective(theta, data, amb, beta=args.beta).value
                row["theta_diff_inf"] = float(np.max(np.abs(theta - sol.theta)))
                row["value_rel_diff"] = (value - sol.value) / max(1.0, abs(sol.value))
        emit(row)


def limit_blas(threads: int | None):
    """Limit every BLAS to ``threads`` (``None``: numpy's as it is, scipy's own to one).

    Returns the limiter, to be kept alive. scipy's L-BFGS-B (and scikit-learn's Cholesky)
    call scipy's bundled OpenBLAS on tiny ``d x d`` blocks; with two threads on this
    shared machine each call of L-BFGS-B's ``setulb`` took about 6 ms instead of
    microseconds (0.3 s instead of 0.008 s for a KL solve at n = 1e3), which times thread
    wake-ups, not the method; so that one runs on one thread in every mode.
    """
    from threadpoolctl import ThreadpoolController

    ctl = ThreadpoolController()
    if threads is not None:
        return ctl.limit(limits=threads, user_api="blas")
    paths = [lc.filepath for lc in ctl.lib_controllers if "scipy.libs" in lc.filepath]
    return ctl.select(filepath=paths).limit(limits=1) if paths else None


def warm_up(args, lm) -> None:
    """Run every solver once, untimed, on a small problem: imports and first calls
    (about 1.5 s for scikit-learn, 0.4 s for cvxpy) are not part of any solve time."""
    data = make_data(300, 4, args.seed, "env")
    for name in args.sets:
        amb = SETS[name]()
        sim.solve(data, amb, beta=args.beta, solver="dual")
        for peer in PEERS[name]:
            if peer in args.peers and (peer != "dro" or lm is not None):
                run_peer(peer, name, data, amb, args.beta, lm)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    p.add_argument("--d", type=int, nargs="+", default=[8],
                   help="feature dimensions (default 8), e.g. --d 8 64 512")
    p.add_argument("--data", nargs="+", choices=["env", "gaussian"], default=["env"],
                   help="environment sample (default) and/or Gaussian features (see make_data)")
    p.add_argument("--peers", nargs="+", default=sorted({q for v in PEERS.values() for q in v}),
                   help="peers to run (default all): cvxpy scipy-lbfgsb sklearn-newton-cholesky "
                        "sklearn-lbfgs dro")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cvxpy-max-n", type=int, default=10_000,
                   help="run cvxpy and dro only up to this n (default 1e4)")
    p.add_argument("--max-nd", type=float, default=1e8,
                   help="skip (n, d) with n * d above this (default 1e8: an 800 MB array)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="solve every atom as given (the dual solver's merge=False; by default "
                        "it merges repeated atoms where a probe says it pays)")
    p.add_argument("--memory", action="store_true",
                   help="also measure the dual solver's peak memory (tracemalloc, slows it)")
    p.add_argument("--profile", action="store_true",
                   help="after each dual solve, print a cProfile of a second one")
    p.add_argument("--repeat", type=int, default=1,
                   help="time the dual solver and the non-conic peers this many times and "
                        "report the fastest (default 1; cvxpy and dro run once)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="process CPU time (default: robust on a shared machine) or wall time")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads of every solver (default 1; 0: numpy's default)")
    p.add_argument("--quick", action="store_true", help="n = 1e4 and d = 8 only")
    p.add_argument("--csv", type=pathlib.Path, help="append the rows to this CSV file")
    p.add_argument("--markdown", type=pathlib.Path,
                   help="also write the rows as a markdown table to this file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    sizes, dims = ([10_000], [8]) if args.quick else (args.sizes, args.d)
    lm = import_dro_linear() if "dro" in args.peers else None
    writer = fh = None
    if args.csv is not None:
        new = not args.csv.exists()
        fh = args.csv.open("a", newline="")
        writer = csv.DictWriter(fh, COLUMNS)
        if new:
            writer.writeheader()

    rows: list[dict] = []

    def emit(row):
        row = {c: row.get(c, math.nan if c not in ("status",) else "") for c in COLUMNS}
        rows.append(row)
        print(" ".join(fmt(row[c]) for c in COLUMNS), flush=True)
        if writer is not None:
            writer.writerow(row)
            fh.flush()

    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    limiter = limit_blas(args.threads or None)  # noqa: F841 - kept alive for the whole run
    warm_up(args, lm)
    print(f"dro: {'installed' if lm is not None else 'not installed'}; clock: {args.clock}; "
          f"BLAS threads: {args.threads or 'default'}")
    print(" ".join(f"{c:>11}" for c in COLUMNS))
    touched = False
    for kind in args.data:
        for d in dims:
            for n in sizes:
                if n * d > args.max_nd:
                    emit({"data": kind, "n": n, "d": d, "set": "*", "solver": "*",
                          "status": f"skipped (n d > {args.max_nd:g})"})
                    continue
                data = make_data(n, d, args.seed, kind)
                A = (data.ytil * args.beta)[:, None] * data.x
                if not touched:  # untimed: the first touch of fresh arrays (once per process)
                    sim.solve(data, sim.Nominal(), beta=args.beta)
                    touched = True
                for name in args.sets:
                    bench_one(kind, n, d, name, data, A, args, lm, emit)
                del A, data
    if fh is not None:
        fh.close()
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(rows))
    return 0


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (times to 3 significant digits, blanks for nan)."""
    def cell(c, v):
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            return f"{v:.3g}" if c in ("time_s", "ratio", "passes", "peak_mb") else f"{v:.1e}"
        return str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
