r"""Proximal operators of common penalties, differentiable and vmappable.

Each function computes

.. math:: \operatorname{prox}_{s g}(x, \theta) = \arg\min_z \tfrac12\|z - x\|^2 + s\, g(z, \theta)

for a penalty :math:`g` with parameters :math:`\theta` and a scaling :math:`s > 0` (the
step size of a proximal-gradient step), with JAXopt's calling convention
``prox(x, params, scaling=1.0)``: the penalty's parameters are **one** argument (a tensor or
number, or a tuple of them) placed right after the variable. That is the signature
:func:`~implicitdiff.proximal_gradient_condition` and :func:`~implicitdiff.fista` expect;
any function with that signature can be used there.

Conventions shared by every operator:

* Written in torch operations without Python branching on values: they run under
  ``torch.func.vmap`` and are differentiable with respect to ``x``, the parameters and
  ``scaling`` by plain autograd and by ``torch.func``.
* The derivative is the true Jacobian wherever the operator is differentiable. At a kink
  (an input exactly at a threshold, e.g. :math:`|x_i| = s\lambda` for soft thresholding)
  the derivative of the piece **where the output is zero** is returned: the coordinate
  (group, singular value) is treated as thresholded. For the lasso this makes the implicit
  derivative at a degenerate coordinate the derivative of the problem with that coordinate
  held at zero (see :doc:`/constrained`).
* Penalty parameters are non-negative; this is not checked (a check on values would not
  run under ``vmap``).

Examples
--------
>>> import torch
>>> from implicitdiff import prox
>>> prox.l1(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
tensor([-1.,  0.,  2.])
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["identity", "l1", "elastic_net", "group_lasso", "nonnegative_l1", "l2_squared", "nuclear"]

#: A tensor or a Python number (converted to the dtype and device of ``x``).
TensorLike = torch.Tensor | float


def _as_tensor(value: TensorLike, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _threshold(lam: TensorLike, scaling: TensorLike, like: torch.Tensor) -> torch.Tensor:
    return _as_tensor(lam, like) * _as_tensor(scaling, like)


def identity(x: torch.Tensor, params: Any = None, scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Proximal operator of :math:`g = 0`: the identity.

    With it, :func:`~implicitdiff.proximal_gradient_condition` is the plain gradient step
    fixed point of an unconstrained problem. Cost :math:`O(1)`.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    params, scaling
        Ignored.

    Returns
    -------
    torch.Tensor
        ``x``.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.identity(torch.tensor([1.0, -2.0]))
    tensor([ 1., -2.])
    """
    del params, scaling
    return x


