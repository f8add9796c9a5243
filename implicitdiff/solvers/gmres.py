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
    floor_status,
    running_status,
    safe_div,
    solved_to_working_precision,
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

    Convergence is decided on the true residual, recomputed at each restart, never on the
    estimate of the cycle alone; an iterate worse than the previous one is not kept.
    Restarted GMRES can **stagnate** (GMRES(m) makes no progress at all on some systems,
    e.g. a cyclic permutation with ``m`` below its size): a whole cycle that lowers the
    residual by less than a relative :math:`\sqrt\varepsilon` stops the solve with
    :attr:`~implicitdiff.SolveStatus.STAGNATED` instead of running the whole budget (raise
    ``restart``). Not with ``tol=None``, whose fixed budget is always run.
    When a new Arnoldi column lies in the span of the previous ones (to a relative
    :math:`\varepsilon^{2/3}`), the operator is singular on the Krylov space and GMRES
    breaks down (:attr:`~implicitdiff.SolveStatus.BREAKDOWN`, unless the residual met the
    tolerance): it returns the minimizer over the space built so far, which for a singular
    symmetric system is a least-squares solution, instead of dividing by zero.

    Statuses: ``CONVERGED``, ``MAX_ITERATIONS`` (``BUDGET_USED`` with ``tol=None``),
    ``STAGNATED``, ``BREAKDOWN``, ``NONFINITE``.

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
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(3), solver=idiff.GMRES(tol=1e-6))
    >>> torch.allclose(A @ sol.value, torch.ones(3), atol=1e-5)
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
        singular_tol, lucky_tol, stall = _thresholds(b.dtype)
        anorm = 0.0  # largest ||A M v|| over unit basis vectors v: estimates ||A M|| from below
        iterations = 0
        if not math.isfinite(beta):
            return RawSolution(x, SolveStatus.NONFINITE, 0, beta)
        while True:
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
            singular = False
            for j in range(m):
                w = A(M(basis[j]))
                V = torch.stack(basis)
                h = V @ w
                w2 = w - V.T @ h
                h2 = V @ w2  # second Gram-Schmidt pass
                w2 = w2 - V.T @ h2
                col = torch.cat((h + h2, torch.linalg.vector_norm(w2, dim=0, keepdim=True))).tolist()  # one sync
                iterations += 1
                if not all(math.isfinite(c) for c in col):
                    return RawSolution(x, SolveStatus.NONFINITE, iterations, beta)
                wnorm = math.sqrt(math.fsum(c * c for c in col))  # ||A M v_j||: w = V h + (its orthogonal part)
                anorm = max(anorm, wnorm)
                hn = col[-1]
                for i in range(j):  # previous rotations
                    a, c2 = col[i], col[i + 1]
                    col[i], col[i + 1] = cs[i] * a + sn[i] * c2, -sn[i] * a + cs[i] * c2
                den = math.hypot(col[j], col[j + 1])
                if den <= singular_tol * wnorm:
                    # A M v_j lies in the span of the previous products: the operator is singular on
                    # the Krylov space, the new column cannot lower the residual (and dividing by it
                    # would blow x up). GMRES breaks down here; keep the minimizer found so far.
                    singular = True
                    break
                c, s = col[j] / den, col[j + 1] / den
                cs.append(c)
                sn.append(s)
                col[j] = den
                g[j + 1] = -s * g[j]
                g[j] = c * g[j]
                cols.append(col[: j + 1])
                if abs(g[j + 1]) <= tol or hn <= lucky_tol * wnorm:
                    break
                basis.append(w2 / hn)
            k = len(cols)
            estimate = abs(g[k])
            if k:
                y = [0.0] * k
                for i in reversed(range(k)):  # back substitution with the triangular factor
                    acc = g[i] - sum(cols[q][i] * y[q] for q in range(i + 1, k))
                    y[i] = acc / cols[i][i]
                coef = torch.tensor(y, dtype=b.dtype, device=b.device)
                x_new = x + M(torch.stack(basis[:k]).T @ coef)
                r_new = b - A(x_new)  # the true residual decides convergence
                beta_new = float(torch.linalg.vector_norm(r_new))
                if not math.isfinite(beta_new):
                    return RawSolution(x, SolveStatus.NONFINITE, iterations, beta)
            else:
                x_new, r_new, beta_new = x, r, beta
            if beta_new <= tol:
                return RawSolution(x_new, SolveStatus.CONVERGED, iterations, beta_new)
            beta_old = beta
            if beta_new < beta:  # never keep a worse iterate
                x, r, beta = x_new, r_new, beta_new
            if singular:
                floor = solved_to_working_precision(
                    beta, anorm, float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(b)), b.dtype
                )
                return RawSolution(x, floor_status(problem) if floor else SolveStatus.BREAKDOWN, iterations, beta)
            # a whole cycle that does not lower the residual (its estimate or the true one)
            if not problem.fixed_budget and max(beta_new, estimate) >= beta_old * (1.0 - stall):
                return RawSolution(x, SolveStatus.STAGNATED, iterations, beta)

    def _solve_masked(self, problem: LinearProblem) -> RawSolution:
        """Tensor-scalar path: vmap-safe (masked updates) and differentiable."""
        A, M = problem.matvec, problem.precondition
        x = problem.x0
        tol = problem.abs_tol
        dtype, device = x.dtype, x.device
        singular_tol, lucky_tol, stall = _thresholds(dtype)
        status = running_status(problem, x)
        iters = torch.zeros((), dtype=torch.int64, device=device)
        r = problem.b - A(x)
        rnorm = torch.linalg.vector_norm(r)
        bnorm = torch.linalg.vector_norm(problem.b)
        conv0 = rnorm <= tol
        bad0 = ~torch.isfinite(rnorm)
        status = torch.where(conv0, code(SolveStatus.CONVERGED, x), status)
        status = torch.where(bad0, code(SolveStatus.NONFINITE, x), status)
        active = ~conv0 & ~bad0
        anorm = torch.zeros_like(rnorm)
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
            singular = torch.zeros_like(active)
            for j in range(m):
                if not problem.keep_going(cycle_active):
                    break
                w = A(M(basis[j]))
                wnorm = torch.linalg.vector_norm(w)
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
                h_finite = torch.isfinite(H).all() & torch.isfinite(g).all() & torch.isfinite(wnorm)
                H = torch.where(torch.isfinite(H), H, torch.zeros_like(H))  # LAPACK rejects NaN input
                g_safe = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
                # the new column's part outside the span of the previous ones (|R[j, j]| of H = QR):
                # ~0 when the operator is singular on the Krylov space (see the fast path)
                # (as the distance of column j from the span of the others: QR is not vmappable inside
                # nested torch.func transforms in torch 2.13, lstsq is)
                Hd = H.detach()
                if j == 0:
                    den = torch.linalg.vector_norm(Hd[:, 0])
                else:
                    coef = torch.linalg.lstsq(Hd[:, :j], Hd[:, j : j + 1]).solution
                    den = torch.linalg.vector_norm(Hd[:, j] - (Hd[:, :j] @ coef).squeeze(-1))
                sing = cycle_active & h_finite & (den <= singular_tol * wnorm.detach())
                y = torch.linalg.lstsq(H, g_safe.unsqueeze(-1)).solution.squeeze(-1)
                res = torch.linalg.vector_norm(g_safe - H @ y)
                finite = h_finite & torch.isfinite(res) & torch.isfinite(y).all()
                lucky = hn <= lucky_tol * wnorm
                step = cycle_active & finite & ~sing
                nonfinite = nonfinite | (cycle_active & ~finite & ~sing)  # lstsq may fail on the singular H
                singular = singular | sing
                anorm = torch.where(cycle_active & finite, torch.maximum(anorm, wnorm), anorm)
                y_keep = torch.where(step, torch.cat([y, y_keep[j + 1 :]]), y_keep)
                res_keep = torch.where(step, res, res_keep)
                iters = iters + (cycle_active & (finite | sing)).to(iters.dtype)
                conv = step & ((res <= tol) | lucky)
                cycle_active = step & ~conv
            k = len(cols)
            update = M(torch.stack(basis[:k]).T @ y_keep[:k])
            x_new = x + update
            r_new = problem.b - A(x_new)  # true residual at restart: guards against drift of the estimate
            rnorm_new = torch.linalg.vector_norm(r_new)
            ok = active & ~nonfinite & torch.isfinite(x_new).all() & torch.isfinite(rnorm_new)
            status = torch.where(active & ~ok, code(SolveStatus.NONFINITE, x), status)
            better = ok & (rnorm_new < rnorm)  # never keep a worse iterate
            rnorm_old = rnorm
            x = torch.where(better, x_new, x)
            r = torch.where(better, r_new, r)
            rnorm = torch.where(better, rnorm_new, rnorm)
            conv = ok & (rnorm <= tol)
            brk = ok & ~conv & singular
            floor = solved_to_working_precision(rnorm, anorm, torch.linalg.vector_norm(x), bnorm, dtype)
            status = torch.where(brk, code(SolveStatus.BREAKDOWN, x), status)
            status = torch.where(brk & floor, code(floor_status(problem), x), status)
            if problem.fixed_budget:
                stalled = torch.zeros_like(ok)
            else:  # a whole cycle that does not lower the residual
                stalled = ok & ~conv & ~brk & (
                    (rnorm_new >= rnorm_old * (1.0 - stall)) | (res_keep >= rnorm_old * (1.0 - stall))
                )
                status = torch.where(stalled, code(SolveStatus.STAGNATED, x), status)
            status = torch.where(conv, code(SolveStatus.CONVERGED, x), status)
            active = ok & ~conv & ~brk & ~stalled
            done += max(k, 1)
        st, it = finalize_status(problem, status, iters)
        return RawSolution(x, st, it, rnorm)


def _thresholds(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(singular, lucky, stall)`` thresholds of GMRES (relative), for ``dtype``.

    * singular: a new Arnoldi column whose part outside the span of the previous ones is at
      most ``eps ** (2/3)`` times its norm (for a non-singular operator that ratio is at
      least ``1 / cond``, so this needs a condition number above 3e10 in float64);
    * lucky: the new basis vector is at most ``10 eps`` times ``||A M v||``: the Krylov space
      is invariant (exhausted);
    * stall: a restart cycle that lowers the residual by less than a relative ``sqrt(eps)``.
    """
    eps = float(torch.finfo(dtype).eps)
    return eps ** (2.0 / 3.0), 10.0 * eps, eps**0.5
