"""Optimality conditions F(x, *args) = 0 for the common kinds of inner problems.

implicitdiff differentiates a solution through the condition it satisfies. These helpers
build the condition for the usual cases and carry one fact the library uses: whether the
Jacobian ``dF/dx`` is symmetric (then CG is the default iterative backward solver). Signs are
normalized so that the Jacobian is "positive" in the usual cases: the Hessian for an
objective, ``I - dT/dx`` for a fixed point, ``I + H/lambda`` for the proximal condition.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._tree import tree_flatten, tree_map, tree_unflatten

__all__ = ["Condition", "stationarity_condition", "fixed_point_condition", "proximal_condition"]


class Condition:
    """A residual function ``F(x, *args, **kwargs)`` with metadata.

    Calling it evaluates the residual, a pytree with the structure of ``x``.

    Parameters
    ----------
    fn : callable
        The residual.
    symmetric : bool
        Whether ``dF/dx`` is symmetric (true for gradients of objectives); selects CG as the
        default iterative backward solver (GMRES otherwise).
    name : str
        Shown in error messages.
    eager : callable, optional
        The same residual computed with plain autograd, for the per-call check outside
        ``torch.func`` (cheaper than a ``torch.func.grad`` there): returns ``(residual,
        closes_over_grad)``, the flag telling whether the residual depends on a tensor that
        requires grad other than ``x``.
    eager_graph : callable, optional
        The residual by plain autograd with its graph (``create_graph=True``), for ``x`` whose
        leaves require grad: the backward pass's products then run on a plain autograd graph,
        which is cheaper per product than a graph of ``torch.func.grad``.
    step : callable, optional
        The iteration ``x -> T(x, *args, **kwargs)`` whose fixed points are the roots of the
        residual, when the condition has that form (a fixed point, a projected or proximal
        gradient step): the differentiable step of ``mode="truncated"``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        symmetric: bool,
        name: str,
        eager: Callable[..., tuple[Any, bool]] | None = None,
        eager_graph: Callable[..., Any] | None = None,
        step: Callable[..., Any] | None = None,
    ) -> None:
        self.fn = fn
        self.step = step
        self.symmetric = symmetric
        self.name = name
        self.eager = eager
        self.eager_graph = eager_graph

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.fn(x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Condition({self.name}, symmetric={self.symmetric})"


def _scalar_objective(objective: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def checked(x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = objective(x, *args, **kwargs)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = (type(value).__name__ if not isinstance(value, torch.Tensor)
                    else f"a tensor of shape {tuple(value.shape)}")
            raise ValueError(f"the objective must return a scalar tensor, got {what}")
        return value.reshape(())

    return checked


def stationarity_condition(objective: Callable[..., torch.Tensor]) -> Condition:
    r"""The condition :math:`F(x, \theta) = \nabla_x f(x, \theta)` of an unconstrained minimum.

    Parameters
    ----------
    objective : callable
        ``f(x, *args, **kwargs) -> scalar tensor``; ``x`` may be a pytree.

    Returns
    -------
    Condition
        Symmetric (its Jacobian is the Hessian), so CG is the default iterative backward solver.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> F = idiff.stationarity_condition(lambda x, a: ((x - a) ** 2).sum())
    >>> F(torch.zeros(2), torch.ones(2))
    tensor([-2., -2.])
    """
    grad_fn = torch.func.grad(_scalar_objective(objective), argnums=0)
    return Condition(
        grad_fn,
        symmetric=True,
        name=f"stationarity of {getattr(objective, '__name__', 'objective')}",
        eager=_eager_gradient(_scalar_objective(objective)),
        eager_graph=_gradient_graph(_scalar_objective(objective)),
    )


def _eager_gradient(objective: Callable[..., torch.Tensor]) -> Callable[..., tuple[Any, bool]]:
    """``grad_x objective`` by plain autograd, and whether the objective reaches other leaves requiring grad."""

    def evaluate(x: Any, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
        leaves, spec = tree_flatten(x)
        xs = [t.detach().requires_grad_() for t in leaves]
        with torch.enable_grad():
            value = objective(tree_unflatten(spec, xs), *args, **kwargs)
        closure = _reaches_other_leaves(value, xs)
        grads: tuple[torch.Tensor | None, ...]
        if value.requires_grad:
            grads = torch.autograd.grad(value, xs, allow_unused=True)
        else:
            grads = (None,) * len(xs)
        return tree_unflatten(spec, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, xs)]), closure

    return evaluate


def _gradient_graph(objective: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """``grad_x objective`` with its graph, for ``x`` whose leaves require grad."""

    def evaluate(x: Any, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten(x)
        with torch.enable_grad():
            grads = torch.autograd.grad(objective(x, *args, **kwargs), leaves, create_graph=True, allow_unused=True)
        return tree_unflatten(spec, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)])

    return evaluate


def _reaches_other_leaves(value: torch.Tensor, own: list[torch.Tensor]) -> bool:
    """Whether the graph of ``value`` accumulates into a leaf tensor that is not one of ``own``."""
    own_ids = {id(t) for t in own}
    stack, seen = [value.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in own_ids:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def fixed_point_condition(fixed_point: Callable[..., Any]) -> Condition:
    r"""The condition of a fixed point :math:`x = T(x, \theta)`, as :math:`F = x - T(x, \theta)`.

    The sign makes :math:`\partial F/\partial x = I - \partial T/\partial x`, so that for a
    contractive :math:`T` the default :class:`~implicitdiff.Neumann` solver is the classic
    adjoint fixed-point iteration :math:`u \leftarrow g + (\partial T/\partial x)^\top u`.

    Parameters
    ----------
    fixed_point : callable
        ``T(x, *args, **kwargs)`` returning a pytree shaped like ``x``.

    Returns
    -------
    Condition
        Not symmetric: GMRES is the default iterative backward solver.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> F = idiff.fixed_point_condition(lambda x, a: 0.5 * x + a)
    >>> F(torch.tensor([2.0]), torch.tensor([1.0]))
    tensor([0.])
    """

    def residual(x: Any, *args: Any, **kwargs: Any) -> Any:
        return tree_map(torch.sub, x, fixed_point(x, *args, **kwargs))

    return Condition(
        residual, symmetric=False, name=f"fixed point of {getattr(fixed_point, '__name__', 'map')}", step=fixed_point
    )


def proximal_condition(loss_fn: Callable[..., torch.Tensor], lam: float) -> Condition:
    r"""iMAML's condition for :math:`\phi^* = \arg\min_\phi L(\phi) + \tfrac{\lambda}{2}\|\phi - \theta\|^2`.

    Returns :math:`F(\phi, \theta, \ldots) = \nabla L(\phi)/\lambda + (\phi - \theta)`, the
    stationarity condition divided by :math:`\lambda`. Then
    :math:`\partial F/\partial\phi = I + \nabla^2 L/\lambda` (symmetric: CG by default) and
    :math:`\partial F/\partial\theta = -I`, so the implicit meta-gradient is
    :math:`(I + \nabla^2 L(\phi^*)/\lambda)^{-1} \nabla L_{\text{test}}(\phi^*)` as in
    Rajeswaran et al. (2019), and ``mode="one_step"`` (Jacobian replaced by the identity)
    is exactly first-order MAML.

    Parameters
    ----------
    loss_fn : callable
        ``L(phi, *args, **kwargs) -> scalar``: the inner (training) loss.
    lam : float
        Proximal regularization strength :math:`\lambda > 0`.

    Returns
    -------
    Condition
        With signature ``F(phi, theta, *args, **kwargs)``.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> F = idiff.proximal_condition(lambda p, t: ((p - t) ** 2).sum(), lam=2.0)
    >>> F(torch.ones(2), torch.zeros(2), torch.zeros(2))
    tensor([2., 2.])
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    grad_fn = torch.func.grad(_scalar_objective(loss_fn), argnums=0)
    inv = 1.0 / float(lam)

    def residual(phi: Any, theta: Any, *args: Any, **kwargs: Any) -> Any:
        g = grad_fn(phi, *args, **kwargs)
        return tree_map(lambda gi, p, t: gi * inv + (p - t), g, phi, theta)

    return Condition(residual, symmetric=True, name=f"proximal condition of {getattr(loss_fn, '__name__', 'loss')}")