def l1(x: torch.Tensor, lam: TensorLike, scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Soft thresholding: the proximal operator of :math:`g(z) = \lambda\|z\|_1`.

    Algorithm: :math:`\operatorname{sign}(x)\max(|x| - s\lambda, 0)` entrywise, with
    :math:`t = s\lambda` (``scaling * lam``). Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    lam : tensor or float
        :math:`\lambda \ge 0`: a scalar, or a tensor broadcastable to ``x`` (one weight per
        coordinate).
    scaling : tensor or float
        :math:`s > 0`.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``. Derivative 1 (with respect to ``x``) and
        :math:`-\operatorname{sign}(x_i)` (with respect to :math:`t`) where :math:`|x_i| > t`,
        0 where :math:`|x_i| \le t` — including exactly at the threshold, where soft
        thresholding is not differentiable and the derivative of the zero piece is returned.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.l1(torch.tensor([-2.0, 0.5, 3.0]), 1.0, scaling=0.5)
    tensor([-1.5000,  0.0000,  2.5000])
    """
    t = _threshold(lam, scaling, x)
    return torch.where(x > t, x - t, torch.where(x < -t, x + t, 0.0))


def elastic_net(x: torch.Tensor, params: tuple[TensorLike, TensorLike], scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Proximal operator of the elastic net :math:`g(z) = \lambda\|z\|_1 + \tfrac{\gamma}{2}\|z\|_2^2`.

    Algorithm: :math:`\operatorname{soft}(x, s\lambda)/(1 + s\gamma)` entrywise. Cost
    :math:`O(n)`.

    Note the parametrization: the two terms have independent weights. JAXopt's
    ``prox_elastic_net`` uses :math:`\lambda(\|z\|_1 + \tfrac{\gamma}{2}\|z\|^2)`, so its
    ``(lam, gamma)`` is this function's ``(lam, lam * gamma)``.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    params : tuple
        ``(lam, gamma)``, both :math:`\ge 0`, scalars or tensors broadcastable to ``x``.
    scaling : tensor or float
        :math:`s > 0`.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; kinks as for :func:`l1`.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.elastic_net(torch.tensor([-3.0, 0.5, 3.0]), (1.0, 1.0))
    tensor([-1.,  0.,  1.])
    """
    lam, gamma = params
    return l1(x, lam, scaling) / (1 + _threshold(gamma, scaling, x))


def group_lasso(x: torch.Tensor, lam: TensorLike, scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Block soft thresholding: the proximal operator of :math:`g(z) = \lambda \sum_g \|z_g\|_2`.

    The groups are the vectors along the **last dimension** of ``x``: a 1-d ``x`` is one
    group, the rows of a matrix are its groups. Algorithm:
    :math:`z_g = \max(0, 1 - s\lambda/\|x_g\|_2)\, x_g`. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Input, at least 1-d.
    lam : tensor or float
        :math:`\lambda \ge 0`: a scalar, or a tensor of shape ``x.shape[:-1]`` (one weight
        per group).
    scaling : tensor or float
        :math:`s > 0`.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``. A group with :math:`\|x_g\| \le s\lambda` (including exactly at
        the threshold) is zeroed, with derivative 0; elsewhere the Jacobian is
        :math:`I - \frac{s\lambda}{\|x_g\|}(I - \hat x_g \hat x_g^\top)`. Finite at
        :math:`x_g = 0`.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.group_lasso(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
    tensor([[2.4000, 3.2000],
            [0.0000, 0.0000]])
    """
    t = _threshold(lam, scaling, x)
    if t.dim() > 0:
        t = t.unsqueeze(-1)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    keep = norm > t
    factor = torch.where(keep, 1 - t / torch.where(keep, norm, 1.0), 0.0)
    return x * factor


def nonnegative_l1(x: torch.Tensor, lam: TensorLike, scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Proximal operator of :math:`g(z) = \lambda \sum_i z_i + \iota_{z \ge 0}(z)`.

    The l1 norm restricted to the non-negative orthant (the non-negative lasso); with
    ``lam = 0`` it is the projection onto the orthant. Algorithm:
    :math:`\max(x - s\lambda, 0)` entrywise. Cost :math:`O(n)`.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    lam : tensor or float
        :math:`\lambda \ge 0`: a scalar or a tensor broadcastable to ``x``.
    scaling : tensor or float
        :math:`s > 0`.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; derivative 0 where :math:`x_i \le s\lambda` (zero piece at the
        kink).

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.nonnegative_l1(torch.tensor([-1.0, 0.5, 3.0]), 1.0)
    tensor([0., 0., 2.])
    """
    t = _threshold(lam, scaling, x)
    return torch.where(x > t, x - t, 0.0)


def l2_squared(x: torch.Tensor, lam: TensorLike, scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Proximal operator of :math:`g(z) = \tfrac{\lambda}{2}\|z\|_2^2` (ridge).

    Algorithm: :math:`x/(1 + s\lambda)`. Cost :math:`O(n)`. Same parametrization as
    JAXopt's ``prox_ridge``.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    lam : tensor or float
        :math:`\lambda \ge 0`: a scalar or a tensor broadcastable to ``x``.
    scaling : tensor or float
        :math:`s > 0`.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``; differentiable everywhere.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.l2_squared(torch.tensor([2.0, -4.0]), 1.0)
    tensor([ 1., -2.])
    """
    return x / (1 + _threshold(lam, scaling, x))


def nuclear(X: torch.Tensor, lam: TensorLike, scaling: TensorLike = 1.0) -> torch.Tensor:
    r"""Singular value thresholding: the proximal operator of :math:`g(Z) = \lambda\|Z\|_*`.

    :math:`\|Z\|_*` is the nuclear norm (sum of singular values). Algorithm: with the thin
    SVD :math:`X = U \operatorname{diag}(\sigma) V^\top` (``torch.linalg.svd``), the result
    is :math:`U \operatorname{diag}(\max(\sigma - t, 0)) V^\top`, :math:`t = s\lambda`
    (Cai, Candès and Shen 2010). Cost: one SVD, :math:`O(mn\min(m, n))` for an
    :math:`m \times n` matrix.

    **Derivative.** Singular value thresholding is a spectral function of a 1-Lipschitz
    scalar function, so it is differentiable wherever **no singular value equals the
    threshold** :math:`t` — also where singular values are repeated or zero, where a
    derivative through ``torch.linalg.svd`` would be infinite or NaN. Its first derivatives
    are therefore given by a custom rule, the closed form of Candès, Sing-Long and Trzasko
    (2013): with :math:`f(\sigma) = \max(\sigma - t, 0)` and :math:`\tilde A = U^\top dX V`,
    :math:`U^\top dZ\, V = D^- \circ \operatorname{sym}(\tilde A) + D^+ \circ
    \operatorname{skew}(\tilde A)` where :math:`D^-_{ij} = \frac{f(\sigma_i) -
    f(\sigma_j)}{\sigma_i - \sigma_j}` (:math:`f'(\sigma_i)` when
    :math:`\sigma_i = \sigma_j`) and :math:`D^+_{ij} = \frac{f(\sigma_i) +
    f(\sigma_j)}{\sigma_i + \sigma_j}`, plus the components outside the ranges of
    :math:`U` and :math:`V` scaled by :math:`f(\sigma_j)/\sigma_j`. The rule is
    gauge-invariant (it does not depend on which singular vectors the SVD returns for a
    repeated singular value), works in reverse and forward mode and under ``vmap``. At a
    singular value exactly equal to :math:`t` the derivative of the thresholded piece is
    returned (:math:`f' = 0`), the convention of the other operators.

    Second derivatives (e.g. ``hessian``, or a backward pass that is itself differentiated)
    go through ``torch.linalg.svd``, recomputed in the backward: they are correct where the
    singular values of ``X`` are distinct and non-zero, and not finite where they are not.

    Parameters
    ----------
    X : torch.Tensor
        A matrix, or a batch of matrices ``(..., m, n)`` (each thresholded with the same
        :math:`t`).
    lam : tensor or float
        :math:`\lambda \ge 0`, a scalar.
    scaling : tensor or float
        :math:`s > 0`, a scalar.

    Returns
    -------
    torch.Tensor
        Shaped like ``X``.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff import prox
    >>> prox.nuclear(torch.diag(torch.tensor([3.0, 1.0, 0.5])), 1.0)
    tensor([[2., 0., 0.],
            [0., 0., 0.],
            [0., 0., 0.]])
    """
    t = _threshold(lam, scaling, X).reshape(())
    return _SingularValueThresholding.apply(X, t)


def _thresholding_derivative(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, t: torch.Tensor, dX: torch.Tensor
) -> torch.Tensor:
    """The derivative of singular value thresholding at ``U diag(S) Vh`` applied to ``dX`` (self-adjoint)."""
    kept = S > t
    f = torch.where(kept, S - t, 0.0)
    si, sj = S.unsqueeze(-1), S.unsqueeze(-2)
    fi, fj = f.unsqueeze(-1), f.unsqueeze(-2)
    ki, kj = kept.unsqueeze(-1), kept.unsqueeze(-2)
    mixed = ki ^ kj  # one above the threshold, one at or below it: sigma_i != sigma_j
    difference = torch.where(ki & kj, 1.0, torch.where(mixed, (fi - fj) / torch.where(mixed, si - sj, 1.0), 0.0))
    total = si + sj
    positive = total > 0
    average = torch.where(positive, (fi + fj) / torch.where(positive, total, 1.0), 0.0)
    V = Vh.mT
    A = U.mT @ dX @ V
    sym, skew = (A + A.mT) / 2, (A - A.mT) / 2
    dZ = U @ (difference * sym + average * skew) @ Vh
    ratio = torch.where(kept, f / torch.where(kept, S, 1.0), 0.0)  # f(sigma) / sigma, 0 where thresholded
    m, n, k = dX.shape[-2], dX.shape[-1], S.shape[-1]
    if m > k:  # the part of dX outside the range of U
        outside = dX @ V - U @ A
        dZ = dZ + (outside * ratio.unsqueeze(-2)) @ Vh
    if n > k:  # the part of dX outside the range of V
        outside = U.mT @ dX - A @ Vh
        dZ = dZ + U @ (ratio.unsqueeze(-1) * outside)
    return dZ


class _SingularValueThresholding(torch.autograd.Function):
    """``U diag(max(S - t, 0)) V^T`` with the gauge-invariant derivative of a spectral function."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        return (U * torch.where(S > t, S - t, 0.0).unsqueeze(-2)) @ Vh

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        X, t = inputs
        ctx.save_for_backward(X, t)
        ctx.save_for_forward(X, t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X, t = ctx.saved_tensors
        # recomputed from X so that a differentiated backward sees how U, S, V move with X
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        grad_X = _thresholding_derivative(U, S, Vh, t, grad)
        diagonal = (U.mT @ grad @ Vh.mT).diagonal(dim1=-2, dim2=-1)
        grad_t = -torch.where(S > t, diagonal, 0.0).sum()
        return grad_X, grad_t

    @staticmethod
    def jvp(ctx: Any, dX: torch.Tensor | None, dt: torch.Tensor | None) -> torch.Tensor:
        X, t = ctx.saved_tensors
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        out = _thresholding_derivative(U, S, Vh, t, dX) if dX is not None else torch.zeros_like(X)
        if dt is not None:
            out = out - (U * torch.where(S > t, 1.0, 0.0).unsqueeze(-2)) @ Vh * dt
        return out
