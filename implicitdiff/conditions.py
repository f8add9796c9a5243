"""Optimality conditions F(x, *args) = 0 for the common kinds of inner problems.

implicitdiff differentiates a solution through the condition it satisfies. These helpers
build the condition for the usual cases and carry one fact the library uses: whether the
Jacobian ``dF/dx`` is symmetric (then CG is the default backward solver). Signs are
normalized so that the Jacobian is "positive" in the usual cases: the Hessian for an
objective, ``I - dT/dx`` for a fixed point, ``I + H/lambda`` for the proximal condition.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._tree import tree_map

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
        default backward solver.
    name : str
        Shown in error messages.
    """

    def __init__(self, fn: Callable[..., Any], *, symmetric: bool, name: str) -> None:
        self.fn = fn
        self.symmetric = symmetric
        self.name = name

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.fn(x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Condition({self.name}, symmetric={self.symmetric})"


def _scalar_objective(objective: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def checked(x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = objective(x, *args, **kwargs)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            what = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
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
        Symmetric (its Jacobian is the Hessian), so CG is the default backward solver.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> F = idiff.stationarity_condition(lambda x, a: ((x - a) ** 2).sum())
    >>> F(torch.zeros(2), torch.ones(2))
    tensor([-2., -2.])
    """
    grad_fn = torch.func.grad(_scalar_objective(objective), argnums=0)
    return Condition(grad_fn, symmetric=True, name=f"stationarity of {getattr(objective, '__name__', 'objective')}")


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
        Not symmetric: GMRES is the default backward solver.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> F = idiff.fixed_point_condition(lambda x, a: 0.5 * x + a)
    >>> F(torch.tensor([2.0]), torch.tensor([1.0]))
    tensor([0.])
    """

    def residual(x: Any, *args: Any, **kwargs: Any) -> Any:
        return tree_map(torch.sub, x, fixed_point(x, *args, **kwargs))

    return Condition(residual, symmetric=False, name=f"fixed point of {getattr(fixed_point, '__name__', 'map')}")


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
