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
import importlib
import inspect
import warnings
from typing import Any, Callable, Literal, Sequence, cast

import optree
import torch

from ._functorch import ad_levels, is_wrapped, physical, under_functorch, under_vmap
from ._tree import PyTree, Raveler, describe, tree_flatten, tree_map, tree_unflatten
from .conditions import Condition, fixed_point_condition, stationarity_condition
from .diagnostics import SolveInfo, SolveStatus, report
from .distributed import DataParallel
from .errors import ImplicitDiffError, InnerOptimalityWarning, NonFiniteError
from .linear_solve import check_solver, solve_flat
from .minibatch import Minibatch
from .solvers.auto import Auto
from .solvers.base import LinearSolver

__all__ = ["implicit_diff", "ImplicitFunction"]

Mode = Literal["implicit", "unrolled", "one_step", "truncated"]
_MODES = ("implicit", "unrolled", "one_step", "truncated")


_CLOSURE_MESSAGE = (
    "{name}: the optimality condition depends on a tensor that requires grad but is not an argument of the "
    "solver (a closure, a global, or a module's parameters). Its gradient would be silently zero. Pass it as an "
    "argument of the decorated solver and of the condition (for a module, pass dict(module.named_parameters()) "
    "and use torch.func.functional_call), or detach it."
)


class _DefaultTolerance(float):
    """The default ``check_optimality`` (a float that remembers it was not chosen by the user)."""

    def __repr__(self) -> str:
        return f"{float(self)!r} (default)"


#: Default of ``check_optimality``: warn when ||F(x*)|| > 1e-3 ||F(init)||.
DEFAULT_OPTIMALITY_TOL = _DefaultTolerance(1e-3)

_MUTATION_HINT = (
    "{name}: {where} modifies a tensor in place that it does not receive as an argument (functorch: "
    "'mutate a captured Tensor'). The usual cause is an nn.Module with BatchNorm in train mode called through "
    "torch.func.functional_call: it updates its running_mean / running_var buffers on every call. Fixes: call "
    "module.eval() for the inner problem (it then normalizes with its running statistics), or build BatchNorm "
    "with track_running_stats=False (batch statistics, no buffers). Passing the buffers as an argument does not "
    "help: the implicit function would still see them change in place."
)


