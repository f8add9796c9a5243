"""Worker of tests/test_distributed.py, started by ``torchrun --nproc_per_node=W`` (not a test module).

Each rank holds its shard of a ridge and of a logistic-regression problem, computes hypergradients
through ``implicit_diff(..., distributed=DataParallel(...))`` and saves them, with the backward
solves' diagnostics, to ``OUT/rank{r}.pt`` for the test to compare with a single process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import implicitdiff as idiff

N, D = 64, 6  # rows per rank, features


def full_data(world: int) -> tuple[torch.Tensor, ...]:
    """The whole data set, the same on every rank (each keeps its rows)."""
    g = torch.Generator().manual_seed(1234)
    X = torch.randn(world * N, D, generator=g, dtype=torch.float64)
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    y = X @ w_true + 0.3 * torch.randn(world * N, generator=g, dtype=torch.float64)
    labels = (torch.rand(world * N, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w_true)).to(torch.float64)
    X_val = torch.randn(40, D, generator=g, dtype=torch.float64)
    y_val = X_val @ w_true
    return X, y, labels, X_val, y_val


def ridge_objective(w, log_lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (log_lam.exp() * w**2).sum()


def logistic_objective(w, log_lam, X, t):
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (log_lam.exp() * w**2).sum()


def ridge_solver(distributed: bool):
    def fit(w, log_lam, X, y):
        G, c = X.T @ X / len(X), X.T @ y / len(X)
        if distributed:
            world = dist.get_world_size()
            dist.all_reduce(G)
            dist.all_reduce(c)
            G, c = G / world, c / world
        return torch.linalg.solve(G + torch.diag(log_lam.exp()), c)

    return fit


def logistic_solver(distributed: bool, steps: int = 60):
    def fit(w, log_lam, X, t):
        for _ in range(steps):  # Newton on the global objective (gradients and Hessians all-reduced)
            p = torch.sigmoid(X @ w)
            grad = X.T @ (p - t) / len(X)
            hess = X.T @ (X * (p * (1 - p))[:, None]) / len(X)
            if distributed:
                world = dist.get_world_size()
                dist.all_reduce(grad)
                dist.all_reduce(hess)
                grad, hess = grad / world, hess / world
            lam = log_lam.exp()
            w = w - torch.linalg.solve(hess + torch.diag(lam), grad + lam * w)
        return w

    return fit


def hypergradients(distributed: bool, X, y, labels, X_val, y_val) -> dict:
    """Every case's hypergradients and backward diagnostics, distributed or on one process."""
    dp = idiff.DataParallel(sharded=["X", "y"]) if distributed else None
    dp_t = idiff.DataParallel(sharded=["X", "t"]) if distributed else None
    out: dict = {}
    for name, solver in (("cg", idiff.CG(tol=1e-12)), ("direct", idiff.Direct()), ("gmres", idiff.GMRES(tol=1e-12))):
        fit = idiff.implicit_diff(objective=ridge_objective, solver=solver, distributed=dp)(ridge_solver(distributed))
        log_lam = torch.linspace(-2.0, 0.5, D, dtype=torch.float64).requires_grad_()
        Xr = X.clone().requires_grad_(name == "cg")  # gradient w.r.t. this rank's data too (CG case)
        w = fit(torch.zeros(D, dtype=torch.float64), log_lam, Xr, y)
        loss = 0.5 * ((X_val @ w - y_val) ** 2).mean()
        loss.backward()
        info = fit.last_backward
        out[f"ridge_{name}"] = {
            "log_lam_grad": log_lam.grad.clone(),
            "X_grad": None if Xr.grad is None else Xr.grad.clone(),
            "status": info.status.name,
            "iterations": info.iterations,
            "residual": info.residual_norm,
        }
    fit = idiff.implicit_diff(objective=logistic_objective, solver=idiff.CG(tol=1e-12), distributed=dp_t)(
        logistic_solver(distributed)
    )
    log_lam = torch.full((D,), -1.0, dtype=torch.float64, requires_grad=True)
    w = fit(torch.zeros(D, dtype=torch.float64), log_lam, X, labels)
    loss = ((X_val @ w - y_val) ** 2).mean()
    loss.backward()
    info = fit.last_backward
    out["logistic_cg"] = {
        "log_lam_grad": log_lam.grad.clone(),
        "status": info.status.name,
        "iterations": info.iterations,
        "residual": info.residual_norm,
    }
    return out


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    X, y, labels, X_val, y_val = full_data(world)
    rows = slice(rank * N, (rank + 1) * N)
    result = hypergradients(True, X[rows], y[rows], labels[rows], X_val, y_val)
    # a cotangent that differs across ranks must raise on every rank (none left waiting)
    fit = idiff.implicit_diff(objective=ridge_objective, distributed=idiff.DataParallel(sharded=["X", "y"]))(
        ridge_solver(True)
    )
    log_lam = torch.zeros(D, dtype=torch.float64, requires_grad=True)
    w = fit(torch.zeros(D, dtype=torch.float64), log_lam, X[rows], y[rows])
    try:
        (w.sum() * (rank + 1)).backward()
        result["mismatch_error"] = ""
    except idiff.ImplicitDiffError as err:
        result["mismatch_error"] = str(err)
    # a solver that solves only its rank's shard must not give a (silently wrong) hypergradient
    local_fit = idiff.implicit_diff(objective=ridge_objective, distributed=idiff.DataParallel(sharded=["X", "y"]))(
        ridge_solver(False)
    )
    try:
        local_fit(torch.zeros(D, dtype=torch.float64), log_lam, X[rows], y[rows])
        result["local_solution_error"] = ""
    except idiff.ImplicitDiffError as err:
        result["local_solution_error"] = str(err)
    # the optimality check judges the global residual: a global solve stopped early warns on every rank
    import warnings

    early = idiff.implicit_diff(objective=logistic_objective, distributed=idiff.DataParallel(sharded=["X", "t"]))(
        logistic_solver(True, steps=1)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        early(torch.zeros(D, dtype=torch.float64), log_lam, X[rows], labels[rows])
    result["early_stop_warned"] = any(issubclass(c.category, idiff.InnerOptimalityWarning) for c in caught)
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
