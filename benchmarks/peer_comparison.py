"""Hypergradient step against the peers, same problems, same run: implicitdiff, hand-written torch,
TorchOpt, JAXopt (jit) and Optimistix (jit).

Two problems, float64, the exact inner solution given (so that only the hypergradient step is
timed: the library call at ``x*``, the outer loss and the backward pass / ``jax.grad``):

* ``ridge``: ``w*(theta) = argmin mean((X w - y)^2) + sum(exp(theta) w^2)``, ``n = 2000``,
  ``d = 1000`` (synthetic, AR(1)-correlated features); outer loss: validation MSE.
* ``logistic``: the same per-feature penalty on logistic regression, scikit-learn's bundled
  ``breast_cancer`` (standardized, ``d = 30``, 285 training / 284 validation samples); the
  exact ``w*`` by Newton's method to machine precision.

Every method solves the backward system with CG at the same tolerance (``--tol``, default
1e-10) except where its name says otherwise; the hypergradient is compared with a dense
float64 solve. Methods are interleaved across rounds (A, B, C, ..., A, B, C, ...) so that
background load on a shared machine hits all alike; torch and XLA run on one thread. Peers
that are not installed are skipped (``pip install -e ".[bench]"`` installs them; they are
never runtime dependencies).

Usage::

    python benchmarks/peer_comparison.py [--rounds 7] [--repeats 7] [--tol 1e-10] [--out benchmarks/results]

Writes ``peer_comparison.json`` and ``peer_comparison.md`` to ``--out``.
"""

from __future__ import annotations

import os

# one thread for XLA too (must precede the first jax import)
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import implicitdiff as idiff  # noqa: E402
from benchmarks._timing import machine_info  # noqa: E402

try:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
except ImportError:  # optional
    jax = None
try:
    import jaxopt
except ImportError:
    jaxopt = None
try:
    import lineax
    import optimistix
    import optimistix.internal
except ImportError:
    optimistix = None
try:
    import torchopt

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt\.")
except ImportError:
    torchopt = None


