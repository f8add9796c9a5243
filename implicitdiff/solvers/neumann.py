"""Truncated Neumann series (Richardson iteration)."""

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
    fast_or_masked,
    finalize_status,
    running_status,
)

__all__ = ["Neumann"]


class Neumann(LinearSolver):
    r"""Truncated Neumann series :math:`A^{-1} b \approx \alpha \sum_{k=0}^{K} (I - \alpha A)^k b`.

    Computed as the Richardson iteration :math:`x \leftarrow x + \alpha M (b - A x)` from
    :math:`x_0 = 0`, whose iterates are exactly the partial sums. It converges when the
    spectral radius of :math:`I - \alpha M A` is below one. For a fixed-point condition
    :math:`x = T(x)` with a contractive :math:`T`, implicitdiff solves with
    :math:`A = I - \partial T/\partial x`, so the default ``step_size=1`` gives
    :math:`\sum_k (\partial T/\partial x)^k b`: the classic fixed-point adjoint iteration,
    which converges. For an objective, choose ``step_size`` below ``2 / L`` (``L`` the
    largest Hessian eigenvalue).

    When the series diverges (spectral radius above one: ``step_size`` too long) the
    residual grows geometrically; the iteration stops with
    :attr:`~implicitdiff.SolveStatus.DIVERGED` once the residual exceeds 100 times the
    smallest one met and its growth over the last 10 iterations is at least that over the
    10 before (or it exceeds :math:`10^8` times the smallest). The transient growth of a
    non-normal contraction (as :math:`k \rho^k`) slows down and is not mistaken for
    divergence. On ``DIVERGED``, ``MAX_ITERATIONS`` and ``NONFINITE`` the iterate with the
    smallest residual met (the initial guess included) is returned, never a worse one; with
    ``tol=None`` (``BUDGET_USED``) the last partial sum is.

    Parameters
    ----------
    step_size : float
        :math:`\alpha`.
    **kwargs
        See :class:`~implicitdiff.LinearSolver`. Each iteration costs one product.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> J = torch.tensor([[0.3, 0.1], [0.0, 0.2]])      # a contraction
    >>> sol = idiff.linear_solve(lambda v: v - J @ v, torch.ones(2), solver=idiff.Neumann(tol=1e-6))
    >>> torch.allclose(sol.value, torch.linalg.solve(torch.eye(2) - J, torch.ones(2)), atol=1e-5)
    True
    """

    #: A stationary iteration, whose expectation under independent random products is the full one's
    accepts_stochastic_operator = True

    def __init__(self, step_size: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.step_size = float(step_size)

    def default_maxiter(self, n: int) -> int:
        """1000: the series converges at the rate of the spectral radius, whatever the size."""
        return 1000

    def solve(self, problem: LinearProblem) -> RawSolution:
        return fast_or_masked(problem, self._solve_fast, self._solve_masked)

    def _solve_fast(self, problem: LinearProblem) -> RawSolution:
        """Eager path with Python scalars."""
        A, M, x = problem.matvec, problem.precondition, problem.x0
        Ax = A(x)
        check_no_graph(Ax)
        r = problem.b - Ax
        tol = float(problem.abs_tol)
        best_x, best_r = x, math.inf
        history: list[float] = []
        for k in range(problem.maxiter + 1):
            rnorm = float(torch.linalg.vector_norm(r))
            if not math.isfinite(rnorm):
                if k == 0:
                    return RawSolution(x, SolveStatus.NONFINITE, 0, rnorm)
                return RawSolution(best_x, SolveStatus.NONFINITE, k, best_r)
            if rnorm < best_r:
                best_x, best_r = x, rnorm
            if rnorm <= tol:
                return RawSolution(x, SolveStatus.CONVERGED, k, rnorm)
            history.append(rnorm)
            if _diverging(history, best_r):
                return RawSolution(best_x, SolveStatus.DIVERGED, k, best_r)
            if k == problem.maxiter:
                break
            x = torch.add(x, M(r), alpha=self.step_size)
            r = problem.b - A(x)
        if problem.fixed_budget:  # exactly the partial sum asked for
            return RawSolution(x, SolveStatus.BUDGET_USED, problem.maxiter, rnorm)
        return RawSolution(best_x, SolveStatus.MAX_ITERATIONS, problem.maxiter, best_r)

    def _solve_masked(self, problem: LinearProblem) -> RawSolution:
        """Tensor-scalar path: vmap-safe (masked updates) and differentiable."""
        A, M, x = problem.matvec, problem.precondition, problem.x0
        tol = problem.abs_tol
        status = running_status(problem, x)
        active = torch.ones((), dtype=torch.bool, device=x.device)
        iters = torch.zeros((), dtype=torch.int64, device=x.device)
        r = problem.b - A(x)
        rnorm = torch.linalg.vector_norm(r)
        best_x, best_r = x, torch.full_like(rnorm, math.inf)
        history: list[torch.Tensor] = []
        for k in range(problem.maxiter + 1):
            finite = torch.isfinite(rnorm)
            better = active & finite & (rnorm < best_r)
            best_x = torch.where(better, x, best_x)
            best_r = torch.where(better, rnorm, best_r)
            conv = active & finite & (rnorm <= tol)
            history.append(rnorm)
            diverged = active & finite & ~conv & _diverging_masked(history, best_r)
            status = torch.where(active & ~finite, code(SolveStatus.NONFINITE, x), status)
            status = torch.where(conv, code(SolveStatus.CONVERGED, x), status)
            status = torch.where(diverged, code(SolveStatus.DIVERGED, x), status)
            active = active & finite & ~conv & ~diverged
            if k == problem.maxiter or not problem.keep_going(active):
                break
            x = torch.where(active, x + self.step_size * M(r), x)
            iters = iters + active.to(iters.dtype)
            r_new = problem.b - A(x)
            rnorm = torch.where(active, torch.linalg.vector_norm(r_new), rnorm)
            r = torch.where(active, r_new, r)
        # a failure returns the best iterate met (never worse than x0); a fixed budget its partial sum
        keep_best = (status != int(SolveStatus.CONVERGED)) & (status != int(SolveStatus.BUDGET_USED))
        keep_best = keep_best & torch.isfinite(best_r)
        x = torch.where(keep_best, best_x, x)
        rnorm = torch.where(keep_best, best_r, rnorm)
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, rnorm)


#: Divergence test of the Richardson iteration (see :class:`Neumann`).
_GROWTH = 1e2
_HARD_GROWTH = 1e8
_WINDOW = 10


def _diverging(history: list[float], best: float) -> bool:
    """Whether the residual norms ``history`` (last one current) show divergence."""
    now = history[-1]
    if now > _HARD_GROWTH * best:
        return True
    if len(history) <= 2 * _WINDOW or now <= _GROWTH * best:
        return False
    mid, old = history[-1 - _WINDOW], history[-1 - 2 * _WINDOW]
    # growing, and not slowing down: exponential growth, not the transient of a non-normal contraction
    return now > mid and now * old >= (1.0 - 1e-6) * mid * mid


def _diverging_masked(history: list[torch.Tensor], best: torch.Tensor) -> torch.Tensor:
    """:func:`_diverging` on tensors (vmap-safe)."""
    now = history[-1]
    hard = now > _HARD_GROWTH * best
    if len(history) <= 2 * _WINDOW:
        return hard
    mid, old = history[-1 - _WINDOW], history[-1 - 2 * _WINDOW]
    return hard | ((now > _GROWTH * best) & (now > mid) & (now * old >= (1.0 - 1e-6) * mid * mid))
