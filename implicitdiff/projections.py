r"""Euclidean projections onto convex sets, differentiable and vmappable.

Each function computes :math:`P_C(x) = \arg\min_{z \in C} \tfrac12\|z - x\|^2` for a set
:math:`C` described by parameters, with JAXopt's calling convention: the set's parameters
are **one** argument (a tensor or number, or a tuple of them when there are several) placed
right after the variable, ``proj(x, params)``. That is the signature
:func:`~implicitdiff.projected_gradient_condition` and
:func:`~implicitdiff.projected_gradient` expect.

Conventions shared by every projection:

* ``x`` is treated as **one vector** made of all its entries, whatever its shape (the
  output has the shape of ``x``); to project the rows of a matrix separately, use
  ``torch.func.vmap``. Parameters that describe per-coordinate data (bounds, the normal
  ``a`` of a hyperplane) have the shape of ``x`` or broadcast to it.
* Every function is written in torch operations without Python branching on values, so it
  runs under ``torch.func.vmap`` and is differentiable with respect to ``x`` **and** the
  parameters by plain autograd and by ``torch.func`` (``grad``, ``jacrev``, ``jacfwd``).
* The derivative is the true Jacobian wherever the projection is differentiable (almost
  everywhere). At a kink — a point where the active constraints change, e.g. a coordinate
  exactly on a bound — the derivative of the piece **where the constraint is active** is
  returned (for :func:`box` at ``x == lower``: 0 with respect to ``x``, 1 with respect to
  ``lower``). This is one element of the Clarke generalized Jacobian, and it makes the
  fixed-point system of :func:`~implicitdiff.projected_gradient_condition` treat a
  degenerate coordinate as fixed at its bound.
* Parameters must describe a non-empty set (``lower <= upper``, radius and scale
  ``> 0``, ``a != 0``, ``A`` of full row rank); this is not checked, since a check on values
  would not run under ``vmap``.

Examples
--------
>>> import torch
>>> from implicitdiff import projections
>>> projections.simplex(torch.tensor([0.5, 1.5, -1.0]))
tensor([0., 1., 0.])
>>> projections.box(torch.tensor([-2.0, 0.3, 2.0]), (0.0, 1.0))
tensor([0.0000, 0.3000, 1.0000])
"""

from __future__ import annotations

import torch

__all__ = [
    "nonnegative",
    "box",
    "hyperplane",
    "halfspace",
    "affine_set",
    "simplex",
    "l1_ball",
    "l2_ball",
    "linf_ball",
    "box_section",
]

#: A tensor or a Python number (converted to the dtype and device of ``x``).
TensorLike = torch.Tensor | float


