"""MINRES for symmetric (possibly indefinite, possibly singular) systems."""

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

__all__ = ["MINRES"]

#: The Lanczos process has exhausted an invariant Krylov subspace when the next
#: off-diagonal ``beta`` is below ``_EXHAUSTED * eps * ||A||``.
_EXHAUSTED = 10.0


def _singular_threshold(dtype: torch.dtype) -> float:
    """``||A r|| <= this * ||A|| ||r||``: ``r`` is numerically in the null space (``eps ** (2/3)``).

    ``||A r|| / (||A|| ||r||) >= 1 / cond(A)`` for a non-singular ``A``, so this never fires
    below a condition number of ``eps ** (-2/3)`` (3e10 in float64, 4e4 in float32), and it
    sits well above the rounding level (1e-14 to 1e-12 in float64) at which an exactly
    singular operator's invariant subspace runs out.
    """
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


class MINRES(LinearSolver):
    r"""Minimum-residual method (Paige & Saunders, 1975) for **symmetric** operators.

    Unlike :class:`~implicitdiff.CG` it needs no definiteness: it minimizes
    :math:`\|b - A x\|` over the Krylov space, so it is the solver of choice when the
    operator is symmetric but indefinite, as the Hessian of a non-convex inner problem
    (iMAML after few inner steps). One product with :math:`A` per iteration; the residual
    norm never increases. An optional preconditioner must be symmetric positive definite;
    the convergence test then uses the preconditioned residual norm.

    A **singular** operator is handled as MINRES should: a consistent system (``b`` in the
    range) converges; an inconsistent one stops at a least-squares solution, reported as
    :attr:`~implicitdiff.SolveStatus.LEAST_SQUARES`. This happens when
    :math:`\|A r\| \le \varepsilon^{2/3} \|A\| \|r\|` (``r = b - A x``, ``\|A r\|`` and
    :math:`\|A\|` estimated by the recurrences, as SciPy's ``test2``), i.e. when the Lanczos
    process exhausts an invariant Krylov subspace on which the operator is singular; the
    minimum residual over it is then attained by the current iterate, and the next update,
    which would divide by zero, is skipped (it is skipped too when
    :math:`\|A r\| \le \sqrt\varepsilon\,\|A\|\|r\|` and the step would not lower the
    residual: it would only add rounding noise to ``x``). Operators with a condition number
    above about :math:`\varepsilon^{-2/3}` count as singular. An exhausted subspace on which
    the residual estimate is still above the tolerance is reported the same way. If the
    residual is then at the rounding floor, :math:`100\,\varepsilon(\|A\|\|x\| + \|b\|)`,
    the system is consistent and solved as well as the dtype allows: ``STAGNATED``
    (``BUDGET_USED`` with ``tol=None``).

    Statuses: ``CONVERGED``, ``MAX_ITERATIONS`` (``BUDGET_USED`` with ``tol=None``),
    ``LEAST_SQUARES``, ``STAGNATED``, ``BREAKDOWN`` (the preconditioner is not positive
    definite), ``NONFINITE``.

    Parameters are those of :class:`~implicitdiff.LinearSolver`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]])   # symmetric, indefinite
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.MINRES(tol=1e-6))
    >>> torch.allclose(A @ sol.value, torch.ones(2), atol=1e-5)
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
        anorm = zero  # largest column norm of the Lanczos tridiagonal: estimates ||A|| from below
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
        singular_tol = _singular_threshold(x.dtype)
        stalled_tol = float(eps) ** 0.5
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
            col2 = alfa * alfa + beta_n * beta_n + (oldb_n * oldb_n if k > 0 else 0.0)
            anorm_n = torch.maximum(anorm, torch.sqrt(col2))
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln_n = sn * beta_n
            dbar_n = -cs * beta_n
            # ||A r_{k-1}|| = phibar * root: the current iterate's residual is (numerically) in the
            # null space, so it is a least-squares solution; gamma <= root would divide by ~0
            root = torch.hypot(gbar, dbar_n)
            gamma = torch.hypot(gbar, beta_n)
            gamma = torch.where(gamma == 0, one, gamma)
            cs_n = gbar / gamma
            sn_n = beta_n / gamma
            # stop at x_{k-1} when its residual is numerically in the null space (the next step
            # would divide by ~0), or nearly so while the next step would not lower the residual
            # (it only adds rounding noise, amplified by the near-singularity, to x)
            singular = active & ~breakdown & (
                (root <= singular_tol * anorm_n) | ((root <= stalled_tol * anorm_n) & (cs_n * cs_n <= stalled_tol))
            )
            gamma = torch.where(singular, one, gamma)
            phi = cs_n * phibar
            phibar_n = sn_n * phibar
            w1 = w2
            w2n = w
            w_n = (v - oldeps * w1 - delta * w2n) / gamma
            x_n = x + phi * w_n
            finite = torch.isfinite(phibar_n) & torch.isfinite(x_n).all() & torch.isfinite(anorm_n)
            nonfinite = active & ~finite & ~singular
            step = active & finite & ~breakdown & ~singular
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
            anorm = torch.where(step, anorm_n, anorm)
            iters = iters + step.to(iters.dtype)
            conv = step & (phibar <= tol)
            # an exhausted (invariant) Krylov subspace that leaves a residual: no solution in it
            exhausted = step & ~conv & (beta_n <= _EXHAUSTED * eps * anorm_n)
            status = torch.where(nonfinite, code(SolveStatus.NONFINITE, x), status)
            status = torch.where(breakdown & finite, code(SolveStatus.BREAKDOWN, x), status)
            status = torch.where(singular | exhausted, code(SolveStatus.LEAST_SQUARES, x), status)
            status = torch.where((singular & (phibar <= tol)) | conv, code(SolveStatus.CONVERGED, x), status)
            active = step & ~conv & ~exhausted
        # a singular operator detected with the residual at the rounding floor: a consistent
        # system solved as well as the dtype allows, not an inconsistent one
        rnorm_est = phibar * safe_div(r1norm, beta1)
        floor = solved_to_working_precision(
            rnorm_est, anorm, torch.linalg.vector_norm(x), torch.linalg.vector_norm(problem.b), x.dtype
        )
        status = torch.where((status == int(SolveStatus.LEAST_SQUARES)) & floor, code(floor_status(problem), x), status)
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, None)
