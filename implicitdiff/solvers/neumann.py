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
    >>> sol = idiff.linear_solve(lambda v: v - J @ v, torch.ones(2), solver=idiff.Neumann(tol=1e-10))
    >>> torch.allclose(sol.value, torch.linalg.solve(torch.eye(2) - J, torch.ones(2)))
    True
    """

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
        for k in range(problem.maxiter + 1):
            rnorm = float(torch.linalg.vector_norm(r))
            if not math.isfinite(rnorm):
                return RawSolution(x, SolveStatus.NONFINITE, k, rnorm)
            if rnorm <= tol:
                return RawSolution(x, SolveStatus.CONVERGED, k, rnorm)
            if k == problem.maxiter:
                break
            x = torch.add(x, M(r), alpha=self.step_size)
            r = problem.b - A(x)
        status = SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.MAX_ITERATIONS
        return RawSolution(x, status, problem.maxiter, rnorm)

    def _solve_masked(self, problem: LinearProblem) -> RawSolution:
        """Tensor-scalar path: vmap-safe (masked updates) and differentiable."""
        A, M, x = problem.matvec, problem.precondition, problem.x0
        tol = problem.abs_tol
        status = running_status(problem, x)
        active = torch.ones((), dtype=torch.bool, device=x.device)
        iters = torch.zeros((), dtype=torch.int64, device=x.device)
        r = problem.b - A(x)
        rnorm = torch.linalg.vector_norm(r)
        for k in range(problem.maxiter + 1):
            finite = torch.isfinite(rnorm)
            conv = active & finite & (rnorm <= tol)
            status = torch.where(active & ~finite, code(SolveStatus.NONFINITE, x), status)
            status = torch.where(conv, code(SolveStatus.CONVERGED, x), status)
            active = active & finite & ~conv
            if k == problem.maxiter or not problem.keep_going(active):
                break
            x = torch.where(active, x + self.step_size * M(r), x)
            iters = iters + active.to(iters.dtype)
            r_new = problem.b - A(x)
            rnorm = torch.where(active, torch.linalg.vector_norm(r_new), rnorm)
            r = torch.where(active, r_new, r)
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, rnorm)