class _Call:
    """Everything about one call that is not a tensor: the function, pytree specs, options."""

    __slots__ = ("fn", "init_spec", "arg_spec", "n_init", "sol_spec", "n_sol", "raveler", "aux_spec",
                 "aux_static", "aux_is_tensor")

    def __init__(self, fn: ImplicitFunction, init_spec: Any, arg_spec: Any, n_init: int) -> None:
        self.fn = fn
        self.init_spec = init_spec
        self.arg_spec = arg_spec
        self.n_init = n_init
        self.sol_spec: Any = None
        self.n_sol = 0
        self.raveler: Raveler = cast(Raveler, None)  # set with the solution's structure, before any use
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
    def vmap(
        info: Any, in_dims: tuple[Any, ...], call: _Call, *leaves: Any
    ) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
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
        truncated_steps: int | None = None,
        step: Callable[..., Any] | None = None,
        minibatch: Minibatch | None = None,
        distributed: DataParallel | None = None,
        compile_backward: bool = False,
    ) -> None:
        self.inner = inner
        self.condition = condition
        self.solver = solver
        self.has_aux = has_aux
        self.mode = mode
        self.check_optimality = check_optimality
        self.warm_start = warm_start
        self.vmap_inner = vmap_inner
        self.truncated_steps = truncated_steps
        self.step = step
        self.minibatch = minibatch
        self.distributed = distributed
        self.compile_backward = compile_backward
        self._compiled_backwards: dict[Any, Any] = {}
        self.last_backward: SolveInfo | None = None
        self._warm: torch.Tensor | None = None
        functools.update_wrapper(self, inner)

    @property
    def name(self) -> str:
        return getattr(self.inner, "__name__", "inner solver")

    def __repr__(self) -> str:
        return f"<implicit_diff {self.name} ({self.condition.name}, {self.solver!r}, mode={self.mode})>"

    # ------------------------------------------------------------------ calling
    # torch.compile: the inner solver is arbitrary Python (loops on values, scipy, torch.optim) and
    # the derivative rules read values through functorch's layers, so dynamo runs the call eagerly
    # (one graph break) and compiles what surrounds it
    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        init, args, kwargs = self._split_init(args, kwargs)
        if torch.is_inference_mode_enabled():
            return self._call_in_inference_mode(init, args, kwargs)
        if self.mode == "unrolled":
            return self._call_unrolled(init, args, kwargs)
        if under_functorch() and (self.distributed is not None or self.minibatch is not None):
            option = "distributed=" if self.distributed is not None else "minibatch="
            raise ImplicitDiffError(
                f"{self.name}: {option} supports first-order reverse mode outside torch.func transforms only "
                "(loss.backward(), torch.autograd.grad): it cannot run under vmap, grad, vjp or jvp"
            )
        if self.mode == "truncated":
            return self._call_truncated(init, args, kwargs)
        init_leaves, init_spec = tree_flatten(init)
        arg_leaves, arg_spec = tree_flatten((args, kwargs))
        call = _Call(self, init_spec, arg_spec, len(init_leaves))
        outs = _InnerSolve.apply(call, *init_leaves, *arg_leaves)
        sol_leaves = list(outs[: call.n_sol])
        attaches, forward_levels = _attach_count(arg_leaves)
        if forward_levels >= 2 and self.mode == "one_step":
            raise ImplicitDiffError(
                f"{self.name}: mode='one_step' does not support forward mode nested in forward mode (jacfwd(jacfwd)); "
                "use jacrev over jacfwd, or mode='implicit'"
            )
        if forward_levels >= 2:
            # torch does not differentiate a custom forward-mode rule under another forward level
            # (jacfwd(jacfwd(f)) would see a zero second derivative): use traced Newton steps instead
            sol_leaves = self._newton_traced(call, sol_leaves, arg_leaves, attaches)
        else:
            # one attach carries every order of reverse mode (its backward sees the solution x*(theta));
            # forward mode under a reverse level needs the attach once per level, each one's tangent
            # rule seeing the previous one's derivative of x*
            for _ in range(attaches):
                sol_leaves = list(_ImplicitAttach.apply(call, *sol_leaves, *arg_leaves))
        solution = tree_unflatten(call.sol_spec, sol_leaves)
        if not self.has_aux:
            return solution
        aux_iter = iter(outs[call.n_sol :])
        aux_leaves = [next(aux_iter) if is_t else s for is_t, s in zip(call.aux_is_tensor, call.aux_static)]
        return solution, tree_unflatten(call.aux_spec, aux_leaves)

    def _newton_traced(
        self, call: _Call, sol_leaves: list[torch.Tensor], arg_leaves: Sequence[Any], order: int
    ) -> list[torch.Tensor]:
        """x* refined by Newton steps ``x <- x - (dF/dx)^{-1} F(x, theta)`` written in traced operations.

        Started from the (constant) solution, each step doubles the number of correct derivatives
        plus one, so ``ceil(log2(order + 1))`` steps make every derivative up to ``order`` exact,
        whatever transforms are active. The Jacobian is formed densely (``n`` products), so this
        path, taken only for nested forward mode, is limited to small solutions.
        """
        rav = call.raveler
        if rav.size > _NEWTON_MAX_SIZE:
            raise ImplicitDiffError(
                f"{self.name}: forward mode nested in forward mode (e.g. jacfwd(jacfwd(f))) forms dF/dx densely and "
                f"supports at most {_NEWTON_MAX_SIZE} unknowns (this solution has {rav.size}); use "
                "jacrev(jacfwd(f)) or torch.func.hessian, which stay matrix-free"
            )
        x = rav.ravel(tree_unflatten(call.sol_spec, list(sol_leaves)))

        def residual(v: torch.Tensor) -> torch.Tensor:
            return call.residual(tree_flatten(rav.unravel(v))[0], list(arg_leaves))

        for _ in range(max(1, (order).bit_length())):
            # inv, not linalg.solve nor lu_solve: in torch 2.13 the third forward-mode derivative of
            # linalg.solve is wrong (measured against lu_solve, inv and lstsq, which agree), and lu_solve
            # is wrong under nested vmap (factor and right-hand side batched at different levels, as in
            # vmap(jacfwd(jacfwd(f)))); the matrix is small here (at most _NEWTON_MAX_SIZE)
            x = x - torch.linalg.inv(torch.func.jacrev(residual)(x)) @ residual(x)
        return tree_flatten(rav.unravel(x))[0]

    def _split_init(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """``init`` is the first positional argument, or the keyword named like the solver's first parameter."""
        if args:
            return args[0], args[1:], kwargs
        name = self._init_name()
        if name is not None and name in kwargs:
            kwargs = dict(kwargs)
            return kwargs.pop(name), (), kwargs
        shown = f"positionally or as {name}=..." if name else "as the first positional argument"
        raise TypeError(f"{self.name}() is missing its initial guess (the solver's first parameter): pass it {shown}")

    def _param_names(self) -> list[str]:
        """Names of the solver's parameters after init (for messages)."""
        try:
            params = list(inspect.signature(self.inner).parameters.values())
        except (TypeError, ValueError):
            return []
        return [p.name for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def _init_name(self) -> str | None:
        try:
            params = list(inspect.signature(self.inner).parameters.values())
        except (TypeError, ValueError):
            return None
        if params and params[0].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            return params[0].name
        return None

    def _call_in_inference_mode(self, init: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Under ``torch.inference_mode()`` nothing is differentiated, but the inner solver may need autograd:
        run it outside inference mode on ordinary copies of the inference tensors."""
        with torch.inference_mode(False):
            init, args, kwargs = tree_map(
                lambda x: x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x, (init, args, kwargs)
            )
            return self(init, *args, **kwargs)

    def _call_unrolled(self, init: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        init = optree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, init)
        arg_leaves, arg_spec = tree_flatten((args, kwargs))
        versions = _versions(arg_leaves)
        with torch.enable_grad():
            out = self.inner(init, *args, **kwargs)
        self._check_unmodified(arg_leaves, versions, (args, kwargs))
        solution = self._split_aux(out)[0]
        if not under_vmap():
            init_leaves, _ = tree_flatten(init)
            sol_leaves, spec = tree_flatten(solution)
            call = _Call(self, None, arg_spec, len(init_leaves))
            self._describe_solution(call, sol_leaves, spec)
            self._check(call, _detach(sol_leaves), _detach(init_leaves), _detach(arg_leaves))
        return out

    def _call_truncated(self, init: PyTree, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The solver's solution, with the derivative of ``truncated_steps`` differentiable steps from it."""
        init_leaves, init_spec = tree_flatten(init)
        arg_leaves, arg_spec = tree_flatten((args, kwargs))
        call = _Call(self, init_spec, arg_spec, len(init_leaves))
        outs = _InnerSolve.apply(call, *init_leaves, *arg_leaves)
        sol_leaves = list(outs[: call.n_sol])
        tensors = [a for a in arg_leaves if isinstance(a, torch.Tensor)]
        if _needs_graph(tensors) or _has_plain_tangent(tensors):
            step = self.step if self.step is not None else self.condition.step
            assert step is not None  # checked by implicit_diff
            x = tree_unflatten(call.sol_spec, sol_leaves)
            for _ in range(cast(int, self.truncated_steps)):
                x = step(x, *args, **kwargs)
            stepped, spec = tree_flatten(x)
            if spec != call.sol_spec or any(
                not isinstance(a, torch.Tensor) or a.shape != b.shape for a, b in zip(stepped, sol_leaves)
            ):
                raise ImplicitDiffError(
                    f"{self.name}: mode='truncated': the step must return a pytree shaped like the solution; solution "
                    f"is {describe(tree_unflatten(call.sol_spec, sol_leaves))}, step returned {describe(x)}"
                )
            # the value stays the solver's own solution; only the derivative is that of the last k steps
            sol_leaves = [s + (t - t.detach()) for s, t in zip(sol_leaves, stepped)]
        solution = tree_unflatten(call.sol_spec, sol_leaves)
        if not self.has_aux:
            return solution
        aux_iter = iter(outs[call.n_sol :])
        aux_leaves = [next(aux_iter) if is_t else s for is_t, s in zip(call.aux_is_tensor, call.aux_static)]
        return solution, tree_unflatten(call.aux_spec, aux_leaves)

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
            if x.is_complex():
                raise ImplicitDiffError(
                    f"{self.name}: the solution has a complex leaf (dtype {x.dtype}); implicitdiff differentiates "
                    "real-valued solutions only. Represent a complex z by its real and imaginary parts "
                    "(torch.view_as_real) in the solver and in the optimality condition."
                )
            if not x.is_floating_point():
                raise ImplicitDiffError(
                    f"{self.name}: the solution has a leaf of dtype {x.dtype} in {spec}, which cannot be "
                    "differentiated. If it is an auxiliary output (an iteration count, indices, a mask), return "
                    "(solution, aux) from the solver and pass has_aux=True; if it is part of the solution, make it "
                    "floating point."
                )
        call.sol_spec = spec
        call.n_sol = len(sol_leaves)
        call.raveler = Raveler(tree_unflatten(spec, sol_leaves))

    def _run_inner(self, call: _Call, leaves: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """Forward of _InnerSolve: run the solver, validate, check optimality."""
        detached = _detach(leaves)
        # the solver gets its own copy of init (it is expected to update it); the arguments are the
        # caller's own tensors, so in-place changes to them are detected through their version counters
        init_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in detached[: call.n_init]]
        arg_leaves = detached[call.n_init :]
        init = tree_unflatten(call.init_spec, list(init_leaves))
        args, kwargs = call.args(arg_leaves)
        versions = _versions(arg_leaves)
        with torch.enable_grad():
            out = self._guarded(lambda: self.inner(init, *args, **kwargs), "the inner solver", arg_leaves, None)
        self._check_unmodified(arg_leaves, versions, (args, kwargs))
        solution, aux = self._split_aux(out)
        sol_leaves, spec = tree_flatten(solution)
        self._describe_solution(call, sol_leaves, spec)
        inputs = {
            x.untyped_storage().data_ptr() for x in detached if isinstance(x, torch.Tensor) and x.device.type != "meta"
        }
        sol_leaves = [self._own(x, inputs) for x in sol_leaves]
        self._check_devices(sol_leaves, arg_leaves)
        self._check_finite(sol_leaves)
        if self.distributed is not None:
            self._check_replicated_solution(call, sol_leaves)
        self._check(call, sol_leaves, detached[: call.n_init], arg_leaves)
        aux_tensors: list[torch.Tensor] = []
        if self.has_aux:
            aux_leaves, call.aux_spec = tree_flatten(aux)
            call.aux_is_tensor = [isinstance(a, torch.Tensor) for a in aux_leaves]
            call.aux_static = [None if t else a for a, t in zip(aux_leaves, call.aux_is_tensor)]
            aux_tensors = [self._own(a, inputs) for a in aux_leaves if isinstance(a, torch.Tensor)]
        return tuple(sol_leaves) + tuple(aux_tensors)

    def _guarded(
        self, fn: Callable[[], Any], where: str, arg_leaves: Sequence[Any], sol_leaves: Sequence[Any] | None
    ) -> Any:
        """Run user code, turning two raw torch errors into ones that name the cause and the fix."""
        try:
            return fn()
        except RuntimeError as err:
            text = str(err)
            if "mutate a captured Tensor" in text:
                raise ImplicitDiffError(_MUTATION_HINT.format(name=self.name, where=where)) from err
            if sol_leaves is not None and "dtype" in text.lower():
                sol_dt = sorted({str(x.dtype) for x in sol_leaves})
                arg_dt = sorted(
                    {str(a.dtype) for a in arg_leaves if isinstance(a, torch.Tensor) and a.is_floating_point()}
                )
                if arg_dt and sol_dt != arg_dt:
                    raise ImplicitDiffError(
                        f"{self.name}: dtype mismatch: the solution is {', '.join(sol_dt)} but the floating-point "
                        f"arguments are {', '.join(arg_dt)}, and {where} failed on it ({text.splitlines()[0]}). Give "
                        "init and the arguments one floating dtype."
                    ) from err
            raise

    def _check_unmodified(self, arg_leaves: Sequence[Any], versions: list[int | None], tree: Any) -> None:
        changed = [i for i, (a, v) in enumerate(zip(arg_leaves, versions)) if v is not None and a._version != v]
        if changed:
            names = _leaf_names(tree, self._param_names())
            which = ", ".join(names[i] for i in changed)
            raise ImplicitDiffError(
                f"{self.name}: the inner solver modified its argument(s) {which} in place. They are the caller's own "
                "tensors (only init is copied for the solver), so the caller's data has changed and the gradient "
                "would be taken at other values. Update a copy inside the solver (x = x.clone()) instead."
            )

    def _check_finite(self, sol_leaves: Sequence[torch.Tensor]) -> None:
        bad = [i for i, x in enumerate(sol_leaves) if x.numel() and not bool(torch.isfinite(physical(x)).all())]
        if bad:
            raise NonFiniteError(
                f"{self.name}: the inner solver returned a solution with non-finite values (NaN or inf) in leaf "
                f"{bad[0]} (shape {tuple(sol_leaves[bad[0]].shape)}): the inner problem diverged (step size too "
                "large?) or is unbounded, and nothing can be differentiated there.",
                None,
            )

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
        detached = [x.clone() if isinstance(x, torch.Tensor) and i < call.n_init else x for i, x in enumerate(detached)]
        arg_leaves = detached[call.n_init :]
        versions = _versions(arg_leaves)

        def one(*ls: Any) -> tuple[torch.Tensor, ...]:
            init = tree_unflatten(call.init_spec, list(ls[: call.n_init]))
            args, kwargs = call.args(ls[call.n_init :])
            with torch.enable_grad():
                out = self.inner(init, *args, **kwargs)
            sol_leaves, spec = tree_flatten(out)
            call.sol_spec = spec
            return tuple(x.detach() for x in sol_leaves)

        sols = self._guarded(
            lambda: torch.func.vmap(one, in_dims=tuple(dims))(*detached), "the inner solver", arg_leaves, None
        )
        self._check_unmodified(arg_leaves, versions, call.args(arg_leaves))
        per_spec = call.sol_spec
        unbatched = [s[0] for s in sols]
        self._describe_solution(call, unbatched, per_spec)
        self._check_finite(list(sols))
        self._check_batched(call, list(sols), detached, dims)
        return tuple(sols)

    def _check_devices(self, sol_leaves: Sequence[torch.Tensor], arg_leaves: Sequence[Any]) -> None:
        devices = {x.device for x in sol_leaves}
        arg_devices = {a.device for a in arg_leaves if isinstance(a, torch.Tensor) and a.is_floating_point()}
        if len(devices) > 1 or (arg_devices and not devices <= arg_devices):
            raise ImplicitDiffError(
                f"{self.name}: device mismatch: the solution is on {sorted(map(str, devices))} but the floating-point "
                f"arguments are on {sorted(map(str, arg_devices))}; move them to one device"
            )

    def _residual(
        self, call: _Call, sol_leaves: Sequence[torch.Tensor], arg_leaves: Sequence[Any], check_versions: bool = True
    ) -> Any:
        """F at the solution, with grad mode on (so that a closure over a tensor requiring grad shows)."""
        args, kwargs = call.args(arg_leaves)
        x = tree_unflatten(call.sol_spec, list(sol_leaves))
        versions = _versions(sol_leaves) if check_versions else [None] * len(sol_leaves)
        eager = getattr(self.condition, "eager", None)
        if eager is not None and not under_functorch():
            # plain autograd outside torch.func: cheaper than torch.func.grad for this per-call check
            residual, closure = self._guarded(
                lambda: eager(x, *args, **kwargs),
                f"the optimality condition ({self.condition.name})",
                arg_leaves,
                sol_leaves,
            )
            if closure:
                raise ImplicitDiffError(_CLOSURE_MESSAGE.format(name=self.name))
        else:
            with torch.enable_grad():
                residual = self._guarded(
                    lambda: self.condition(x, *args, **kwargs),
                    f"the optimality condition ({self.condition.name})",
                    arg_leaves,
                    sol_leaves,
                )
        if any(v is not None and s._version != v for s, v in zip(sol_leaves, versions)):
            raise ImplicitDiffError(
                f"{self.name}: the optimality condition ({self.condition.name}) modified the solution in place; it "
                "must compute its residual without changing its inputs"
            )
        return residual

    def _validate_residual(
        self, call: _Call, residual: Any, sol_leaves: Sequence[torch.Tensor], inputs: Sequence[Any] = ()
    ) -> list[torch.Tensor]:
        r_leaves, r_spec = tree_flatten(residual)
        if r_spec != call.sol_spec or any(
            not isinstance(r, torch.Tensor) or r.shape != s.shape for r, s in zip(r_leaves, sol_leaves)
        ):
            x = tree_unflatten(call.sol_spec, list(sol_leaves))
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
        # a wrapped residual betrays a closure only when the inputs themselves are not wrapped (by outer levels)
        wrapped_ok = any(is_wrapped(t) for t in (*sol_leaves, *inputs) if isinstance(t, torch.Tensor))
        if any(r.requires_grad or (is_wrapped(r) and not wrapped_ok) for r in r_leaves) or _captures_transformed_tensor(
            self.condition
        ):
            raise ImplicitDiffError(_CLOSURE_MESSAGE.format(name=self.name))
        return r_leaves

    def _check(
        self,
        call: _Call,
        sol_leaves: Sequence[torch.Tensor],
        init_leaves: Sequence[Any],
        arg_leaves: Sequence[Any],
    ) -> None:
        """Evaluate F at the solution (every call): validate its structure, find closures, check optimality."""
        residual = self._residual(call, sol_leaves, arg_leaves)
        self._validate_residual(call, residual, sol_leaves, arg_leaves)
        default_tol = isinstance(self.check_optimality, _DefaultTolerance)
        if self.check_optimality is None or (self.mode == "unrolled" and default_tol):
            return  # unrolled mode differentiates the iterations as they are: stationarity is not assumed
        args, kwargs = call.args(arg_leaves)
        with torch.no_grad():
            res = float(self._global(call.raveler.ravel(residual)).norm()) if call.raveler.size else 0.0
        floor = _rounding_floor(sol_leaves)
        # solved to rounding: no need to evaluate F(init) (the common case costs one evaluation of F)
        ref = float("inf") if res <= floor else self._reference_norm(call, init_leaves, args, kwargs)
        self._report_optimality(res, ref, floor=floor)

    def _reference_norm(
        self, call: _Call, init_leaves: Sequence[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> float:
        """||F(init)||, or 1 when init has another structure than the solution (the tolerance is then absolute)."""
        try:
            init = tree_unflatten(call.sol_spec, list(init_leaves))
            with torch.enable_grad():
                r0 = self.condition(init, *args, **kwargs)
            with torch.no_grad():
                return float(self._global(call.raveler.ravel(r0)).norm()) if call.raveler.size else 0.0
        except (ValueError, TypeError, RuntimeError):
            return 1.0

    def _check_replicated_solution(self, call: _Call, sol_leaves: Sequence[torch.Tensor]) -> None:
        dp = cast(DataParallel, self.distributed)
        if call.raveler.size:
            dp.replicated(
                call.raveler.ravel(tree_unflatten(call.sol_spec, list(sol_leaves))),
                self.name,
                dp.solution_rtol,
                "the inner solver returned different solutions on different ranks",
                "With distributed=DataParallel(...) it must solve the global problem on every rank (all-reduce its "
                "gradients or statistics), not only its rank's shard",
            )

    def _global(self, residual: torch.Tensor) -> torch.Tensor:
        """The global residual: this rank's term all-reduced under ``distributed=``, else itself."""
        return residual if self.distributed is None else self.distributed.all_reduce(residual)

    def _report_optimality(self, res: float, ref: float, task: str = "", floor: float = 0.0) -> None:
        tol = self.check_optimality
        assert tol is not None  # callers return early when the check is off
        rel = res / ref if ref > 0 else (0.0 if res == 0 else float("inf"))
        # solved to rounding counts as solved, also when init was already close (a warm start)
        ok = rel <= tol or res <= floor
        info = SolveInfo(
            "optimality",
            "optimality",
            SolveStatus.CONVERGED if ok else SolveStatus.MAX_ITERATIONS,
            None,
            res,
            rel,
            self.name,
            (f"||F(x*)|| = {res:.3e}, solved to the dtype's precision{task}" if ref == float("inf") else
             f"||F(x*)|| / ||F(init)|| = {rel:.3e} (tolerance {tol:g}){task}"),
        )
        report(info, "ignore")
        if not ok and res == res:
            warnings.warn(
                f"{self.name}: the inner solution does not satisfy its optimality condition{task}: "
                f"||F(x*)|| = {res:.3e}, {rel:.3e} times ||F(init)|| (tolerance {tol:g}). "
                "The implicit gradient is taken at a non-stationary point and may be wrong: run the inner solver "
                "longer or more accurately (or pass check_optimality=None to silence this check).",
                InnerOptimalityWarning,
                stacklevel=5,
            )

    def _check_batched(self, call: _Call, sols: list[torch.Tensor], detached: list[Any], dims: Sequence[Any]) -> None:
        """The per-task check of a batched inner solve, with F evaluated once under vmap."""
        n_init = call.n_init
        arg_dims = tuple(dims[n_init:])
        init_dims = tuple(dims[:n_init])
        arg_leaves = detached[n_init:]
        first_args = [_tensor_slice(a, d, 0) for a, d in zip(arg_leaves, arg_dims)]
        self._validate_residual(
            call, self._residual(call, [s[0] for s in sols], first_args, False), [s[0] for s in sols], first_args
        )
        if self.check_optimality is None:
            return

        def norms(
            sol: tuple[torch.Tensor, ...], init: tuple[Any, ...], args: tuple[Any, ...]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            a, kw = call.args(list(args))
            r = call.raveler.ravel(self.condition(tree_unflatten(call.sol_spec, list(sol)), *a, **kw))
            try:
                r0 = call.raveler.ravel(self.condition(tree_unflatten(call.sol_spec, list(init)), *a, **kw))
                ref = torch.linalg.vector_norm(r0)
            except (ValueError, TypeError, RuntimeError):
                ref = torch.ones((), dtype=r.dtype, device=r.device)
            return torch.linalg.vector_norm(r), ref

        init_leaves = detached[:n_init]
        same = len(init_leaves) == len(sols)
        with torch.enable_grad():
            res, ref = torch.func.vmap(
                norms, in_dims=((0,) * len(sols), init_dims if same else None, arg_dims)
            )(tuple(sols), tuple(init_leaves) if same else tuple(s[0] for s in sols), tuple(arg_leaves))
        if not same:
            ref = torch.ones_like(ref)
        floor = _rounding_floor([s[0] for s in sols])
        residuals, references = physical(res.detach()).reshape(-1).tolist(), physical(ref.detach()).reshape(-1).tolist()
        for i, (r, f) in enumerate(zip(residuals, references)):
            self._report_optimality(r, f, f" (task {i} of a batched solve)", floor)

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
        differentiable = _needs_graph([g, *sol, *[a for a in args if isinstance(a, torch.Tensor)]])
        dp, mb = self.distributed, self.minibatch
        if (dp is not None or mb is not None) and differentiable:
            option = "distributed=" if dp is not None else "minibatch="
            raise ImplicitDiffError(
                f"{self.name}: {option} gives first derivatives only; this backward pass is itself differentiated "
                "(create_graph=True or a higher-order derivative)"
            )
        if dp is not None:
            g = dp.replicated_cotangent(g, self.name)
        if self.compile_backward and not differentiable and self.mode == "implicit":
            from ._compiled_backward import compiled_backward

            done = compiled_backward(self, call, sol, args, g, wanted)
            if done is not None:
                grads_out, compiled_info = done
                report(compiled_info, self.solver.on_failure)
                self.last_backward = compiled_info
                return grads_out
        if mb is not None:
            transpose_products, args_vjp, forward_products = _minibatch_products(
                call, sol, args, wanted, mb, self._resample(), transpose=self.mode != "one_step"
            )
        else:
            transpose_products, args_vjp = _linearize(
                call, sol, args, wanted, transpose=self.mode != "one_step" and not differentiable
            )

            def forward_products() -> Callable[[torch.Tensor], torch.Tensor]:  # A v, for NormalCG
                def mv(v: torch.Tensor) -> torch.Tensor:
                    vs = tree_flatten(rav.unravel(v))[0]
                    return torch.func.jvp(lambda *xs: call.residual(xs, args), tuple(sol), tuple(vs))[1]

                return mv

        if dp is not None:
            transpose_products, args_vjp, forward_products = self._reduced(
                call, args, wanted, transpose_products, args_vjp, forward_products
            )
        if self.mode == "one_step":
            return args_vjp(-g)
        if differentiable:
            # a backward that is itself differentiated (create_graph, nested torch.func transforms): the
            # solve gets its own implicit derivative in g and in the operator (x*, theta), exact at every
            # order, instead of a derivative of the solver's iterations
            u, info = _adjoint_solve(self, call, sol, args, g, transpose=True)
        else:
            assert transpose_products is not None  # asked for above (transpose=True on this path)
            u, info = solve_flat(
                self.solver,
                transpose_products,
                g,
                raveler=rav,
                x0=self._warm_guess(g),
                rmatvec_factory=forward_products,
                kind="backward",
                function=self.name,
                stochastic=mb is not None,
            )
        if info is not None and info.status is not None:
            self.last_backward = info
            if self.warm_start:
                self._warm = u.detach()
        return args_vjp(-u)

    def _resample(self) -> str:
        """How the minibatch products are drawn: per product (stationary solvers) or per solve."""
        mb = cast(Minibatch, self.minibatch)
        return mb.resample or ("product" if self.solver.accepts_stochastic_operator else "solve")

    def _reduced(
        self,
        call: _Call,
        args: list[Any],
        wanted: list[int],
        transpose_products: Callable[[torch.Tensor], torch.Tensor] | None,
        args_vjp: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
        forward_products: Callable[[], Callable[[torch.Tensor], torch.Tensor]],
    ) -> tuple[Any, Any, Any]:
        """The products of the global condition: this rank's products all-reduced (``distributed=``)."""
        dp = cast(DataParallel, self.distributed)
        if transpose_products is not None:
            transpose_products = dp.reduce_products(transpose_products)
        mask = self._sharded_mask(call, args)
        wanted_mask = [mask[i] for i in wanted]
        local_vjp = args_vjp

        def reduced_vjp(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return dp.reduce_argument_grads(local_vjp(u), wanted_mask)

        local_forward = forward_products

        def reduced_forward() -> Callable[[torch.Tensor], torch.Tensor]:
            return dp.reduce_products(local_forward())

        return transpose_products, reduced_vjp, reduced_forward

    def _sharded_mask(self, call: _Call, arg_leaves: Sequence[Any]) -> list[bool]:
        """Which argument leaves hold this rank's shard (named in ``DataParallel(sharded=...)``)."""
        dp = cast(DataParallel, self.distributed)
        if not dp.sharded:
            return [False] * len(arg_leaves)
        args, kwargs = call.args(arg_leaves)
        names = self._param_names()
        unknown = sorted(set(dp.sharded) - set(names[: len(args)]) - set(kwargs))
        if unknown:
            raise ImplicitDiffError(
                f"{self.name}: DataParallel(sharded=...) names {unknown}, which are not arguments of this call; the "
                f"solver's parameters after init are {names}"
            )
        positional = [i < len(names) and names[i] in dp.sharded for i in range(len(args))]
        marks = (
            tuple(tree_map(lambda _, on=on: on, a) for a, on in zip(args, positional)),
            {k: tree_map(lambda _, on=(k in dp.sharded): on, v) for k, v in kwargs.items()},
        )
        return [bool(m) for m in tree_flatten(marks)[0]]

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
        if self.distributed is not None or self.minibatch is not None:
            option = "distributed=" if self.distributed is not None else "minibatch="
            raise ImplicitDiffError(
                f"{self.name}: {option} supports reverse mode only (loss.backward(), torch.autograd.grad); forward "
                "mode (jvp, jacfwd, forward_ad) is not available with it"
            )
        rav = call.raveler
        r0, vjp_b = torch.func.vjp(call.residual_in(sol, args, moving), *[args[i] for i in moving])  # type: ignore[misc]  # typed as a 2- or 3-tuple
        _, jvp_b = torch.func.vjp(lambda u: vjp_b(u), torch.zeros_like(r0))  # type: ignore[misc]  # typed as a 2- or 3-tuple
        b_dtheta = jvp_b(tuple(tangents))[0]
        if self.mode == "one_step":
            t = -b_dtheta
        elif _needs_graph([b_dtheta, *sol, *[a for a in args if isinstance(a, torch.Tensor)]]):
            t, _ = _adjoint_solve(self, call, sol, args, -b_dtheta, transpose=False)
        else:
            transpose_products, matvec = _products(call, sol, args, self.condition.symmetric)
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

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled by reference, like the function it decorates (it replaces that function in its module)
        module, qualname = getattr(self, "__module__", None), getattr(self, "__qualname__", None)
        try:
            found = _import_by_name(module, qualname)  # type: ignore[arg-type]  # None: TypeError, caught
        except (ImportError, AttributeError, TypeError):
            found = None
        if found is not self:
            import pickle

            raise pickle.PicklingError(
                f"{self.name}: only a decorated function defined at module level can be pickled (by its name "
                f"{module}.{qualname}); this one is not reachable under that name"
            )
        return _import_by_name, (module, qualname)

    def _warm_guess(self, g: torch.Tensor) -> torch.Tensor | None:
        w = self._warm
        if not self.warm_start or w is None or under_vmap():
            return None
        if w.shape != g.shape or w.dtype != g.dtype or w.device != g.device:
            return None
        return w


def _import_by_name(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rounding_floor(sol_leaves: Sequence[torch.Tensor]) -> float:
    """A residual this small counts as solved whatever ||F(init)|| was: eps^(2/3) * max(1, ||x*||)."""
    if not sol_leaves:
        return 0.0
    eps = max(torch.finfo(x.dtype).eps for x in sol_leaves)
    size = sum(float(torch.linalg.vector_norm(physical(x).detach().double())) ** 2 for x in sol_leaves) ** 0.5
    return eps ** (2 / 3) * max(1.0, size)


def _versions(leaves: Sequence[Any]) -> list[int | None]:
    """Version counters of the tensor leaves (they count in-place changes, also through detached aliases)."""
    out: list[int | None] = []
    for x in leaves:
        try:
            out.append(x._version if isinstance(x, torch.Tensor) and not is_wrapped(x) else None)
        except RuntimeError:  # tensors without a version counter (inference tensors)
            out.append(None)
    return out


def _leaf_names(tree: Any, param_names: Sequence[str] = ()) -> list[str]:
    """Readable names of the leaves of ``(args, kwargs)``: 'X', 'params['w']', 'positional argument 3'."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    names = []
    for path in paths:
        if path and path[0] == 0:
            i = path[1]
            head = repr(param_names[i]) if i < len(param_names) else f"positional argument {i + 2}"
        else:
            head = repr(path[1]) if len(path) > 1 else "?"
        names.append(head + "".join(f"[{k!r}]" for k in path[2:]))
    return names


def _needs_graph(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a derivative computed from ``tensors`` will itself be differentiated.

    Tensors wrapped by an active grad or jvp transform will be; tensors that are only batched
    (a first-order backward pass run under ``vmap``, e.g. over a batch of tasks) are not, unless
    grad mode is on (``create_graph=True``) and the tensors under the batching require grad.
    """
    reverse, forward = ad_levels()
    if (reverse or forward) and any(is_wrapped(t) for t in tensors):
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad or (is_wrapped(t) and physical(t).requires_grad) for t in tensors)


def _has_plain_tangent(tensors: Sequence[torch.Tensor]) -> bool:
    from torch.autograd import forward_ad

    for t in tensors:
        try:
            if not is_wrapped(t) and forward_ad.unpack_dual(t).tangent is not None:
                return True
        except RuntimeError:
            pass
    return False


#: Largest solution for which nested forward mode (Newton steps with a dense Jacobian) is allowed.
_NEWTON_MAX_SIZE = 4096


def _attach_count(arg_leaves: Sequence[Any]) -> tuple[int, int]:
    """``(attaches, forward levels)``: one attach, or one per AD level when forward mode is nested."""
    reverse, forward = ad_levels()
    tensors = [a for a in arg_leaves if isinstance(a, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reverse += 1
    if _has_plain_tangent(tensors):
        forward += 1
    return (reverse + forward if forward and reverse + forward > 1 else 1), forward


def _products(
    call: _Call, sol: Sequence[torch.Tensor], args: list[Any], symmetric: bool
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(v -> A^T v, v -> A v)`` for ``A = dF/dx`` at the solution, from one linearization.

    ``A v`` is the transpose of the vjp (a vjp is linear in its cotangent), which also works
    inside a forward-mode rule, where torch cannot open another forward-AD level.
    """
    rav = call.raveler
    _, vjp_x = torch.func.vjp(lambda *xs: call.residual(xs, args), *sol)  # type: ignore[misc]  # typed as a 2- or 3-tuple

    def transpose_products(v: torch.Tensor) -> torch.Tensor:
        return rav.ravel(tree_unflatten(call.sol_spec, list(vjp_x(v))))

    if symmetric:
        return transpose_products, transpose_products
    zero = torch.zeros(rav.size, dtype=rav.dtype, device=sol[0].device)
    _, jvp_x = torch.func.vjp(transpose_products, zero)  # type: ignore[misc]  # typed as a 2- or 3-tuple
    return transpose_products, lambda v: jvp_x(v)[0]


def _adjoint_solve(
    fn: ImplicitFunction,
    call: _Call,
    sol: Sequence[torch.Tensor],
    args: list[Any],
    b: torch.Tensor,
    *,
    transpose: bool,
) -> tuple[torch.Tensor, SolveInfo | None]:
    """Solve ``A^T u = b`` (or ``A u = b``) with derivatives exact at every order.

    The solve is itself an implicit function: the root of ``G(u; b, x*, theta) = A(x*, theta)^T u - b``,
    linear in ``u``, whose operator's tensors are explicit arguments. Differentiating it therefore
    costs one more solve (with the transposed operator) per derivative order, never a derivative
    of the solver's iterations, and early exits (``b = 0``) keep their derivative.
    """
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    n_sol = len(sol)
    symmetric = fn.condition.symmetric
    kind = "backward" if transpose else "forward"

    def operator(params: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        full = list(args)
        for i, t in zip(tensor_pos, params[n_sol:]):
            full[i] = t
        transpose_products, matvec = _products(call, params[:n_sol], full, symmetric)
        return transpose_products if transpose else matvec

    infos: list[SolveInfo] = []

    def linear_system(u0: torch.Tensor, rhs: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            u, info = solve_flat(fn.solver, operator(params), rhs, raveler=call.raveler, kind=kind, function=fn.name)
        infos.append(info)
        return u

    linear_system.__name__ = linear_system.__qualname__ = f"{fn.name} ({kind} solve)"
    condition = Condition(
        lambda u, rhs, *params: operator(params)(u) - rhs, symmetric=symmetric, name=f"the {kind} linear system"
    )
    root = ImplicitFunction(
        linear_system, condition, fn.solver, has_aux=False, mode="implicit", check_optimality=None,
        warm_start=False, vmap_inner="batched",
    )
    u = root(torch.zeros_like(b), b, *sol, *[args[i] for i in tensor_pos])
    return u, (infos[-1] if infos else None)


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
        # one graph of F in (x, theta): autograd.grad only runs the part leading to the inputs it is asked for
        eager_graph = getattr(call.fn.condition, "eager_graph", None)
        xs = [s.detach().requires_grad_(transpose or eager_graph is not None) for s in sol]
        moving = {i: args[i].detach().requires_grad_() for i in wanted}
        fixed = [moving.get(i, a.detach() if isinstance(a, torch.Tensor) else a) for i, a in enumerate(args)]
        with torch.enable_grad():
            if eager_graph is not None:  # a plain autograd graph: cheaper per product than torch.func.grad's
                a, kw = call.args(fixed)
                r = rav.ravel(eager_graph(tree_unflatten(call.sol_spec, xs), *a, **kw))
            else:
                r = call.residual(xs, fixed)

        def transpose_fast(v: torch.Tensor) -> torch.Tensor:
            return rav.ravel(tree_unflatten(call.sol_spec, list(torch.autograd.grad(r, xs, v, retain_graph=True))))

        def transpose_batched(rows: torch.Tensor) -> torch.Tensor:  # A^T V for the rows of V: one vmapped backward
            grads = torch.autograd.grad(r, xs, rows, retain_graph=True, is_grads_batched=True)
            return torch.cat([g.reshape(rows.shape[0], -1).to(rav.dtype) for g in grads], dim=1)

        transpose_fast.batched = transpose_batched  # type: ignore[attr-defined]  # read by solve_flat (dense solvers)

        def args_fast(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
            targets = [moving[i] for i in wanted]
            out = torch.autograd.grad(r, targets, u, allow_unused=True, retain_graph=True)
            return tuple(torch.zeros_like(t) if o is None else o for o, t in zip(out, targets))

        return (transpose_fast if transpose else None), args_fast

    transpose_products = None
    if transpose:
        _, vjp_x = torch.func.vjp(lambda *xs: call.residual(xs, args), *sol)  # type: ignore[misc]  # typed as a 2- or 3-tuple

        def transpose_products(v: torch.Tensor) -> torch.Tensor:
            return rav.ravel(tree_unflatten(call.sol_spec, list(vjp_x(v))))

    def vjp_args(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # linearized in the arguments only when B^T u is asked for (after the solve): built with the
        # linearization in x, it would be held through the solve with its residual (one solution-sized
        # vector per problem, the whole batch's under vmap) and evaluate F on top of that linearization
        _, vjp = torch.func.vjp(call.residual_in(sol, args, wanted), *[args[i] for i in wanted])  # type: ignore[misc]  # typed as a 2- or 3-tuple
        return tuple(vjp(u))

    return transpose_products, vjp_args


_Products = Callable[[torch.Tensor], torch.Tensor]


def _minibatch_products(
    call: _Call,
    sol: Sequence[torch.Tensor],
    args: list[Any],
    wanted: list[int],
    minibatch: Minibatch,
    resample: str,
    *,
    transpose: bool,
) -> tuple[Any, Callable[[torch.Tensor], tuple[torch.Tensor, ...]], Callable[[], _Products]]:
    """Products of the condition on minibatches: ``(v -> A_b^T v, u -> B_b'^T u, () -> (v -> A_b v))``.

    With ``resample="product"`` every product draws its own batch (a fresh linearization);
    with ``"solve"`` one batch serves the whole solve. ``B^T u`` always uses a batch of its own,
    drawn with the arguments as inputs, so its gradient flows through the user's indexing.
    """
    rav = call.raveler
    device = sol[0].device
    sol = [s.detach() for s in sol]
    fixed = _detach(args)
    condition = call.fn.condition

    def as_solution(xs: Sequence[torch.Tensor]) -> Any:
        return tree_unflatten(call.sol_spec, list(xs))

    def linearized() -> tuple[_Products, Callable[[], _Products]]:
        a, kw = minibatch.draw(device, *call.args(fixed))

        def residual(*xs: torch.Tensor) -> torch.Tensor:
            return rav.ravel(condition(as_solution(xs), *a, **kw))

        eager_graph = getattr(condition, "eager_graph", None)
        if eager_graph is not None:  # a plain autograd graph: a fresh one per batch is cheaper than torch.func's
            xs = [s.requires_grad_() for s in (t.clone() for t in sol)]
            with torch.enable_grad():
                r = rav.ravel(eager_graph(as_solution(xs), *a, **kw))

            def transpose_products(v: torch.Tensor) -> torch.Tensor:
                return rav.ravel(as_solution(torch.autograd.grad(r, xs, v, retain_graph=True)))

        else:
            _, vjp_x = torch.func.vjp(residual, *sol)  # type: ignore[misc]  # typed as a 2- or 3-tuple

            def transpose_products(v: torch.Tensor) -> torch.Tensor:
                return rav.ravel(as_solution(vjp_x(v)))

        def forward_factory() -> Callable[[torch.Tensor], torch.Tensor]:
            def mv(v: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(residual, tuple(sol), tuple(tree_flatten(rav.unravel(v))[0]))[1]

            return mv

        return transpose_products, forward_factory

    transpose_products: Callable[[torch.Tensor], torch.Tensor] | None = None
    forward_factory: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
    if not transpose:
        forward_factory = lambda: linearized()[1]()  # noqa: E731  # unused: one_step needs no solve
    elif resample == "product":

        def transpose_products(v: torch.Tensor) -> torch.Tensor:
            return linearized()[0](v)

        def forward_factory() -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda v: linearized()[1]()(v)

    else:
        transpose_products, forward_factory = linearized()

    def args_vjp(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def residual_of(*moving: torch.Tensor) -> torch.Tensor:
            full = list(fixed)
            for i, m in zip(wanted, moving):
                full[i] = m
            a, kw = minibatch.draw(device, *call.args(full))
            return rav.ravel(condition(as_solution(sol), *a, **kw))

        _, vjp = torch.func.vjp(residual_of, *[fixed[i] for i in wanted])  # type: ignore[misc]  # typed as a 2- or 3-tuple
        return tuple(vjp(u))

    return transpose_products, args_vjp, forward_factory


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
        bound = (*fn.args, *fn.keywords.values())
        if any(isinstance(a, torch.Tensor) and (is_wrapped(a) or a.requires_grad) for a in bound):
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
    named = (("optimality_fn", optimality_fn), ("objective", objective), ("fixed_point", fixed_point))
    given = {k: v for k, v in named if v is not None}
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
    check_optimality: float | None = DEFAULT_OPTIMALITY_TOL,
    warm_start: bool = False,
    vmap_inner: Literal["loop", "batched"] = "loop",
    truncated_steps: int | None = None,
    step: Callable[..., Any] | None = None,
    minibatch: Minibatch | None = None,
    distributed: DataParallel | None = None,
    compile_backward: bool = False,
) -> Callable[[Callable[..., Any]], ImplicitFunction]:
    r"""Make an inner solver differentiable by implicit differentiation.

    Decorates ``inner(init, *args, **kwargs) -> solution`` (or ``(solution, aux)`` with
    ``has_aux=True``), where the solution :math:`x^\star(\theta)` satisfies an optimality
    condition :math:`F(x^\star, \theta) = 0` and :math:`\theta` stands for ``args`` and
    ``kwargs``. By the implicit function theorem

    .. math::

        \frac{\partial x^\star}{\partial\theta}
        = -\Big(\frac{\partial F}{\partial x}\Big)^{-1}\frac{\partial F}{\partial\theta},

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
        Backward linear solver. Default :class:`Auto`: for a solution of at most 256 numbers
        (and 64 MiB for the matrix and its factor) the Jacobian is materialized with one
        batched product and factorized (Cholesky when symmetric positive definite, else LU;
        the factorization is reused by further backward calls at the same solution), which
        is exact and, at that size, faster than iterating; larger systems go to :class:`CG`
        when the condition's Jacobian is symmetric (an objective, or a :class:`Condition`
        marked symmetric, as :func:`proximal_condition`: then the positive definite Hessian
        at a strict minimum, for which CG is the cheapest Krylov method) and to
        :class:`GMRES` otherwise (it assumes nothing about the operator). Override the size
        rule with ``Auto(max_size=..., max_bytes=...)`` or pass any solver. Its
        ``on_failure`` policy applies in the backward pass.
    has_aux : bool
        ``inner`` returns ``(solution, aux)``; aux is returned as is, not differentiated.
    mode : {"implicit", "unrolled", "one_step", "truncated"}
        ``"implicit"`` (default): the implicit function theorem. ``"unrolled"``: plain autograd
        through ``inner`` as written (it must be differentiable; memory grows with its
        iterations). ``"one_step"``: Jacobian-free backpropagation, :math:`\partial F/\partial x`
        replaced by the identity (cheap, approximate; first-order MAML for the proximal
        condition). ``"truncated"``: truncated back-propagation (Shaban et al., 2019): the
        value is the solver's solution :math:`x^\star`, the derivative that of
        ``truncated_steps`` applications of the differentiable inner iteration ``step`` from
        :math:`x^\star`, i.e. :math:`\sum_{j<k} (\partial T/\partial x)^j\,\partial T/\partial\theta`,
        the first :math:`k` terms of the implicit derivative's Neumann series (error
        :math:`O(\rho^k)` for a contraction of rate :math:`\rho`); memory :math:`O(k)`.
        Shaban et al. back-propagate through the solver's own last :math:`k` iterates; once
        the solver has converged those equal :math:`x^\star` and the two coincide.
    check_optimality : float or None
        After every inner solve, compare :math:`\|F(x^\star)\|` with :math:`\|F(\text{init})\|`
        and warn (:class:`InnerOptimalityWarning`) when the ratio exceeds this (default
        ``1e-3``: quiet on solutions that are solved at all, loud on a solver stopped early);
        the result is also logged to :func:`record_solves` (``kind="optimality"``). Costs one
        evaluation of the condition at ``init`` on top of the one at the solution, which is
        made on every call anyway (to validate the residual and to find closures over
        tensors requiring grad). A residual below :math:`\epsilon^{2/3}\max(1, \|x^\star\|)`
        (the dtype's precision) always passes, so a warm start already near the solution is
        not flagged. ``None`` turns the comparison off; in ``mode="unrolled"`` only an explicit
        value turns it on. If ``init`` has another structure than the solution,
        :math:`\|F(x^\star)\|` is compared with the tolerance itself.
    warm_start : bool
        Start each backward solve from the previous one's solution (useful across outer
        iterations, where the system changes slowly).
    vmap_inner : {"loop", "batched"}
        Under ``torch.func.vmap``, run the inner solver once per problem (``"loop"``, works
        for any solver) or once on the batch under vmap (``"batched"``, faster, for solvers
        written in plain torch operations without data-dependent Python control flow).
    truncated_steps : int, optional
        :math:`k \ge 1` for ``mode="truncated"`` (required there, rejected elsewhere).
    step : callable, optional
        The differentiable inner iteration ``step(x, *args, **kwargs) -> x_next`` of
        ``mode="truncated"`` (e.g. one gradient step). Default: the condition's own iteration
        when it has one (``fixed_point=``, :func:`projected_gradient_condition`,
        :func:`proximal_gradient_condition`); an ``objective`` or a root condition needs it.
    minibatch : Minibatch, optional
        Take the backward solve's products on minibatches of the inner data (see
        :class:`Minibatch`): for data too large for full-batch products.
    distributed : DataParallel, optional
        The condition is this rank's term of a condition reduced over a ``torch.distributed``
        process group (see :class:`DataParallel`): products are all-reduced, every rank gets
        the global hypergradient.
    compile_backward : bool
        Compute the hypergradient of a plain first-order backward pass (``.backward()``,
        ``torch.autograd.grad``, ``mode="implicit"``) with one ``torch.compile``-d function:
        for a solution within :class:`Auto`'s dense size, :math:`A` by ``jacrev`` and a dense
        solve; above it, for a symmetric condition, CG in compiled control flow
        (``while_loop``), to the solver's ``tol`` and ``maxiter``. It removes eager PyTorch's
        per-operation overhead (on a 30-feature logistic regression, about 10x faster than the
        eager path after compiling; see :doc:`/benchmarks`), at a one-off compile time of
        seconds per call structure. Elsewhere (higher-order derivatives, ``torch.func``
        transforms, forward mode, large non-symmetric systems, unhashable static arguments)
        and when the compiled dense solve reports trouble, the eager path runs. The
        condition must be traceable by ``torch.compile`` (graph breaks only slow it down).

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
        solver = Auto(symmetric=condition.symmetric)
    elif isinstance(solver, Auto):
        solver = solver.with_symmetry(condition.symmetric)
    check_solver(solver, "implicit_diff")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if vmap_inner not in ("loop", "batched"):
        raise ValueError(f"vmap_inner must be 'loop' or 'batched', got {vmap_inner!r}")
    if check_optimality is not None and not check_optimality >= 0:
        raise ValueError(f"check_optimality must be a non-negative float or None, got {check_optimality!r}")
    _check_truncation(mode, truncated_steps, step, condition)
    _check_scaling_options(minibatch, distributed, solver, mode)
    if compile_backward and (minibatch is not None or distributed is not None):
        raise ValueError("compile_backward does not combine with minibatch= or distributed=")

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
            truncated_steps=truncated_steps,
            step=step,
            minibatch=minibatch,
            distributed=distributed,
            compile_backward=compile_backward,
        )

    return decorate


def _check_truncation(mode: str, truncated_steps: int | None, step: Any, condition: Condition) -> None:
    if mode != "truncated":
        if truncated_steps is not None:
            raise ValueError(f"truncated_steps is for mode='truncated' only (mode is {mode!r})")
        return
    if not isinstance(truncated_steps, int) or isinstance(truncated_steps, bool) or truncated_steps < 1:
        raise ValueError(f"mode='truncated' needs truncated_steps, an int >= 1 (got {truncated_steps!r})")
    if step is not None and not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    if step is None and condition.step is None:
        raise ValueError(
            f"mode='truncated' differentiates k applications of the inner iteration, and {condition.name} does not "
            "define one: pass step=, e.g. step=lambda w, *args: w - lr * torch.func.grad(objective)(w, *args)"
        )


def _check_scaling_options(
    minibatch: Minibatch | None, distributed: DataParallel | None, solver: LinearSolver, mode: str
) -> None:
    if minibatch is not None:
        if not isinstance(minibatch, Minibatch):
            raise TypeError(f"minibatch must be an implicitdiff.Minibatch, got {type(minibatch).__name__}")
        if mode not in ("implicit", "one_step"):
            raise ValueError(f"minibatch= applies to mode='implicit' or 'one_step', not {mode!r}")
        resample = minibatch.resample or ("product" if solver.accepts_stochastic_operator else "solve")
        if resample == "product" and not solver.accepts_stochastic_operator:
            raise ValueError(
                f"Minibatch(resample='product') draws a new operator for every product, which only a stationary "
                f"iteration such as Neumann tolerates; {solver.name} assumes one fixed operator: use "
                "resample='solve' (one minibatch per solve) or solver=Neumann(...)"
            )
        if resample == "product" and solver.tol is not None:
            raise ValueError(
                f"Minibatch(resample='product') makes every residual a random estimate, so a tolerance test is "
                f"meaningless: give {solver.name} a fixed budget (tol=None, maxiter=K)"
            )
    if distributed is not None:
        if not isinstance(distributed, DataParallel):
            raise TypeError(f"distributed must be an implicitdiff.DataParallel, got {type(distributed).__name__}")
        if mode not in ("implicit", "one_step"):
            raise ValueError(f"distributed= applies to mode='implicit' or 'one_step', not {mode!r}")
