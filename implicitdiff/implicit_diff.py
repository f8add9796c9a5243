"""The :func:`implicit_diff` decorator: differentiate any inner solver through its optimality condition.

How it works. A call ``solver(init, *args, **kwargs)`` runs in two autograd Functions:

1. :class:`_InnerSolve` runs the user's solver on *detached* arguments, with grad mode on
   (so the solver may use autograd, ``torch.optim``, or leave torch for scipy) and keeps
   none of its graph: memory does not depend on how many iterations it ran. Under
   ``torch.func.vmap`` its vmap rule runs the solver once per problem (or batched, on
   request), so any solver works under vmap.
2. :class:`_ImplicitAttach` returns the solution unchanged and carries the derivative of
   the implicit function theorem: with :math:`A = \\partial F/\\partial x` and
   :math:`B = \\partial F/\\partial\\theta` at the solution, its backward solves
   :math:`A^\\top u = \\bar x` and returns :math:`\\bar\\theta = -B^\\top u`; its forward-mode
   rule solves :math:`A\\,\\dot x = -B\\dot\\theta`. Products with :math:`A^\\top` and
   :math:`B^\\top` come from ``torch.func.vjp`` (one linearization reused by every product
   of the solve), products with :math:`A` and :math:`B` from ``torch.func.jvp``
   (forward-over-reverse for an objective). Both rules are written in vmappable torch ops,
   so the Function composes with ``grad``, ``vjp``, ``jvp`` and ``vmap`` in any order.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Literal, Sequence

import torch

from ._functorch import is_wrapped, under_functorch, under_vmap
from ._tree import PyTree, Raveler, describe, tree_flatten, tree_unflatten
from .conditions import Condition, fixed_point_condition, stationarity_condition
from .diagnostics import SolveInfo, SolveStatus, report
from .errors import ImplicitDiffError, InnerOptimalityWarning
from .linear_solve import check_solver, solve_flat
from .solvers.base import LinearSolver
from .solvers.cg import CG
from .solvers.gmres import GMRES

__all__ = ["implicit_diff", "ImplicitFunction"]

Mode = Literal["implicit", "unrolled", "one_step"]
_MODES = ("implicit", "unrolled", "one_step")


_CLOSURE_MESSAGE = (
    "{name}: the optimality condition depends on a tensor that requires grad but is not an argument of the "
    "solver (a closure, a global, or a module's parameters). Its gradient would be silently zero. Pass it as an "
    "argument of the decorated solver and of the condition (for a module, pass dict(module.named_parameters()) "
    "and use torch.func.functional_call), or detach it."
)


class _Call:
    """Everything about one call that is not a tensor: the function, pytree specs, options."""

    __slots__ = ("fn", "init_spec", "arg_spec", "n_init", "sol_spec", "n_sol", "raveler", "aux_spec",
                 "aux_static", "aux_is_tensor")

    def __init__(self, fn: "ImplicitFunction", init_spec: Any, arg_spec: Any, n_init: int) -> None:
        self.fn = fn
        self.init_spec = init_spec
        self.arg_spec = arg_spec
        self.n_init = n_init
        self.sol_spec: Any = None
        self.n_sol = 0
        self.raveler: Raveler | None = None
        self.aux_spec: Any = None
        self.aux_static: list[Any] = []
        self.aux_is_tensor: list[bool] = []

    def args(self, arg_leaves: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = tree_unflatten(self.arg_spec, list(arg_leaves))
        return args, kwargs

    def residual(self, sol_leaves: Sequence[torch.Tensor], arg_leaves: Sequence[Any]) -> torch.Tensor:
        """F(x, *args, **kwargs) raveled to a flat vector."""
        x = tree_unflatten(self.sol_spec, list(sol_leaves))
        args, kwargs = self.args(arg_leaves)
        return self.raveler.ravel(self.fn.condition(x, *args, **kwargs))

    def residual_in(
        self, sol_leaves: Sequence[torch.Tensor], arg_leaves: Sequence[Any], positions: Sequence[int]
    ) -> Callable[..., torch.Tensor]:
        """F at the solution as a function of the argument leaves at ``positions`` (for B products)."""

        def of(*moving: torch.Tensor) -> torch.Tensor:
            full = list(arg_leaves)
            for i, m in zip(positions, moving):
                full[i] = m
            return self.residual(sol_leaves, full)

        return of


def _detach(leaves: Sequence[Any]) -> list[Any]:
    return [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]


def _tensor_slice(x: Any, dim: int | None, i: int) -> Any:
    return x if dim is None else x.select(dim, i)


class _InnerSolve(torch.autograd.Function):
    """Runs the inner solver; outputs are not differentiable (the attach step adds the derivative)."""

    @staticmethod
    def forward(call: _Call, *leaves: Any) -> tuple[torch.Tensor, ...]:
        return call.fn._run_inner(call, leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output)
        ctx.n_out = len(output)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[None, ...]:
        return (None,) * len(ctx.needs_input_grad)  # outputs are non-differentiable

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[None, ...]:
        return (None,) * ctx.n_out

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], call: _Call, *leaves: Any) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        dims = in_dims[1:]
        if call.fn.vmap_inner == "batched":
            outs = call.fn._run_inner_batched(call, leaves, dims)
        else:
            per_problem = [
                _InnerSolve.apply(call, *[_tensor_slice(x, d, i) for x, d in zip(leaves, dims)])
                for i in range(info.batch_size)
            ]
            outs = tuple(torch.stack(col) for col in zip(*per_problem))
        return outs, (0,) * len(outs)


class _ImplicitAttach(torch.autograd.Function):
    """Identity on the solution whose derivative is given by the implicit function theorem."""

    generate_vmap_rule = True

    @staticmethod
    def forward(call: _Call, *leaves: Any) -> tuple[torch.Tensor, ...]:
        return tuple(x.clone() for x in leaves[: call.n_sol])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        call = inputs[0]
        args = inputs[1 + call.n_sol :]
        ctx.call = call
        ctx.tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.static_args = [None if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [args[i] for i in ctx.tensor_pos]
        # the outputs (not the inputs) are saved so that a second derivative sees x*(theta)
        ctx.save_for_backward(*output, *tensors)
        ctx.save_for_forward(*inputs[1 : 1 + call.n_sol], *tensors)

    @staticmethod
    def saved(ctx: Any) -> tuple[tuple[torch.Tensor, ...], list[Any]]:
        """The solution and the full argument leaves, tensors restored from the saved ones."""
        saved = ctx.saved_tensors
        n_sol = ctx.call.n_sol
        args = list(ctx.static_args)
        for i, t in zip(ctx.tensor_pos, saved[n_sol:]):
            args[i] = t
        return saved[:n_sol], args

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        call: _Call = ctx.call
        sol, args = _ImplicitAttach.saved(ctx)
        offset = 1 + call.n_sol
        wanted = [i for i in ctx.tensor_pos if ctx.needs_input_grad[offset + i]]
        out: list[Any] = [None] * (offset + len(args))
        if not wanted:
            return tuple(out)
        g = [gi if gi is not None else torch.zeros_like(s) for gi, s in zip(grads, sol)]
        arg_grads = call.fn._backward(call, sol, args, g, wanted)
        for i, gr in zip(wanted, arg_grads):
            out[offset + i] = gr
        return tuple(out)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[torch.Tensor, ...]:
        call: _Call = ctx.call
        sol, args = _ImplicitAttach.saved(ctx)
        arg_tangents = tangents[1 + call.n_sol :]
        moving = [i for i in ctx.tensor_pos if arg_tangents[i] is not None]
        if not moving:
            return tuple(torch.zeros_like(s) for s in sol)
        return call.fn._forward_tangent(call, sol, args, [arg_tangents[i] for i in moving], moving)


class ImplicitFunction:
    """An inner solver made differentiable by :func:`implicit_diff` (create it with the decorator).

    Calling it as ``fn(init, *args, **kwargs)`` runs the wrapped solver and returns its
    solution (and aux), differentiable w.r.t. every tensor in ``args``/``kwargs``.

    Attributes
    ----------
    last_backward : SolveInfo or None
        Diagnostics of the most recent backward linear solve of this function.
    """

    def __init__(
        self,
        inner: Callable[..., Any],
        condition: Condition,
        solver: LinearSolver,
        *,
        has_aux: bool,
        mode: Mode,
        check_optimality: float | None,
        warm_start: bool,
        vmap_inner: Literal["loop", "batched"],
    ) -> None:
        self.inner = inner
        self.condition = condition
        self.solver = solver
        self.has_aux = has_aux
        self.mode = mode
        self.check_optimality = check_optimality
        self.warm_start = warm_start
        self.vmap_inner = vmap_inner
        self.last_backward: SolveInfo | None = None
        self._warm: torch.Tensor | None = None
        self._validated: set[Any] = set()
        functools.update_wrapper(self, inner)

    @property
    def name(self) -> str:
        return getattr(self.inner, "__name__", "inner solver")

    def __repr__(self) -> str:
        return f"<implicit_diff {self.name} ({self.condition.name}, {self.solver!r}, mode={self.mode})>"

    # ------------------------------------------------------------------ calling
    def __call__(self, init: PyTree, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "unrolled":
            return self._call_unrolled(init, args, kwargs)
        init_leaves, init_spec = tree_flatten(init)
        arg_leaves, arg_spec = tree_flatten((args, kwargs))
        call = _Call(self, init_spec, arg_spec, len(init_leaves))
        outs = _InnerSolve.apply(call, *init_leaves, *arg_leaves)
        sol_leaves = list(outs[: call.n_sol])
        sol_leaves = list(_ImplicitAttach.apply(call, *sol_leaves, *arg_leaves))
        solution = tree_unflatten(call.sol_spec, sol_leaves)
        if not self.has_aux:
            return solution
        aux_iter = iter(outs[call.n_sol :])
        aux_leaves = [next(aux_iter) if is_t else s for is_t, s in zip(call.aux_is_tensor, call.aux_static)]
        return solution, tree_unflatten(call.aux_spec, aux_leaves)

    def _call_unrolled(self, init: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with torch.enable_grad():
            out = self.inner(init, *args, **kwargs)
        solution = self._split_aux(out)[0]
        if self.check_optimality is not None and not under_vmap():
            init_leaves, _ = tree_flatten(init)
            sol_leaves, spec = tree_flatten(solution)
            arg_leaves, arg_spec = tree_flatten((args, kwargs))
            call = _Call(self, None, arg_spec, len(init_leaves))
            self._describe_solution(call, sol_leaves, spec)
            self._check(call, _detach(sol_leaves), _detach(init_leaves), _detach(arg_leaves))
        return out

    # ------------------------------------------------------------------ forward solve
    def _split_aux(self, out: Any) -> tuple[Any, Any]:
        if not self.has_aux:
            return out, None
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ImplicitDiffError(
                f"{self.name}: has_aux=True, so the inner solver must return (solution, aux), got {type(out).__name__}"
            )
        return out[0], out[1]

    def _describe_solution(self, call: _Call, sol_leaves: list[Any], spec: Any) -> None:
        if not sol_leaves:
            raise ImplicitDiffError(f"{self.name}: the inner solver returned no tensors (got {spec})")
        for x in sol_leaves:
            if not isinstance(x, torch.Tensor):
                raise ImplicitDiffError(
                    f"{self.name}: the solution must be a tensor or a pytree of tensors, got a leaf of type "
                    f"{type(x).__name__} in {spec}"
                )
            if not x.is_floating_point():
                raise ImplicitDiffError(
                    f"{self.name}: the solution must be floating point to be differentiated, got dtype {x.dtype} "
                    f"in {spec}; cast init to a floating dtype"
                )
        call.sol_spec = spec
        call.n_sol = len(sol_leaves)
        call.raveler = Raveler(tree_unflatten(spec, sol_leaves))

    def _run_inner(self, call: _Call, leaves: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """Forward of _InnerSolve: run the solver, validate, check optimality."""
        detached = _detach(leaves)
        init_leaves, arg_leaves = detached[: call.n_init], detached[call.n_init :]
        init = tree_unflatten(call.init_spec, init_leaves)
        args, kwargs = call.args(arg_leaves)
        with torch.enable_grad():
            out = self.inner(init, *args, **kwargs)
        solution, aux = self._split_aux(out)
        sol_leaves, spec = tree_flatten(solution)
        self._describe_solution(call, sol_leaves, spec)
        inputs = {x.untyped_storage().data_ptr() for x in detached if isinstance(x, torch.Tensor) and x.device.type != "meta"}
        sol_leaves = [self._own(x, inputs) for x in sol_leaves]
        self._check_devices(sol_leaves, arg_leaves)
        signature = (
            call.sol_spec,
            call.arg_spec,
            tuple((x.shape, x.dtype, x.device) for x in sol_leaves),
            tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in arg_leaves),
        )
        if self.check_optimality is not None or signature not in self._validated:
            # evaluating F costs about one gradient: once per signature unless optimality is checked
            self._check(call, sol_leaves, init_leaves, arg_leaves)
            self._validated.add(signature)
        elif _captures_transformed_tensor(self.condition):
            raise ImplicitDiffError(_CLOSURE_MESSAGE.format(name=self.name))
        aux_tensors: list[torch.Tensor] = []
        if self.has_aux:
            aux_leaves, call.aux_spec = tree_flatten(aux)
            call.aux_is_tensor = [isinstance(a, torch.Tensor) for a in aux_leaves]
            call.aux_static = [None if t else a for a, t in zip(aux_leaves, call.aux_is_tensor)]
            aux_tensors = [self._own(a, inputs) for a in aux_leaves if isinstance(a, torch.Tensor)]
        return tuple(sol_leaves) + tuple(aux_tensors)

    @staticmethod
    def _own(x: torch.Tensor, input_ptrs: set[int]) -> torch.Tensor:
        """Detach from the solver's graph; copy if it aliases an argument (autograd needs fresh outputs)."""
        x = x.detach()
        if x.device.type != "meta" and x.untyped_storage().data_ptr() in input_ptrs:
            x = x.clone()
        return x

    def _run_inner_batched(self, call: _Call, leaves: Sequence[Any], dims: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """vmap rule with ``vmap_inner="batched"``: one batched run of the solver."""
        if self.has_aux:
            raise ImplicitDiffError(f"{self.name}: vmap_inner='batched' does not support has_aux=True; use 'loop'")
        detached = _detach(leaves)

        def one(*ls: Any) -> tuple[torch.Tensor, ...]:
            init = tree_unflatten(call.init_spec, list(ls[: call.n_init]))
            args, kwargs = call.args(ls[call.n_init :])
            with torch.enable_grad():
                out = self.inner(init, *args, **kwargs)
            sol_leaves, spec = tree_flatten(out)
            call.sol_spec = spec
            return tuple(x.detach() for x in sol_leaves)

        sols = torch.func.vmap(one, in_dims=tuple(dims))(*detached)
        per_spec = call.sol_spec
        unbatched = [s[0] for s in sols]
        self._describe_solution(call, unbatched, per_spec)
        if self.check_optimality is not None:
            for i in range(sols[0].shape[0]):
                self._check(
                    call,
                    [s[i] for s in sols],
                    [_tensor_slice(x, d, i) for x, d in zip(detached[: call.n_init], dims[: call.n_init])],
                    [_tensor_slice(x, d, i) for x, d in zip(detached[call.n_init :], dims[call.n_init :])],
                )
        return tuple(sols)

    def _check_devices(self, sol_leaves: Sequence[torch.Tensor], arg_leaves: Sequence[Any]) -> None:
        devices = {x.device for x in sol_leaves}
        arg_devices = {a.device for a in arg_leaves if isinstance(a, torch.Tensor) and a.is_floating_point()}
        if len(devices) > 1 or (arg_devices and not devices <= arg_devices):
            raise ImplicitDiffError(
                f"{self.name}: device mismatch: the solution is on {sorted(map(str, devices))} but the floating-point "
                f"arguments are on {sorted(map(str, arg_devices))}; move them to one device"
            )

    def _check(
        self,
        call: _Call,
        sol_leaves: Sequence[torch.Tensor],
        init_leaves: Sequence[Any],
        arg_leaves: Sequence[Any],
    ) -> None:
        """Evaluate F at the solution once: validate its structure, find closures, check optimality."""
        args, kwargs = call.args(arg_leaves)
        x = tree_unflatten(call.sol_spec, list(sol_leaves))
        with torch.enable_grad():
            residual = self.condition(x, *args, **kwargs)
        r_leaves, r_spec = tree_flatten(residual)
        if r_spec != call.sol_spec or any(
            not isinstance(r, torch.Tensor) or r.shape != s.shape for r, s in zip(r_leaves, sol_leaves)
        ):
            raise ImplicitDiffError(
                f"{self.name}: the optimality condition ({self.condition.name}) must return a residual with the "
                f"solution's structure and shapes; solution is {describe(x)}, residual is {describe(residual)}"
            )
        for r, s in zip(r_leaves, sol_leaves):
            if r.dtype != s.dtype:
                raise ImplicitDiffError(
                    f"{self.name}: the residual has dtype {r.dtype} where the solution has {s.dtype}; "
                    "the optimality condition must keep the solution's dtype"
                )
            if r.requires_grad or is_wrapped(r) or _captures_transformed_tensor(self.condition):
                raise ImplicitDiffError(_CLOSURE_MESSAGE.format(name=self.name))
        if self.check_optimality is None:
            return
        with torch.no_grad():
            res = float(call.raveler.ravel(residual).norm())
            try:
                init = tree_unflatten(call.sol_spec, list(init_leaves))
                ref = float(call.raveler.ravel(self.condition(init, *args, **kwargs)).norm())
            except (ValueError, TypeError, RuntimeError):
                ref = 1.0  # init has another structure: the tolerance is absolute
        rel = res / ref if ref > 0 else (0.0 if res == 0 else float("inf"))
        ok = rel <= self.check_optimality
        info = SolveInfo(
            "optimality",
            "optimality",
            SolveStatus.CONVERGED if ok else SolveStatus.MAX_ITERATIONS,
            None,
            res,
            rel,
            self.name,
            f"||F(x*)|| / ||F(init)|| = {rel:.3e} (tolerance {self.check_optimality:g})",
        )
        report(info, "ignore")
        if not ok and res == res:
            warnings.warn(
                f"{self.name}: the inner solution does not satisfy its optimality condition: ||F(x*)|| = {res:.3e}, "
                f"{rel:.3e} times ||F(init)|| (tolerance {self.check_optimality:g}). The implicit gradient is taken at "
                "a non-stationary point and may be wrong: run the inner solver longer or more accurately.",
                InnerOptimalityWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ derivatives
    def _backward(
        self,
        call: _Call,
        sol: Sequence[torch.Tensor],
        args: list[Any],
        grads: Sequence[torch.Tensor],
        wanted: list[int],
    ) -> tuple[torch.Tensor, ...]:
        """Reverse mode: solve A^T u = g, return -B^T u for the wanted argument leaves."""
        rav = call.raveler
        g = rav.ravel(tree_unflatten(call.sol_spec, list(grads)))
        transpose_products, args_vjp = _linearize(call, sol, args, wanted, transpose=self.mode != "one_step")
        if self.mode == "one_step":
            u = g
        else:

            def forward_products() -> Callable[[torch.Tensor], torch.Tensor]:  # A v, for NormalCG
                def mv(v: torch.Tensor) -> torch.Tensor:
                    vs = tree_flatten(rav.unravel(v))[0]
                    return torch.func.jvp(lambda *xs: call.residual(xs, args), tuple(sol), tuple(vs))[1]

                return mv

            u, info = solve_flat(
                self.solver,
                transpose_products,
                g,
                raveler=rav,
                x0=self._warm_guess(g),
                rmatvec_factory=forward_products,
                kind="backward",
                function=self.name,
            )
            if info.status is not None:
                self.last_backward = info
                if self.warm_start:
                    self._warm = u.detach()
        return args_vjp(-u)

    def _forward_tangent(
        self,
        call: _Call,
        sol: Sequence[torch.Tensor],
        args: list[Any],
        tangents: list[torch.Tensor],
        moving: list[int],
    ) -> tuple[torch.Tensor, ...]:
        """Forward mode: solve A t = -B dtheta.

        Runs inside a forward-AD level, where torch cannot nest another one, so products
        with A and B are taken as transposes of vector-Jacobian products (a vjp is linear
        in its cotangent; its own vjp is the Jacobian-vector product), each linearization
        built once and reused.
        """
        rav = call.raveler
        r0, vjp_b = torch.func.vjp(call.residual_in(sol, args, moving), *[args[i] for i in moving])
        _, jvp_b = torch.func.vjp(lambda u: vjp_b(u), torch.zeros_like(r0))
        b_dtheta = jvp_b(tuple(tangents))[0]
        if self.mode == "one_step":
            t = -b_dtheta
        else:
            _, vjp_x = torch.func.vjp(lambda *xs: call.residual(xs, args), *sol)

            def transpose_products(v: torch.Tensor) -> torch.Tensor:  # A^T v
                return rav.ravel(tree_unflatten(call.sol_spec, list(vjp_x(v))))

            if self.condition.symmetric:
                matvec = transpose_products
            else:
                _, jvp_x = torch.func.vjp(transpose_products, torch.zeros_like(r0))

                def matvec(v: torch.Tensor) -> torch.Tensor:  # A v
                    return jvp_x(v)[0]

            t, _ = solve_flat(
                self.solver,
                matvec,
                -b_dtheta,
                raveler=rav,
                rmatvec_factory=lambda: transpose_products,
                kind="forward",
                function=self.name,
            )
        return tuple(tree_flatten(rav.unravel(t))[0])

    def _warm_guess(self, g: torch.Tensor) -> torch.Tensor | None:
        w = self._warm
        if not self.warm_start or w is None or under_vmap():
            return None
        if w.shape != g.shape or w.dtype != g.dtype or w.device != g.device:
            return None
        return w


def _linearize(
    call: _Call, sol: Sequence[torch.Tensor], args: list[Any], wanted: list[int], *, transpose: bool = True
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]]:
    """Products with A^T (reused linearization of F in x) and u -> B^T u for the wanted arguments.

    In a plain ``.backward()`` (no torch.func transform, no ``create_graph``) the products
    are taken with ``torch.autograd.grad`` on a graph of F built once and retained, which
    skips torch.func's per-call wrapping; otherwise with ``torch.func.vjp``, which
    composes with every transform and keeps the products differentiable.
    """
    rav = call.raveler
    if not torch.is_grad_enabled() and not under_functorch():
        xs = [s.detach().requires_grad_() for s in sol]
        moving = {i: args[i].detach().requires_grad_() for i in wanted}
        fixed = [moving.get(i, a.detach() if isinstance(a, torch.Tensor) else a) for i, a in enumerate(args)]
        with torch.enable_grad():
            r_x = call.residual(xs, [a.detach() if isinstance(a, torch.Tensor) else a for a in args]) if transpose else None
            r_theta = call.residual([s.detach() for s in sol], fixed)

        def transpose_fast(v: torch.Tensor) -> torch.Tensor:
            return rav.ravel(tree_unflatten(call.sol_spec, list(torch.autograd.grad(r_x, xs, v, retain_graph=True))))

        def args_fast(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
            targets = [moving[i] for i in wanted]
            out = torch.autograd.grad(r_theta, targets, u, allow_unused=True)
            return tuple(torch.zeros_like(t) if o is None else o for o, t in zip(out, targets))

        return (transpose_fast if transpose else None), args_fast

    transpose_products = None
    if transpose:
        _, vjp_x = torch.func.vjp(lambda *xs: call.residual(xs, args), *sol)

        def transpose_products(v: torch.Tensor) -> torch.Tensor:
            return rav.ravel(tree_unflatten(call.sol_spec, list(vjp_x(v))))

    _, vjp_args = torch.func.vjp(call.residual_in(sol, args, wanted), *[args[i] for i in wanted])
    return transpose_products, vjp_args


def _captures_transformed_tensor(fn: Any, depth: int = 0) -> bool:
    """Whether ``fn`` closes over a tensor that requires grad or is wrapped by a torch.func transform.

    Inside the inner-solve Function such a tensor's derivative is invisible, so the result
    would silently carry none; the closure cells are where it hides in practice
    (``lambda x: f(x, lam)`` inside a function transformed by ``torch.func.grad``). This
    scan is cheap and runs on every call; evaluating F (which also catches tensors reached
    through globals or modules) runs once per argument signature.
    """
    if depth > 4:
        return False
    if isinstance(fn, Condition):
        return _captures_transformed_tensor(fn.fn, depth + 1)
    if isinstance(fn, functools.partial):
        if any(isinstance(a, torch.Tensor) and (is_wrapped(a) or a.requires_grad) for a in (*fn.args, *fn.keywords.values())):
            return True
        return _captures_transformed_tensor(fn.func, depth + 1)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if isinstance(value, torch.Tensor):
            if is_wrapped(value) or value.requires_grad:
                return True
        elif callable(value) and _captures_transformed_tensor(value, depth + 1):
            return True
    return False


def _make_condition(optimality_fn: Any, objective: Any, fixed_point: Any) -> Condition:
    given = {k: v for k, v in (("optimality_fn", optimality_fn), ("objective", objective), ("fixed_point", fixed_point)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            "implicit_diff needs exactly one of optimality_fn (root form F(x, ...) = 0), objective (x minimizes "
            f"f(x, ...)) or fixed_point (x = T(x, ...)); got {sorted(given) if given else 'none'}"
        )
    (kind, fn), = given.items()
    if not callable(fn):
        raise TypeError(f"implicit_diff: {kind} must be callable, got {type(fn).__name__}")
    if kind == "objective":
        return stationarity_condition(fn)
    if kind == "fixed_point":
        return fixed_point_condition(fn)
    if isinstance(fn, Condition):
        return fn
    return Condition(fn, symmetric=False, name=getattr(fn, "__name__", "optimality_fn"))


def implicit_diff(
    optimality_fn: Callable[..., Any] | None = None,
    *,
    objective: Callable[..., torch.Tensor] | None = None,
    fixed_point: Callable[..., Any] | None = None,
    solver: LinearSolver | None = None,
    has_aux: bool = False,
    mode: Mode = "implicit",
    check_optimality: float | None = None,
    warm_start: bool = False,
    vmap_inner: Literal["loop", "batched"] = "loop",
) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    r"""Make an inner solver differentiable by implicit differentiation.

    Decorates ``inner(init, *args, **kwargs) -> solution`` (or ``(solution, aux)`` with
    ``has_aux=True``), where the solution :math:`x^\star(\theta)` satisfies an optimality
    condition :math:`F(x^\star, \theta) = 0` and :math:`\theta` stands for ``args`` and
    ``kwargs``. By the implicit function theorem

    .. math:: \frac{\partial x^\star}{\partial\theta} = -\Big(\frac{\partial F}{\partial x}\Big)^{-1}\frac{\partial F}{\partial\theta},

    so a hypergradient costs one linear solve with :math:`\partial F/\partial x`, done
    matrix-free by ``solver``, whatever the inner solver did to find :math:`x^\star`.

    Give exactly one of:

    - ``optimality_fn(solution, *args, **kwargs)``: a residual with the solution's
      structure, zero at the solution (root form);
    - ``objective(solution, *args, **kwargs)``: a scalar the solution minimizes
      (:math:`F = \nabla_x f`; the Jacobian is the Hessian);
    - ``fixed_point(solution, *args, **kwargs)``: a map with ``solution = T(solution, ...)``
      (:math:`F = x - T(x)`).

    The condition receives exactly the arguments of ``inner``, with ``init`` replaced by the
    solution.

    Parameters
    ----------
    optimality_fn, objective, fixed_point : callable
        The condition (exactly one). The helpers :func:`stationarity_condition`,
        :func:`fixed_point_condition` and :func:`proximal_condition` build common ones.
    solver : LinearSolver, optional
        Backward linear solver. Default :class:`CG` when the condition's Jacobian is
        symmetric (an objective, or a :class:`Condition` marked symmetric, as
        :func:`proximal_condition`), since it is then the positive definite Hessian at a
        strict minimum and CG is the cheapest Krylov method for it; :class:`GMRES` otherwise,
        since it assumes nothing about the operator. Its ``on_failure`` policy applies in
        the backward pass.
    has_aux : bool
        ``inner`` returns ``(solution, aux)``; aux is returned as is, not differentiated.
    mode : {"implicit", "unrolled", "one_step"}
        ``"implicit"`` (default): the implicit function theorem. ``"unrolled"``: plain autograd
        through ``inner`` as written (it must be differentiable; memory grows with its
        iterations). ``"one_step"``: Jacobian-free backpropagation, :math:`\partial F/\partial x`
        replaced by the identity (cheap, approximate; first-order MAML for the proximal
        condition).
    check_optimality : float, optional
        After each inner solve, compare :math:`\|F(x^\star)\|` with :math:`\|F(\text{init})\|`
        and warn (:class:`InnerOptimalityWarning`) when the ratio exceeds this; the result is
        also logged to :func:`record_solves` (``kind="optimality"``). If ``init`` has another
        structure than the solution, :math:`\|F(x^\star)\|` is compared with the tolerance itself.
    warm_start : bool
        Start each backward solve from the previous one's solution (useful across outer
        iterations, where the system changes slowly).
    vmap_inner : {"loop", "batched"}
        Under ``torch.func.vmap``, run the inner solver once per problem (``"loop"``, works
        for any solver) or once on the batch under vmap (``"batched"``, faster, for solvers
        written in plain torch operations without data-dependent Python control flow).

    Returns
    -------
    callable
        A decorator producing an :class:`ImplicitFunction`.

    Raises
    ------
    ValueError
        If none or several conditions are given, or an option is invalid.
    TypeError
        If ``solver`` is not a :class:`LinearSolver` instance.

    Notes
    -----
    The wrapped function works with ``.backward()``, ``torch.autograd.grad``,
    ``torch.func.grad``/``vjp``/``jvp``, ``torch.autograd.forward_ad`` and
    ``torch.func.vmap``. Higher-order derivatives are computed by differentiating the
    backward pass, including the iterations of its linear solve: exact with
    :class:`Direct`, and accurate to the solve's tolerance with iterative solvers.
    The inner solver's graph is never kept: it runs on detached arguments.

    Examples
    --------
    Ridge regression with one penalty per feature, solved by plain gradient descent:

    >>> import torch, implicitdiff as idiff
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    >>> def objective(w, log_lam, X, y):
    ...     return ((X @ w - y) ** 2).mean() + (log_lam.exp() * w ** 2).sum()
    >>> @idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-12))
    ... def fit(w, log_lam, X, y):
    ...     for _ in range(500):
    ...         w = w - 0.2 * torch.func.grad(objective)(w, log_lam, X, y)
    ...     return w
    >>> log_lam = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    >>> w = fit(torch.zeros(3, dtype=torch.float64), log_lam, X, y)
    >>> (w ** 2).sum().backward()
    >>> log_lam.grad.shape
    torch.Size([3])
    """
    condition = _make_condition(optimality_fn, objective, fixed_point)
    if solver is None:
        solver = CG() if condition.symmetric else GMRES()
    check_solver(solver, "implicit_diff")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if vmap_inner not in ("loop", "batched"):
        raise ValueError(f"vmap_inner must be 'loop' or 'batched', got {vmap_inner!r}")
    if check_optimality is not None and not check_optimality >= 0:
        raise ValueError(f"check_optimality must be a non-negative float or None, got {check_optimality!r}")

    def decorate(inner: Callable[..., Any]) -> ImplicitFunction:
        if not callable(inner):
            raise TypeError(f"implicit_diff decorates a callable inner solver, got {type(inner).__name__}")
        return ImplicitFunction(
            inner,
            condition,
            solver,
            has_aux=has_aux,
            mode=mode,
            check_optimality=check_optimality,
            warm_start=warm_start,
            vmap_inner=vmap_inner,
        )

    return decorate
