"""The backward solve of an implicit function as one ``torch.compile``-d function (private).

``implicit_diff(..., compile_backward=True)``: in a plain first-order backward pass, the whole
hypergradient ``-B^T A^{-T} g`` is computed by one compiled function of the solution, the
arguments and the cotangent, which removes eager PyTorch's per-operation Python overhead (what
separates it from JIT-compiled JAX on small problems):

* ``dense`` (a solution of at most the dense size, 256 by default): ``A`` by ``torch.func.jacrev``
  of the condition, ``A^T u = g`` by ``torch.linalg.solve_ex``, the true residual, ``-B^T u``
  by ``torch.func.vjp``;
* ``cg`` (larger solutions of a symmetric condition): conjugate gradients in a
  ``torch._higher_order_ops.while_loop`` (compiled control flow, so the iteration count is a
  tensor and the loop stops at the tolerance), products by ``torch.func.jvp``.

One compiled function is built per call structure (pytree specs, static arguments, which
arguments are differentiated) and reused; torch recompiles it when shapes or dtypes change.
A dense solve that reports trouble (a singular matrix, a residual above ``sqrt(eps)``) falls
back to the eager path and its solver, which diagnoses it properly.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ._tree import tree_unflatten
from .diagnostics import SolveInfo, SolveStatus
from .solvers.auto import Auto

if TYPE_CHECKING:
    from .implicit_diff import ImplicitFunction, _Call

_Compiled = Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]]


class _Rebuild:
    """Rebuild a pytree from its optree-ordered leaves with torch's own pytree, which dynamo traces
    (dynamo's polyfill of optree cannot unflatten a spec made outside the compiled function)."""

    def __init__(self, tree: Any, leaves: Sequence[Any]) -> None:
        import torch.utils._pytree as tpt

        torch_leaves, self.spec = tpt.tree_flatten(tree)
        used: set[int] = set()
        self.order: list[int | None] = []
        for x in torch_leaves:
            j = next((k for k, y in enumerate(leaves) if y is x and k not in used), None)
            if j is not None:
                used.add(j)
            self.order.append(j)
        self.statics = list(torch_leaves)
        # every tensor must be found, else the two pytree libraries disagree on the structure
        self.ok = all(k in used for k, y in enumerate(leaves) if isinstance(y, torch.Tensor))

    def __call__(self, leaves: Sequence[Any]) -> Any:
        import torch.utils._pytree as tpt

        return tpt.tree_unflatten(
            [self.statics[i] if j is None else leaves[j] for i, j in enumerate(self.order)], self.spec
        )


def _key(call: _Call, args: Sequence[Any], wanted: Sequence[int], path: str) -> Any:
    statics = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
    try:
        hash(statics)
    except TypeError:
        return None  # unhashable static arguments: no reusable compiled function
    return (call.sol_spec, call.arg_spec, statics, tuple(wanted), path)


def _dense_limit(fn: ImplicitFunction) -> Callable[[int, torch.dtype], bool]:
    solver = fn.solver
    if isinstance(solver, Auto):
        return solver.dense
    return Auto().dense


def _tolerances(fn: ImplicitFunction, n: int) -> tuple[float, int, bool]:
    solver = fn.solver
    tol = 0.0 if solver.tol is None else float(solver.tol)
    maxiter = solver.maxiter if solver.maxiter is not None else min(10 * max(n, 1), 10_000)
    return tol, int(maxiter), solver.tol is None


def _build(
    fn: ImplicitFunction, call: _Call, sol: Sequence[torch.Tensor], args: Sequence[Any], wanted: Sequence[int],
    path: str,
) -> _Compiled | None:
    from torch._higher_order_ops.while_loop import while_loop

    condition = fn.condition
    raveler = call.raveler
    rebuild_args = _Rebuild(tree_unflatten(call.arg_spec, list(args)), args)
    rebuild_sol = _Rebuild(tree_unflatten(call.sol_spec, list(sol)), sol)
    if not (rebuild_args.ok and rebuild_sol.ok):
        return None
    statics = [None if isinstance(a, torch.Tensor) else a for a in args]
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    moving_idx = [tensor_pos.index(i) for i in wanted]
    n = raveler.size
    tol, maxiter, fixed_budget = _tolerances(fn, n)

    shapes = [tuple(int(d) for d in s) for s in raveler.shapes]  # plain ints: while_loop refuses torch.Size inputs
    numels = [int(k) for k in raveler.numels]

    def unravel(x: torch.Tensor) -> Any:
        parts = [x] if raveler.single else list(torch.split(x, numels))
        return rebuild_sol([p.reshape(s).to(d) for p, s, d in zip(parts, shapes, raveler.dtypes)])

    def residual(x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        leaves = list(statics)
        for i, t in zip(tensor_pos, tensors):
            leaves[i] = t
        a, kw = rebuild_args(leaves)
        return raveler.ravel(condition(unravel(x), *a, **kw))

    def transpose_solve_dense(x: torch.Tensor, g: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Any:
        A = torch.func.jacrev(lambda z: residual(z, tensors))(x)
        u, info = torch.linalg.solve_ex(A.mT, g)
        res = torch.linalg.vector_norm(A.mT @ u - g)
        return u, res, info

    def transpose_solve_cg(x: torch.Tensor, g: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Any:
        def product(v: torch.Tensor) -> torch.Tensor:  # symmetric condition: A^T v = A v
            return torch.func.jvp(lambda z: residual(z, tensors), (x,), (v,))[1]

        scale = torch.clamp(g.abs().amax(), min=torch.finfo(g.dtype).tiny)
        b = g / scale  # unit max-norm: tiny cotangents neither underflow nor stall the test
        threshold = (tol * torch.linalg.vector_norm(b)) ** 2
        r = b.clone()

        def keep_going(u: Any, r: Any, p: Any, rs: Any, k: Any) -> Any:
            return (rs > threshold) & (k < maxiter)

        def step(u: Any, r: Any, p: Any, rs: Any, k: Any) -> Any:
            Ap = product(p)
            alpha = rs / (p @ Ap)
            u = u + alpha * p
            r = r - alpha * Ap
            rs_new = r @ r
            return u, r, r + (rs_new / rs) * p, rs_new, k + 1

        start = (torch.zeros_like(b), r, r.clone(), r @ r, torch.zeros((), dtype=torch.int64, device=g.device))
        u, _, _, _, k = while_loop(keep_going, step, start)
        res = torch.linalg.vector_norm(b - product(u)) * scale  # the true residual, not the recursive one
        return u * scale, res, k

    def backward(x: torch.Tensor, g: torch.Tensor, *tensors: torch.Tensor) -> Any:
        if path == "dense":
            u, res, extra = transpose_solve_dense(x, g, tensors)
        else:
            u, res, extra = transpose_solve_cg(x, g, tensors)

        def of(*moving: torch.Tensor) -> torch.Tensor:
            full = list(tensors)
            for j, m in zip(moving_idx, moving):
                full[j] = m
            return residual(x, full)

        _, vjp = torch.func.vjp(of, *[tensors[j] for j in moving_idx])  # type: ignore[misc]  # a 2- or 3-tuple
        return tuple(-t for t in vjp(u)), res, extra

    compiled = torch.compile(backward, dynamic=False)  # one static-shape program per call structure
    compiled.tol, compiled.maxiter, compiled.fixed_budget = tol, maxiter, fixed_budget  # type: ignore[attr-defined]
    return compiled


def compiled_backward(
    fn: ImplicitFunction, call: _Call, sol: Sequence[torch.Tensor], args: Sequence[Any], g: torch.Tensor,
    wanted: Sequence[int],
) -> tuple[tuple[torch.Tensor, ...], SolveInfo] | None:
    """``(-B^T u for the wanted arguments, diagnostics)`` by the compiled path, or None to use the eager one."""
    n = call.raveler.size
    if n == 0:
        return None
    dtype = call.raveler.dtype
    if _dense_limit(fn)(n, dtype):
        path = "dense"
    elif fn.condition.symmetric:
        path = "cg"
    else:
        return None  # a large non-symmetric system: the eager Krylov solver (GMRES) runs it
    key = _key(call, args, wanted, path)
    if key is None:
        return None
    cache: dict[Any, _Compiled | None] = fn._compiled_backwards
    if key in cache:
        compiled = cache[key]
    else:
        compiled = cache[key] = _build(fn, call, sol, args, wanted, path)
    if compiled is None:
        return None
    x = call.raveler.ravel(tree_unflatten(call.sol_spec, [s.detach() for s in sol]))
    tensors = [a.detach() for a in args if isinstance(a, torch.Tensor)]
    try:
        grads, res_t, extra = compiled(x, g.detach(), *tensors)
    except Exception as err:  # any compiler failure: the eager path is always correct
        cache[key] = None
        warnings.warn(
            f"{fn.name}: compile_backward: torch.compile could not compile the {path} backward "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); this call structure uses the eager path",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    res = float(res_t)
    gnorm = float(torch.linalg.vector_norm(g))
    rel = res / gnorm if gnorm > 0 else 0.0
    finite = math.isfinite(res) and all(bool(torch.isfinite(t).all()) for t in grads)
    if path == "dense":
        if not finite or int(extra) != 0 or rel > math.sqrt(torch.finfo(dtype).eps):
            return None  # the eager solver diagnoses a singular or ill-conditioned system properly
        status, iterations, name = SolveStatus.CONVERGED, 1, "compiled dense LU"
    else:
        iterations, name = int(extra), "compiled CG"
        tol = compiled.tol  # type: ignore[attr-defined]
        if not finite:
            status = SolveStatus.NONFINITE
        elif compiled.fixed_budget:  # type: ignore[attr-defined]
            status = SolveStatus.BUDGET_USED
        else:
            met = rel <= max(tol, 10 * torch.finfo(dtype).eps)
            status = SolveStatus.CONVERGED if met else SolveStatus.MAX_ITERATIONS
    info = SolveInfo(name, "backward", status, iterations, res, rel, fn.name)
    return grads, info
