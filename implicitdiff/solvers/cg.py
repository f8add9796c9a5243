"""Conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import math

import torch

from ..diagnostics import SolveStatus
from .base import (
    LinearProblem,
    LinearSolver,
    RawSolution,
    check_no_graph,
    code,
    dot,
    fast_or_masked,
    finalize_status,
    running_status,
    safe_div,
)

__all__ = ["CG"]


class CG(LinearSolver):
    r"""Preconditioned conjugate gradients.

    Solves :math:`(A + \delta I) x = b` for a **symmetric positive definite** operator
    :math:`A` (e.g. the Hessian of a strongly convex inner objective, or iMAML's
    :math:`I + \nabla^2 L/\lambda`). In exact arithmetic it converges in at most ``n``
    iterations, each costing one product with :math:`A`.

    When it meets non-positive curvature :math:`p^\top A p \le 0` (the operator is not
    positive definite: a non-convex inner problem, or too few inner steps) it stops at once
    and reports :attr:`~implicitdiff.SolveStatus.NEGATIVE_CURVATURE`; the failure policy
    then applies. It returns the best iterate met in CG's own sense: the last one, since
    every step so far went along a direction of positive curvature and lowered the
    quadratic model :math:`\tfrac12 x^\top A x - b^\top x` (the truncated-CG rule of
    Steihaug). If NaN or infinity appears, the iterate with the smallest residual is
    returned instead. Never NaN.
    Remedies: ``damping`` (Levenberg-Marquardt), :class:`~implicitdiff.MINRES`, or
    :class:`~implicitdiff.GMRES`.

    Parameters are those of :class:`~implicitdiff.LinearSolver`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.tensor([1.0, 2.0]), solver=idiff.CG(tol=1e-6))
    >>> sol.value
    tensor([0.0909, 0.6364])
    >>> sol.info.iterations
    2
    """

    requires_symmetric = True

    def solve(self, problem: LinearProblem) -> RawSolution:
        return conjugate_gradient(problem)


def conjugate_gradient(problem: LinearProblem) -> RawSolution:
    """Run (preconditioned) CG on ``problem``; shared by :class:`CG` and :class:`NormalCG`."""
    return fast_or_masked(problem, _cg_fast, _cg_masked)


def _cg_fast(problem: LinearProblem) -> RawSolution:
    """Eager path with Python scalars: the fewest tensor operations per iteration."""
    A, M, x = problem.matvec, problem.preconditioner, problem.x0
    if bool(x.any()):
        Ax = A(x)
        check_no_graph(Ax)
        r = problem.b - Ax
    else:
        r = problem.b
    rr = float(dot(r, r))
    tol2 = float(problem.abs_tol) ** 2
    if rr <= tol2:
        return RawSolution(x, SolveStatus.CONVERGED, 0, math.sqrt(rr))
    z = r if M is None else M(r)
    rz = rr if M is None else float(dot(r, z))
    d = z
    best_x, best_rr = x, rr
    status = SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.MAX_ITERATIONS
    k = 0
    for k in range(1, problem.maxiter + 1):
        Ad = A(d)
        if k == 1:
            check_no_graph(Ad)
        dAd = float(dot(d, Ad))
        if not math.isfinite(dAd):
            return RawSolution(best_x, SolveStatus.NONFINITE, k - 1, math.sqrt(best_rr))
        if dAd <= 0.0:
            return RawSolution(x, SolveStatus.NEGATIVE_CURVATURE, k - 1, math.sqrt(rr))
        alpha = rz / dAd
        x = torch.add(x, d, alpha=alpha)
        r = torch.add(r, Ad, alpha=-alpha)
        rr = float(dot(r, r))
        if not math.isfinite(rr):
            return RawSolution(best_x, SolveStatus.NONFINITE, k, math.sqrt(best_rr))
        if rr < best_rr:
            best_x, best_rr = x, rr
        if rr <= tol2:
            return RawSolution(x, SolveStatus.CONVERGED, k, math.sqrt(rr))
        z = r if M is None else M(r)
        rz_new = rr if M is None else float(dot(r, z))
        d = torch.add(z, d, alpha=rz_new / rz)
        rz = rz_new
    return RawSolution(x, status, k, math.sqrt(rr))


def _cg_masked(problem: LinearProblem) -> RawSolution:
    """Tensor-scalar path: vmap-safe (masked updates) and differentiable."""
    A, M, x = problem.matvec, problem.precondition, problem.x0
    r = problem.b - A(x)
    z = M(r)
    d = z
    rz = dot(r, z)
    rnorm = torch.linalg.vector_norm(r)
    tol = problem.abs_tol
    status = running_status(problem, r)
    converged0 = rnorm <= tol
    status = torch.where(converged0, code(SolveStatus.CONVERGED, r), status)
    active = ~converged0
    iters = torch.zeros((), dtype=torch.int64, device=r.device)
    best_x, best_r = x, rnorm
    for _ in range(problem.maxiter):
        if not problem.keep_going(active):
            break
        Ad = A(d)
        dAd = dot(d, Ad)
        nonfinite = active & ~torch.isfinite(dAd)
        negative = active & ~nonfinite & (dAd <= 0)
        step = active & ~nonfinite & ~negative
        alpha = torch.where(step, safe_div(rz, dAd), torch.zeros_like(rz))
        x_new = x + alpha * d
        r_new = r - alpha * Ad
        rnorm_new = torch.linalg.vector_norm(r_new)
        bad = step & ~torch.isfinite(rnorm_new)
        step = step & ~bad
        x = torch.where(step, x_new, x)
        r = torch.where(step, r_new, r)
        rnorm = torch.where(step, rnorm_new, rnorm)
        z = M(r)
        rz_new = dot(r, z)
        beta = torch.where(step, safe_div(rz_new, rz), torch.zeros_like(rz))
        d = torch.where(step, z + beta * d, d)
        rz = torch.where(step, rz_new, rz)
        iters = iters + step.to(iters.dtype)
        better = step & (rnorm < best_r)
        best_x = torch.where(better, x, best_x)
        best_r = torch.where(better, rnorm, best_r)
        conv = step & (rnorm <= tol)
        status = torch.where(negative, code(SolveStatus.NEGATIVE_CURVATURE, r), status)
        status = torch.where(nonfinite | bad, code(SolveStatus.NONFINITE, r), status)
        status = torch.where(conv, code(SolveStatus.CONVERGED, r), status)
        active = step & ~conv
    # at negative curvature x is already the last iterate (the masked update froze it there)
    failed = status == int(SolveStatus.NONFINITE)
    x = torch.where(failed, best_x, x)
    rnorm = torch.where(failed, best_r, rnorm)
    st, it = finalize_status(problem, status, iters)
    return RawSolution(x, st, it, rnorm)
