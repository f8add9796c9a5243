"""The default step size 1/L: a few power iterations on the Hessian (private).

Shared by the projected/proximal-gradient conditions and the inner solvers. Written in
torch operations only (no random numbers, no Python branching on values), so it runs under
every ``torch.func`` transform; it works on detached values, so the step it returns is a
constant for every derivative.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._tree import tree_flatten, tree_map, tree_unflatten

#: Power iterations for the estimate of the largest Hessian eigenvalue (in magnitude).
POWER_ITERATIONS = 10


def _detached(tree: Any) -> Any:
    return tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, tree)


def _start_vector(x: torch.Tensor, offset: int) -> torch.Tensor:
    """A fixed, dense, non-random direction (additive recurrence with the golden ratio): vmap forbids randomness."""
    index = torch.arange(offset + 1, offset + 1 + x.numel(), dtype=x.dtype, device=x.device)
    return (torch.frac(index * 0.6180339887498949) - 0.5).reshape(x.shape)


def inverse_lipschitz(
    objective: Callable[..., torch.Tensor], x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    r"""``1/L`` with ``L`` the power-iteration estimate of :math:`\|\nabla^2 f(x)\|_2`; 1 where ``L`` is negligible.

    ``L`` is :math:`\|H v_k\|` after :data:`POWER_ITERATIONS` normalized products from a
    fixed start, a lower bound of :math:`\|H\|_2` that converges to it. Below the dtype's
    machine epsilon (a linear objective) the step is 1. Returns a 0-d tensor.
    """
    x0 = _detached(x)
    args0, kwargs0 = _detached((args, kwargs))
    grad_fn = torch.func.grad(lambda z: objective(z, *args0, **kwargs0))
    hessian_product = torch.func.vjp(grad_fn, x0)[1]  # H symmetric: H^T v = H v
    leaves, spec = tree_flatten(x0)
    offsets = [0]
    for leaf in leaves[:-1]:
        offsets.append(offsets[-1] + leaf.numel())
    v = tree_unflatten(spec, [_start_vector(leaf, o) for leaf, o in zip(leaves, offsets)])
    v = _scale(v, 1.0 / _norm(v))
    dtype = leaves[0].dtype
    tiny = torch.finfo(dtype).tiny
    estimate = torch.zeros((), dtype=dtype, device=leaves[0].device)
    for _ in range(POWER_ITERATIONS):
        (w,) = hessian_product(v)
        estimate = _norm(w)
        v = _scale(w, 1.0 / estimate.clamp_min(tiny))
    significant = estimate > torch.finfo(dtype).eps
    return torch.where(significant, 1.0 / torch.where(significant, estimate, 1.0), 1.0)


def _norm(tree: Any) -> torch.Tensor:
    leaves = tree_flatten(tree)[0]
    return torch.sqrt(sum((leaf * leaf).sum() for leaf in leaves))


def _scale(tree: Any, factor: Any) -> Any:
    return tree_map(lambda leaf: leaf * factor, tree)
