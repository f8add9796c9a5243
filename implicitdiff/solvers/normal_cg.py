"""Conjugate gradients on the normal equations, as CGLS (CGNR tracking the true residual)."""

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

__all__ = ["NormalCG"]

#: ``||A p|| <= _ZERO_CURVATURE * eps * ||A|| ||p||``: ``A p`` is rounding noise, ``p`` in the null space of ``A``.
_ZERO_CURVATURE = 10.0


def _thresholds(dtype: torch.dtype) -> tuple[float, float]:
    """``(singular, stalled)``: ``||A^T r|| / (||A|| ||r||)`` below ``eps**(2/3)``, or below
    ``sqrt(eps)`` while ``||r||`` no longer decreases, makes ``x`` a least-squares solution.

    For a non-singular ``A`` the ratio is at least ``1 / cond(A)``, so neither fires below a
    condition number of ``eps ** -0.5`` (7e7 in float64), where CG on the normal equations,
    which squares it, has long stopped being accurate.
    """
    eps = float(torch.finfo(dtype).eps)
    return eps ** (2.0 / 3.0), eps**0.5


class NormalCG(LinearSolver):
    r"""CG on the normal equations :math:`A^\top A x = A^\top b`, as CGLS.

    Works for any (even non-symmetric, even singular) operator because :math:`A^\top A` is
    symmetric positive semi-definite, at the price of **squaring the condition number** (so
    it converges slowly, and loses accuracy, beyond a condition number of about
    :math:`\varepsilon^{-1/2}`) and of two products per iteration, one with :math:`A` and one
    with :math:`A^\top` (derived automatically by a vector-Jacobian product when not given).
    ``damping`` applies to :math:`A` (it solves :math:`(A+\delta I)^\top(A+\delta I) x = (A+\delta I)^\top b`).

    It is the CGLS form (Hestenes & Stiefel; Björck), which updates the residual
    :math:`r = b - A x` of the original system itself (``q = A p``, ``r -= alpha q``,
    ``s = A^T r``): each iterate minimizes :math:`\|b - A x\|` over the Krylov space, so the
    residual decreases monotonically, and the tolerance is tested on it, as for every other
    solver (:math:`\|b - A x\| \le \max(\text{tol}\,\|b\|, \text{atol})`), not on the
    normal-equation residual :math:`\|A^\top r\|`, which can be small while :math:`\|r\|` is not.

    Statuses: ``CONVERGED`` when :math:`\|r\|` meets the tolerance; ``LEAST_SQUARES`` when
    :math:`\|A^\top r\|` has become negligible, :math:`\le \varepsilon^{2/3}\|A\|\|r\|` (or
    :math:`\le \sqrt\varepsilon\,\|A\|\|r\|` with :math:`\|r\|` no longer decreasing;
    :math:`\|A\|` estimated from the products; with a preconditioner ``M``, in its geometry:
    :math:`\|M^{1/2} A^\top r\|` and :math:`\|A M^{1/2}\|`) while :math:`\|r\|` is above the
    tolerance:
    the system is inconsistent and ``x`` is a least-squares solution (``STAGNATED``,
    ``BUDGET_USED`` with ``tol=None``, if :math:`\|r\|` is at the rounding floor
    :math:`100\,\varepsilon(\|A\|\|x\| + \|b\|)`: a consistent system solved as well as
    the dtype allows); ``MAX_ITERATIONS``
    (``BUDGET_USED`` with ``tol=None``); ``BREAKDOWN`` when a search direction is numerically
    in the null space of :math:`A` without ``x`` being a least-squares solution (a
    preconditioner that is not positive definite); ``NONFINITE``.

    Parameters are those of :class:`~implicitdiff.LinearSolver`; a preconditioner, if
    given, must be symmetric positive definite and approximate :math:`(A^\top A)^{-1}`
    (it is applied to :math:`A^\top r`).

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[1.0, 2.0], [-3.0, 1.0]])
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.NormalCG(tol=1e-6))
    >>> torch.allclose(A @ sol.value, torch.ones(2), atol=1e-5)
    True
    """

    def solve(self, problem: LinearProblem) -> RawSolution:
        return fast_or_masked(problem, _cgls_fast, _cgls_masked)


