"""Data-parallel implicit differentiation on ``torch.distributed``.

The inner objective is a sum (or mean) over data sharded across the ranks of a process
group; the solution and the hyperparameters are replicated. Each rank evaluates the
condition on its own shard; the products with :math:`\\partial F/\\partial x` and
:math:`\\partial F/\\partial\\theta` that the backward solve needs are all-reduced, so every
rank runs the same Krylov iteration on the global system and returns the same
hypergradient, equal to the one of a single process holding all the data.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch

from ._functorch import under_functorch
from .errors import ImplicitDiffError

__all__ = ["DataParallel"]


class DataParallel:
    r"""Declare that the optimality condition is reduced over a ``torch.distributed`` process group.

    Pass it as ``implicit_diff(..., distributed=DataParallel(...))``. On rank :math:`r` the
    condition (or objective) sees the rank's shard :math:`D_r` and computes its own term;
    the global condition is

    .. math::

        F(x, \theta) = \frac{1}{W}\sum_{r=1}^{W} F_r(x, \theta; D_r)
        \quad(\texttt{reduce="mean"}), \qquad
        F = \sum_r F_r \quad(\texttt{reduce="sum"}),

    for a group of :math:`W` processes. With ``reduce="mean"`` (the convention of
    ``DistributedDataParallel``, which averages gradients) a local objective written as *mean
    loss over the local shard + penalty* describes the global *mean loss + penalty* when the
    shards have equal sizes; with ``reduce="sum"`` write the local term so that the terms add
    up (e.g. data term summed and divided by the global sample count, penalty divided by
    :math:`W`).

    The backward pass of a call then

    0. (at every call) checks that the inner solver returned the same solution on every rank;
    1. takes the cotangent :math:`\bar x` from rank 0 (it must be the same on every rank: the
       outer loss is replicated; a cotangent that differs by more than rounding raises on
       every rank, see below);
    2. solves :math:`A^\top u = \bar x` with every product :math:`A^\top v` all-reduced
       (one ``all_reduce`` of a vector of the solution's size per product); since the
       products, the right-hand side and therefore every decision of the solver are the same
       on all ranks, all ranks run the same iterations and report the same
       :class:`~implicitdiff.SolveInfo`;
    3. returns :math:`-B^\top u` with :math:`B^\top u` all-reduced for the replicated
       arguments (the hyperparameters), and the rank's own term (scaled like the reduction)
       for the arguments named in ``sharded`` (the rank's data: their gradient belongs to the
       rank that holds them).

    The inner solver is the user's: it must return the solution of the *global* problem on
    every rank (e.g. gradient descent or L-BFGS on all-reduced gradients, or a closed form on
    all-reduced statistics). The optimality check all-reduces :math:`F(x^\star)` too, so it
    judges the global residual and warns on every rank alike.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The process group (default: the world group). The backend is any that supports
        ``all_reduce`` and ``broadcast`` on the tensors' device (gloo on CPU, nccl on CUDA).
    sharded : sequence of str
        Names of the inner solver's parameters that hold this rank's shard of the data.
        Every other argument is taken as replicated.
    reduce : {"mean", "sum"}
        How the ranks' conditions combine (see above).
    solution_rtol : float
        Every call checks that the inner solver returned the same solution on every rank (one
        ``broadcast`` of the solution and one scalar ``all_reduce``), within this relative
        tolerance: a solver that solved only its rank's shard would otherwise give a silently
        wrong hypergradient. All ranks raise together when it fails.
    check_cotangent : bool
        Verify that the cotangent is replicated (one ``broadcast`` and one scalar
        ``all_reduce`` per backward call). An outer loss computed on each rank's own
        validation shard gives different cotangents: all-reduce that loss first (e.g. with
        ``torch.distributed.nn.functional.all_reduce``, which is differentiable), so that it
        is the same global loss everywhere.

    Notes
    -----
    *Scope.* First-order reverse mode (``loss.backward()``, ``torch.autograd.grad``) in
    ``mode="implicit"`` or ``"one_step"``. Collectives cannot run inside ``torch.func``
    transforms, so ``vmap``/``grad``/``jvp`` over a data-parallel implicit function and
    higher-order derivatives raise :class:`~implicitdiff.ImplicitDiffError`.

    *With DistributedDataParallel.* A DDP-wrapped model is usually the *outer* model; the
    implicit function's inner condition should evaluate the unwrapped module
    (``ddp.module``, through ``torch.func.functional_call``), because DDP's own gradient
    hooks would otherwise all-reduce a second time. The hyperparameters' gradients that this
    class returns are already global: exclude them from any further averaging (or, if they
    are parameters of the DDP module, give DDP a replicated outer loss so that its averaging
    of identical gradients leaves them unchanged).

    *FSDP.* A solution sharded across ranks (fully sharded parameters) would need the
    products to all-gather the solution and reduce-scatter the result instead of one
    all-reduce, and the Krylov inner products to be all-reduced; this class assumes a
    replicated solution and does not do that.

    Examples
    --------
    Two processes, each holding half of a ridge problem's rows (run under ``torchrun``)::

        import torch, torch.distributed as dist, implicitdiff as idiff

        def objective(w, log_lam, X, y):      # this rank's term: mean loss on its rows + penalty
            return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * log_lam.exp() * (w ** 2).sum()

        @idiff.implicit_diff(objective=objective, distributed=idiff.DataParallel(sharded=["X", "y"]))
        def fit(w, log_lam, X, y):            # normal equations of the global problem
            G, c = X.T @ X / len(X), X.T @ y / len(X)
            dist.all_reduce(G); dist.all_reduce(c)
            W = dist.get_world_size()
            return torch.linalg.solve(G / W + log_lam.exp() * torch.eye(len(w)), c / W)
    """

    def __init__(
        self,
        group: Any = None,
        *,
        sharded: Sequence[str] = (),
        reduce: Literal["mean", "sum"] = "mean",
        solution_rtol: float = 1e-6,
        check_cotangent: bool = True,
    ) -> None:
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        if isinstance(sharded, str):
            sharded = (sharded,)
        if not all(isinstance(s, str) for s in sharded):
            raise TypeError(f"sharded must be a sequence of parameter names (str), got {sharded!r}")
        self.group = group
        self.sharded = tuple(sharded)
        self.reduce = reduce
        if not solution_rtol >= 0:
            raise ValueError(f"solution_rtol must be >= 0, got {solution_rtol!r}")
        self.solution_rtol = float(solution_rtol)
        self.check_cotangent = bool(check_cotangent)

    def __repr__(self) -> str:
        return f"DataParallel(sharded={list(self.sharded)}, reduce={self.reduce!r})"

    # ------------------------------------------------------------------ collectives
    def _dist(self, where: str) -> Any:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ImplicitDiffError(
                f"{where}: distributed=DataParallel(...) needs an initialized process group "
                "(torch.distributed.init_process_group), e.g. under torchrun"
            )
        return dist

    def world_size(self, where: str = "DataParallel") -> int:
        """Number of processes in the group."""
        return int(self._dist(where).get_world_size(self.group))

    def check_context(self, where: str, *, differentiable: bool = False, forward: bool = False) -> None:
        """Raise where collectives cannot run (inside torch.func transforms, higher-order derivatives)."""
        self._dist(where)
        if forward:
            raise ImplicitDiffError(
                f"{where}: data-parallel implicit differentiation supports reverse mode only (loss.backward(), "
                "torch.autograd.grad); forward mode (jvp, jacfwd) is not available with distributed="
            )
        if under_functorch() or differentiable:
            raise ImplicitDiffError(
                f"{where}: data-parallel implicit differentiation supports first-order reverse mode only "
                "(loss.backward(), torch.autograd.grad without create_graph): collectives cannot run inside "
                "torch.func transforms (vmap, grad, jvp) or a differentiated backward pass"
            )

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The reduction of ``t`` over the group (a new tensor; ``t`` is not changed)."""
        dist = self._dist("DataParallel")
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        if self.reduce == "mean":
            out = out / dist.get_world_size(self.group)
        return out

    def local_share(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's term of a sharded argument's gradient, scaled like the reduction."""
        if self.reduce == "mean":
            return t / self.world_size()
        return t

    def replicated_cotangent(self, g: torch.Tensor, where: str) -> torch.Tensor:
        """Rank 0's cotangent, after checking (optionally) that every rank has the same one."""
        if not self.check_cotangent:
            return self._broadcast(g, where)
        return self.replicated(
            g,
            where,
            1e3 * torch.finfo(g.dtype).eps,
            "the cotangent of the solution differs across ranks",
            "DataParallel assumes a replicated outer loss; compute it on all the validation data on every rank, "
            "or all-reduce it with torch.distributed.nn.functional.all_reduce before backward()",
        )

    def replicated(self, t: torch.Tensor, where: str, rtol: float, what: str, fix: str) -> torch.Tensor:
        """Rank 0's ``t``; every rank raises together if some rank's ``t`` differs by more than ``rtol``."""
        dist = self._dist(where)
        t0 = self._broadcast(t, where)
        scale = float(t0.abs().amax()) if t0.numel() else 0.0
        gap = float((t.detach() - t0).abs().amax()) if t0.numel() else 0.0
        flag = torch.tensor([1.0 if gap > rtol * max(scale, 1e-300) else 0.0], device=t0.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if float(flag) > 0:  # every rank raises together: none is left waiting in a collective
            raise ImplicitDiffError(
                f"{where}: {what} (largest difference from rank 0 on this rank {gap:.3e}, scale {scale:.3e}). {fix}"
            )
        return t0

    def _broadcast(self, t: torch.Tensor, where: str) -> torch.Tensor:
        dist = self._dist(where)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        out = t.detach().clone().contiguous()
        dist.broadcast(out, src=src, group=self.group)
        return out

    def reduce_products(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> all_reduce(fn(v))``, keeping a batched variant if ``fn`` has one."""

        def reduced(v: torch.Tensor) -> torch.Tensor:
            return self.all_reduce(fn(v))

        batched = getattr(fn, "batched", None)
        if batched is not None:
            reduced.batched = lambda rows: self.all_reduce(batched(rows))  # type: ignore[attr-defined]  # read by solve_flat
        return reduced

    def reduce_argument_grads(
        self, grads: Sequence[torch.Tensor], sharded_mask: Sequence[bool]
    ) -> tuple[torch.Tensor, ...]:
        """All-reduce the replicated arguments' gradients (one flat collective); scale the sharded ones."""
        out = list(grads)
        shared = [i for i, s in enumerate(sharded_mask) if not s]
        for dtype in dict.fromkeys(grads[i].dtype for i in shared):  # one flat collective per dtype
            group = [i for i in shared if grads[i].dtype == dtype]
            total = self.all_reduce(torch.cat([grads[i].reshape(-1) for i in group]))
            offset = 0
            for i in group:
                n = grads[i].numel()
                out[i] = total[offset : offset + n].reshape(grads[i].shape)
                offset += n
        for i, s in enumerate(sharded_mask):
            if s:
                out[i] = self.local_share(grads[i])
        return tuple(out)
