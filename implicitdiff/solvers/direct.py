"""Dense reference solver: materialize the operator and factorize it."""

from __future__ import annotations

import torch

from ..diagnostics import SolveStatus
from ..errors import LinearSolveError
from .base import LinearProblem, LinearSolver, RawSolution

__all__ = ["Direct"]


class Direct(LinearSolver):
    r"""Materialize :math:`A` column by column and solve with ``torch.linalg.solve``.

    The matrix is built from ``n`` products with unit vectors, batched with
    ``torch.func.vmap`` (a Python loop if the product cannot be vmapped), so it costs
    :math:`O(n)` products, :math:`O(n^2)` memory and an :math:`O(n^3)` LU factorization:
    for small problems and as a reference to check iterative solvers against. It is exact
    up to rounding, differentiable (higher-order derivatives through it are exact), and
    works for any non-singular operator. A singular operator raises
    :class:`~implicitdiff.LinearSolveError` (or is reported as a breakdown, per the
    failure policy under ``torch.func.vmap``).

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

    def __init__(self, *, damping: float = 0.0, on_failure="warn") -> None:
        super().__init__(tol=0.0, maxiter=0, damping=damping, on_failure=on_failure)

    def solve(self, problem: LinearProblem) -> RawSolution:
        b = problem.b
        eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
        try:
            columns = torch.func.vmap(problem.matvec)(eye)
        except RuntimeError:
            columns = torch.stack([problem.matvec(e) for e in eye])
        matrix = columns.T
        if problem.eager:
            try:
                x = torch.linalg.solve(matrix, b)
            except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
                raise LinearSolveError(f"Direct: the operator is singular ({err})") from err
            finite = bool(torch.isfinite(x).all())
            status = SolveStatus.CONVERGED if finite else SolveStatus.NONFINITE
            return RawSolution(x, status, 1, None)
        x, info = torch.linalg.solve_ex(matrix, b)
        ok = (info == 0) & torch.isfinite(x).all()
        status = torch.where(ok, int(SolveStatus.CONVERGED), int(SolveStatus.BREAKDOWN)).to(torch.int64)
        return RawSolution(x, status, torch.ones((), dtype=torch.int64, device=b.device), None)
