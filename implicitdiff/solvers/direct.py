"""Dense reference solver: materialize the operator and factorize it."""

from __future__ import annotations

import torch

from .._functorch import any_true
from ..diagnostics import SolveStatus
from .base import LinearProblem, LinearSolver, RawSolution

__all__ = ["Direct"]


_BATCHED_MAX = 256


def materialize(problem: LinearProblem) -> torch.Tensor:
    """The operator as a dense ``n x n`` matrix: one batched product when the problem offers it,
    else ``n`` products batched by ``torch.func.vmap`` (a Python loop if the product does not vmap)."""
    b = problem.b
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    # one vmapped backward is the fastest for small n (one call instead of n); for large n it was
    # measured slower than n separate products (ridge, n = 1000: 2.1 s against 0.37 s on one CPU thread)
    if problem.matmat is not None and b.shape[-1] <= _BATCHED_MAX:
        return problem.matmat(eye).T
    try:
        rows = torch.func.vmap(problem.matvec)(eye)
    except RuntimeError:
        rows = torch.stack([problem.matvec(e) for e in eye])
    return rows.T


class Direct(LinearSolver):
    r"""Materialize :math:`A` column by column and solve with ``torch.linalg.solve``.

    The matrix is built from ``n`` products with unit vectors, batched with
    ``torch.func.vmap`` (a Python loop if the product cannot be vmapped), so it costs
    :math:`O(n)` products, :math:`O(n^2)` memory and an :math:`O(n^3)` LU factorization:
    for small problems and as a reference to check iterative solvers against. It is exact
    up to rounding, differentiable (higher-order derivatives through it are exact), and
    works for any non-singular operator. An operator singular to working precision (a
    pivot of its LU factorization below ``n * eps`` times the largest) is reported as
    :attr:`~implicitdiff.SolveStatus.BREAKDOWN`, the failure policy applies, and the
    minimum-norm least-squares solution (``pinv(A) @ b``) is returned instead of the huge,
    meaningless one LU would give.

    Parameters
    ----------
    damping : float
        Solve :math:`(A + \delta I) x = b`.
    on_failure : {"warn", "raise", "ignore"}
        Failure policy (see :class:`~implicitdiff.LinearSolver`).

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    >>> idiff.linear_solve(lambda v: A @ v, torch.ones(2, dtype=torch.float64), solver=idiff.Direct()).value
    tensor([0.1429, 0.5714], dtype=torch.float64)
    """

    checks_true_residual = False  # a factorization: its accuracy is cond(A) * eps, not a tolerance

    def __init__(self, *, damping: float = 0.0, on_failure="warn") -> None:
        super().__init__(tol=0.0, maxiter=0, damping=damping, on_failure=on_failure)

    def solve(self, problem: LinearProblem) -> RawSolution:
        b = problem.b
        n = b.shape[-1]
        matrix = materialize(problem)
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        pivot_sizes = lu.diagonal(dim1=-2, dim2=-1).abs()
        # singular to working precision: a pivot negligible against the largest one (LU succeeds on a
        # rank-deficient matrix rounded away from singular and returns a huge, meaningless x)
        singular = (info != 0) | (pivot_sizes.min() <= n * torch.finfo(b.dtype).eps * pivot_sizes.max())
        if problem.eager:
            x = torch.linalg.lu_solve(lu, pivots, b.unsqueeze(-1)).squeeze(-1)
        else:
            # torch 2.13's lu_solve is wrong under nested vmap when the factor and the right-hand side are
            # batched at different levels (an operator batched by an outer vmap, right-hand sides by an inner
            # one, as in vmap(jacrev(f))): linalg.solve is right there
            x = torch.linalg.solve_ex(matrix, b.unsqueeze(-1))[0].squeeze(-1)  # _ex: singular is handled below
        if any_true(singular):
            # the minimum-norm least-squares solution instead (finite, never worse than x = 0)
            x = torch.where(singular, torch.linalg.pinv(matrix) @ b, x)
        finite = torch.isfinite(x).all()
        status = torch.where(
            ~finite,
            int(SolveStatus.NONFINITE),
            torch.where(singular, int(SolveStatus.BREAKDOWN), int(SolveStatus.CONVERGED)),
        ).to(torch.int64)
        x = torch.where(finite, x, torch.zeros_like(x))
        one = torch.ones((), dtype=torch.int64, device=b.device)
        if problem.eager:
            return RawSolution(x, SolveStatus(int(status)), 1, None)
        return RawSolution(x, status, one, None)
