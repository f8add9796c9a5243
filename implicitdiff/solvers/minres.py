"""MINRES for symmetric (possibly indefinite) systems."""

from __future__ import annotations

import torch

from ..diagnostics import SolveStatus
from .base import LinearProblem, LinearSolver, RawSolution, code, dot, finalize_status, running_status, safe_div

__all__ = ["MINRES"]


class MINRES(LinearSolver):
    r"""Minimum-residual method (Paige & Saunders, 1975) for **symmetric** operators.

    Unlike :class:`~implicitdiff.CG` it needs no definiteness: it minimizes
    :math:`\|b - A x\|` over the Krylov space, so it is the solver of choice when the
    operator is symmetric but indefinite, as the Hessian of a non-convex inner problem
    (iMAML after few inner steps). One product with :math:`A` per iteration. An optional
    preconditioner must be symmetric positive definite; the convergence test then uses the
    preconditioned residual norm.

    Parameters are those of :class:`~implicitdiff.LinearSolver`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]])   # symmetric, indefinite
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.MINRES(tol=1e-10))
    >>> torch.allclose(A @ sol.value, torch.ones(2), atol=1e-6)
    True
    """

    requires_symmetric = True

    def solve(self, problem: LinearProblem) -> RawSolution:
        A, M = problem.matvec, problem.precondition
        x = problem.x0
        r1 = problem.b - A(x)
        y = M(r1)
        r_m_r = dot(r1, y)
        beta1 = torch.sqrt(torch.clamp(r_m_r, min=0))
        r1norm = torch.linalg.vector_norm(r1)
        zero = torch.zeros_like(beta1)
        one = torch.ones_like(beta1)
        oldb, beta, dbar, epsln, phibar = zero, beta1, zero, zero, beta1
        cs, sn = -one, zero
        w = torch.zeros_like(x)
        w2 = torch.zeros_like(x)
        r2 = r1
        # phibar estimates the residual in the preconditioner's norm: scale the 2-norm tolerance to it
        tol = problem.abs_tol * safe_div(beta1, r1norm)
        status = running_status(problem, x)
        conv0 = r1norm <= problem.abs_tol
        broken0 = ~conv0 & (r_m_r <= 0)  # the preconditioner is not positive definite
        status = torch.where(conv0, code(SolveStatus.CONVERGED, x), status)
        status = torch.where(broken0, code(SolveStatus.BREAKDOWN, x), status)
        active = ~conv0 & ~broken0
        iters = torch.zeros((), dtype=torch.int64, device=x.device)
        eps = torch.finfo(x.dtype).eps
        for k in range(problem.maxiter):
            if not problem.keep_going(active):
                break
            s = safe_div(one, beta)
            v = s * y
            y = A(v)
            if k > 0:
                y = y - safe_div(beta, oldb) * r1
            alfa = dot(v, y)
            y = y - safe_div(alfa, beta) * r2
            r1n, r2n = r2, y
            y_new = M(r2n)
            oldb_n = beta
            beta_sq = dot(r2n, y_new)
            breakdown = active & (beta_sq < 0)  # preconditioner not positive definite
            beta_n = torch.sqrt(torch.clamp(beta_sq, min=0))
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln_n = sn * beta_n
            dbar_n = -cs * beta_n
            gamma = torch.clamp(torch.hypot(gbar, beta_n), min=eps)
            cs_n = gbar / gamma
            sn_n = beta_n / gamma
            phi = cs_n * phibar
            phibar_n = sn_n * phibar
            w1 = w2
            w2n = w
            w_n = (v - oldeps * w1 - delta * w2n) / gamma
            x_n = x + phi * w_n
            finite = torch.isfinite(phibar_n) & torch.isfinite(x_n).all()
            step = active & finite & ~breakdown
            # masked state update: inactive problems keep their state
            x = torch.where(step, x_n, x)
            r1 = torch.where(step, r1n, r1)
            r2 = torch.where(step, r2n, r2)
            y = torch.where(step, y_new, y)
            w2 = torch.where(step, w2n, w2)
            w = torch.where(step, w_n, w)
            oldb = torch.where(step, oldb_n, oldb)
            beta = torch.where(step, beta_n, beta)
            epsln = torch.where(step, epsln_n, epsln)
            dbar = torch.where(step, dbar_n, dbar)
            cs = torch.where(step, cs_n, cs)
            sn = torch.where(step, sn_n, sn)
            phibar = torch.where(step, phibar_n, phibar)
            iters = iters + step.to(iters.dtype)
            conv = step & ((phibar <= tol) | (beta <= eps * beta1))
            status = torch.where(active & ~finite, code(SolveStatus.NONFINITE, x), status)
            status = torch.where(breakdown & finite, code(SolveStatus.BREAKDOWN, x), status)
            status = torch.where(conv, code(SolveStatus.CONVERGED, x), status)
            active = step & ~conv
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, None)