def _cgls_fast(problem: LinearProblem) -> RawSolution:
    """Eager path with Python scalars: one sync per iteration.

    With a preconditioner ``M`` every test works in its geometry, that of CG on
    ``M^{1/2} A^T A M^{1/2}``: ``gamma = s^T M s`` stands for ``||A^T r||^2`` and
    ``pMp = p^T M^{-1} p`` (by the recurrence ``gamma + beta^2 pMp``) for ``||p||^2``.
    """
    A, At, M, x = problem.matvec, problem.rmatvec, problem.preconditioner, problem.x0
    if bool(x.any()):
        Ax = A(x)
        check_no_graph(Ax)
        r = problem.b - Ax
    else:
        r = problem.b
    s = At(r)
    check_no_graph(s)
    z = s if M is None else M(s)
    rr, gamma = torch.stack((dot(r, r), dot(s, z))).tolist()
    tol2 = float(problem.abs_tol) ** 2
    singular, stalled = _thresholds(r.dtype)
    zero_curv = _ZERO_CURVATURE * torch.finfo(r.dtype).eps
    if not (math.isfinite(rr) and math.isfinite(gamma)):
        return RawSolution(x, SolveStatus.NONFINITE, 0, math.sqrt(rr) if math.isfinite(rr) else None)
    if rr <= tol2:
        return RawSolution(x, SolveStatus.CONVERGED, 0, math.sqrt(rr))
    if gamma < 0.0:  # the preconditioner is not positive definite
        return RawSolution(x, SolveStatus.BREAKDOWN, 0, math.sqrt(rr))
    anorm2 = gamma / rr  # ||A^T r||^2 / ||r||^2 <= ||A||^2: the estimate of ||A||^2 grows from below
    bnorm = math.sqrt(float(dot(problem.b, problem.b)))

    def least_squares(x: torch.Tensor, rr: float, anorm2: float) -> SolveStatus:
        # at the rounding floor a consistent system is solved as well as the dtype allows
        floor = solved_to_working_precision(
            math.sqrt(rr), math.sqrt(anorm2), float(torch.linalg.vector_norm(x)), bnorm, r.dtype
        )
        return floor_status(problem) if floor else SolveStatus.LEAST_SQUARES

    if gamma <= singular**2 * anorm2 * rr:  # A^T b = 0: x0 is already a least-squares solution
        return RawSolution(x, least_squares(x, rr, anorm2), 0, math.sqrt(rr))
    p, pMp = z, gamma
    status = SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.MAX_ITERATIONS
    k = 0
    for k in range(1, problem.maxiter + 1):
        q = A(p)
        qq_t = dot(q, q)
        alpha = gamma / qq_t  # a tensor: no sync before the update
        x_new = x + alpha * p
        r_new = r - alpha * q
        s_new = At(r_new)
        z_new = s_new if M is None else M(s_new)
        vals = torch.stack((qq_t, dot(r_new, r_new), dot(s_new, z_new))).tolist()  # the one sync
        if not all(math.isfinite(t) for t in vals):
            return RawSolution(x, SolveStatus.NONFINITE, k - 1, math.sqrt(rr))
        qq, rr_new, gamma_new = vals
        anorm2 = max(anorm2, qq / pMp)
        if qq <= zero_curv**2 * anorm2 * pMp:  # A p is rounding noise: p is in the null space of A
            st = least_squares(x, rr, anorm2) if gamma <= stalled**2 * anorm2 * rr else SolveStatus.BREAKDOWN
            return RawSolution(x, st, k - 1, math.sqrt(rr))
        if rr_new > 0.0:
            anorm2 = max(anorm2, gamma_new / rr_new)
        no_progress = rr_new >= rr * (1.0 - stalled)
        x, r, s, z, rr = x_new, r_new, s_new, z_new, rr_new
        if rr <= tol2:
            return RawSolution(x, SolveStatus.CONVERGED, k, math.sqrt(rr))
        if gamma_new < 0.0:  # the preconditioner is not positive definite
            return RawSolution(x, SolveStatus.BREAKDOWN, k, math.sqrt(rr))
        if gamma_new <= singular**2 * anorm2 * rr or (no_progress and gamma_new <= stalled**2 * anorm2 * rr):
            return RawSolution(x, least_squares(x, rr, anorm2), k, math.sqrt(rr))
        beta = gamma_new / gamma
        p = torch.add(z, p, alpha=beta)
        pMp = gamma_new + beta * beta * pMp
        gamma = gamma_new
    return RawSolution(x, status, k, math.sqrt(rr))


