r"""Inner solvers for constrained and composite problems: projected gradient and FISTA.

Ordinary functions, meant to be called *inside* an inner solver decorated with
:func:`~implicitdiff.implicit_diff` and :func:`~implicitdiff.projected_gradient_condition`
or :func:`~implicitdiff.proximal_gradient_condition`; they share those conditions'
conventions (``objective(x, *args, **kwargs)``, ``projection(y, params)``,
``prox(y, params, scaling)``), so the solver and the condition are written once:

.. code-block:: python

   condition = idiff.proximal_gradient_condition(objective, prox.l1)

   @idiff.implicit_diff(condition)
   def lasso(w0, lam, X, y):
       return idiff.fista(objective, prox.l1, w0, lam, X, y).x

They stop on the fixed-point residual the conditions evaluate, with a default tolerance
at the precision the decorator's optimality check accepts as solved, so its
:class:`~implicitdiff.InnerOptimalityWarning` stays quiet on a converged solve. Their
loops branch on values in Python (stopping test, line search): under ``torch.func.vmap``
keep the decorator's default ``vmap_inner="loop"``. They are written in differentiable
operations, so ``mode="unrolled"`` differentiates through their iterations.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ._lipschitz import inverse_lipschitz
from .conditions import _scalar_objective

__all__ = ["OptimizeResult", "projected_gradient", "fista"]

#: Step halvings allowed per iteration of the backtracking line search.
_MAX_HALVINGS = 60


class OptimizeResult(NamedTuple):
    """What :func:`projected_gradient` and :func:`fista` return.

    Attributes
    ----------
    x : torch.Tensor
        The solution.
    iterations : int
        Iterations run (gradient evaluations, not counting the line search's objective
        evaluations).
    residual : float
        :math:`\\|x - T_\\eta(x)\\|` at the returned ``x``, with :math:`T_\\eta` the
        projected (proximal) gradient step of the final step size: the norm of
        :func:`~implicitdiff.projected_gradient_condition` (``proximal_gradient_condition``)
        evaluated with ``stepsize=stepsize``.
    stepsize : float
        The final step size :math:`\\eta` (after the line search, if any).
    converged : bool
        Whether the stopping test was met before ``maxiter``.
    """

    x: torch.Tensor
    iterations: int
    residual: float
    stepsize: float
    converged: bool


def projected_gradient(
    objective: Callable[..., torch.Tensor],
    projection: Callable[[torch.Tensor, Any], torch.Tensor],
    init: torch.Tensor,
    params: Any,
    *args: Any,
    stepsize: float | None = None,
    maxiter: int = 1000,
    tol: float | None = None,
    acceleration: bool = True,
    **kwargs: Any,
) -> OptimizeResult:
    r"""Minimize :math:`f(x)` over :math:`x \in C` by (accelerated) projected gradient descent.

    Iterates :math:`x_{k+1} = P_C(y_k - \eta\nabla f(y_k))` with FISTA's momentum
    :math:`y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k)` (Beck and Teboulle
    2009) and the gradient-based adaptive restart of O'Donoghue and Candès (2015), which
    resets the momentum when it points uphill and gives linear convergence on strongly
    convex problems; ``acceleration=False`` is plain projected gradient
    (:math:`y_k = x_k`). It is :func:`fista` with the projection as the proximal operator.

    Parameters
    ----------
    objective : callable
        ``f(x, *args, **kwargs) -> scalar``, smooth.
    projection : callable
        ``projection(y, params)``, e.g. from :mod:`implicitdiff.projections`.
    init : torch.Tensor
        Starting point (a floating tensor).
    params : any
        The set's parameters, passed to ``projection``.
    *args, **kwargs
        Passed to ``objective``. The keyword names of the options below cannot be used
        for it.
    stepsize : float or None
        ``None`` (default): start from :math:`1/L`, estimated by 10 power iterations on
        the Hessian at ``init``, and halve the step until the sufficient-decrease condition
        :math:`f(x_{k+1}) \le f(y_k) + \nabla f(y_k)^\top d + \|d\|^2/(2\eta)`,
        :math:`d = x_{k+1} - y_k`, holds (backtracking; Beck and Teboulle 2009), or its
        gradient form :math:`(\nabla f(x_{k+1}) - \nabla f(y_k))^\top d \le \|d\|^2/(2\eta)`,
        which implies it for a convex :math:`f` and stays accurate when the steps are so
        small that function values differ only by rounding. The step never increases. A
        float: that fixed step, no line search (it must be at most :math:`1/L` for
        convergence).
    maxiter : int
        Maximum number of iterations.
    tol : float or None
        Stop when :math:`\|x_{k+1} - y_k\| \le \text{tol}\cdot\max(1, \|x_{k+1}\|)`. ``None``
        (default): :math:`\epsilon^{2/3}` of the dtype (``3.7e-11`` in float64,
        ``2.4e-5`` in float32), the level the decorator's optimality check counts as solved.
    acceleration : bool
        Use FISTA's momentum (default) or plain projected gradient.

    Returns
    -------
    OptimizeResult
        ``(x, iterations, residual, stepsize, converged)``.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> from implicitdiff import projections
    >>> c = torch.tensor([0.3, 1.2, -0.4], dtype=torch.float64)
    >>> def objective(x, c):
    ...     return ((x - c) ** 2).sum()
    >>> result = idiff.projected_gradient(objective, projections.simplex, torch.zeros(3, dtype=torch.float64), 1.0, c)
    >>> result.x, result.converged
    (tensor([0.0500, 0.9500, 0.0000], dtype=torch.float64), True)
    """

    def step(y: torch.Tensor, eta: float) -> torch.Tensor:
        return projection(y, params)

    return _minimize(objective, step, init, args, kwargs, stepsize, maxiter, tol, acceleration, "projected_gradient")


def fista(
    objective: Callable[..., torch.Tensor],
    prox: Callable[..., torch.Tensor],
    init: torch.Tensor,
    params: Any,
    *args: Any,
    stepsize: float | None = None,
    maxiter: int = 1000,
    tol: float | None = None,
    **kwargs: Any,
) -> OptimizeResult:
    r"""Minimize :math:`f(x) + g(x)` by FISTA, the accelerated proximal gradient method.

    Iterates :math:`x_{k+1} = \operatorname{prox}_{\eta g}(y_k - \eta\nabla f(y_k))`,
    :math:`y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k)`,
    :math:`t_{k+1} = \frac{1 + \sqrt{1 + 4t_k^2}}{2}` (Beck and Teboulle 2009), with a
    backtracking line search on :math:`\eta` and the gradient-based adaptive restart of
    O'Donoghue and Candès (2015).

    Parameters
    ----------
    objective : callable
        ``f(x, *args, **kwargs) -> scalar``, the smooth part.
    prox : callable
        ``prox(y, params, scaling=eta)``, the proximal operator of :math:`g`, e.g. from
        :mod:`implicitdiff.prox`.
    init : torch.Tensor
        Starting point (a floating tensor).
    params : any
        The penalty's parameters, passed to ``prox``.
    *args, **kwargs
        Passed to ``objective``. The keyword names of the options below cannot be used
        for it.
    stepsize : float or None
        ``None`` (default): start from :math:`1/L` (10 power iterations on the Hessian of
        :math:`f` at ``init``) and backtrack (halve the step) until the sufficient-decrease
        condition of :func:`projected_gradient` holds. A float: that fixed step, no line
        search (at most :math:`1/L` for convergence).
    maxiter : int
        Maximum number of iterations.
    tol : float or None
        Stop when :math:`\|x_{k+1} - y_k\| \le \text{tol}\cdot\max(1, \|x_{k+1}\|)`; ``None``:
        :math:`\epsilon^{2/3}` of the dtype, as for :func:`projected_gradient`.

    Returns
    -------
    OptimizeResult
        ``(x, iterations, residual, stepsize, converged)``.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> from implicitdiff import prox
    >>> c = torch.tensor([2.0, -0.2, -1.0], dtype=torch.float64)
    >>> def objective(w, c):
    ...     return 0.5 * ((w - c) ** 2).sum()
    >>> result = idiff.fista(objective, prox.l1, torch.zeros(3, dtype=torch.float64), 0.5, c)
    >>> result.x
    tensor([ 1.5000,  0.0000, -0.5000], dtype=torch.float64)
    """

    def step(y: torch.Tensor, eta: float) -> torch.Tensor:
        return prox(y, params, scaling=eta)

    return _minimize(objective, step, init, args, kwargs, stepsize, maxiter, tol, True, "fista")


def _minimize(
    objective: Callable[..., torch.Tensor],
    step: Callable[[torch.Tensor, float], torch.Tensor],
    init: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    stepsize: float | None,
    maxiter: int,
    tol: float | None,
    acceleration: bool,
    name: str,
) -> OptimizeResult:
    """Accelerated proximal gradient with backtracking and adaptive restart; ``step(y, eta)`` is the prox."""
    if not isinstance(init, torch.Tensor) or not init.is_floating_point():
        raise TypeError(f"{name}: init must be a floating-point tensor, got {_describe(init)}")
    if stepsize is not None and not _is_positive_number(stepsize):
        raise ValueError(f"{name}: stepsize must be a positive float or None (line search), got {stepsize!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"{name}: maxiter must be a positive int, got {maxiter!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"{name}: tol must be a non-negative float or None, got {tol!r}")
    checked = _scalar_objective(objective)
    value_and_gradient = torch.func.grad_and_value(checked, argnums=0)
    eps = torch.finfo(init.dtype).eps
    tolerance = eps ** (2 / 3) if tol is None else float(tol)
    line_search = stepsize is None
    if stepsize is None:
        eta = _float(inverse_lipschitz(checked, init, args, kwargs))
    else:
        eta = float(stepsize)

    x = y = init
    t = 1.0
    converged = False
    iterations = 0
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (point, gradient, value)
    for iteration in range(1, maxiter + 1):
        iterations = iteration
        if cached is not None and cached[0] is y:
            _, gradient, value = cached
        else:
            gradient, value = value_and_gradient(y, *args, **kwargs)
        x_new = step(y - eta * gradient, eta)
        cached = None
        if line_search:
            for _ in range(_MAX_HALVINGS):
                d = x_new - y
                if acceleration:  # the next gradient is taken at the extrapolated point: test on the value first
                    if _values_decrease(d, gradient, value, checked(x_new, *args, **kwargs), eta, eps):
                        break
                gradient_new, value_new = value_and_gradient(x_new, *args, **kwargs)
                cached = (x_new, gradient_new, value_new)
                if _values_decrease(d, gradient, value, value_new, eta, eps) or _gradients_decrease(
                    d, gradient, gradient_new, eta
                ):
                    break
                eta *= 0.5
                x_new = step(y - eta * gradient, eta)
                cached = None
        move = x_new - y
        size = max(1.0, _float(torch.linalg.vector_norm(x_new)))
        converged = _float(torch.linalg.vector_norm(move)) <= tolerance * size
        if acceleration and not converged:
            if _float((move * (x_new - x)).sum()) < 0:  # momentum points uphill: restart
                t, y = 1.0, x_new
            else:
                t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
                y = x_new + ((t - 1) / t_next) * (x_new - x)
                t = t_next
        else:
            y = x_new
        x = x_new
        if converged:
            break
    if cached is not None and cached[0] is x:
        gradient = cached[1]
    else:
        gradient, _ = value_and_gradient(x, *args, **kwargs)
    residual = _float(torch.linalg.vector_norm(x - step(x - eta * gradient, eta)))
    return OptimizeResult(x, iterations, residual, eta, converged)


# The backtracking test for the step d = x+ - y is the quadratic upper bound of f at x+ (Beck and Teboulle
# 2009), f(x+) <= f(y) + g'd + |d|^2 / (2 eta), checked on function values or, equivalently up to a factor of
# two, on gradients: (g(x+) - g(y))'d <= |d|^2 / (2 eta) implies it for a convex f (convexity gives
# f(x+) - f(y) - g(y)'d <= (g(x+) - g(y))'d), and stays accurate when the steps are so small (below about
# sqrt(eps)) that the function values differ only by rounding.


def _values_decrease(d: torch.Tensor, gradient: torch.Tensor, value: torch.Tensor, value_new: torch.Tensor,
                     eta: float, eps: float) -> bool:
    f_y = _float(value)
    bound = f_y + _float((gradient * d).sum()) + _float((d * d).sum()) / (2 * eta)
    return _float(value_new) <= bound + 10 * eps * abs(f_y)


def _gradients_decrease(d: torch.Tensor, gradient: torch.Tensor, gradient_new: torch.Tensor, eta: float) -> bool:
    return _float(((gradient_new - gradient) * d).sum()) <= _float((d * d).sum()) / (2 * eta)


def _float(value: torch.Tensor) -> float:
    """A Python float of a 0-d tensor, without a warning when it is part of a graph (``mode="unrolled"``)."""
    return float(value.detach())


def _is_positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__
