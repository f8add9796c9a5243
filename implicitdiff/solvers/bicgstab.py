"""BiCGSTAB for general non-symmetric systems."""

from __future__ import annotations

import torch

from ..diagnostics import SolveStatus
from .base import LinearProblem, LinearSolver, RawSolution, code, dot, finalize_status, running_status, safe_div

__all__ = ["BiCGSTAB"]


class BiCGSTAB(LinearSolver):
    r"""Stabilized bi-conjugate gradients (van der Vorst, 1992) for general square systems.

    Short recurrences (constant memory, unlike GMRES) and two products with :math:`A` per
    iteration; convergence is irregular and it can break down (reported as
    :attr:`~implicitdiff.SolveStatus.BREAKDOWN`) when :math:`\hat r^\top r` or the
    stabilizing step vanish. Right-preconditioned, so the tested residual is the true one.

    Parameters are those of :class:`~implicitdiff.LinearSolver`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])   # non-symmetric
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.BiCGSTAB(tol=1e-10))
    >>> torch.allclose(A @ sol.value, torch.ones(2), atol=1e-6)
    True
    """

    def solve(self, problem: LinearProblem) -> RawSolution:
        A, M = problem.matvec, problem.precondition
        x = problem.x0
        r = problem.b - A(x)
        rhat = r
        one = torch.ones((), dtype=r.dtype, device=r.device)
        rho, alpha, omega = one, one, one
        v = torch.zeros_like(r)
        p = torch.zeros_like(r)
        rnorm = torch.linalg.vector_norm(r)
        tol = problem.abs_tol
        # breakdown thresholds relative to the initial residual
        tiny = torch.finfo(r.dtype).eps ** 2 * (rnorm * rnorm)
        status = running_status(problem, r)
        conv0 = rnorm <= tol
        status = torch.where(conv0, code(SolveStatus.CONVERGED, r), status)
        active = ~conv0
        iters = torch.zeros((), dtype=torch.int64, device=r.device)
        for _ in range(problem.maxiter):
            if not problem.keep_going(active):
                break
            rho_new = dot(rhat, r)
            brk1 = rho_new.abs() <= tiny
            beta = safe_div(rho_new, rho) * safe_div(alpha, omega)
            p_n = r + beta * (p - omega * v)
            phat = M(p_n)
            v_n = A(phat)
            rv = dot(rhat, v_n)
            brk2 = rv.abs() <= tiny
            alpha_n = safe_div(rho_new, rv)
            s = r - alpha_n * v_n
            snorm = torch.linalg.vector_norm(s)
            s_conv = snorm <= tol
            shat = M(s)
            t = A(shat)
            tt = dot(t, t)
            omega_n = torch.where(s_conv, torch.zeros_like(tt), safe_div(dot(t, s), tt))
            brk3 = ~s_conv & (omega_n.abs() <= torch.finfo(r.dtype).eps)
            x_n = x + alpha_n * phat + omega_n * shat
            r_n = s - omega_n * t
            rnorm_n = torch.linalg.vector_norm(r_n)
            finite = torch.isfinite(rnorm_n)
            breakdown = active & (brk1 | brk2) & ~s_conv
            step = active & finite & ~breakdown
            x = torch.where(step, x_n, x)
            r = torch.where(step, r_n, r)
            p = torch.where(step, p_n, p)
            v = torch.where(step, v_n, v)
            rho = torch.where(step, rho_new, rho)
            alpha = torch.where(step, alpha_n, alpha)
            omega = torch.where(step, omega_n, omega)
            rnorm = torch.where(step, rnorm_n, rnorm)
            iters = iters + step.to(iters.dtype)
            conv = step & (rnorm <= tol)
            status = torch.where(active & ~finite, code(SolveStatus.NONFINITE, r), status)
            status = torch.where(breakdown | (step & brk3 & ~conv), code(SolveStatus.BREAKDOWN, r), status)
            status = torch.where(conv, code(SolveStatus.CONVERGED, r), status)
            active = step & ~conv & ~brk3
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, rnorm)
