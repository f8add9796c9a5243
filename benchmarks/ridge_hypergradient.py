"""Hypergradient of ridge regression with one penalty per feature: accuracy and speed.

Inner problem (training set, ``n`` samples, ``d`` features, float64)::

    w*(theta) = argmin_w  mean((X w - y)^2) + sum(exp(theta) * w^2)

Outer loss: validation mean squared error of ``w*``. The hypergradient
``d outer / d theta`` is computed by every method below and compared with the exact one
from a dense float64 solve with the Hessian ``H = 2 (X^T X / n + diag(exp(theta)))``:
``grad = -2 exp(theta) * w* * H^{-1} g`` with ``g`` the validation gradient at ``w*``.

Methods: implicitdiff with CG, GMRES, Neumann, Direct and Jacobian-free ``one_step``;
backpropagation through an unrolled gradient-descent inner loop (``mode="unrolled"``);
TorchOpt's ``custom_root`` with its CG (when TorchOpt is installed: an optional benchmark
dependency); and a minimal hand-written ``torch.func`` CG running the same number of
iterations as implicitdiff's CG (the overhead reference).

Two times are reported: the *hypergradient step* (from the inner solution ``w*`` to the
hypergradient: the library call with an inner solver that returns ``w*``, the outer loss and
the backward pass; for unrolled GD, the backward pass through its graph), and the whole
*outer step* (inner solve + hypergradient). All implicit methods share one inner solver: a
Cholesky solve with the Gram matrix ``X^T X / n``, precomputed once since it does not depend
on ``theta``.

Usage::

    python benchmarks/ridge_hypergradient.py [--quick] [--out benchmarks/results]
        [--sizes 100 1000] [--threads 1] [--repeats 5] [--ratio-rounds 5] [--device cpu]
        [--render results.json]

Writes ``ridge_hypergradient.json``, ``.md`` (markdown table), ``.rst`` (reST table included
by ``docs/benchmarks.rst``) and ``.png`` (bar chart) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import implicitdiff as idiff  # noqa: E402
from benchmarks._timing import Timing, graph_saved_bytes, machine_info, time_call  # noqa: E402

try:
    import torchopt

    # TorchOpt 0.7.3 calls the deprecated functorch.vjp: not our concern, keep the output readable
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchopt\.")
except ImportError:  # optional: the benchmark runs without it and says so
    torchopt = None

DTYPE = torch.float64
HYPERGRAD_DEF = "from w* to the hypergradient (library call + outer loss + backward)"


# ---------------------------------------------------------------------------- problem
def inner_objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ridge training loss with one penalty ``exp(log_lam[j])`` per feature."""
    return ((X @ w - y) ** 2).mean() + (log_lam.exp() * w**2).sum()


