"""A network layer that solves a quadratic program: sparsemax, trained end to end.

The layer maps scores ``s`` (one row per sample) to the solution of the QP

    z*(s) = argmin_z  0.5 * ||z - s||^2   s.t.  z >= 0,  sum(z) = 1,

the Euclidean projection onto the probability simplex ("sparsemax", Martins and Astudillo
2016): a probability vector with exact zeros. The QP is solved by an inner solver and
differentiated by implicit differentiation, in two interchangeable ways:

* ``method="projected_gradient"``: :func:`implicitdiff.projected_gradient` with
  :func:`implicitdiff.projections.simplex` (row by row under ``torch.vmap``), differentiated
  through :func:`implicitdiff.projected_gradient_condition` (step ``eta = 0.5``, so the
  backward Jacobian ``I - eta * J_P`` is not the identity: a genuine GMRES solve);
* ``method="kkt"``: the same primal solution completed by the multipliers of ``sum(z) = 1``
  (``nu``) and ``z >= 0`` (``mu``), differentiated through :func:`implicitdiff.kkt_condition`.

Both are checked against a dense reference (:func:`dense_kkt_sparsemax`): per sample, the KKT
system of the QP restricted to its active set (the support ``S`` of ``z``),

    [ I   1 ] [ z_S ]   [ s_S ]
    [ 1^T 0 ] [ nu  ] = [  1  ],

solved by ``torch.linalg.solve`` and differentiated by plain autograd.

The task (:func:`make_task`) is generated in-process: inputs ``x`` in R^20, and target
distributions over 10 labels that are sparse (1 to 3 labels carry the mass, 1.7 on average,
like a multi-label problem normalized to sum 1), produced by a random teacher network followed by sparsemax.
A two-layer network ``x -> Linear -> ReLU -> Linear -> sparsemax`` is fitted by Adam to the
squared error between its output distribution and the target.

Run ``python -m applications.hyperparameter_tuning.qp_layer --quick``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch

import implicitdiff as idiff
from implicitdiff import projections

__all__ = [
    "simplex_rows",
    "make_sparsemax",
    "dense_kkt_sparsemax",
    "SparsemaxNet",
    "make_task",
    "train",
    "main",
]

#: Step of the projected gradient condition and solver (the QP's Hessian is I, so 1/L = 1;
#: 0.5 keeps the backward system non-trivial and the solver contractive).
STEP = 0.5


def simplex_rows(y: torch.Tensor, params: Any = None) -> torch.Tensor:
    """Project every row of ``y`` onto the probability simplex (``params`` unused)."""
    return torch.vmap(projections.simplex)(y)


def qp_objective(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||z - s||^2`` summed over the rows: one independent QP per row."""
    return 0.5 * ((z - s) ** 2).sum()


