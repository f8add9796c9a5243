"""Conjugate gradients on the normal equations (CGNR)."""

from __future__ import annotations

import torch

from .base import LinearProblem, LinearSolver, RawSolution
from .cg import conjugate_gradient

__all__ = ["NormalCG"]


class NormalCG(LinearSolver):
    r"""CG on the normal equations :math:`A^\top A x = A^\top b` (CGNR).

    Works for any non-singular (even non-square-conditioned, non-symmetric) operator
    because :math:`A^\top A` is symmetric positive definite, at the price of squaring the
    condition number and of two products per iteration, one with :math:`A` and one with
    :math:`A^\top` (derived automatically by a vector-Jacobian product when not given).
    ``damping`` applies to :math:`A` (it solves :math:`(A+\delta I)^\top(A+\delta I) x = (A+\delta I)^\top b`);
    the tolerance is tested on the normal-equation residual :math:`\|A^\top(b - A x)\|`
    relative to :math:`\|A^\top b\|`.

    Parameters are those of :class:`~implicitdiff.LinearSolver`; a preconditioner, if
    given, must approximate :math:`(A^\top A)^{-1}`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[1.0, 2.0], [-3.0, 1.0]])
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.NormalCG(tol=1e-10))
    >>> torch.allclose(A @ sol.value, torch.ones(2), atol=1e-6)
    True
    """

    def solve(self, problem: LinearProblem) -> RawSolution:
        A, At = problem.matvec, problem.rmatvec
        bn = At(problem.b)
        rel = problem.abs_tol / torch.clamp(torch.linalg.vector_norm(problem.b), min=torch.finfo(bn.dtype).tiny)
        normal = LinearProblem(
            matvec=lambda v: At(A(v)),
            b=bn,
            x0=problem.x0,
            abs_tol=rel * torch.linalg.vector_norm(bn),
            maxiter=problem.maxiter,
            fixed_budget=problem.fixed_budget,
            eager=problem.eager,
            differentiable=problem.differentiable,
            preconditioner=problem.preconditioner,
        )
        if problem.eager:
            normal.abs_tol = float(normal.abs_tol)
        out = conjugate_gradient(normal)
        return RawSolution(out.x, out.status, out.iterations, None)
