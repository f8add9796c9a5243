"""Dense float64 reference gradients, built from explicit Jacobians and ``torch.linalg.solve``.

These do not use :mod:`implicitdiff` at all. They are what the matrix-free implicit gradients of the
applications are checked against (in the tests and in the equilibrium report), so they stay as
literal as possible: materialize the matrices, solve, multiply.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, hessian, jacrev, vjp, vmap

__all__ = ["flatten", "unflatten", "minimizer_hypergradient", "fixed_point_gradient"]

TensorDict = dict[str, torch.Tensor]


def flatten(tree: TensorDict) -> torch.Tensor:
    """Concatenate the tensors of a dict (in key order) into one vector."""
    return torch.cat([tree[k].reshape(-1) for k in tree])


def unflatten(vector: torch.Tensor, like: TensorDict) -> TensorDict:
    """Inverse of :func:`flatten`: split ``vector`` into tensors shaped like the entries of ``like``."""
    out, start = {}, 0
    for key, leaf in like.items():
        out[key] = vector[start : start + leaf.numel()].reshape(leaf.shape)
        start += leaf.numel()
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the dict needs {start}")
    return out


def minimizer_hypergradient(
    inner_objective: Callable[..., torch.Tensor],
    outer_loss: Callable[..., torch.Tensor],
    solution: TensorDict,
    hyper: torch.Tensor,
    inner_args: tuple = (),
    outer_args: tuple = (),
) -> torch.Tensor:
    """Total derivative of ``outer_loss(w*(h), h, *outer_args)`` w.r.t. ``h`` at an exact inner minimizer.

    ``w*(h)`` minimizes ``inner_objective(w, h, *inner_args)``; by the implicit function theorem

    ``d outer / dh = d_h outer - (d_h grad_w f)^T H^{-1} grad_w outer``  with  ``H = d_ww f``,

    and here ``H`` and ``d_h grad_w f`` are formed as dense matrices and the system solved directly.

    Parameters
    ----------
    inner_objective : callable
        ``f(w, h, *inner_args) -> scalar`` with ``w`` a dict of tensors.
    outer_loss : callable
        ``g(w, h, *outer_args) -> scalar``.
    solution : dict of str to torch.Tensor
        The inner minimizer ``w*(h)`` (solved precisely by the caller).
    hyper : torch.Tensor
        The hyperparameter ``h`` (any shape).

    Returns
    -------
    torch.Tensor
        The hypergradient, shaped like ``hyper``.

    Examples
    --------
    >>> f = lambda w, h: 0.5 * ((w["x"] - h) ** 2).sum()          # w*(h) = h
    >>> g = lambda w, h: (w["x"] ** 2).sum()                       # g(w*(h)) = ||h||^2
    >>> h = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> minimizer_hypergradient(f, g, {"x": h.clone()}, h)
    tensor([2., 4.], dtype=torch.float64)
    """
    w0 = flatten(solution).detach()
    h0 = hyper.detach()

    def f_flat(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return inner_objective(unflatten(w, solution), h, *inner_args)

    def g_flat(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return outer_loss(unflatten(w, solution), h, *outer_args)

    hess = hessian(f_flat, argnums=0)(w0, h0)  # (p, p)
    mixed = jacrev(grad(f_flat, argnums=0), argnums=1)(w0, h0).reshape(w0.numel(), -1)  # (p, |h|)
    g_w, g_h = grad(g_flat, argnums=(0, 1))(w0, h0)
    adjoint = torch.linalg.solve(hess.T, g_w)
    return g_h - (mixed.T @ adjoint).reshape(h0.shape)


def fixed_point_gradient(
    step: Callable[..., torch.Tensor],
    loss: Callable[..., torch.Tensor],
    z_star: torch.Tensor,
    params: TensorDict,
    x: torch.Tensor,
    y: torch.Tensor,
) -> TensorDict:
    """Gradient of ``loss(z*(params), params, y)`` for a per-sample fixed point ``z* = step(z*, params, x)``.

    ``step`` must act on each row of ``z`` independently (row ``i`` of the output depends only on row
    ``i`` of ``z`` and of ``x``), so ``I - d step / dz`` is block diagonal with one ``(h, h)`` block per
    sample. The blocks are materialized with ``vmap(jacrev)`` and the adjoint system

    ``(I - J_i)^T v_i = d loss / d z_i``

    solved densely; the gradient is ``d_params loss + (d_params step)^T v``.

    Returns
    -------
    dict of str to torch.Tensor
        Gradient w.r.t. each entry of ``params``.
    """
    z0 = z_star.detach()
    params0 = {k: v.detach() for k, v in params.items()}

    def row_step(z_row: torch.Tensor, x_row: torch.Tensor) -> torch.Tensor:
        return step(z_row.unsqueeze(0), params0, x_row.unsqueeze(0)).squeeze(0)

    blocks = vmap(jacrev(row_step, argnums=0))(z0, x)  # (n, h, h)
    eye = torch.eye(z0.shape[-1], dtype=z0.dtype, device=z0.device)
    g_z, g_params = grad(loss, argnums=(0, 1))(z0, params0, y)
    adjoint = torch.linalg.solve((eye - blocks).transpose(-1, -2), g_z.unsqueeze(-1)).squeeze(-1)
    _, step_vjp = vjp(lambda p: step(z0, p, x), params0)
    (through_z,) = step_vjp(adjoint)
    return {k: g_params[k] + through_z[k] for k in params0}
