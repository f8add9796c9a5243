"""Solving ``A x = b`` matrix-free over pytrees: :func:`linear_solve`."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from ._functorch import physical, under_functorch, under_vmap
from ._tree import PyTree, Raveler, describe, leaves
from .diagnostics import SolveInfo, SolveStatus, report
from .errors import ImplicitDiffError, NonFiniteError
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
        raise TypeError(f"{where}: solver must be a solver instance, got the class {solver.__name__}; write {solver.__name__}()")
    if not isinstance(solver, LinearSolver):
        raise TypeError(
            f"{where}: solver must be an implicitdiff.LinearSolver (e.g. idiff.CG(), idiff.GMRES()), "
            f"got {type(solver).__name__}"
        )
    return solver


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
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve on flat vectors with scaling, damping, preconditioning and reporting (private).

    ``raveler`` describes the pytree behind the flat vectors (for the preconditioner).
    """
    eager = not under_vmap()
    # differentiating through the solve is possible only with grad mode on and a graph to extend;
    # solvers also check that their first product carries no graph before taking a fast path
    differentiable = torch.is_grad_enabled() and (b.requires_grad or under_functorch())
    name = solver.name
    where = f" in the {kind} solve of {function!r}" if function else ""
    n = b.shape[-1]
    if eager:
        if not bool(torch.isfinite(b).all()):
            info = SolveInfo(name, kind, SolveStatus.NONFINITE, 0, float("nan"), float("nan"), function, "right-hand side")
            raise NonFiniteError(
                f"{name}{where}: the right-hand side has non-finite values (NaN or inf): "
                "the outer loss or its gradient is not finite",
                info,
            )
        scale_t = b.detach().abs().amax()
        scale = float(scale_t)
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
    if solver.preconditioner is not None:
        user_m = solver.preconditioner
        precond = lambda v: raveler.ravel(user_m(raveler.unravel(v)))  # noqa: E731
    if rmatvec_factory is not None and damping != 0.0:
        base_factory = rmatvec_factory

        def rmatvec_factory():
            rm = base_factory()
            return lambda v: rm(v) + damping * v

    problem = LinearProblem(
        matvec=op,
        b=bn,
        x0=x0n,
        abs_tol=abs_tol,
        maxiter=solver.maxiter if solver.maxiter is not None else solver.default_maxiter(n),
        fixed_budget=solver.tol is None,
        eager=eager,
        differentiable=differentiable,
        preconditioner=precond,
        _rmatvec_factory=rmatvec_factory,
    )
    raw = solver.solve(problem)
    x = raw.x * scale
    if not eager:
        info = _batched_info(solver, raw, bn, op, bnorm, scale, kind, function)
        report(info, solver.on_failure)
        return x, info
    res = raw.residual_norm
    if res is None:
        with torch.no_grad():
            res = torch.linalg.vector_norm(bn - op(raw.x))
    res_n = _to_float(res)
    status = raw.status if isinstance(raw.status, SolveStatus) else SolveStatus(int(raw.status))
    if status != SolveStatus.NONFINITE and not bool(torch.isfinite(raw.x).all()):
        status = SolveStatus.NONFINITE
    info = SolveInfo(
        solver=name,
        kind=kind,
        status=status,
        iterations=int(raw.iterations),
        residual_norm=res_n * scale,
        relative_residual=res_n / max(float(bnorm.detach()), 1e-300),
        function=function,
    )
    report(info, solver.on_failure)
    return x, info


# failures in decreasing order of severity: the one reported for a batch
_SEVERITY = (
    SolveStatus.NONFINITE,
    SolveStatus.BREAKDOWN,
    SolveStatus.NEGATIVE_CURVATURE,
    SolveStatus.MAX_ITERATIONS,
    SolveStatus.BUDGET_USED,
    SolveStatus.CONVERGED,
)


def _batched_info(
    solver: LinearSolver,
    raw: Any,
    bn: torch.Tensor,
    op: Callable[[torch.Tensor], torch.Tensor],
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
    res = raw.residual_norm
    if res is None:
        with torch.no_grad():
            res = torch.linalg.vector_norm(bn - op(raw.x))
    res = torch.as_tensor(res, dtype=bn.dtype, device=bn.device)
    status = physical(torch.as_tensor(raw.status)).reshape(-1).tolist()
    iterations = physical(torch.as_tensor(raw.iterations)).reshape(-1)
    rel = physical((res / bnorm.clamp_min(torch.finfo(bn.dtype).tiny)).detach()).reshape(-1)
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
    norm underflows) is solved as accurately as one of 1. The call is differentiable when
    gradients are enabled (by differentiating through the iterations; exactly with
    :class:`~implicitdiff.Direct`) and works under ``torch.func.vmap``.

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
    flat_mv = raveler.wrap(matvec)
    factory = None
    if rmatvec is not None:
        flat_rmv = raveler.wrap(rmatvec)
        factory = lambda: flat_rmv  # noqa: E731
    x0_flat = None if x0 is None else raveler.ravel(x0)
    x, info = solve_flat(solver, flat_mv, raveler.ravel(b), raveler=raveler, x0=x0_flat, rmatvec_factory=factory)
    return LinearSolution(raveler.unravel(x), info)