def _cgls_masked(problem: LinearProblem) -> RawSolution:
    """Tensor-scalar path: vmap-safe (masked updates) and differentiable (tests of the fast path)."""
    A, At, M, x = problem.matvec, problem.rmatvec, problem.precondition, problem.x0
    r = problem.b - A(x)
    s = At(r)
    z = M(s)
    rr, gamma = dot(r, r), dot(s, z)
    tol2 = torch.as_tensor(problem.abs_tol, dtype=r.dtype, device=r.device) ** 2
    singular, stalled = _thresholds(r.dtype)
    zero_curv = _ZERO_CURVATURE * torch.finfo(r.dtype).eps
    status = running_status(problem, r)
    finite0 = torch.isfinite(rr) & torch.isfinite(gamma)
    conv0 = finite0 & (rr <= tol2)
    brk0 = finite0 & ~conv0 & (gamma < 0)
    anorm2 = torch.where(finite0, safe_div(gamma, rr), torch.zeros_like(rr))
    ls0 = finite0 & ~conv0 & ~brk0 & (gamma <= singular**2 * anorm2 * rr)
    status = torch.where(~finite0, code(SolveStatus.NONFINITE, r), status)
    status = torch.where(conv0, code(SolveStatus.CONVERGED, r), status)
    status = torch.where(brk0, code(SolveStatus.BREAKDOWN, r), status)
    status = torch.where(ls0, code(SolveStatus.LEAST_SQUARES, r), status)
    active = finite0 & ~conv0 & ~ls0 & ~brk0
    iters = torch.zeros((), dtype=torch.int64, device=r.device)
    p, pMp = z, gamma
    for _ in range(problem.maxiter):
        if not problem.keep_going(active):
            break
        q = A(p)
        qq = dot(q, q)
        alpha = safe_div(gamma, qq)
        x_new = x + alpha * p
        r_new = r - alpha * q
        s_new = At(r_new)
        z_new = M(s_new)
        rr_new, gamma_new = dot(r_new, r_new), dot(s_new, z_new)
        finite = torch.isfinite(qq) & torch.isfinite(rr_new) & torch.isfinite(gamma_new)
        nonfinite = active & ~finite
        anorm2_n = torch.maximum(anorm2, safe_div(qq, pMp))
        null_dir = active & finite & (qq <= zero_curv**2 * anorm2_n * pMp)
        null_ls = null_dir & (gamma <= stalled**2 * anorm2_n * rr)
        step = active & finite & ~null_dir
        anorm2_n = torch.where(rr_new > 0, torch.maximum(anorm2_n, safe_div(gamma_new, rr_new)), anorm2_n)
        no_progress = rr_new >= rr * (1.0 - stalled)
        x = torch.where(step, x_new, x)
        r = torch.where(step, r_new, r)
        s = torch.where(step, s_new, s)
        z = torch.where(step, z_new, z)
        rr = torch.where(step, rr_new, rr)
        anorm2 = torch.where(active & finite, anorm2_n, anorm2)
        iters = iters + step.to(iters.dtype)
        conv = step & (rr <= tol2)
        brk = (step & ~conv & (gamma_new < 0)) | (null_dir & ~null_ls)
        ls = step & ~conv & ~brk & (
            (gamma_new <= singular**2 * anorm2 * rr) | (no_progress & (gamma_new <= stalled**2 * anorm2 * rr))
        )
        status = torch.where(nonfinite, code(SolveStatus.NONFINITE, r), status)
        status = torch.where(brk, code(SolveStatus.BREAKDOWN, r), status)
        status = torch.where(ls | null_ls, code(SolveStatus.LEAST_SQUARES, r), status)
        status = torch.where(conv, code(SolveStatus.CONVERGED, r), status)
        active = step & ~conv & ~ls & ~brk
        beta = torch.where(active, safe_div(gamma_new, gamma), torch.zeros_like(gamma))
        p = torch.where(active, z + beta * p, p)
        pMp = torch.where(active, gamma_new + beta * beta * pMp, pMp)
        gamma = torch.where(active, gamma_new, gamma)
    rnorm = torch.sqrt(rr)
    floor = solved_to_working_precision(
        rnorm, torch.sqrt(anorm2), torch.linalg.vector_norm(x), torch.linalg.vector_norm(problem.b), r.dtype
    )
    status = torch.where((status == int(SolveStatus.LEAST_SQUARES)) & floor, code(floor_status(problem), r), status)
    st, it = finalize_status(problem, status, iters)
    return RawSolution(x, st, it, rnorm)