def _sum_constraint(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return z.sum(-1) - 1


def _nonnegativity(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return -z


def make_sparsemax(method: str = "projected_gradient", *, solver: idiff.LinearSolver | None = None) -> Any:
    """The sparsemax layer ``sparsemax(s) -> z`` (``s``: ``(batch, k)``), differentiable by ``method``.

    ``solver``: the backward linear solver. Default: GMRES (tol 1e-12) for the projected gradient
    condition, whose Jacobian ``I - eta J_P`` has eigenvalues in ``[1 - eta, 1]``; the dense
    :class:`implicitdiff.Direct` for the KKT condition, whose Jacobian has the complementarity
    rows ``diag(mu)`` and ``diag(z)``: entries as small as the smallest non-zero ``z_i`` or
    multiplier ``mu_i``, which make it ill-conditioned enough to stall restarted GMRES.

    Examples
    --------
    >>> layer = make_sparsemax()
    >>> layer(torch.tensor([[1.0, 0.4, 0.1]], dtype=torch.float64))
    tensor([[0.8000, 0.2000, 0.0000]], dtype=torch.float64)
    """
    if method == "projected_gradient":
        solver = solver or idiff.GMRES(tol=1e-12, maxiter=200)
        condition = idiff.projected_gradient_condition(qp_objective, simplex_rows, stepsize=STEP)

        @idiff.implicit_diff(condition, solver=solver)
        def solve(init: torch.Tensor, params: Any, s: torch.Tensor) -> torch.Tensor:
            return idiff.projected_gradient(qp_objective, simplex_rows, init, params, s, stepsize=STEP).x

        def layer(s: torch.Tensor) -> torch.Tensor:
            return solve(torch.zeros_like(s), None, s)

        return layer
    if method == "kkt":
        solver = solver or idiff.Direct()
        condition = idiff.kkt_condition(qp_objective, eq=_sum_constraint, ineq=_nonnegativity)

        @idiff.implicit_diff(condition, solver=solver)
        def solve_kkt(init: Any, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            z = idiff.projected_gradient(qp_objective, simplex_rows, init[0], None, s, stepsize=STEP).x
            # stationarity z - s + nu * 1 - mu = 0: nu from the support, mu = z - s + nu (0 on it)
            support = z > 0
            nu = ((s - z) * support).sum(-1) / support.sum(-1)
            mu = torch.where(support, torch.zeros_like(z), z - s + nu[:, None])
            return z, nu, mu

        def layer_kkt(s: torch.Tensor) -> torch.Tensor:
            batch, k = s.shape
            init = (torch.zeros_like(s), s.new_zeros(batch), s.new_zeros(batch, k))
            return solve_kkt(init, s)[0]

        return layer_kkt
    raise ValueError(f"method must be 'projected_gradient' or 'kkt', got {method!r}")


def dense_kkt_sparsemax(s: torch.Tensor) -> torch.Tensor:
    """Reference: sparsemax of each row from its active-set KKT system, ``torch.linalg.solve``.

    The support is found by the exact sort-based projection (not differentiated); the values on
    it come from the dense KKT solve, differentiable by autograd with respect to ``s``.
    """
    rows = []
    for row in s:
        support = projections.simplex(row.detach()) > 0
        m = int(support.sum())
        K = torch.zeros(m + 1, m + 1, dtype=s.dtype)
        K[:m, :m] = torch.eye(m, dtype=s.dtype)
        K[:m, m] = 1
        K[m, :m] = 1
        rhs = torch.cat([row[support], torch.ones(1, dtype=s.dtype)])
        solution = torch.linalg.solve(K, rhs)
        z = torch.zeros_like(row).masked_scatter(support, solution[:m])
        rows.append(z)
    return torch.stack(rows)


class SparsemaxNet(torch.nn.Module):
    """``x -> Linear -> ReLU -> Linear -> QP layer``: a sparse probability vector per sample."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 32, layer: Any = None, dtype=torch.float64):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden, dtype=dtype), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out, dtype=dtype)
        )
        self.layer = layer if layer is not None else make_sparsemax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.body(x))


@dataclass
class Task:
    x_train: torch.Tensor
    z_train: torch.Tensor
    x_test: torch.Tensor
    z_test: torch.Tensor


def make_task(n_train: int = 512, n_test: int = 256, n_in: int = 20, n_out: int = 10, seed: int = 0) -> Task:
    """Sparse target distributions from a random teacher: ``sparsemax(teacher(x))``.

    The teacher's scores are scaled so that 1 to 3 of the ``n_out`` labels (1.7 on average) carry the mass.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, n_in, generator=generator, dtype=torch.float64)
    W1 = torch.randn(n_in, 32, generator=generator, dtype=torch.float64) / n_in**0.5
    W2 = torch.randn(32, n_out, generator=generator, dtype=torch.float64) / 32**0.5
    scores = 1.5 * torch.relu(x @ W1) @ W2 * 2.0
    z = simplex_rows(scores)
    return Task(x[:n_train], z[:n_train], x[n_train:], z[n_train:])


def train(task: Task, *, steps: int = 200, batch: int = 64, lr: float = 1e-2, method: str = "projected_gradient",
          seed: int = 0) -> dict[str, Any]:
    """Fit :class:`SparsemaxNet` with Adam on the squared error; returns losses and timing."""
    torch.manual_seed(seed)
    net = SparsemaxNet(task.x_train.shape[1], task.z_train.shape[1], layer=make_sparsemax(method))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def loss_on(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ((net(x) - z) ** 2).sum(-1).mean()

    with torch.no_grad():
        start_train, start_test = float(loss_on(task.x_train, task.z_train)), float(loss_on(task.x_test, task.z_test))
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(len(task.x_train), (batch,), generator=generator)
        loss = loss_on(task.x_train[index], task.z_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        predictions = net(task.x_test)
        end_train, end_test = float(loss_on(task.x_train, task.z_train)), float(loss_on(task.x_test, task.z_test))
    support_agreement = float(((predictions > 0) == (task.z_test > 0)).double().mean())
    return {
        "method": method,
        "steps": steps,
        "train loss start": start_train,
        "train loss end": end_train,
        "test loss start": start_test,
        "test loss end": end_test,
        "test support agreement": support_agreement,
        "mean test support size": float((predictions > 0).double().sum(-1).mean()),
        "seconds": seconds,
        "net": net,
    }


def gradient_check(seed: int = 0, batch: int = 16) -> dict[str, float]:
    """Max abs difference of the network's parameter gradients: implicit layers vs the dense KKT layer."""
    task = make_task(n_train=batch, n_test=3, seed=seed)
    torch.manual_seed(seed)
    net = SparsemaxNet(task.x_train.shape[1], task.z_train.shape[1])
    grads = {}
    for name, layer in (("projected_gradient", make_sparsemax("projected_gradient")),
                        ("kkt", make_sparsemax("kkt")), ("dense", dense_kkt_sparsemax)):
        net.layer = layer
        net.zero_grad()
        ((net(task.x_train) - task.z_train) ** 2).sum().backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone()
    return {name: float((grads[name] - grads["dense"]).abs().max()) for name in ("projected_gradient", "kkt")} | {
        "max |gradient|": float(grads["dense"].abs().max())
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 Adam steps instead of 400")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from .reporting import markdown_table

    check = gradient_check()
    print("max |gradient difference| vs dense KKT (float64):", {k: f"{v:.2e}" for k, v in check.items()})
    task = make_task()
    rows = []
    for method in ("projected_gradient", "kkt"):
        result = train(task, steps=100 if args.quick else 400, method=method)
        result.pop("net")
        rows.append(result)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
