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
    floor_status,
    running_status,
    safe_div,
    solved_to_working_precision,
)

__all__ = ["CG"]

#: Curvature ``d^T A d`` at or below ``_ZERO_CURVATURE * eps * d^T M^-1 d * ||M A||`` is not positive:
#: it cannot be told from zero in floating point (a singular operator), and dividing by it blows up.
_ZERO_CURVATURE = 10.0


class CG(LinearSolver):
    r"""Preconditioned conjugate gradients.

    Solves :math:`(A + \delta I) x = b` for a **symmetric positive definite** operator
    :math:`A` (e.g. the Hessian of a strongly convex inner objective, or iMAML's
    :math:`I + \nabla^2 L/\lambda`). In exact arithmetic it converges in at most ``n``
    iterations, each costing one product with :math:`A`.

    When it meets non-positive curvature it stops at once and reports
    :attr:`~implicitdiff.SolveStatus.NEGATIVE_CURVATURE`; the failure policy then applies.
    Non-positive means :math:`p^\top A p \le 10\,\varepsilon\,(p^\top M^{-1} p)\,\|MA\|`
    (:math:`\|MA\|` estimated by the largest Rayleigh quotient met, ``M`` the preconditioner,
    the identity without one): a negative eigenvalue (an indefinite
    operator: a non-convex inner problem, or too few inner steps), or a zero one (a singular
    operator, whose system may have no solution: CG would divide by zero and blow up). It
    then returns the iterate with the **smallest residual** met, the initial guess included,
    so the result is never worse than the initial guess and never NaN or infinite (the last
    iterate can be much worse than doing nothing on an indefinite system). The same holds if
    NaN or infinity appears. If that residual is already at the rounding floor
    (:math:`100\,\varepsilon(\|A\|\|x\| + \|b\|)`, a singular but consistent system
    solved as well as the dtype allows), the status is ``STAGNATED`` (``BUDGET_USED`` with
    ``tol=None``) instead. At ``MAX_ITERATIONS`` (and ``BUDGET_USED``) the last iterate is
    returned, as CG's error in the energy norm decreases monotonically.
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
    """Run (preconditioned) CG on ``problem``."""
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
    zero_curv = _ZERO_CURVATURE * torch.finfo(r.dtype).eps
    anorm = 0.0  # largest Rayleigh quotient d^T A d / d^T M^-1 d met: estimates ||M A|| from below
    beta = dd = 0.0
    status = SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.MAX_ITERATIONS
    k = 0
    for k in range(1, problem.maxiter + 1):
        Ad = A(d)
        if k == 1:
            check_no_graph(Ad)
        dAd = float(dot(d, Ad))
        # ||d||^2 in the preconditioner's geometry, d^T M^{-1} d, by the recurrence d = z + beta d_old
        # (z^T M^{-1} d_old = r^T d_old = 0): no extra product, no extra sync
        dd = rz if k == 1 else rz + beta * beta * dd
        if not math.isfinite(dAd):
            return RawSolution(best_x, SolveStatus.NONFINITE, k - 1, math.sqrt(best_rr))
        if dAd > 0.0 and dd > 0.0:
            anorm = max(anorm, dAd / dd)
        if dAd <= zero_curv * dd * anorm:  # negative or zero curvature (dAd <= 0 included)
            best_r = math.sqrt(best_rr)
            xnorm, bnorm = float(torch.linalg.vector_norm(best_x)), float(torch.linalg.vector_norm(problem.b))
            floor = solved_to_working_precision(best_r, anorm, xnorm, bnorm, r.dtype)
            status = floor_status(problem) if floor else SolveStatus.NEGATIVE_CURVATURE
            return RawSolution(best_x, status, k - 1, best_r)
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
        beta = rz_new / rz
        d = torch.add(z, d, alpha=beta)
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
    zero_curv = _ZERO_CURVATURE * torch.finfo(r.dtype).eps
    anorm = torch.zeros_like(rnorm)  # largest Rayleigh quotient met
    dd = rz  # d^T M^{-1} d, by the recurrence of the fast path
    for _ in range(problem.maxiter):
        if not problem.keep_going(active):
            break
        Ad = A(d)
        dAd = dot(d, Ad)
        nonfinite = active & ~(torch.isfinite(dAd) & torch.isfinite(dd))
        rayleigh = safe_div(dAd, dd)
        anorm = torch.where(active & ~nonfinite & (dAd > 0) & (dd > 0), torch.maximum(anorm, rayleigh), anorm)
        negative = active & ~nonfinite & (dAd <= zero_curv * dd * anorm)
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
        dd = torch.where(step, rz_new + beta * beta * dd, dd)
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
    # a failure returns the iterate with the smallest residual met (never worse than x0)
    curvature = status == int(SolveStatus.NEGATIVE_CURVATURE)
    failed = (status == int(SolveStatus.NONFINITE)) | curvature
    x = torch.where(failed, best_x, x)
    rnorm = torch.where(failed, best_r, rnorm)
    # stopped at the rounding floor: as good as the dtype allows, not an indefinite operator
    floor = solved_to_working_precision(
        rnorm, anorm, torch.linalg.vector_norm(x), torch.linalg.vector_norm(problem.b), r.dtype
    )
    status = torch.where(curvature & floor, code(floor_status(problem), r), status)
    st, it = finalize_status(problem, status, iters)
    return RawSolution(x, st, it, rnorm)
