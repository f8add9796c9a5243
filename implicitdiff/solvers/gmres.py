"""Restarted GMRES for general non-symmetric systems."""

from __future__ import annotations

import torch

from ..diagnostics import SolveStatus
from .base import LinearProblem, LinearSolver, RawSolution, code, finalize_status, running_status, safe_div

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
