"""Solving ``A x = b`` matrix-free over pytrees: :func:`linear_solve`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, cast

import torch

from ._functorch import any_true, is_wrapped, physical, under_functorch, under_vmap
from ._tree import PyTree, Raveler, describe, leaves, tree_structure
from .diagnostics import SolveInfo, SolveStatus, report
from .errors import ImplicitDiffError, NonFiniteError
from .preconditioners import OperatorPreconditioner
from .solvers.base import LinearProblem, LinearSolver
from .solvers.gmres import GMRES

__all__ = ["linear_solve", "LinearSolution"]


class LinearSolution(NamedTuple):
    """Result of :func:`linear_solve`.

    Attributes
    ----------
    value : pytree of tensors
        The solution, with the structure of the right-hand side.
    info : SolveInfo
        Diagnostics: iterations, residual norm, status, ``converged``.
    """

    value: PyTree
    info: SolveInfo


def check_solver(solver: Any, where: str) -> LinearSolver:
    """Reject anything that is not a :class:`LinearSolver` instance, with a hint (private)."""
    if isinstance(solver, type) and issubclass(solver, LinearSolver):
        raise TypeError(
            f"{where}: solver must be a solver instance, got the class {solver.__name__}; write {solver.__name__}()"
        )
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            f"{where}: solver must be an implicitdiff.LinearSolver (e.g. idiff.CG(), idiff.GMRES()), "
            f"got {type(solver).__name__}"
        )
    return solver


def _private(fn: Callable[[torch.Tensor], torch.Tensor], single_leaf: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """User code gets its own copy of the vector (it may write into it) and its output is copied when
    it could alias a buffer the user reuses; the solver keeps every tensor it still needs."""
    if single_leaf:
        return lambda v: fn(v.clone()).clone()
    return lambda v: fn(v.clone())


_STOCHASTIC_NOTE = "products on minibatches: the residual is an estimate"


def _true_residual(op: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.linalg.vector_norm(b - op(x)).detach()


def solve_flat(
    solver: LinearSolver,
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    raveler: Raveler,
    x0: torch.Tensor | None = None,
    rmatvec_factory: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None,
    kind: str = "linear_solve",
    function: str = "",
    stochastic: bool = False,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve on flat vectors with scaling, damping, preconditioning, verification and reporting (private).

    Nothing is differentiated through the solver's iterations: callers attach derivatives by the
    adjoint rule. After the solver stops, the *true* residual ``||b - A x||`` is recomputed with one
    product: a ``CONVERGED`` that it does not confirm is rerun from ``x`` (residual replacement) and
    reported as ``STAGNATED`` if that does not help; a failed solve never returns an iterate worse
    than the initial guess. ``raveler`` describes the pytree behind the flat vectors (for the
    preconditioner). ``stochastic``: the products are taken on minibatches (marked in the record).
    """
    eager = not under_vmap()
    name = solver.name
    where = f" in the {kind} solve of {function!r}" if function else ""
    n = b.shape[-1]
    if n == 0:  # an empty system: the empty solution, nothing to iterate
        info = SolveInfo(name, kind, SolveStatus.CONVERGED, 0, 0.0, 0.0, function)
        report(info, solver.on_failure)
        return torch.zeros_like(b), info
    if eager:
        if not bool(torch.isfinite(b).all()):
            info = SolveInfo(
                name, kind, SolveStatus.NONFINITE, 0, float("nan"), float("nan"), function, "right-hand side"
            )
            raise NonFiniteError(
                f"{name}{where}: the right-hand side has non-finite values (NaN or inf): "
                "the outer loss or its gradient is not finite",
                info,
            )
        scale_t = b.detach().abs().amax()
        scale: Any = float(scale_t)  # a float when eager, else a 0-d tensor
        if scale == 0.0:  # A x = 0 has the solution 0: no iterations, no division by zero
            info = SolveInfo(name, kind, SolveStatus.CONVERGED, 0, 0.0, 0.0, function)
            report(info, solver.on_failure)
            return torch.zeros_like(b), info
    else:
        scale_t = b.abs().amax()
        scale_t = torch.where(scale_t > 0, scale_t, torch.ones_like(scale_t))
        scale = scale_t
    bn = b / scale
    x0n = torch.zeros_like(bn) if x0 is None else x0.to(bn.dtype) / scale
    damping = solver.damping
    op = matvec if damping == 0.0 else (lambda v: matvec(v) + damping * v)
    bnorm = torch.linalg.vector_norm(bn)
    if solver.tol is None:
        abs_tol = torch.finfo(bn.dtype).eps * bnorm  # fixed budget: stop only at machine precision
    else:
        abs_tol = torch.clamp(solver.tol * bnorm, min=solver.atol / scale) if eager else torch.maximum(
            solver.tol * bnorm, solver.atol / scale
        )
    if eager:
        abs_tol = _to_float(abs_tol)
    precond = None
    if isinstance(solver.preconditioner, OperatorPreconditioner):  # built from the operator (Nystrom)
        precond = solver.preconditioner.bind(op, bn, _batched_products(matvec, damping))
    elif solver.preconditioner is not None:
        user_m = solver.preconditioner
        precond = _private(lambda v: raveler.ravel(user_m(raveler.unravel(v))), raveler.single)
    if rmatvec_factory is not None and damping != 0.0:
        base_factory = rmatvec_factory

        def rmatvec_factory():
            rm = base_factory()
            return lambda v: rm(v) + damping * v

    maxiter = solver.maxiter if solver.maxiter is not None else solver.default_maxiter(n)
    problem = LinearProblem(
        matvec=op,
        b=bn,
        x0=x0n,
        abs_tol=abs_tol,
        maxiter=maxiter,
        fixed_budget=solver.tol is None,
        eager=eager,
        differentiable=False,
        preconditioner=precond,
        matmat=_batched_products(matvec, damping),
        _rmatvec_factory=rmatvec_factory,
    )
    raw = solver.solve(problem)
    if not eager:
        x, statuses, iteration_counts, res = _verify_batched(solver, problem, raw, op, bnorm, x0 is not None)
        info = _batched_info(solver, statuses, iteration_counts, res, bnorm, scale, kind, function)
        report(info, solver.on_failure)
        return x * scale, info
    x, status, iterations, res_n, note = _verify(solver, problem, raw, op, float(bnorm), x0 is not None)
    info = SolveInfo(
        solver=name,
        kind=kind,
        status=status,
        iterations=iterations,
        residual_norm=res_n * scale,
        relative_residual=res_n / max(float(bnorm.detach()), 1e-300),
        function=function,
        message="; ".join(m for m in (note, _STOCHASTIC_NOTE if stochastic else "") if m),
        stochastic=stochastic,
    )
    report(info, solver.on_failure)
    return x * scale, info


