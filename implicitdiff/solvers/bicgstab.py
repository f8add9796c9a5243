"""BiCGSTAB for general non-symmetric systems."""

from __future__ import annotations

import torch

from ..diagnostics import SolveStatus
from .base import (
    LinearProblem,
    LinearSolver,
    RawSolution,
    code,
    dot,
    finalize_status,
    floor_status,
    running_status,
    safe_div,
    solved_to_working_precision,
)

__all__ = ["BiCGSTAB"]


class BiCGSTAB(LinearSolver):
    r"""Stabilized bi-conjugate gradients (van der Vorst, 1992) for general square systems.

    Short recurrences (constant memory, unlike GMRES) and two products with :math:`A` per
    iteration; convergence is irregular and it can break down (reported as
    :attr:`~implicitdiff.SolveStatus.BREAKDOWN`) when :math:`\hat r^\top r`,
    :math:`\hat r^\top A p` or the stabilizing step :math:`t^\top s` vanish relative to the
    norms involved (a cosine below machine epsilon; a skew-symmetric operator breaks down at
    once), or when a search direction is numerically in the null space of :math:`A`
    (:math:`\|A M p\| \le \sqrt\varepsilon\,\|A M\|\|p\|`, ``M`` the preconditioner,
    :math:`\|A M\|` estimated from the products: a singular operator, along which the step
    would blow ``x`` up without lowering the residual; for a non-singular one this needs a
    condition number above :math:`\varepsilon^{-1/2}`). A breakdown with the residual at the rounding floor
    :math:`100\,\varepsilon(\|A\|\|x\| + \|b\|)` is reported ``STAGNATED`` (``BUDGET_USED``
    with ``tol=None``). ``CONVERGED`` only when the residual meets the tolerance.

    Its residual is not monotone: when the solve does not converge (``BREAKDOWN``,
    ``MAX_ITERATIONS``, ``BUDGET_USED``, ``STAGNATED``, ``NONFINITE``) the iterate with the
    smallest residual met is returned, the initial guess included, never a worse one.
    Right-preconditioned, so the tested residual is that of the original system (updated
    recursively).

    Parameters are those of :class:`~implicitdiff.LinearSolver`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])   # non-symmetric
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.BiCGSTAB(tol=1e-6))
    >>> torch.allclose(A @ sol.value, torch.ones(2), atol=1e-5)
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
        rhat_norm = rnorm
        tol = problem.abs_tol
        eps = torch.finfo(r.dtype).eps
        status = running_status(problem, r)
        conv0 = rnorm <= tol
        bad0 = ~torch.isfinite(rnorm)
        status = torch.where(conv0, code(SolveStatus.CONVERGED, r), status)
        status = torch.where(bad0, code(SolveStatus.NONFINITE, r), status)
        active = ~conv0 & ~bad0
        iters = torch.zeros((), dtype=torch.int64, device=r.device)
        best_x, best_r = x, rnorm
        anorm = torch.zeros_like(rnorm)
        null_tol = float(eps) ** 0.5
        for _ in range(problem.maxiter):
            if not problem.keep_going(active):
                break
            rho_new = dot(rhat, r)
            # breakdowns: the shadow residual is (numerically) orthogonal to r or to A p
            brk1 = rho_new.abs() <= eps * rhat_norm * rnorm
            beta = safe_div(rho_new, rho) * safe_div(alpha, omega)
            p_n = r + beta * (p - omega * v)
            phat = M(p_n)
            v_n = A(phat)
            rv = dot(rhat, v_n)
            vnorm = torch.linalg.vector_norm(v_n)
            brk2 = rv.abs() <= eps * rhat_norm * vnorm
            # ||A M p|| / ||p|| against the largest such ratio met (a lower estimate of ||A M||): a
            # direction (numerically) in the null space of a singular operator, along which the
            # step length alpha would blow x up without lowering the residual
            pnorm = torch.linalg.vector_norm(p_n)
            anorm = torch.where(active, torch.maximum(anorm, safe_div(vnorm, pnorm)), anorm)
            null_p = vnorm <= null_tol * anorm * pnorm
            alpha_n = safe_div(rho_new, rv)
            s = r - alpha_n * v_n
            snorm = torch.linalg.vector_norm(s)
            s_conv = snorm <= tol
            shat = M(s)
            t = A(shat)
            tt = dot(t, t)
            ts = dot(t, s)
            tnorm = torch.sqrt(tt)
            anorm = torch.where(active & ~s_conv, torch.maximum(anorm, safe_div(tnorm, snorm)), anorm)
            null_s = ~s_conv & (tnorm <= null_tol * anorm * snorm)
            omega_n = torch.where(s_conv | null_s, torch.zeros_like(tt), safe_div(ts, tt))
            # the stabilizing step stagnates (t orthogonal to s, or s in the null space): stop
            # after the half step, as the next beta would divide by ~0
            brk3 = ~s_conv & ((ts.abs() <= eps * tnorm * snorm) | null_s)
            x_n = x + alpha_n * phat + omega_n * shat
            r_n = s - omega_n * t
            rnorm_n = torch.linalg.vector_norm(r_n)
            breakdown = active & (brk1 | brk2 | null_p)
            finite = torch.isfinite(rnorm_n) & torch.isfinite(x_n).all()
            nonfinite = active & ~breakdown & ~finite
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
            better = step & (rnorm < best_r)
            best_x = torch.where(better, x, best_x)
            best_r = torch.where(better, rnorm, best_r)
            conv = step & (rnorm <= tol)
            status = torch.where(nonfinite, code(SolveStatus.NONFINITE, r), status)
            status = torch.where(breakdown | (step & brk3 & ~conv), code(SolveStatus.BREAKDOWN, r), status)
            status = torch.where(conv, code(SolveStatus.CONVERGED, r), status)
            active = step & ~conv & ~brk3
        # an unsuccessful solve returns the iterate with the smallest residual met (x0 included)
        failed = status != int(SolveStatus.CONVERGED)
        x = torch.where(failed, best_x, x)
        rnorm = torch.where(failed, best_r, rnorm)
        # a breakdown with the residual at the rounding floor: as good as the dtype allows
        floor = solved_to_working_precision(
            rnorm, anorm, torch.linalg.vector_norm(x), torch.linalg.vector_norm(problem.b), r.dtype
        )
        status = torch.where((status == int(SolveStatus.BREAKDOWN)) & floor, code(floor_status(problem), r), status)
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, rnorm)
