"""Restarted GMRES for general non-symmetric systems."""

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
    safe_div,
)

__all__ = ["GMRES"]


class GMRES(LinearSolver):
    r"""Restarted GMRES(m) (Saad & Schultz, 1986) for general square systems.

    Each cycle builds an orthonormal Krylov basis of up to ``restart`` vectors (classical
    Gram-Schmidt applied twice, which is as stable as modified Gram-Schmidt and uses
    matrix products instead of a Python loop) and picks the iterate minimizing the residual
    norm over it, by a small least-squares solve. Needs no symmetry or definiteness, which
    makes it the default for root and fixed-point conditions; memory grows with ``restart``.
    Right-preconditioned, so the tested residual is the true one. One product with
    :math:`A` per iteration.

    Parameters
    ----------
    restart : int
        Krylov dimension per cycle.
    **kwargs
        See :class:`~implicitdiff.LinearSolver`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[3.0, 1.0, 0.0], [-1.0, 2.0, 0.5], [0.0, 0.3, 1.0]])
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(3), solver=idiff.GMRES(tol=1e-10))
    >>> torch.allclose(A @ sol.value, torch.ones(3), atol=1e-6)
    True
    """

    def __init__(self, restart: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(restart, int) or restart < 1:
            raise ValueError(f"restart must be a positive int, got {restart!r}")
        self.restart = restart

    def solve(self, problem: LinearProblem) -> RawSolution:
        return fast_or_masked(problem, self._solve_fast, self._solve_masked)

    def _solve_fast(self, problem: LinearProblem) -> RawSolution:
        """Eager path: Givens rotations on Python scalars, one sync per iteration."""
        A, M, b = problem.matvec, problem.precondition, problem.b
        x = problem.x0
        Ax = A(x)
        check_no_graph(Ax)
        r = b - Ax
        beta = float(torch.linalg.vector_norm(r))
        tol = float(problem.abs_tol)
        eps = torch.finfo(b.dtype).eps
        iterations = 0
        while True:
            if not math.isfinite(beta):
                return RawSolution(x, SolveStatus.NONFINITE, iterations, beta)
            if beta <= tol:
                return RawSolution(x, SolveStatus.CONVERGED, iterations, beta)
            if iterations >= problem.maxiter:
                status = SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.MAX_ITERATIONS
                return RawSolution(x, status, iterations, beta)
            m = min(self.restart, problem.maxiter - iterations)
            basis = [r / beta]
            cols: list[list[float]] = []
            cs: list[float] = []
            sn: list[float] = []
            g = [beta] + [0.0] * m
            for j in range(m):
                w = A(M(basis[j]))
                V = torch.stack(basis)
                h = V @ w
                w = w - V.T @ h
                h2 = V @ w  # second Gram-Schmidt pass
                w = w - V.T @ h2
                hn_t = torch.linalg.vector_norm(w)
                col = (h + h2).tolist() + [float(hn_t)]
                iterations += 1
                if not all(math.isfinite(c) for c in col):
                    return RawSolution(x, SolveStatus.NONFINITE, iterations, beta)
                hn = col[-1]
                for i in range(j):  # previous rotations
                    a, c2 = col[i], col[i + 1]
                    col[i], col[i + 1] = cs[i] * a + sn[i] * c2, -sn[i] * a + cs[i] * c2
                den = math.hypot(col[j], col[j + 1])
                c, s = (col[j] / den, col[j + 1] / den) if den > 0 else (1.0, 0.0)
                cs.append(c)
                sn.append(s)
                col[j] = den
                g[j + 1] = -s * g[j]
                g[j] = c * g[j]
                cols.append(col[: j + 1])
                if abs(g[j + 1]) <= tol or hn <= eps * beta:
                    break
                basis.append(w / hn)
            k = len(cols)
            y = [0.0] * k
            for i in reversed(range(k)):  # back substitution with the triangular factor
                acc = g[i] - sum(cols[l][i] * y[l] for l in range(i + 1, k))
                y[i] = acc / cols[i][i] if cols[i][i] != 0 else 0.0
            coef = torch.tensor(y, dtype=b.dtype, device=b.device)
            x = x + M(torch.stack(basis[:k]).T @ coef)
            r = b - A(x)  # the true residual decides convergence
            beta = float(torch.linalg.vector_norm(r))

    def _solve_masked(self, problem: LinearProblem) -> RawSolution:
        """Tensor-scalar path: vmap-safe (masked updates) and differentiable."""
        A, M = problem.matvec, problem.precondition
        x = problem.x0
        tol = problem.abs_tol
        dtype, device = x.dtype, x.device
        status = running_status(problem, x)
        iters = torch.zeros((), dtype=torch.int64, device=device)
        r = problem.b - A(x)
        rnorm = torch.linalg.vector_norm(r)
        conv0 = rnorm <= tol
        bad0 = ~torch.isfinite(rnorm)
        status = torch.where(conv0, code(SolveStatus.CONVERGED, x), status)
        status = torch.where(bad0, code(SolveStatus.NONFINITE, x), status)
        active = ~conv0 & ~bad0
        eps = torch.finfo(dtype).eps
        done = 0
        while done < problem.maxiter:
            if not problem.keep_going(active):
                break
            m = min(self.restart, problem.maxiter - done)
            beta = rnorm
            basis = [safe_div(r, beta)]
            cols: list[torch.Tensor] = []
            g = torch.cat([beta.reshape(1), torch.zeros(m, dtype=dtype, device=device)])
            y_keep = torch.zeros(m, dtype=dtype, device=device)
            res_keep = rnorm
            cycle_active = active
            nonfinite = torch.zeros_like(active)
            for j in range(m):
                if not problem.keep_going(cycle_active):
                    break
                w = A(M(basis[j]))
                V = torch.stack(basis)  # (j+1, n)
                h = V @ w
                w = w - V.T @ h
                h2 = V @ w  # second pass restores orthogonality lost to rounding
                w = w - V.T @ h2
                h = h + h2
                hn = torch.linalg.vector_norm(w)
                cols.append(torch.cat([h, hn.reshape(1), torch.zeros(m - j - 1, dtype=dtype, device=device)]))
                basis.append(safe_div(w, hn))
                H = torch.stack(cols, dim=1)  # (m+1, j+1)
                h_finite = torch.isfinite(H).all() & torch.isfinite(g).all()
                H = torch.where(torch.isfinite(H), H, torch.zeros_like(H))  # LAPACK rejects NaN input
                g_safe = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
                y = torch.linalg.lstsq(H, g_safe.unsqueeze(-1)).solution.squeeze(-1)
                res = torch.linalg.vector_norm(g_safe - H @ y)
                finite = h_finite & torch.isfinite(res) & torch.isfinite(y).all()
                lucky = hn <= eps * beta
                step = cycle_active & finite
                nonfinite = nonfinite | (cycle_active & ~finite)
                y_keep = torch.where(step, torch.cat([y, y_keep[j + 1 :]]), y_keep)
                res_keep = torch.where(step, res, res_keep)
                iters = iters + step.to(iters.dtype)
                conv = step & ((res <= tol) | lucky)
                status = torch.where(conv, code(SolveStatus.CONVERGED, x), status)
                cycle_active = step & ~conv
            k = len(cols)
            update = M(torch.stack(basis[:k]).T @ y_keep[:k])
            x_new = x + update
            ok = active & ~nonfinite & torch.isfinite(x_new).all()
            status = torch.where(active & ~ok, code(SolveStatus.NONFINITE, x), status)
            x = torch.where(ok, x_new, x)
            r = problem.b - A(x)  # true residual at restart: guards against drift of the estimate
            rnorm = torch.where(ok, torch.linalg.vector_norm(r), rnorm)
            active = ok & cycle_active & (rnorm > tol)
            conv_true = ok & (rnorm <= tol)
            status = torch.where(conv_true, code(SolveStatus.CONVERGED, x), status)
            done += max(k, 1)
        # a converged estimate that the true residual does not confirm is not convergence
        status = torch.where(
            (status == int(SolveStatus.CONVERGED)) & (rnorm > 10 * tol + eps * 10),
            running_status(problem, x),
            status,
        )
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, rnorm)