def _batched_products(
    matvec: Callable[[torch.Tensor], torch.Tensor], damping: float
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Rows ``v -> (A + damping I) v`` of a matrix in one call, when ``matvec`` carries a ``batched`` form."""
    batched = getattr(matvec, "batched", None)
    if batched is None:
        return None
    if damping == 0.0:
        return batched
    return lambda rows: batched(rows) + damping * rows


#: how often a CONVERGED that the true residual does not confirm is rerun from its iterate
_RESTARTS = 3


def _verify(
    solver: LinearSolver, problem: LinearProblem, raw: Any, op: Callable[[torch.Tensor], torch.Tensor], bnorm: float,
    warm: bool,
) -> tuple[torch.Tensor, SolveStatus, int, float, str]:
    """Eager truth check: the status is decided on the true residual (see :func:`solve_flat`)."""
    x = raw.x
    status = raw.status if isinstance(raw.status, SolveStatus) else SolveStatus(int(raw.status))
    iterations = int(raw.iterations)
    finite = bool(torch.isfinite(x).all())
    if not finite:
        return x, SolveStatus.NONFINITE, iterations, float("nan"), ""
    res = float(_true_residual(op, problem.b, x))
    note = ""
    if status == SolveStatus.CONVERGED and res > problem.abs_tol and solver.checks_true_residual:
        if problem.fixed_budget:
            status = SolveStatus.BUDGET_USED
        else:
            estimate_met = True
            for _ in range(_RESTARTS):
                remaining = problem.maxiter - iterations
                if remaining <= 0:
                    status = SolveStatus.MAX_ITERATIONS
                    break
                rerun = solver.solve(dataclasses.replace(problem, x0=x, maxiter=remaining))
                iterations += int(rerun.iterations)
                rerun_finite = bool(torch.isfinite(rerun.x).all())
                new_res = float(_true_residual(op, problem.b, rerun.x)) if rerun_finite else float("inf")
                improved = new_res < 0.5 * res
                if new_res < res:
                    x, res = rerun.x, new_res
                if res <= problem.abs_tol:
                    status = SolveStatus.CONVERGED
                    break
                rerun_status = SolveStatus(int(rerun.status))
                if rerun_status != SolveStatus.CONVERGED:
                    status, estimate_met = rerun_status, False
                    break
                if not improved:
                    status = SolveStatus.STAGNATED
                    break
            else:
                status = SolveStatus.STAGNATED
            if status == SolveStatus.STAGNATED and estimate_met:
                eps = torch.finfo(problem.b.dtype).eps
                note = (
                    f"true relative residual {res / max(bnorm, 1e-300):.2e} above the tolerance although the solver's "
                    f"estimate met it; {problem.b.dtype} has eps {eps:.1e}"
                )
    if not status.ok and solver.tol is not None and 0 < solver.tol < 10 * torch.finfo(problem.b.dtype).eps:
        precision = (
            f"tol={solver.tol:g} is below what {problem.b.dtype} can reach "
            f"(eps {torch.finfo(problem.b.dtype).eps:.1e}): "
            "loosen tol or solve in float64"
        )
        note = f"{note}; {precision}" if note else precision
    if not status.ok and status != SolveStatus.NONFINITE:
        r0 = float(_true_residual(op, problem.b, problem.x0)) if warm else bnorm
        if res > r0:  # never hand back an iterate worse than the initial guess
            x, res = problem.x0, r0
            note = (note + "; " if note else "") + "the iterates were worse than the initial guess, which is returned"
    return x, status, iterations, res, note


def _verify_batched(
    solver: LinearSolver, problem: LinearProblem, raw: Any, op: Callable[[torch.Tensor], torch.Tensor],
    bnorm: torch.Tensor, warm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The truth check of :func:`_verify` with masks, for solves run under vmap (one rerun)."""
    x = raw.x
    status = torch.as_tensor(raw.status, device=x.device).to(torch.int64)
    iterations = torch.as_tensor(raw.iterations, device=x.device).to(torch.int64)
    res = _true_residual(op, problem.b, x)
    finite = torch.isfinite(res) & torch.isfinite(x).all()
    status = torch.where(finite, status, torch.full_like(status, int(SolveStatus.NONFINITE)))
    converged = status == int(SolveStatus.CONVERGED)
    unconfirmed = converged & (res > problem.abs_tol) & finite
    if solver.checks_true_residual and any_true(unconfirmed):
        if problem.fixed_budget:
            status = torch.where(unconfirmed, torch.full_like(status, int(SolveStatus.BUDGET_USED)), status)
        else:
            rerun = solver.solve(dataclasses.replace(problem, x0=x))
            new_res = _true_residual(op, problem.b, rerun.x)
            take = unconfirmed & torch.isfinite(new_res) & (new_res < res)
            x = torch.where(take, rerun.x, x)
            res = torch.where(take, new_res, res)
            extra = torch.as_tensor(rerun.iterations, device=x.device).to(torch.int64)
            iterations = iterations + torch.where(unconfirmed, extra, torch.zeros_like(extra))
            ok_now = res <= problem.abs_tol
            status = torch.where(
                unconfirmed,
                torch.where(ok_now, status, torch.full_like(status, int(SolveStatus.STAGNATED))),
                status,
            )
    failed = (status != int(SolveStatus.CONVERGED)) & (status != int(SolveStatus.BUDGET_USED)) & finite
    r0 = _true_residual(op, problem.b, problem.x0) if warm else bnorm.detach()
    worse = failed & (res > r0)
    x = torch.where(worse, problem.x0, x)
    res = torch.where(worse, r0, res)
    return x, status, iterations, res


# failures in decreasing order of severity: the one reported for a batch
_SEVERITY = (
    SolveStatus.NONFINITE,
    SolveStatus.DIVERGED,
    SolveStatus.BREAKDOWN,
    SolveStatus.NEGATIVE_CURVATURE,
    SolveStatus.LEAST_SQUARES,
    SolveStatus.STAGNATED,
    SolveStatus.MAX_ITERATIONS,
    SolveStatus.BUDGET_USED,
    SolveStatus.CONVERGED,
)


def _batched_info(
    solver: LinearSolver,
    status_t: torch.Tensor,
    iterations_t: torch.Tensor,
    res: torch.Tensor,
    bnorm: torch.Tensor,
    scale: torch.Tensor,
    kind: str,
    function: str,
) -> SolveInfo:
    """One SolveInfo summarizing a batch of solves run under vmap.

    Python cannot branch on values under vmap, but it can read them through the batching
    layers once the solve is done: the batch's worst status is reported (and the failure
    policy applied to it), with the largest iteration count and relative residual.
    """
    status = physical(status_t).reshape(-1).tolist()
    iterations = physical(iterations_t).reshape(-1)
    rel = physical((res / bnorm.clamp_min(torch.finfo(res.dtype).tiny)).detach()).reshape(-1)
    abs_res = physical((res * scale).detach()).reshape(-1)
    present = {SolveStatus(int(c)) for c in status}
    worst = next(s for s in _SEVERITY if s in present)
    failed = sum(not SolveStatus(int(c)).ok for c in status)
    return SolveInfo(
        solver=solver.name,
        kind=kind,
        status=worst,
        iterations=int(iterations.max()),
        residual_norm=float(abs_res.max()),
        relative_residual=float(rel.max()),
        function=function,
        message=f"worst of a vmapped batch of {len(status)} solves, {failed} not successful",
        batch_size=len(status),
        batch_failures=failed,
    )


def _to_float(value: float | torch.Tensor) -> float:
    # not torch.as_tensor: that would round a Python float through float32
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


_HIGHER_ORDER_MESSAGE = (
    "linear_solve: a higher-order derivative with respect to tensors that matvec closes over is not supported "
    "(first derivatives are exact; the operator's tensors are invisible to the derivative rule of the solve). "
    "Pass the operator's tensors explicitly instead: implicit_diff(optimality_fn=lambda x, A, b: A @ x - b) "
    "around a function returning linear_solve(...).value gives exact derivatives of every order."
)


class _Inverse(torch.autograd.Function):
    """``r -> A^{-1} r`` evaluated at ``r ~ 0`` (value 0) whose derivatives are solves with ``A``.

    :func:`linear_solve` returns ``x* - A^{-1}(A x* - b)`` with ``x*`` the solver's (detached)
    answer: the value is ``x*`` and the derivative is ``A^{-1}(db - dA x*)``, the adjoint rule,
    exact whatever the solver did, for ``b`` and for every tensor the matvec closes over.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(ops: Any, r: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(r)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.ops = inputs[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, ctx.ops.solve(grad, transpose=True)

    @staticmethod
    def jvp(ctx: Any, _ops_tangent: Any, r_tangent: torch.Tensor) -> torch.Tensor:
        return ctx.ops.solve(r_tangent, transpose=False)


class _RefuseHigherOrder(torch.autograd.Function):
    """Identity whose own derivative raises: marks a first derivative that must not be differentiated again."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise ImplicitDiffError(_HIGHER_ORDER_MESSAGE)


class _Operator:
    """The flat operator of one :func:`linear_solve` call, for the derivative solves of :class:`_Inverse`."""

    def __init__(
        self, solver: LinearSolver, matvec: Callable, rmatvec: Callable | None, raveler: Raveler, like: torch.Tensor
    ) -> None:
        self.solver = solver
        self.matvec = matvec
        self.raveler = raveler
        self.like = like
        self._rmatvec = rmatvec

    def rmatvec(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.solver.requires_symmetric:
            return self.matvec
        if self._rmatvec is None:
            _, vjp = torch.func.vjp(self.matvec, torch.zeros_like(self.like))  # type: ignore[misc]  # typed as a 2- or 3-tuple
            self._rmatvec = lambda u: vjp(u)[0]
        return self._rmatvec

    def solve(self, rhs: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        mv = self.rmatvec() if transpose else self.matvec
        rmv = self.matvec if transpose else self._rmatvec
        try:
            out = cast(torch.Tensor, _solve_differentiable(self.solver, mv, rmv, rhs, self.raveler,
                                                           kind="adjoint" if transpose else "tangent"))
        except RuntimeError as err:
            if "level" in str(err) and "INTERNAL ASSERT" in str(err):
                raise ImplicitDiffError(_HIGHER_ORDER_MESSAGE) from err
            raise
        if torch.is_grad_enabled() and not under_functorch():
            # create_graph: if the operator's closure requires grad, a second derivative would miss the
            # operator's own dependence; the first derivative stands, differentiating it again raises
            with torch.enable_grad():
                if mv(rhs.detach()).requires_grad:
                    out = _RefuseHigherOrder.apply(out)
        return out


def _forward_ad_active() -> bool:
    return torch._C._is_fwd_grad_enabled() and torch.autograd.forward_ad._current_level >= 0


def _has_tangent(t: torch.Tensor) -> bool:
    return not is_wrapped(t) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _solve_differentiable(
    solver: LinearSolver,
    flat_mv: Callable[[torch.Tensor], torch.Tensor],
    flat_rmv: Callable[[torch.Tensor], torch.Tensor] | None,
    b: torch.Tensor,
    raveler: Raveler,
    *,
    x0: torch.Tensor | None = None,
    kind: str = "linear_solve",
) -> tuple[torch.Tensor, SolveInfo] | torch.Tensor:
    """Solve without a graph, then attach the adjoint derivative (see :class:`_Inverse`)."""
    if flat_rmv is not None:
        factory = lambda: flat_rmv  # noqa: E731
    else:

        def factory() -> Callable[[torch.Tensor], torch.Tensor]:  # A^T by a vjp of the (un-detached) matvec
            _, vjp = torch.func.vjp(flat_mv, torch.zeros_like(b.detach()))  # type: ignore[misc]  # typed as a 2- or 3-tuple
            return lambda u: vjp(u)[0].detach()

    detached_mv = lambda v: flat_mv(v).detach()  # noqa: E731  (no graph and no tangents in the iterations)
    with torch.no_grad():
        x, info = solve_flat(
            solver, detached_mv, b.detach(), raveler=raveler, x0=None if x0 is None else x0.detach(),
            rmatvec_factory=factory, kind=kind,
        )
    x = x.detach()
    if torch.is_grad_enabled() or under_functorch() or _forward_ad_active():
        residual = flat_mv(x) - b  # carries the graph to b and to the operator's tensors
        if residual.requires_grad or is_wrapped(residual) or _has_tangent(residual):
            x = x - _Inverse.apply(_Operator(solver, flat_mv, flat_rmv, raveler, b.detach()), residual)
    return x if kind in ("adjoint", "tangent") else (x, info)


def linear_solve(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    solver: LinearSolver | None = None,
    *,
    x0: PyTree | None = None,
    rmatvec: Callable[[PyTree], PyTree] | None = None,
) -> LinearSolution:
    """Solve ``A x = b`` where ``A`` is given only by its product ``matvec``.

    Parameters
    ----------
    matvec : callable
        ``x -> A x``, a linear map from pytrees shaped like ``b`` to the same. Only products
        are taken: ``A`` is never formed (except by :class:`~implicitdiff.Direct`).
    b : tensor or pytree of tensors
        Right-hand side, floating point.
    solver : LinearSolver, optional
        Default :class:`~implicitdiff.GMRES` (no assumption on ``A``); use
        :class:`~implicitdiff.CG` for symmetric positive definite ``A``.
    x0 : pytree, optional
        Initial guess (warm start).
    rmatvec : callable, optional
        ``y -> A^T y``; only :class:`~implicitdiff.NormalCG` needs it and derives it from
        ``matvec`` by a vector-Jacobian product when omitted.

    Returns
    -------
    LinearSolution
        ``value`` (the solution, structured like ``b``) and ``info`` (a
        :class:`~implicitdiff.SolveInfo`). The solver's failure policy has been applied.

    Raises
    ------
    NonFiniteError
        When ``b`` or the iterates contain NaN or infinity.
    LinearSolveError
        When the solve fails and the solver's ``on_failure`` is ``"raise"``.

    Notes
    -----
    The right-hand side is divided by its largest absolute entry before the solve and the
    solution multiplied back, so that a right-hand side of 1e-30 in float32 (whose squared
    norm underflows) is solved as accurately as one of 1.

    Derivatives follow the adjoint rule, never the solver's iterations: the reverse-mode
    cotangent of ``b`` is ``u = A^{-T} x_bar`` (one more solve with the same solver) and that of
    every tensor ``matvec`` closes over is ``-u x^T`` through a vector-Jacobian product of
    ``matvec``; forward mode solves ``A x_dot = b_dot - A_dot x``. Both are exact whatever
    the solver did (also at ``b = 0``) and work under ``torch.func`` transforms and
    ``vmap``. Derivatives of second and higher order are exact with respect to ``b``; with
    respect to the operator's closure tensors they raise :class:`~implicitdiff.ImplicitDiffError`
    (use :func:`~implicitdiff.implicit_diff` with the operator's tensors as arguments).
    When gradients are enabled the call costs one more product (to attach the derivative).

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.tensor([1.0, 2.0]), solver=idiff.CG(tol=1e-8))
    >>> sol.info.converged, sol.info.iterations
    (True, 2)

    Pytrees work the same way:

    >>> b = {"w": torch.ones(2), "c": torch.tensor(2.0)}
    >>> sol = idiff.linear_solve(lambda v: {"w": 2 * v["w"], "c": 4 * v["c"]}, b, solver=idiff.CG())
    >>> sol.value["c"]
    tensor(0.5000)
    """
    solver = check_solver(GMRES() if solver is None else solver, "linear_solve")
    b_leaves = leaves(b)
    if not b_leaves:
        raise ImplicitDiffError("linear_solve: b has no tensor leaves")
    for leaf in b_leaves:
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise ImplicitDiffError(f"linear_solve: b must be a pytree of floating-point tensors, got {describe(b)}")
    raveler = Raveler(b)
    flat_mv = _private(_square_checked(raveler, matvec, "matvec"), raveler.single)
    flat_rmv = None if rmatvec is None else _private(_square_checked(raveler, rmatvec, "rmatvec"), raveler.single)
    if x0 is not None and (tree_structure(x0) != raveler.spec or [t.shape for t in leaves(x0)] != raveler.shapes):
        raise ImplicitDiffError(
            f"linear_solve: x0 must have the structure and shapes of b ({describe(b)}), got {describe(x0)}"
        )
    x0_flat = None if x0 is None else raveler.ravel(x0)
    x, info = _solve_differentiable(solver, flat_mv, flat_rmv, raveler.ravel(b), raveler, x0=x0_flat)
    return LinearSolution(raveler.unravel(x), info)


def _square_checked(
    raveler: Raveler, fn: Callable[[PyTree], PyTree], what: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` on flat vectors; its output must have b's structure and shapes (a square operator)."""

    def flat(v: torch.Tensor) -> torch.Tensor:
        out = fn(raveler.unravel(v))
        out_leaves = leaves(out)
        if tree_structure(out) != raveler.spec or any(
            not isinstance(t, torch.Tensor) or t.shape != s for t, s in zip(out_leaves, raveler.shapes)
        ):
            raise ImplicitDiffError(
                f"linear_solve: {what} must map a vector shaped like b to one shaped like b (a square operator); "
                f"b is {describe(raveler.unravel(v))}, {what}(b) is {describe(out)}. For a non-square or "
                "least-squares problem solve the normal equations A^T A x = A^T b."
            )
        return raveler.ravel(out)

    return flat