def inner_gradient(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of :func:`inner_objective` (what a hand-written GD loop uses)."""
    return 2.0 / X.shape[0] * (X.T @ (X @ w - y)) + 2.0 * log_lam.exp() * w


def outer_loss(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Validation mean squared error."""
    return ((X @ w - y) ** 2).mean()


@dataclasses.dataclass
class RidgeProblem:
    """Data, hyperparameters, the exact solution and the exact hypergradient of one size."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    log_lam: torch.Tensor
    gram: torch.Tensor  # X^T X / n, independent of log_lam
    xty: torch.Tensor  # X^T y / n
    w_star: torch.Tensor
    exact: torch.Tensor
    lipschitz: float  # largest Hessian eigenvalue
    strong_convexity: float  # smallest Hessian eigenvalue

    @property
    def d(self) -> int:
        return self.X_train.shape[1]

    @property
    def condition_number(self) -> float:
        return self.lipschitz / self.strong_convexity

    def data(self) -> tuple[torch.Tensor, ...]:
        return (self.X_train, self.y_train, self.X_val, self.y_val, self.gram, self.xty)

    def fresh_log_lam(self) -> torch.Tensor:
        return self.log_lam.detach().clone().requires_grad_(True)

    def closed_form(self, log_lam: torch.Tensor) -> torch.Tensor:
        """The shared inner solver: Cholesky solve of (X^T X / n + diag(lam)) w = X^T y / n."""
        chol = torch.linalg.cholesky(self.gram + torch.diag(log_lam.exp()))
        return torch.cholesky_solve(self.xty[:, None], chol)[:, 0]


def make_problem(n_train: int, n_val: int, d: int, *, seed: int, device: torch.device) -> RidgeProblem:
    """Synthetic regression with correlated features and a sparse true weight vector.

    Features have an AR(1) correlation 0.5 (a realistically conditioned Gram matrix); 10% of
    the true weights are non-zero; log-penalties are spread over [log 1e-2, log 1e-1].
    """
    gen = torch.Generator().manual_seed(seed)
    rho = 0.5

    def features(n: int) -> torch.Tensor:
        z = torch.randn(n, d, generator=gen, dtype=DTYPE)
        x = torch.empty_like(z)
        x[:, 0] = z[:, 0]
        for j in range(1, d):  # AR(1) across features: unit variance, correlation rho^|i-j|
            x[:, j] = rho * x[:, j - 1] + math.sqrt(1 - rho**2) * z[:, j]
        return x

    w_true = torch.zeros(d, dtype=DTYPE)
    support = torch.randperm(d, generator=gen)[: max(1, d // 10)]
    w_true[support] = torch.randn(len(support), generator=gen, dtype=DTYPE)
    X_train, X_val = features(n_train), features(n_val)
    y_train = X_train @ w_true + 0.5 * torch.randn(n_train, generator=gen, dtype=DTYPE)
    y_val = X_val @ w_true + 0.5 * torch.randn(n_val, generator=gen, dtype=DTYPE)
    log_lam = math.log(1e-2) + math.log(10.0) * torch.rand(d, generator=gen, dtype=DTYPE)
    X_train, y_train, X_val, y_val, log_lam = (t.to(device) for t in (X_train, y_train, X_val, y_val, log_lam))

    # exact reference, independent of autograd: dense float64 solves with the Hessian
    gram = X_train.T @ X_train / n_train
    xty = X_train.T @ y_train / n_train
    lam = log_lam.exp()
    hessian = 2.0 * (gram + torch.diag(lam))
    w_star = torch.linalg.solve(gram + torch.diag(lam), xty)
    g = 2.0 / n_val * (X_val.T @ (X_val @ w_star - y_val))
    exact = -2.0 * lam * w_star * torch.linalg.solve(hessian, g)
    eig = torch.linalg.eigvalsh(hessian)
    return RidgeProblem(
        X_train, y_train, X_val, y_val, log_lam, gram, xty, w_star, exact, float(eig[-1]), float(eig[0])
    )


# ---------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Method:
    """One way of computing the hypergradient.

    ``hypergrad_setup``/``hypergrad_body`` time the hypergradient step (``body(setup())``
    returns the hypergradient); ``outer_step`` computes it from scratch (inner solve
    included); ``graph_forward`` runs the forward pass whose graph is kept for the backward
    and returns ``(loss, log_lam)`` (for the memory and backward-only measurements), or is
    None for methods that keep no graph.
    """

    name: str
    family: str
    hypergrad_body: Callable[[Any], torch.Tensor]
    outer_step: Callable[[], torch.Tensor]
    hypergrad_setup: Callable[[], Any] | None = None
    graph_forward: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    note: str = ""
    iterations: Callable[[], int | None] | None = None  # for methods outside implicitdiff's solve log


def _autograd_hypergrad(loss_and_lam: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    loss, log_lam = loss_and_lam
    return torch.autograd.grad(loss, log_lam)[0]


def _root_closures(
    p: RidgeProblem, fit: Callable[..., torch.Tensor], given_solution: Callable[..., torch.Tensor]
) -> tuple[Callable[[Any], torch.Tensor], Callable[[], torch.Tensor], Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """The three timed closures of a library with a ``fit(w0, log_lam, X, y)`` decorator (implicitdiff, TorchOpt).

    ``given_solution`` returns the precomputed w*, so that ``hypergrad`` times the
    hypergradient step alone; ``outer_step`` runs the inner solve too.
    """
    w0 = torch.zeros_like(p.w_star)

    def hypergrad(_: Any) -> torch.Tensor:
        log_lam = p.fresh_log_lam()
        w = given_solution(w0, log_lam, p.X_train, p.y_train)
        return torch.autograd.grad(outer_loss(w, p.X_val, p.y_val), log_lam)[0]

    def outer_step() -> torch.Tensor:
        log_lam = p.fresh_log_lam()
        w = fit(w0, log_lam, p.X_train, p.y_train)
        return torch.autograd.grad(outer_loss(w, p.X_val, p.y_val), log_lam)[0]

    def graph_forward() -> tuple[torch.Tensor, torch.Tensor]:
        log_lam = p.fresh_log_lam()
        return outer_loss(given_solution(w0, log_lam, p.X_train, p.y_train), p.X_val, p.y_val), log_lam

    return hypergrad, outer_step, graph_forward


def implicitdiff_method(
    p: RidgeProblem, name: str, *, solver: idiff.LinearSolver | None = None, mode: str = "implicit", note: str = ""
) -> Method:
    """implicitdiff with the given backward solver; the inner solver is the shared closed form."""
    kwargs: dict[str, Any] = {"objective": inner_objective, "mode": mode}
    if solver is not None:
        kwargs["solver"] = solver

    @idiff.implicit_diff(**kwargs)
    def fit(w0: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return p.closed_form(log_lam)

    w_star = p.w_star.clone()

    @idiff.implicit_diff(**kwargs)
    def given_solution(w0: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return w_star  # w* already known: time the hypergradient step alone

    hypergrad, outer_step, graph_forward = _root_closures(p, fit, given_solution)
    return Method(name, "implicitdiff", hypergrad, outer_step, graph_forward=graph_forward, note=note)


def unrolled_method(p: RidgeProblem, steps: int) -> Method:
    """Backpropagation through ``steps`` of gradient descent (step 1/L), via ``mode="unrolled"``."""
    step = 1.0 / p.lipschitz

    @idiff.implicit_diff(objective=inner_objective, mode="unrolled")
    def fit(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for _ in range(steps):
            w = w - step * inner_gradient(w, log_lam, X, y)
        return w

    w0 = torch.zeros_like(p.w_star)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        log_lam = p.fresh_log_lam()
        return outer_loss(fit(w0, log_lam, p.X_train, p.y_train), p.X_val, p.y_val), log_lam

    def outer_step() -> torch.Tensor:
        return _autograd_hypergrad(forward())

    return Method(
        f"unrolled GD, K={steps}",
        "unrolled",
        _autograd_hypergrad,
        outer_step,
        hypergrad_setup=forward,
        graph_forward=forward,
        note=f"step 1/L; hypergradient time = backward through the {steps}-step graph",
    )


def _plain_cg(hvp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, iterations: int) -> torch.Tensor:
    """Textbook CG from zero for a fixed number of iterations: the hand-written baselines' solve."""
    u = torch.zeros_like(g)
    r = g.clone()
    d = r.clone()
    rr = r @ r
    for _ in range(iterations):
        hd = hvp(d)
        alpha = rr / (d @ hd)
        u = u + alpha * d
        r = r - alpha * hd
        rr_new = r @ r
        d = r + (rr_new / rr) * d
        rr = rr_new
    return u


def handwritten_cg_hypergrad(
    w_star: torch.Tensor, log_lam: torch.Tensor, p: RidgeProblem, iterations: int
) -> torch.Tensor:
    """Minimal hand-written implicit hypergradient with torch.func: plain CG, fixed iterations.

    Each Hessian-vector product is ``jvp(grad(f))`` (forward-over-reverse), rebuilt every
    product, as one writes it without a library.
    """
    X, y = p.X_train, p.y_train
    g = torch.func.grad(outer_loss)(w_star, p.X_val, p.y_val)
    grad_w = torch.func.grad(inner_objective)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(lambda w: grad_w(w, log_lam, X, y), (w_star,), (v,))[1]

    u = _plain_cg(hvp, g, iterations)
    _, vjp_lam = torch.func.vjp(lambda lam: grad_w(w_star, lam, X, y), log_lam)
    return -vjp_lam(u)[0]


def handwritten_linearized_cg_hypergrad(
    w_star: torch.Tensor, log_lam: torch.Tensor, p: RidgeProblem, iterations: int
) -> torch.Tensor:
    """As :func:`handwritten_cg_hypergrad`, but every product reuses one linearization.

    ``vjp(grad(f))`` is built once at ``w*``; each Hessian-vector product is then a
    backward pass through that saved graph (the Hessian is symmetric). This is the
    strongest simple hand-written baseline.
    """
    X, y = p.X_train, p.y_train
    g = torch.func.grad(outer_loss)(w_star, p.X_val, p.y_val)
    grad_w = torch.func.grad(inner_objective)
    _, vjp_w = torch.func.vjp(lambda w: grad_w(w, log_lam, X, y), w_star)
    u = _plain_cg(lambda v: vjp_w(v)[0], g, iterations)
    _, vjp_lam = torch.func.vjp(lambda lam: grad_w(w_star, lam, X, y), log_lam)
    return -vjp_lam(u)[0]


def handwritten_method(p: RidgeProblem, iterations: int, *, linearized: bool = False) -> Method:
    log_lam = p.log_lam.detach()
    fn = handwritten_linearized_cg_hypergrad if linearized else handwritten_cg_hypergrad

    def hypergrad(_: Any) -> torch.Tensor:
        return fn(p.w_star, log_lam, p, iterations)

    def outer_step() -> torch.Tensor:
        return fn(p.closed_form(log_lam), log_lam, p, iterations)

    if linearized:
        return Method(
            "hand-written CG, one linearization", "reference", hypergrad, outer_step,
            note="same iterations; hvp = vjp of grad(f), linearized once at w*", iterations=lambda: iterations,
        )
    return Method(
        "hand-written torch.func CG",
        "reference",
        hypergrad,
        outer_step,
        note="same iterations as implicitdiff CG; hvp = jvp(grad(f)) rebuilt per product",
        iterations=lambda: iterations,
    )


def torchopt_method(p: RidgeProblem, tol: float) -> Method:
    """TorchOpt ``custom_root`` with ``solve_cg`` on the same optimality condition."""
    grad_w = torch.func.grad(inner_objective)

    def optimality(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return grad_w(w, log_lam, X, y)

    cg = torchopt.linear_solve.solve_cg(rtol=tol, maxiter=10 * p.d)
    products: list[int] = []

    def solve(matvec: Callable[[Any], Any], b: Any) -> Any:
        # count the products: TorchOpt does not report iterations (one extra product for r0 = b - A x0)
        products.append(0)

        def counted(v: Any) -> Any:
            products[-1] += 1
            return matvec(v)

        return cg(counted, b)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def fit(w0: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return p.closed_form(log_lam.detach())

    w_star = p.w_star.clone()

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def given_solution(w0: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return w_star

    hypergrad, outer_step, graph_forward = _root_closures(p, fit, given_solution)
    return Method(
        f"TorchOpt {torchopt.__version__} custom_root + CG",
        "torchopt",
        hypergrad,
        outer_step,
        graph_forward=graph_forward,
        note=f"solve_cg(rtol={tol:g}); iterations = counted products - 1",
        iterations=lambda: products[-1] - 1 if products else None,
    )


def dense_method(p: RidgeProblem) -> Method:
    """The exact reference itself, timed: form the Hessian and solve densely."""

    def from_solution(w: torch.Tensor) -> torch.Tensor:
        lam = p.log_lam.exp()
        g = 2.0 / p.X_val.shape[0] * (p.X_val.T @ (p.X_val @ w - p.y_val))
        return -2.0 * lam * w * torch.linalg.solve(2.0 * (p.gram + torch.diag(lam)), g)

    return Method(
        "dense closed form (exact)",
        "exact",
        lambda _: from_solution(p.w_star),
        lambda: from_solution(p.closed_form(p.log_lam)),
        note="hand-derived formula, Gram matrix precomputed",
    )


# ---------------------------------------------------------------------------- measuring
def relative_error(h: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(h - exact) / torch.linalg.vector_norm(exact))


def solve_record(method: Method) -> tuple[torch.Tensor, list[idiff.SolveInfo]]:
    """One hypergradient with the implicitdiff solve log (and warnings kept quiet but recorded)."""
    state = method.hypergrad_setup() if method.hypergrad_setup else None
    with idiff.record_solves() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", idiff.LinearSolveWarning)
        h = method.hypergrad_body(state)
    return h.detach(), log


def graph_bytes(method: Method, p: RidgeProblem) -> int | None:
    if method.graph_forward is None:
        return None
    loss, _ = method.graph_forward()
    return graph_saved_bytes(loss, exclude=p.data())


def measure(method: Method, p: RidgeProblem, *, repeats: int, device: torch.device) -> dict[str, Any]:
    h, log = solve_record(method)
    backward = [s for s in log if s.kind == "backward"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", idiff.LinearSolveWarning)
        t_hyper = time_call(method.hypergrad_body, setup=method.hypergrad_setup, repeats=repeats, device=device)
        t_outer = time_call(lambda _: method.outer_step(), repeats=repeats, device=device)
        h_outer = method.outer_step().detach()
        t_backward = None
        if method.graph_forward is not None and method.graph_forward is not method.hypergrad_setup:
            t_backward = time_call(_autograd_hypergrad, setup=method.graph_forward, repeats=repeats, device=device)
    mem = graph_bytes(method, p)
    row = {
        "d": p.d,
        "method": method.name,
        "family": method.family,
        "relative_error": relative_error(h, p.exact),
        "relative_error_outer_step": relative_error(h_outer, p.exact),
        "iterations": backward[0].iterations if backward else (method.iterations() if method.iterations else None),
        "solve_status": backward[0].status.name if backward and backward[0].status is not None else None,
        "relative_residual": backward[0].relative_residual if backward else None,
        "hypergrad_time_s": t_hyper.median,
        "hypergrad_cpu_time_s": t_hyper.cpu_median,
        "hypergrad_times_s": list(t_hyper.times),
        "backward_only_time_s": None if t_backward is None else t_backward.median,
        "outer_step_time_s": t_outer.median,
        "outer_step_cpu_time_s": t_outer.cpu_median,
        "outer_step_times_s": list(t_outer.times),
        "graph_memory_bytes": mem,
        "note": method.note,
    }
    return row


def cg_overhead_ratio(
    cg: Method, references: dict[str, Method], *, rounds: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """implicitdiff-CG time / each reference's time for the hypergradient step, in interleaved rounds.

    Interleaving (A, B, C, A, B, C, ...) exposes all of them to the same background load
    on a shared machine; the spread over rounds says how much to trust one number. Ratios
    of wall times and of process CPU times are both kept (CPU time is the robust one on a
    loaded machine with one torch thread; wall time is the one that matters on a GPU).
    """
    lib: list[Timing] = []
    ref: dict[str, list[Timing]] = {key: [] for key in references}
    for _ in range(rounds):
        lib.append(time_call(cg.hypergrad_body, repeats=repeats, device=device))
        for key, m in references.items():
            ref[key].append(time_call(m.hypergrad_body, repeats=repeats, device=device))
    out: dict[str, Any] = {
        "rounds": rounds,
        "repeats_per_round": repeats,
        "implicitdiff_cg_times_s": [t.median for t in lib],
        "implicitdiff_cg_cpu_times_s": [t.cpu_median for t in lib],
    }
    for key in references:
        wall = [a.median / b.median for a, b in zip(lib, ref[key])]
        cpu = [a.cpu_median / b.cpu_median for a, b in zip(lib, ref[key])]
        out[key] = {
            "reference": references[key].name,
            "ratio_median": statistics.median(wall),
            "ratio_min": min(wall),
            "ratio_max": max(wall),
            "ratios": wall,
            "cpu_ratio_median": statistics.median(cpu),
            "cpu_ratio_min": min(cpu),
            "cpu_ratio_max": max(cpu),
            "cpu_ratios": cpu,
            "reference_times_s": [t.median for t in ref[key]],
            "reference_cpu_times_s": [t.cpu_median for t in ref[key]],
        }
    return out


def run_size(
    n_train: int, n_val: int, d: int, *, seed: int, repeats: int, ratio_rounds: int, device: torch.device,
    unrolled_steps: tuple[int, ...], neumann_budget: int, log: Callable[[str], None],
) -> dict[str, Any]:
    p = make_problem(n_train, n_val, d, seed=seed, device=device)
    log(f"d={d}: n_train={n_train}, n_val={n_val}, Hessian eigenvalues [{p.strong_convexity:.3g}, "
        f"{p.lipschitz:.3g}] (condition number {p.condition_number:.1f})")
    cg_tol = 1e-10
    methods = [
        implicitdiff_method(p, "implicitdiff CG", solver=idiff.CG(tol=cg_tol), note=f"tol={cg_tol:g}"),
        implicitdiff_method(p, "implicitdiff GMRES", solver=idiff.GMRES(tol=cg_tol), note=f"tol={cg_tol:g}, restart=20"),
        implicitdiff_method(
            p, "implicitdiff Neumann",
            solver=idiff.Neumann(step_size=1.0 / p.lipschitz, tol=None, maxiter=neumann_budget),
            note=f"step 1/L, fixed budget {neumann_budget} terms",
        ),
        implicitdiff_method(p, "implicitdiff Direct", solver=idiff.Direct(), note="Hessian materialized by d vmapped products"),
        implicitdiff_method(p, "implicitdiff one_step", mode="one_step", note="Jacobian-free: H replaced by I"),
    ]
    rows: list[dict[str, Any]] = []
    cg_row = measure(methods[0], p, repeats=repeats, device=device)
    rows.append(cg_row)
    log(_row_line(cg_row))
    handwritten = handwritten_method(p, cg_row["iterations"])
    linearized = handwritten_method(p, cg_row["iterations"], linearized=True)
    for m in [handwritten, linearized, *methods[1:]]:
        rows.append(measure(m, p, repeats=repeats, device=device))
        log(_row_line(rows[-1]))
    for k in unrolled_steps:
        rows.append(measure(unrolled_method(p, k), p, repeats=repeats, device=device))
        log(_row_line(rows[-1]))
    if torchopt is not None:
        rows.append(measure(torchopt_method(p, cg_tol), p, repeats=repeats, device=device))
        log(_row_line(rows[-1]))
    else:
        log("TorchOpt is not installed: its row is skipped (pip install torchopt==0.7.3)")
    rows.append(measure(dense_method(p), p, repeats=repeats, device=device))
    log(_row_line(rows[-1]))
    ratio = cg_overhead_ratio(
        methods[0], {"handwritten": handwritten, "handwritten_linearized": linearized},
        rounds=ratio_rounds, repeats=repeats, device=device,
    )
    for key in ("handwritten", "handwritten_linearized"):
        r = ratio[key]
        log(f"d={d}: implicitdiff CG / {r['reference']}: wall {r['ratio_median']:.3f} "
            f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}], CPU {r['cpu_ratio_median']:.3f} "
            f"[{r['cpu_ratio_min']:.3f}, {r['cpu_ratio_max']:.3f}] over {ratio_rounds} rounds")
    return {
        "d": d,
        "n_train": n_train,
        "n_val": n_val,
        "condition_number": p.condition_number,
        "hessian_eigenvalue_range": [p.strong_convexity, p.lipschitz],
        "rows": rows,
        "cg_overhead_ratio": ratio,
    }


# ---------------------------------------------------------------------------- reporting
def _ms(seconds: float) -> str:
    """Milliseconds to 3 significant digits, without exponent notation (1090, not 1.09e+03)."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mem(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    if nbytes < 1024**2:
        return f"{nbytes / 1024:.0f} KiB"
    return f"{nbytes / 1024**2:.1f} MiB"


def _cells(row: dict[str, Any]) -> list[str]:
    it = row["iterations"]
    status = row["solve_status"]
    return [
        str(row["d"]),
        row["method"],
        f"{row['relative_error']:.1e}",
        "-" if it is None else (str(it) if status in (None, "CONVERGED", "BUDGET_USED") else f"{it} ({status})"),
        _ms(row["hypergrad_time_s"]),
        _ms(row["hypergrad_cpu_time_s"]),
        _ms(row["outer_step_time_s"]),
        _mem(row["graph_memory_bytes"]),
        row["note"],
    ]


HEADER = ["d", "method", "rel. error", "iterations", "hypergradient (ms)", "hypergradient CPU (ms)", "outer step (ms)",
          "graph memory", "notes"]


def _row_line(row: dict[str, Any]) -> str:
    c = _cells(row)
    return (f"  {c[1]:<40} err {c[2]:>8}  it {c[3]:>6}  hyper {c[4]:>8} ms (CPU {c[5]:>8} ms)  outer {c[6]:>8} ms"
            f"  mem {c[7]:>9}")


def _ratio_text(size: dict[str, Any], key: str) -> str:
    rr = size["cg_overhead_ratio"]
    r = rr[key]
    return (f"d={size['d']}: time of implicitdiff CG / {r['reference']} (same iterations): "
            f"wall {r['ratio_median']:.3f} (range {r['ratio_min']:.3f}-{r['ratio_max']:.3f}), "
            f"CPU {r['cpu_ratio_median']:.3f} (range {r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f}); "
            f"medians of {rr['rounds']} interleaved rounds")


RATIO_KEYS = ("handwritten", "handwritten_linearized")


def _machine_text(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    load = m.get("load_average_1_5_15_min")
    load_text = f", load average {load[0]:g} at start" if load else ""
    return (f"{m['cpu_model']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores{load_text}, "
            f"torch {m['torch_version']} with {m['torch_threads']} thread(s), device {m['device']}{gpu}, "
            f"Python {m['python_version']}")


def to_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Ridge hypergradient benchmark",
        "",
        f"float64, n_train = {cfg['n_train']}, n_val = {cfg['n_val']}; median of {cfg['repeats']} repeats after warm-up. "
        f"Hypergradient time: {HYPERGRAD_DEF}; outer step: inner solve + hypergradient; wall-clock unless marked CPU "
        "(process CPU time, robust to other load on a shared machine). Relative error vs the dense float64 solution. "
        "Graph memory: tensors the autograd graph holds between forward and backward (data excluded).",
        "",
        f"Machine: {_machine_text(result)}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    for size in result["sizes"]:
        for row in size["rows"]:
            lines.append("| " + " | ".join(_cells(row)) + " |")
    lines.append("")
    for size in result["sizes"]:
        lines.append(f"- condition number of the Hessian at d={size['d']}: {size['condition_number']:.1f}")
    for size in result["sizes"]:
        lines.extend(f"- {_ratio_text(size, key)}" for key in RATIO_KEYS)
    return "\n".join(lines) + "\n"


RST_HEADER = ["method", "rel. error", "iterations", "hypergradient, CPU ms", "outer step, CPU ms", "graph memory"]
EMPTY = "—"  # an empty cell; a bare "-" in a list-table cell would be read as a bullet list


def _rst_cells(row: dict[str, Any]) -> list[str]:
    """The columns of the documentation's table (CPU times; wall-clock times and notes: in the CSV)."""
    c = _cells(row)
    outer_cpu = row.get("outer_step_cpu_time_s")
    return [c[1], c[2], c[3], c[5], c[6] if outer_cpu is None else _ms(outer_cpu), c[7]]


def _caption(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    load = m.get("load_average_1_5_15_min")
    load_text = f", load average {load[0]:g} at the start" if load else ""
    return (f"{m['cpu_model']}, {m['usable_cores']} cores, torch {m['torch_version']} with "
            f"{m['torch_threads']} thread(s), device {m['device']}{load_text}; float64, "
            f"n_train = n_val = {cfg['n_train']}, seed {cfg['seed']}, median of {cfg['repeats']} "
            f"repeats after {cfg.get('warmup', 1)} warm-up")


def to_rst(result: dict[str, Any], *, png_path: str = "/../benchmarks/results/ridge_hypergradient.png") -> str:
    """Tables, notes and the figure as reST (included by docs/benchmarks.rst).

    One narrow table per problem size (six columns that fit a page); what the methods are and
    the columns left out (wall-clock hypergradient time, solver settings) are in the notes
    below the tables and in the CSV file. Empty cells are an em dash, not ``-``. Image paths
    are relative to the documentation's source folder (a leading ``/``); a figure with a
    width links to its full-size image in Sphinx's HTML.
    """

    def esc(text: str) -> str:
        return text.replace("*", r"\*").replace("|", r"\|").replace("`", r"\`") or EMPTY

    cfg = result["config"]
    lines = [
        ".. This file is generated by benchmarks/ridge_hypergradient.py (--render JSON); do not edit.",
        "",
    ]
    notes: dict[str, str] = {}
    for size in result["sizes"]:
        lines += [
            f".. list-table:: d = {size['d']} features (condition number of the Hessian "
            f"{size['condition_number']:.1f})",
            "   :header-rows: 1",
            "   :widths: 34 11 11 16 14 14",
            "",
        ]
        for cells in [RST_HEADER] + [_rst_cells(row) for row in size["rows"]]:
            cells = [EMPTY if c in ("-", "") else c for c in cells]
            lines.append(f"   * - {esc(cells[0])}")
            lines.extend(f"     - {esc(c)}" for c in cells[1:])
        lines.append("")
        for row in size["rows"]:
            notes.setdefault(row["method"], row["note"])
    lines += ["Methods:", ""]
    lines += [f"- **{esc(method)}**: {esc(note)}." for method, note in notes.items() if note]
    lines += [
        "",
        f"Measured on: {_caption(result)}. Iterations: matrix-vector products of the backward "
        "solve; a status other than converged is given in parentheses. Graph memory: tensors "
        "held by the autograd graph between the forward and the backward pass (data excluded).",
        "",
    ]
    for size in result["sizes"]:
        lines.extend(f"- {_ratio_text(size, key)}." for key in RATIO_KEYS)
    lines += [
        "",
        f".. figure:: {png_path}",
        "   :width: 100%",
        "   :alt: Hypergradient CPU time and relative error of each method, for each problem size",
        "",
        f"   Left: median CPU time of the hypergradient step (log scale); right: relative error "
        f"of the hypergradient against the exact one (log scale; dashed line: 1e-6). Colours: "
        f"implicitdiff (blue), hand-written references (grey), unrolled (orange), TorchOpt "
        f"(green), the exact dense formula (black). Run: {esc(_caption(result))}; unrolled GD with K = "
        f"{', '.join(map(str, cfg['unrolled_steps']))} steps, Neumann budget {cfg['neumann_budget']} terms. "
        "Click for the full-size image.",
        "",
    ]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["d", "method", "family", "relative_error", "iterations", "solve_status", "relative_residual",
               "hypergrad_time_s", "hypergrad_cpu_time_s", "outer_step_time_s", "outer_step_cpu_time_s",
               "graph_memory_bytes", "note"]


def to_csv(result: dict[str, Any]) -> str:
    """Every row with every measured column (seconds and bytes, unrounded)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for size in result["sizes"]:
        for row in size["rows"]:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def plot(result: dict[str, Any], path: Path) -> None:
    """Time and error per method, one row of two panels per problem size, sized for a web page.

    10-point text on a 9-inch figure at 100 dpi: about 11 px on a page 740 px wide, and the
    documentation links the full-size image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sizes = result["sizes"]
    # CPU time on a CPU run (robust to other load on the machine), wall time on an accelerator
    use_cpu = result["machine"]["device"] == "cpu"
    key, label = ("hypergrad_cpu_time_s", "CPU") if use_cpu else ("hypergrad_time_s", "wall")
    palette = {"implicitdiff": "tab:blue", "unrolled": "tab:orange", "torchopt": "tab:green",
               "reference": "tab:gray", "exact": "black"}
    with plt.rc_context({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
                         "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "legend.fontsize": 9.5}):
        fig, axes = plt.subplots(len(sizes), 2, figsize=(9.5, 4.1 * len(sizes) + 0.9), squeeze=False,
                                 gridspec_kw={"width_ratios": [1.15, 1]})
        for (ax_t, ax_e), size in zip(axes, sizes):
            rows = size["rows"]
            names = [r["method"] for r in rows]
            ypos = list(range(len(rows)))
            colors = [palette.get(r["family"], "tab:gray") for r in rows]
            ax_t.barh(ypos, [r[key] * 1e3 for r in rows], color=colors)
            ax_t.set_xscale("log")
            ax_t.set_yticks(ypos, names)
            ax_t.invert_yaxis()
            ax_t.set_xlabel(f"hypergradient step, median {label} time (ms, log)")
            ax_t.set_title(f"d = {size['d']}: time")
            ax_t.grid(axis="x", alpha=0.3)
            # the exact reference has error 0 by definition: no bar, a label
            errs = [float("nan") if r["family"] == "exact" else max(r["relative_error"], 1e-17) for r in rows]
            ax_e.barh(ypos, errs, color=colors)
            for y, r in zip(ypos, rows):
                if r["family"] == "exact":
                    ax_e.text(1e-16, y, "reference (error 0)", va="center")
            ax_e.set_xscale("log")
            ax_e.set_yticks(ypos, [""] * len(rows))
            ax_e.set_ylim(len(rows) - 0.5, -0.5)  # top to bottom, as the time panel (NaN bars do not autoscale)
            ax_e.set_xlim(1e-17, 10.0)
            ax_e.axvline(1e-6, color="k", ls="--", lw=0.8)
            ax_e.set_xlabel("relative error vs exact (log)")
            ax_e.set_title(f"d = {size['d']}: error")
            ax_e.grid(axis="x", alpha=0.3)
        handles = [Patch(color=palette[f], label=name) for f, name in (
            ("implicitdiff", "implicitdiff"), ("reference", "hand-written reference"),
            ("unrolled", "unrolled GD"), ("torchopt", "TorchOpt"), ("exact", "exact"))]
        handles.append(plt.Line2D([], [], color="k", ls="--", lw=0.8, label="error 1e-6"))
        fig.legend(handles=handles, loc="lower center", ncol=6, frameon=False, columnspacing=1.0)
        m, cfg = result["machine"], result["config"]
        fig.suptitle(f"Ridge hypergradient, float64, n = {cfg['n_train']}; {m['cpu_model']}, "
                     f"torch {m['torch_version']}, {m['torch_threads']} thread(s)", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(path, dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds); for smoke checks")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="feature counts d (default 100 1000)")
    ap.add_argument("--n", type=int, default=None, help="n_train = n_val (default 2000)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (reported)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5, quick 3)")
    ap.add_argument("--ratio-rounds", type=int, default=None, help="interleaved rounds for the CG overhead ratio")
    ap.add_argument("--unrolled-steps", type=int, nargs="+", default=[50, 200], help="K for unrolled GD")
    ap.add_argument("--neumann-budget", type=int, default=200, help="Neumann series terms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="do not run: re-render the markdown, reST and PNG from a saved JSON result")
    args = ap.parse_args(argv)
    quick = {"sizes": [20, 60], "n": 200, "repeats": 3, "ratio_rounds": 2}
    full = {"sizes": [100, 1000], "n": 2000, "repeats": 5, "ratio_rounds": 5}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:  # explicit values (even invalid ones) are kept and checked below
            setattr(args, name, value)
    for name in ("n", "repeats", "ratio_rounds", "threads", "neumann_budget"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(d < 1 for d in args.sizes) or any(k < 1 for k in args.unrolled_steps):
        ap.error("--sizes and --unrolled-steps must be positive integers")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render is not None:  # re-render tables and chart from a saved run
        result = json.loads(args.render.read_text())
        write_results(result, args.out)
        return result
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "ridge_hypergradient",
        "config": {
            "n_train": args.n, "n_val": args.n, "sizes": args.sizes, "dtype": "float64", "repeats": args.repeats,
            "warmup": 1, "ratio_rounds": args.ratio_rounds, "unrolled_steps": args.unrolled_steps,
            "neumann_budget": args.neumann_budget, "seed": args.seed, "quick": args.quick,
            "hypergradient_time": HYPERGRAD_DEF, "outer_step_time": "inner solve (shared Cholesky) + hypergradient",
        },
        "machine": machine_info(device),
        "implicitdiff_version": idiff.__version__,
        "torchopt_version": None if torchopt is None else torchopt.__version__,
        "sizes": [],
    }
    print(f"machine: {_machine_text(result)}")
    for d in args.sizes:
        result["sizes"].append(run_size(
            args.n, args.n, d, seed=args.seed, repeats=args.repeats, ratio_rounds=args.ratio_rounds, device=device,
            unrolled_steps=tuple(args.unrolled_steps), neumann_budget=args.neumann_budget, log=print,
        ))
    result["total_time_s"] = time.perf_counter() - start
    write_results(result, args.out)
    print(f"total {result['total_time_s']:.0f} s")
    return result


def write_results(result: dict[str, Any], out: Path) -> None:
    """Write the JSON, markdown, reST and PNG outputs, and print the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "ridge_hypergradient"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(result))
    stem.with_suffix(".rst").write_text(to_rst(result))
    stem.with_suffix(".csv").write_text(to_csv(result))
    plot(result, stem.with_suffix(".png"))
    print()
    print(to_markdown(result))
    print(f"wrote {stem}.{{json,md,rst,csv,png}}")


if __name__ == "__main__":
    main()