def _as_tensor(value: TensorLike, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor; a Python number takes the dtype and device of ``like``."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def nonnegative(x: torch.Tensor, params: None = None) -> torch.Tensor:
    r"""Projection onto the non-negative orthant :math:`\{z : z \ge 0\}`.

    Algorithm: :math:`\max(x, 0)` entrywise. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project.
    params : None
        Ignored (the set has no parameters); present for the common signature.

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. Derivative 0 at ``x == 0`` (active piece).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.nonnegative(torch.tensor([-1.0, 0.0, 2.0]))
    tensor([0., 0., 2.])
    """
    del params
    return torch.where(x > 0, x, 0.0)


def box(x: torch.Tensor, params: tuple[TensorLike, TensorLike]) -> torch.Tensor:
    r"""Projection onto the box :math:`\{z : \text{lower} \le z \le \text{upper}\}`.

    Algorithm: clipping, entrywise. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project.
    params : tuple
        ``(lower, upper)``: tensors broadcastable to ``x`` or numbers, with
        ``lower <= upper``. Infinite bounds are allowed.

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. The derivative with respect to ``lower``
        (``upper``) is 1 on the coordinates clamped at it, summed over broadcast
        dimensions; a coordinate exactly on a bound counts as clamped.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.box(torch.tensor([-1.0, 0.5, 3.0]), (torch.zeros(3), torch.tensor([1.0, 1.0, 2.0])))
    tensor([0.0000, 0.5000, 2.0000])
    """
    lower, upper = params
    lo, up = _as_tensor(lower, x), _as_tensor(upper, x)
    return torch.where(x <= lo, lo, torch.where(x >= up, up, x))


def hyperplane(x: torch.Tensor, params: tuple[torch.Tensor, TensorLike]) -> torch.Tensor:
    r"""Projection onto the hyperplane :math:`\{z : a^\top z = b\}`.

    Algorithm: the closed form :math:`x - \frac{a^\top x - b}{\|a\|^2} a`. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project.
    params : tuple
        ``(a, b)``: ``a`` a non-zero tensor with as many entries as ``x`` (the normal), ``b``
        a scalar (0-d tensor or number).

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. Differentiable everywhere (``a != 0``).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.hyperplane(torch.tensor([1.0, 1.0]), (torch.tensor([1.0, 0.0]), 3.0))
    tensor([3., 1.])
    """
    a, b = params
    v, av = x.reshape(-1), a.reshape(-1)
    return (v - (av @ v - _as_tensor(b, x)) / (av @ av) * av).reshape(x.shape)


def halfspace(x: torch.Tensor, params: tuple[torch.Tensor, TensorLike]) -> torch.Tensor:
    r"""Projection onto the half-space :math:`\{z : a^\top z \le b\}`.

    Algorithm: :math:`x - \frac{\max(a^\top x - b, 0)}{\|a\|^2} a`. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project.
    params : tuple
        ``(a, b)``: ``a`` a non-zero tensor with as many entries as ``x``, ``b`` a scalar.

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. On the boundary (:math:`a^\top x = b`) the
        derivative is that of the projection onto the hyperplane (active piece).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.halfspace(torch.tensor([2.0, 5.0]), (torch.tensor([0.0, 1.0]), 1.0))
    tensor([2., 1.])
    """
    a, b = params
    v, av = x.reshape(-1), a.reshape(-1)
    violation = av @ v - _as_tensor(b, x)
    step = torch.where(violation >= 0, violation, 0.0)
    return (v - step / (av @ av) * av).reshape(x.shape)


def affine_set(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    r"""Projection onto the affine set :math:`\{z : Az = b\}`.

    Algorithm: :math:`x - A^\top (AA^\top)^{-1}(Ax - b)`, one dense solve with the
    :math:`m \times m` Gram matrix. Cost :math:`O(m^2 n + m^3)` for :math:`A \in
    \mathbb{R}^{m \times n}`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project, with ``n`` entries (flattened in row-major order).
    params : tuple
        ``(A, b)``: ``A`` of shape ``(m, n)`` with full row rank, ``b`` of shape ``(m,)``.

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. Differentiable everywhere (full row rank).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> A, b = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([3.0])
    >>> projections.affine_set(torch.zeros(3), (A, b))
    tensor([1., 1., 1.])
    """
    A, b = params
    v = x.reshape(-1)
    correction = A.mT @ torch.linalg.solve(A @ A.mT, A @ v - b)
    return (v - correction).reshape(x.shape)


def simplex(x: torch.Tensor, scale: TensorLike = 1.0) -> torch.Tensor:
    r"""Projection onto the simplex :math:`\{z : z \ge 0,\ \sum_i z_i = \text{scale}\}`.

    Algorithm: the sort-based method (Held, Wolfe and Crowder 1974; Duchi, Shalev-Shwartz,
    Singer and Chandra 2008; see Condat 2016, "Fast projection onto the simplex and the
    l1 ball", for a survey). With :math:`u` the entries of ``x`` sorted in decreasing order,
    :math:`\rho = \max\{j : u_j - (\sum_{i \le j} u_i - s)/j > 0\}` and
    :math:`\theta = (\sum_{i \le \rho} u_i - s)/\rho`, the projection is
    :math:`\max(x - \theta, 0)`. Written with a sort, a cumulative sum and a gather (no
    Python branching), so it runs under ``vmap``. Cost :math:`O(n \log n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project (all entries form one vector).
    scale : tensor or float
        The sum :math:`s > 0` of the entries (a scalar; differentiable).

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. Its Jacobian is
        :math:`\operatorname{diag}(1_S) - 1_S 1_S^\top/|S|` on the support
        :math:`S = \{i : x_i > \theta\}`; an entry exactly at :math:`\theta` is outside
        the support (derivative 0). The derivative with respect to ``scale`` is
        :math:`1_S/|S|`.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.simplex(torch.tensor([1.0, 0.4, 0.1]))
    tensor([0.8000, 0.2000, 0.0000])
    >>> projections.simplex(torch.tensor([1.0, 2.0]), scale=4.0)
    tensor([1.5000, 2.5000])
    """
    s = _as_tensor(scale, x)
    v = x.reshape(-1)
    u = torch.sort(v, descending=True).values
    cumulative = torch.cumsum(u, 0) - s
    index = torch.arange(1, v.shape[0] + 1, dtype=v.dtype, device=v.device)
    in_support = u - cumulative / index > 0
    # rho >= 1 for s > 0 (the first condition reads s > 0); clamp so that s <= 0 gives a finite result
    rho = (index * in_support).amax().clamp_min(1)
    theta = cumulative.gather(0, (rho.long() - 1).reshape(1)) / rho
    return torch.where(v > theta, v - theta, 0.0).reshape(x.shape)


def l1_ball(x: torch.Tensor, radius: TensorLike = 1.0) -> torch.Tensor:
    r"""Projection onto the l1 ball :math:`\{z : \|z\|_1 \le r\}`.

    Algorithm: :math:`x` itself if :math:`\|x\|_1 < r`, else
    :math:`\operatorname{sign}(x) \odot P_{\Delta_r}(|x|)` with :math:`P_{\Delta_r}` the
    projection onto the simplex of scale :math:`r` (:func:`simplex`; Duchi et al. 2008,
    Condat 2016). Both branches are computed and one is selected with ``torch.where``, so
    it runs under ``vmap``. Cost :math:`O(n \log n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project (all entries form one vector).
    radius : tensor or float
        :math:`r > 0` (a scalar; differentiable).

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. On the sphere :math:`\|x\|_1 = r` the derivative
        of the projecting branch is returned (active piece).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.l1_ball(torch.tensor([0.75, -1.25]))
    tensor([ 0.2500, -0.7500])
    """
    r = _as_tensor(radius, x)
    projected = torch.sign(x) * simplex(x.abs(), r)
    return torch.where(x.abs().sum() < r, x, projected)


def l2_ball(x: torch.Tensor, radius: TensorLike = 1.0) -> torch.Tensor:
    r"""Projection onto the Euclidean ball :math:`\{z : \|z\|_2 \le r\}`.

    Algorithm: :math:`x \min(1, r/\|x\|_2)`. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project (all entries form one vector: the Frobenius norm for a matrix).
    radius : tensor or float
        :math:`r > 0` (a scalar; differentiable).

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. Outside the ball the Jacobian is
        :math:`\frac{r}{\|x\|}(I - \hat x \hat x^\top)`, :math:`\hat x = x/\|x\|`; on the
        sphere that of the projecting branch (active piece); the derivative is finite at
        ``x = 0``.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.l2_ball(torch.tensor([3.0, 4.0]), radius=1.0)
    tensor([0.6000, 0.8000])
    """
    r = _as_tensor(radius, x)
    norm = torch.linalg.vector_norm(x)
    outside = norm >= r
    # the double where keeps r / norm out of the graph at norm = 0 (no 0 * inf in the backward)
    factor = torch.where(outside, r / torch.where(outside, norm, 1.0), 1.0)
    return x * factor


def linf_ball(x: torch.Tensor, radius: TensorLike = 1.0) -> torch.Tensor:
    r"""Projection onto the l-infinity ball :math:`\{z : \|z\|_\infty \le r\}`.

    Algorithm: clipping to :math:`[-r, r]` (:func:`box`). Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project.
    radius : tensor or float
        :math:`r > 0` (a scalar, or a tensor broadcastable to ``x``; differentiable).

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``; the derivative with respect to ``radius`` is
        :math:`\operatorname{sign}(x_i)` on the clamped coordinates.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> projections.linf_ball(torch.tensor([2.0, -0.5, -3.0]))
    tensor([ 1.0000, -0.5000, -1.0000])
    """
    r = _as_tensor(radius, x)
    return box(x, (-r, r))


def box_section(x: torch.Tensor, params: tuple[TensorLike, TensorLike, torch.Tensor, TensorLike]) -> torch.Tensor:
    r"""Projection onto :math:`\{z : \text{lower} \le z \le \text{upper},\ a^\top z = b\}`.

    The feasible set of the dual of a support vector machine (``lower = 0``,
    ``upper = C``, ``a = y``, ``b = 0``) and of many resource-allocation problems; with
    ``a = 1`` and ``b = s`` it is a capped simplex.

    Algorithm: the projection is :math:`z(\tau) = \operatorname{clip}(x - \tau a,
    \text{lower}, \text{upper})` for the multiplier :math:`\tau` of the equality, the root
    of the piecewise-linear, non-increasing :math:`\varphi(\tau) = a^\top z(\tau) - b`
    (Helgason, Kennington and Lall 1980; Kiwiel 2008, "Breakpoint searching algorithms for
    the continuous quadratic knapsack problem"). Its :math:`2n` breakpoints are sorted,
    :math:`\varphi` is evaluated at all of them with cumulative sums of the slope changes,
    and the root is interpolated on the segment where :math:`\varphi` changes sign — an
    exact method with a fixed sequence of torch operations (no iteration count, no Python
    branching), so it runs under ``vmap``. The multiplier is then recomputed in closed form
    on the identified free set :math:`F = \{i : \text{lower}_i < x_i - \tau a_i <
    \text{upper}_i\}`,
    :math:`\tau = (\sum_{F} a_i x_i + \sum_{\bar F} a_i z_i - b)/\sum_{F} a_i^2`, which is
    what autograd differentiates. Cost :math:`O(n \log n)`.

    Parameters
    ----------
    x : torch.Tensor
        Point to project (all entries form one vector).
    params : tuple
        ``(lower, upper, a, b)``: finite bounds broadcastable to ``x`` with
        ``lower <= upper``, ``a`` a tensor with as many entries as ``x`` (entries may be
        zero), ``b`` a scalar, such that the set is non-empty (for an empty set the
        result is a point of the box where :math:`a^\top z` is closest to ``b``).

    Returns
    -------
    torch.Tensor
        The projection, shaped like ``x``. Its derivative with respect to every argument is
        the Jacobian of the closed form on the free set; a coordinate exactly on a bound
        counts as clamped.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import projections
    >>> y = torch.tensor([1.0, -1.0, 1.0])
    >>> projections.box_section(torch.tensor([0.5, 0.2, 0.9]), (0.0, 1.0, y, 0.0))
    tensor([0.1000, 0.6000, 0.5000])
    """
    lower, upper, a, b = params
    v = x.reshape(-1)
    lo = _as_tensor(lower, x).expand(x.shape).reshape(-1)
    up = _as_tensor(upper, x).expand(x.shape).reshape(-1)
    av = _as_tensor(a, x).expand(x.shape).reshape(-1)
    rhs = _as_tensor(b, x)
    positive, nonzero = av > 0, av != 0
    # clip(x - tau a) equals `left` for tau below one breakpoint, `right` above another, x - tau a between
    left, right = torch.where(positive, up, lo), torch.where(positive, lo, up)
    tau = _box_section_multiplier(v.detach(), left.detach(), right.detach(), av.detach(), rhs.detach(), nonzero)
    moved = (v - tau * av).detach()
    at_lower, at_upper = moved <= lo.detach(), moved >= up.detach()
    free = ~(at_lower | at_upper)
    clamped = torch.where(at_lower, lo, up)
    # the closed form of the multiplier on this active set (coordinates with a_i = 0 enter with their
    # derivative: z_i = x_i - tau a_i when free, a_i z_i in the constraint)
    numerator = torch.where(free, av * v, av * clamped).sum() - rhs
    denominator = torch.where(free, av * av, 0.0).sum()
    multiplier = numerator / torch.where(denominator > 0, denominator, 1.0)
    z = torch.where(free, v - multiplier * av, clamped)
    return z.reshape(x.shape)


def _box_section_multiplier(
    v: torch.Tensor, left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, b: torch.Tensor, nonzero: torch.Tensor
) -> torch.Tensor:
    """The root tau of a^T clip(v - tau a) = b by a breakpoint search (not differentiated)."""
    n = v.shape[0]
    safe_a = torch.where(nonzero, a, 1.0)
    # coordinates with a_i = 0 do not move with tau: a zero slope change at a finite breakpoint
    t_left = torch.where(nonzero, (v - left) / safe_a, 0.0)
    t_right = torch.where(nonzero, (v - right) / safe_a, 0.0)
    squares = torch.where(nonzero, a * a, 0.0)
    breakpoints = torch.cat([t_left, t_right])
    slope_changes = torch.cat([-squares, squares])
    order = torch.argsort(breakpoints)
    points, changes = breakpoints[order], slope_changes[order]
    slopes = torch.cumsum(changes, 0)  # slope of phi on (points[k], points[k + 1]), <= 0
    steps = slopes[:-1] * (points[1:] - points[:-1])
    start = (a * left).sum()  # phi(tau) + b for tau below every breakpoint
    values = start + torch.cat([steps.new_zeros(1), torch.cumsum(steps, 0)])  # phi(points[k]) + b, non-increasing
    k = ((values >= b).sum() - 1).clamp(0, 2 * n - 1).reshape(1)
    point, value, slope = points.gather(0, k), values.gather(0, k), slopes.gather(0, k)
    descending = slope < 0
    return torch.where(descending, point + (value - b) / torch.where(descending, -slope, 1.0), point).reshape(())
