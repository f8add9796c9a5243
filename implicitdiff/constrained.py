r"""Optimality conditions of constrained and non-smooth inner problems.

Three condition builders, each returning a :class:`~implicitdiff.Condition` to pass to
:func:`~implicitdiff.implicit_diff`:

* :func:`projected_gradient_condition` — :math:`\min_{x \in C(\theta)} f(x, \theta)` with a
  projection onto :math:`C` (see :mod:`implicitdiff.projections`);
* :func:`proximal_gradient_condition` — :math:`\min_x f(x, \theta) + g(x, \theta)` with the
  proximal operator of :math:`g` (see :mod:`implicitdiff.prox`);
* :func:`kkt_condition` — :math:`\min_x f(x, \theta)` s.t. :math:`h(x, \theta) = 0,\
  g(x, \theta) \le 0`, when the inner solver also returns the multipliers.

None of their Jacobians is symmetric, so :class:`~implicitdiff.GMRES` is the default
iterative backward solver (:class:`~implicitdiff.Auto` factorizes small systems by
LU). The mathematics, the choice between them and the step size are explained
in :doc:`/constrained`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._lipschitz import inverse_lipschitz
from ._tree import tree_map
from .conditions import Condition, _scalar_objective

__all__ = ["projected_gradient_condition", "proximal_gradient_condition", "kkt_condition"]


def _check_stepsize(stepsize: float | None) -> None:
    if stepsize is None:
        return
    if isinstance(stepsize, bool) or not isinstance(stepsize, int | float) or not stepsize > 0:
        raise ValueError(f"stepsize must be a positive float or None (estimate 1/L), got {stepsize!r}")


def _name(fn: Any, default: str) -> str:
    return getattr(fn, "__name__", default)


def projected_gradient_condition(
    objective: Callable[..., torch.Tensor],
    projection: Callable[[Any, Any], Any],
    stepsize: float | None = None,
) -> Condition:
    r"""The fixed point of a projected gradient step, for :math:`\min_{x \in C(\theta)} f(x, \theta)`.

    Returns the condition

    .. math:: F(x, \theta_C, \theta) = x - P_{C(\theta_C)}\big(x - \eta \nabla_x f(x, \theta)\big),

    called as ``F(x, params, *args, **kwargs)``, where ``params`` are the set's parameters
    (passed to ``projection(y, params)``) and ``args``/``kwargs`` those of
    ``objective(x, *args, **kwargs)``. For a convex :math:`f` and a closed convex :math:`C`,
    :math:`F = 0` exactly at the minimizers, for any :math:`\eta > 0`: it says that
    :math:`-\nabla f(x)` lies in the normal cone of :math:`C` at :math:`x`, the first-order
    optimality condition (for a non-convex :math:`f`, at the stationary points).

    The decorated inner solver therefore has the signature
    ``solver(init, params, *args, **kwargs)``, and gradients flow to ``params`` and to every
    tensor of ``args``/``kwargs``.

    Parameters
    ----------
    objective : callable
        ``f(x, *args, **kwargs) -> scalar``, the smooth objective.
    projection : callable
        ``projection(y, params) -> P_C(y)``, e.g. from :mod:`implicitdiff.projections`,
        differentiable in ``y`` and ``params`` (``x`` may be a pytree if the projection
        handles one).
    stepsize : float or None
        The step :math:`\eta > 0`. It does not move the solution, but it scales the free
        block of the backward Jacobian :math:`I - \partial T/\partial x` (which is the
        identity on the active constraints and :math:`\eta\nabla^2 f` projected on the free
        directions), so it sets the conditioning of the backward solve; :math:`1/L`, with
        :math:`L` the largest Hessian eigenvalue, is best. ``None`` (default): estimate
        :math:`1/L` at the point where the condition is evaluated by 10 power iterations
        on the Hessian (10 Hessian-vector products per evaluation, treated as a constant).
        Pass a float when :math:`L` is known, to save those products, and always a
        :math:`\eta < 2/L` with the :class:`~implicitdiff.Neumann` backward solver, whose
        series converges only for a contractive step.

    Returns
    -------
    Condition
        Not symmetric: :class:`~implicitdiff.GMRES` is the default iterative backward solver.

    Examples
    --------
    Non-negative least squares, differentiated with respect to the targets:

    >>> import torch, implicitdiff as idiff
    >>> from implicitdiff import projections
    >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    >>> def objective(x, b):
    ...     return 0.5 * ((A @ x - b) ** 2).sum()
    >>> F = idiff.projected_gradient_condition(objective, projections.nonnegative)
    >>> @idiff.implicit_diff(F, solver=idiff.GMRES(tol=1e-12))
    ... def nnls(x0, params, b):
    ...     return idiff.projected_gradient(objective, projections.nonnegative, x0, params, b).x
    >>> b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    >>> x = nnls(torch.zeros(2, dtype=torch.float64), None, b)
    >>> x.detach()
    tensor([0.7500, 0.0000], dtype=torch.float64)
    >>> x[0].backward()
    >>> b.grad   # x_0 = (b_0 + b_2) / 2 on the active set {x_1 = 0}
    tensor([0.5000, -0.0000, 0.5000], dtype=torch.float64)
    """
    return _gradient_step_condition(
        objective,
        lambda step, params, eta: projection(step, params),
        stepsize,
        f"projected gradient fixed point of {_name(objective, 'objective')} onto {_name(projection, 'the set')}",
    )


def proximal_gradient_condition(
    objective: Callable[..., torch.Tensor],
    prox: Callable[..., Any],
    stepsize: float | None = None,
) -> Condition:
    r"""The fixed point of a proximal gradient step, for :math:`\min_x f(x, \theta) + g(x, \theta_g)`.

    Returns the condition

    .. math::

        F(x, \theta_g, \theta) =
        x - \operatorname{prox}_{\eta g(\cdot, \theta_g)}\big(x - \eta \nabla_x f(x, \theta)\big),

    called as ``F(x, params, *args, **kwargs)``, where ``params`` are the penalty's
    parameters (passed as ``prox(y, params, scaling=eta)``) and ``args``/``kwargs`` those
    of ``objective(x, *args, **kwargs)``. For convex :math:`f` and :math:`g`, :math:`F = 0`
    exactly at the minimizers, for any :math:`\eta > 0`: it says
    :math:`-\nabla f(x) \in \partial g(x)`, the first-order optimality condition of the
    composite problem.

    The decorated inner solver has the signature ``solver(init, params, *args, **kwargs)``;
    gradients flow to ``params`` (e.g. the regularization strength) and to every tensor of
    ``args``/``kwargs``.

    Parameters
    ----------
    objective : callable
        ``f(x, *args, **kwargs) -> scalar``, the smooth part.
    prox : callable
        ``prox(y, params, scaling=1.0)``, e.g. from :mod:`implicitdiff.prox`,
        differentiable in ``y`` and ``params``. It receives ``scaling=eta``: a float, or a
        0-d tensor when ``stepsize=None``.
    stepsize : float or None
        The step :math:`\eta > 0`, also the prox's ``scaling``: as for
        :func:`projected_gradient_condition`, it does not move the solution and sets the
        conditioning of the backward solve; ``None`` (default) estimates :math:`1/L` of
        :math:`f` by 10 power iterations at the point of evaluation.

    Returns
    -------
    Condition
        Not symmetric: :class:`~implicitdiff.GMRES` is the default iterative backward solver.

    Examples
    --------
    The lasso's solution path: with an orthonormal design, :math:`w^\star` is the soft
    thresholding of :math:`c = X^\top y` and :math:`\partial w^\star_i/\partial\lambda =
    -\operatorname{sign}(w^\star_i)` on the support:

    >>> import torch, implicitdiff as idiff
    >>> from implicitdiff import prox
    >>> def objective(w, c):
    ...     return 0.5 * ((w - c) ** 2).sum()
    >>> F = idiff.proximal_gradient_condition(objective, prox.l1)
    >>> @idiff.implicit_diff(F, solver=idiff.GMRES(tol=1e-12))
    ... def lasso(w0, lam, c):
    ...     return idiff.fista(objective, prox.l1, w0, lam, c).x
    >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    >>> c = torch.tensor([2.0, -0.2, -1.0], dtype=torch.float64)
    >>> w = lasso(torch.zeros(3, dtype=torch.float64), lam, c)
    >>> w.detach()
    tensor([ 1.5000,  0.0000, -0.5000], dtype=torch.float64)
    >>> torch.autograd.grad(w.sum(), lam)[0]   # -1 + 0 + 1
    tensor(0., dtype=torch.float64)
    """
    return _gradient_step_condition(
        objective,
        lambda step, params, eta: prox(step, params, scaling=eta),
        stepsize,
        f"proximal gradient fixed point of {_name(objective, 'objective')} with {_name(prox, 'prox')}",
    )


def _gradient_step_condition(
    objective: Callable[..., torch.Tensor],
    nonsmooth_step: Callable[[Any, Any, Any], Any],
    stepsize: float | None,
    name: str,
) -> Condition:
    """``F(x, params, ...) = x - S(x - eta grad f(x, ...), params, eta)``: the projected (S a projection)
    or proximal (S a prox with scaling eta) gradient fixed point."""
    _check_stepsize(stepsize)
    checked = _scalar_objective(objective)
    gradient = torch.func.grad(checked, argnums=0)

    def residual(x: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        return tree_map(torch.sub, x, iteration(x, params, *args, **kwargs))

    def iteration(x: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        eta = inverse_lipschitz(checked, x, args, kwargs) if stepsize is None else stepsize
        step = tree_map(lambda xi, gi: xi - eta * gi, x, gradient(x, *args, **kwargs))
        return nonsmooth_step(step, params, eta)

    return Condition(residual, symmetric=False, name=name, step=iteration)


def kkt_condition(
    objective: Callable[..., torch.Tensor],
    eq: Callable[..., torch.Tensor] | None = None,
    ineq: Callable[..., torch.Tensor] | None = None,
) -> Condition:
    r"""The Karush-Kuhn-Tucker conditions of :math:`\min_x f(x)` s.t. :math:`h(x) = 0,\ g(x) \le 0`.

    Returns the condition on the primal-dual triple :math:`(x, \nu, \mu)`

    .. math::

        F\big((x, \nu, \mu), \theta\big) = \Big(\nabla_x f + J_h^\top \nu + J_g^\top \mu,\ \
        h(x),\ \ \mu \odot g(x)\Big),

    called as ``F((x, nu, mu), *args, **kwargs)``, where ``objective``, ``eq`` and ``ineq``
    all take ``(x, *args, **kwargs)`` (:math:`\theta` stands for ``args`` and ``kwargs``).
    The decorated inner solver takes an initial triple and returns the solution triple:
    the primal solution and the multipliers, e.g. from an interior-point or QP solver. At
    a KKT point with :math:`\mu \ge 0` and :math:`g \le 0`, :math:`F = 0`.

    An absent constraint keeps its slot as ``None``: without ``eq`` the triple is
    ``(x, None, mu)`` and the residual's middle entry is ``None`` (``None`` is an empty
    pytree node, so it has no unknowns); likewise ``mu = None`` without ``ineq``. The
    solver may return a tuple, a list or a namedtuple; the residual has the same type.

    The Jacobian :math:`\partial F/\partial(x, \nu, \mu)` is

    .. math::

        \begin{pmatrix} \nabla^2_x L & J_h^\top & J_g^\top \\ J_h & 0 & 0 \\
        \operatorname{diag}(\mu) J_g & 0 & \operatorname{diag}(g) \end{pmatrix},

    indefinite and not symmetric: :class:`~implicitdiff.GMRES` is the default iterative
    backward solver (LU below :class:`~implicitdiff.Auto`'s dense
    size). It is non-singular under the usual sufficient conditions — linearly independent
    gradients of the active constraints (LICQ), second-order sufficiency, and **strict
    complementarity**: every active inequality (:math:`g_i = 0`) has :math:`\mu_i > 0`. At
    a degenerate active constraint (:math:`g_i = 0` and :math:`\mu_i = 0`) the row of
    :math:`\mu_i g_i` is zero, the Jacobian is singular and the derivative of the solution
    is not defined (it has different one-sided values); the backward solve then does not
    converge and reports it through the solver's failure policy
    (:class:`~implicitdiff.LinearSolveWarning` by default).

    Parameters
    ----------
    objective : callable
        ``f(x, *args, **kwargs) -> scalar``.
    eq : callable, optional
        ``h(x, *args, **kwargs) -> tensor``: the equality constraints :math:`h = 0`;
        :math:`\nu` has its shape.
    ineq : callable, optional
        ``g(x, *args, **kwargs) -> tensor``: the inequality constraints :math:`g \le 0`;
        :math:`\mu` has its shape.

    Returns
    -------
    Condition
        Not symmetric: GMRES is the default iterative backward solver.

    Raises
    ------
    ValueError
        When called on a triple whose ``nu`` (``mu``) is not ``None`` although ``eq``
        (``ineq``) is absent, or the reverse.

    Examples
    --------
    :math:`\min \tfrac12\|x - c\|^2` s.t. :math:`\sum_i x_i = 1`, whose solution
    :math:`x = c - (\sum_i c_i - 1)/n` moves with :math:`c` by :math:`I - 11^\top/n`:

    >>> import torch, implicitdiff as idiff
    >>> def objective(x, c):
    ...     return 0.5 * ((x - c) ** 2).sum()
    >>> def eq(x, c):
    ...     return x.sum().reshape(1) - 1
    >>> F = idiff.kkt_condition(objective, eq=eq)
    >>> @idiff.implicit_diff(F, solver=idiff.GMRES(tol=1e-12))
    ... def solve(init, c):
    ...     nu = (c.sum() - 1).reshape(1) / c.numel()
    ...     return c - nu, nu, None
    >>> c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    >>> init = (torch.zeros(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), None)
    >>> x, nu, mu = solve(init, c)
    >>> x.detach(), mu
    (tensor([-0.6667,  0.3333,  1.3333], dtype=torch.float64), None)
    >>> torch.autograd.grad(x[0], c)[0]
    tensor([ 0.6667, -0.3333, -0.3333], dtype=torch.float64)
    """
    checked = _scalar_objective(objective)

    def lagrangian(x: Any, nu: Any, mu: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = checked(x, *args, **kwargs)
        if eq is not None:
            value = value + (nu * eq(x, *args, **kwargs)).sum()
        if ineq is not None:
            value = value + (mu * ineq(x, *args, **kwargs)).sum()
        return value

    stationarity = torch.func.grad(lagrangian, argnums=0)

    def residual(primal_dual: Any, *args: Any, **kwargs: Any) -> Any:
        x, nu, mu = _unpack(primal_dual, eq is not None, ineq is not None)
        parts = (
            stationarity(x, nu, mu, *args, **kwargs),
            None if eq is None else eq(x, *args, **kwargs),
            None if ineq is None else mu * ineq(x, *args, **kwargs),
        )
        container: Any = type(primal_dual)
        if isinstance(primal_dual, tuple) and hasattr(primal_dual, "_fields"):
            return container(*parts)
        return container(parts)

    constraints = " and ".join(
        name for name, fn in (("equalities", eq), ("inequalities", ineq)) if fn is not None
    ) or "no constraints"
    name = f"KKT conditions of {_name(objective, 'objective')} with {constraints}"
    return Condition(residual, symmetric=False, name=name)


def _unpack(primal_dual: Any, has_eq: bool, has_ineq: bool) -> tuple[Any, Any, Any]:
    if not isinstance(primal_dual, (tuple, list)) or len(primal_dual) != 3:
        raise ValueError(
            "kkt_condition: the solution must be a triple (x, nu, mu) of the primal solution and the multipliers of "
            f"the equality and inequality constraints (None for an absent kind), got {type(primal_dual).__name__}"
            + (f" of length {len(primal_dual)}" if isinstance(primal_dual, (tuple, list)) else "")
        )
    x, nu, mu = primal_dual
    for value, present, slot, kind in ((nu, has_eq, "nu", "eq"), (mu, has_ineq, "mu", "ineq")):
        if present and value is None:
            raise ValueError(f"kkt_condition: {kind} is given, so the multiplier {slot} must not be None")
        if not present and value is not None:
            raise ValueError(f"kkt_condition: {kind} is None, so the slot of {slot} in (x, nu, mu) must be None")
    return x, nu, mu