# ---------------------------------------------------------------------------- problems (NumPy data)
def ridge_data(n: int = 2000, d: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def features(m: int) -> np.ndarray:
        z = rng.standard_normal((m, d))
        x = np.empty_like(z)
        x[:, 0] = z[:, 0]
        for j in range(1, d):
            x[:, j] = 0.5 * x[:, j - 1] + np.sqrt(0.75) * z[:, j]
        return x

    w_true = np.zeros(d)
    support = rng.permutation(d)[: d // 10]
    w_true[support] = rng.standard_normal(len(support))
    Xt, Xv = features(n), features(n)
    yt = Xt @ w_true + 0.5 * rng.standard_normal(n)
    yv = Xv @ w_true + 0.5 * rng.standard_normal(n)
    theta = np.log(1e-2) + np.log(10.0) * rng.random(d)
    w = np.linalg.solve(Xt.T @ Xt / n + np.diag(np.exp(theta)), Xt.T @ yt / n)
    return {"Xt": Xt, "yt": yt, "Xv": Xv, "yv": yv, "theta": theta, "w": w}


def logistic_data(seed: int = 0) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    X, y = X[order], y[order].astype(np.float64)
    X = (X - X.mean(0)) / X.std(0)
    half = len(y) // 2
    Xt, yt, Xv, yv = X[:half], y[:half], X[half:], y[half:]
    theta = np.full(X.shape[1], np.log(1e-2))
    w = np.zeros(X.shape[1])
    for _ in range(100):  # Newton to machine precision
        p = 1 / (1 + np.exp(-(Xt @ w)))
        g = Xt.T @ (p - yt) / half + 2 * np.exp(theta) * w
        H = Xt.T @ (Xt * (p * (1 - p))[:, None]) / half + 2 * np.diag(np.exp(theta))
        w = w - np.linalg.solve(H, g)
    return {"Xt": Xt, "yt": yt, "Xv": Xv, "yv": yv, "theta": theta, "w": w}


# the problems in each framework: inner objective f(w, theta, X, y) and outer loss g(w, X, y)
def torch_fns(kind: str) -> tuple[Callable, Callable]:
    if kind == "ridge":
        return (lambda w, t, X, y: ((X @ w - y) ** 2).mean() + (t.exp() * w**2).sum()), (
            lambda w, X, y: ((X @ w - y) ** 2).mean()
        )
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return (lambda w, t, X, y: bce(X @ w, y) + (t.exp() * w**2).sum()), (lambda w, X, y: bce(X @ w, y))


def jax_fns(kind: str) -> tuple[Callable, Callable]:
    if kind == "ridge":
        return (lambda w, t, X, y: jnp.mean((X @ w - y) ** 2) + jnp.sum(jnp.exp(t) * w**2)), (
            lambda w, X, y: jnp.mean((X @ w - y) ** 2)
        )

    def bce(z, y):
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    return (lambda w, t, X, y: bce(X @ w, y) + jnp.sum(jnp.exp(t) * w**2)), (lambda w, X, y: bce(X @ w, y))


def exact_hypergradient(kind: str, data: dict[str, np.ndarray]) -> np.ndarray:
    f, g = torch_fns(kind)
    T = {k: torch.as_tensor(v) for k, v in data.items()}
    H = torch.func.hessian(f)(T["w"], T["theta"], T["Xt"], T["yt"])
    B = torch.func.jacrev(torch.func.grad(f), argnums=1)(T["w"], T["theta"], T["Xt"], T["yt"])
    gv = torch.func.grad(g)(T["w"], T["Xv"], T["yv"])
    return (-B.T @ torch.linalg.solve(H, gv)).numpy()


# ---------------------------------------------------------------------------- methods
def implicitdiff_method(
    kind: str, data: dict[str, np.ndarray], solver: idiff.LinearSolver | None, *, reuse: bool = False,
    compile_backward: bool = False,
) -> Callable[[], np.ndarray]:
    """One hypergradient step; with ``reuse`` the default solver keeps its factorization between calls
    (several backward calls at one solution), else every call factorizes afresh (a new outer step)."""
    f, g = torch_fns(kind)
    T = {k: torch.as_tensor(v) for k, v in data.items()}
    kwargs: dict[str, Any] = {"objective": f, "compile_backward": compile_backward}
    if solver is not None:
        kwargs["solver"] = solver
    w_star = T["w"]

    @idiff.implicit_diff(**kwargs)
    def given(w0, theta, X, y):
        return w_star

    w0 = torch.zeros_like(w_star)

    def run() -> np.ndarray:
        if isinstance(given.solver, idiff.Auto) and not reuse:
            given.solver.reset()
        theta = T["theta"].clone().requires_grad_(True)
        return torch.autograd.grad(g(given(w0, theta, T["Xt"], T["yt"]), T["Xv"], T["yv"]), theta)[0].numpy()

    return run


def handwritten_torch(kind: str, data: dict[str, np.ndarray], tol: float) -> Callable[[], np.ndarray]:
    """CG on H u = grad g with one linearization of grad f (torch.autograd), then -B^T u."""
    f, g = torch_fns(kind)
    T = {k: torch.as_tensor(v) for k, v in data.items()}

    def run() -> np.ndarray:
        w = T["w"].clone().requires_grad_(True)
        theta = T["theta"].clone().requires_grad_(True)
        gf = torch.autograd.grad(f(w, theta, T["Xt"], T["yt"]), w, create_graph=True)[0]
        wv = T["w"].clone().requires_grad_(True)
        gv = torch.autograd.grad(g(wv, T["Xv"], T["yv"]), wv)[0]

        def hvp(v):
            return torch.autograd.grad(gf, w, v, retain_graph=True)[0]

        u = torch.zeros_like(gv)
        r = gv.clone()
        p = r.clone()
        rr = float(r @ r)
        stop = tol**2 * rr
        for _ in range(10 * len(gv)):
            Ap = hvp(p)
            alpha = rr / float(p @ Ap)
            u += alpha * p
            r -= alpha * Ap
            rr_new = float(r @ r)
            if rr_new <= stop:
                break
            p = r + (rr_new / rr) * p
            rr = rr_new
        return (-torch.autograd.grad(gf, theta, u)[0]).numpy()

    return run


def torchopt_method(kind: str, data: dict[str, np.ndarray], tol: float) -> Callable[[], np.ndarray]:
    f, g = torch_fns(kind)
    T = {k: torch.as_tensor(v) for k, v in data.items()}
    grad_f = torch.func.grad(f)

    def optimality(w, theta, X, y):
        return grad_f(w, theta, X, y)

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(rtol=tol, atol=0.0, maxiter=10_000)
    )
    def given(w0, theta, X, y):
        return T["w"]

    w0 = torch.zeros_like(T["w"])

    def run() -> np.ndarray:
        theta = T["theta"].clone().requires_grad_(True)
        return torch.autograd.grad(g(given(w0, theta, T["Xt"], T["yt"]), T["Xv"], T["yv"]), theta)[0].numpy()

    return run


def jaxopt_method(kind: str, data: dict[str, np.ndarray], tol: float) -> Callable[[], np.ndarray]:
    f, g = jax_fns(kind)
    J = {k: jnp.asarray(v) for k, v in data.items()}
    optimality = jax.grad(f)
    solve = functools.partial(jaxopt.linear_solve.solve_cg, tol=tol, maxiter=10_000)

    @jaxopt.implicit_diff.custom_root(optimality, solve=solve)
    def given(w0, theta, X, y):
        return J["w"]

    hyper = jax.jit(jax.grad(lambda theta: g(given(jnp.zeros_like(J["w"]), theta, J["Xt"], J["yt"]), J["Xv"], J["yv"])))

    def run() -> np.ndarray:
        return np.asarray(hyper(J["theta"]).block_until_ready())

    return run


def optimistix_method(kind: str, data: dict[str, np.ndarray], tol: float) -> Callable[[], np.ndarray]:
    """Optimistix's implicit_jvp (the rule behind its ImplicitAdjoint) with a lineax CG, under jit."""
    g = jax_fns(kind)[1]
    J = {k: jnp.asarray(v) for k, v in data.items()}

    primal = _optx_primal
    rewrite = _optx_rewrite_ridge if kind == "ridge" else _optx_rewrite_logistic

    solver = lineax.CG(rtol=tol, atol=0.0, max_steps=10_000)
    tags = frozenset({lineax.positive_semidefinite_tag, lineax.symmetric_tag})

    def outer(theta, X, y, w, Xv, yv):
        root, _ = optimistix.internal.implicit_jvp(primal, rewrite, (theta, X, y, w), tags, solver)
        return g(root, Xv, yv)

    hyper = jax.jit(jax.grad(outer))

    def run() -> np.ndarray:
        return np.asarray(hyper(J["theta"], J["Xt"], J["yt"], J["w"], J["Xv"], J["yv"]).block_until_ready())

    return run


# Optimistix's implicit_jvp asserts that its functions are global (no closures)
def _optx_primal(inputs):
    return jax.lax.stop_gradient(inputs[3]), None


def _optx_rewrite_ridge(root, _, inputs):
    theta, X, y, _w = inputs
    return jax.grad(jax_fns("ridge")[0])(root, theta, X, y)


def _optx_rewrite_logistic(root, _, inputs):
    theta, X, y, _w = inputs
    return jax.grad(jax_fns("logistic")[0])(root, theta, X, y)


def methods(kind: str, data: dict[str, np.ndarray], tol: float) -> dict[str, Callable[[], np.ndarray]]:
    out: dict[str, Callable[[], np.ndarray]] = {
        f"implicitdiff CG (tol {tol:g})": implicitdiff_method(kind, data, idiff.CG(tol=tol)),
        "implicitdiff default (Auto: dense up to n = 256, else CG tol 1e-6)": implicitdiff_method(kind, data, None),
        "implicitdiff default, factorization reused": implicitdiff_method(kind, data, None, reuse=True),
        "implicitdiff default + compile_backward": implicitdiff_method(kind, data, None, compile_backward=True),
        f"implicitdiff CG (tol {tol:g}) + compile_backward": implicitdiff_method(
            kind, data, idiff.CG(tol=tol), compile_backward=True
        ),
        "implicitdiff Direct": implicitdiff_method(kind, data, idiff.Direct()),
        f"hand-written torch CG (tol {tol:g})": handwritten_torch(kind, data, tol),
    }
    if torchopt is not None:
        out[f"TorchOpt custom_root + CG (rtol {tol:g})"] = torchopt_method(kind, data, tol)
    if jax is not None and jaxopt is not None:
        out[f"JAXopt custom_root + CG, jit (tol {tol:g})"] = jaxopt_method(kind, data, tol)
    if jax is not None and optimistix is not None:
        out[f"Optimistix implicit_jvp + lineax CG, jit (rtol {tol:g})"] = optimistix_method(kind, data, tol)
    return out


def measure(kind: str, data: dict[str, np.ndarray], *, tol: float, rounds: int, repeats: int) -> list[dict[str, Any]]:
    exact = exact_hypergradient(kind, data)
    ms = methods(kind, data, tol)
    errors = {}
    for name, run in ms.items():  # warm-up (and jit compilation), outside the timings
        t0 = time.perf_counter()
        h = run()
        first = time.perf_counter() - t0
        run()
        errors[name] = (float(np.linalg.norm(h - exact) / np.linalg.norm(exact)), first)
    times: dict[str, list[float]] = {name: [] for name in ms}
    for _ in range(rounds):  # interleaved
        for name, run in ms.items():
            per = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                per.append(time.perf_counter() - t0)
            times[name].append(statistics.median(per))
    rows = []
    for name in ms:
        rows.append(
            {
                "problem": kind,
                "method": name,
                "median_ms": 1e3 * statistics.median(times[name]),
                "min_ms": 1e3 * min(times[name]),
                "max_ms": 1e3 * max(times[name]),
                "round_medians_ms": [1e3 * t for t in times[name]],
                "first_call_ms": 1e3 * errors[name][1],
                "relative_error": errors[name][0],
            }
        )
    return rows


def to_markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# Hypergradient step against the peers",
        "",
        f"float64, exact inner solution given, medians over {info['rounds']} interleaved rounds of "
        f"{info['repeats']} repeats, one thread for torch and XLA. Ratio: time / JAXopt's time in the same run. "
        "First call: includes JIT compilation for the JAX libraries.",
        "",
        f"Machine: {info['machine']}. Versions: {info['versions']}.",
        "",
    ]
    for kind in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == kind]
        ref = next((r["median_ms"] for r in sub if r["method"].startswith("JAXopt")), None)
        lines += [f"## {kind}", "", "| method | median (ms) | min-max over rounds (ms) | ratio to JAXopt | rel. error | first call (ms) |", "|---|---|---|---|---|---|"]
        for r in sub:
            ratio = f"{r['median_ms'] / ref:.2f}" if ref else "n/a"
            lines.append(
                f"| {r['method']} | {r['median_ms']:.3g} | {r['min_ms']:.3g}-{r['max_ms']:.3g} | {ratio} | "
                f"{r['relative_error']:.1e} | {r['first_call_ms']:.3g} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--problems", nargs="+", default=["logistic", "ridge"], choices=["logistic", "ridge"])
    ap.add_argument("--ridge-d", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for kind in args.problems:
        data = logistic_data() if kind == "logistic" else ridge_data(d=args.ridge_d)
        rows += measure(kind, data, tol=args.tol, rounds=args.rounds, repeats=args.repeats)
        for r in rows:
            if r["problem"] == kind:
                print(f"{kind:9s} {r['method']:60s} {r['median_ms']:9.3f} ms  err {r['relative_error']:.1e}", flush=True)
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "jax", "jaxlib", "jaxopt", "optimistix", "lineax", "torchopt", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    info = {
        "machine": machine_info("cpu"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "tol": args.tol,
    }
    info["machine"] = f"{info['machine'].get('cpu_model', '?')}, {info['machine'].get('usable_cores', '?')} cores"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_comparison.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    (args.out / "peer_comparison.md").write_text(to_markdown(rows, info))
    (args.out / "peer_comparison.rst").write_text(to_rst(rows))
    print(f"written {args.out / 'peer_comparison.json'}, .md and .rst")


TITLES = {
    "logistic": "Logistic regression, breast cancer (d = 30), one penalty per feature:",
    "ridge": "Ridge, n = 2000, d = 1000, one penalty per feature:",
}


def to_rst(rows: list[dict[str, Any]]) -> str:
    """One list-table per problem (median, ratio to JAXopt, error, first call), included by the docs."""
    out: list[str] = []
    for kind in dict.fromkeys(r["problem"] for r in rows):
        sub = [r for r in rows if r["problem"] == kind]
        ref = next((r["median_ms"] for r in sub if r["method"].startswith("JAXopt")), None)
        out += [f"**{TITLES.get(kind, kind)}**", "", ".. list-table::", "   :header-rows: 1",
                "   :widths: 46 13 12 12 14", "", "   * - method", "     - median (ms)", "     - ratio to JAXopt",
                "     - rel. error", "     - first call (ms)"]
        for r in sub:
            ratio = f"{r['median_ms'] / ref:.2f}" if ref else "n/a"
            out += [f"   * - {r['method']}", f"     - {r['median_ms']:.3g}", f"     - {ratio}",
                    f"     - {r['relative_error']:.1e}", f"     - {r['first_call_ms']:.3g}"]
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
