"""Forward solvers for batched fixed-point problems ``z = f(z)``: plain iteration and Anderson acceleration.

``z`` has shape ``(batch, ...)`` and every sample is its own fixed-point problem (the map acts on
each row independently), so convergence is judged per sample and Anderson keeps a separate
history and separate mixing weights per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FixedPointResult", "fixed_point_iteration", "anderson_acceleration", "relative_residual"]


@dataclass(frozen=True)
class FixedPointResult:
    """Outcome of a fixed-point solve.

    Attributes
    ----------
    solution : torch.Tensor
        The approximate fixed point.
    iterations : int
        Evaluations of the map after the first one.
    residual : float
        Largest per-sample ``||f(z) - z|| / ||f(z)||`` at ``solution``.
    converged : bool
        Whether ``residual <= tol``.
    """

    solution: torch.Tensor
    iterations: int
    residual: float
    converged: bool


def relative_residual(z: torch.Tensor, fz: torch.Tensor) -> float:
    """Largest per-sample relative fixed-point residual ``||f(z) - z|| / max(||f(z)||, tiny)``."""
    diff = (fz - z).reshape(z.shape[0], -1).norm(dim=1)
    scale = fz.reshape(z.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
    return float((diff / scale).max())


def _check(z0: torch.Tensor, tol: float, max_iter: int) -> None:
    if z0.dim() < 2:
        raise ValueError(f"z0 must have a batch dimension, got shape {tuple(z0.shape)}")
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"tol must be positive and max_iter at least 1, got tol={tol}, max_iter={max_iter}")


def fixed_point_iteration(
    f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, tol: float = 1e-10, max_iter: int = 1000
) -> FixedPointResult:
    """Iterate ``z <- f(z)`` until the relative residual is at most ``tol`` (converges for contractions).

    Examples
    --------
    >>> res = fixed_point_iteration(lambda z: 0.5 * z + 1.0, torch.zeros(3, 1, dtype=torch.float64))
    >>> torch.allclose(res.solution, torch.full((3, 1), 2.0, dtype=torch.float64)), res.converged
    (True, True)
    """
    _check(z0, tol, max_iter)
    z, fz = z0, f(z0)
    residual = relative_residual(z, fz)
    iterations = 0
    while residual > tol and iterations < max_iter:
        z, fz = fz, f(fz)
        residual = relative_residual(z, fz)
        iterations += 1
    return FixedPointResult(fz, iterations, residual, residual <= tol)


def anderson_acceleration(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    memory: int = 5,
    tol: float = 1e-10,
    max_iter: int = 500,
    regularization: float = 1e-10,
) -> FixedPointResult:
    """Anderson acceleration (type II, undamped) of ``z <- f(z)``, with one history per sample.

    The next iterate is ``sum_i alpha_i f(z_i)`` over the last ``memory`` iterates, with weights
    ``alpha`` (summing to one) minimizing ``||sum_i alpha_i (f(z_i) - z_i)||``; the small
    ``regularization`` of the normal equations keeps them solvable once residuals become tiny.

    Examples
    --------
    >>> a = torch.tensor([[0.5, 0.3], [0.0, 0.9]], dtype=torch.float64)
    >>> res = anderson_acceleration(lambda z: z @ a.T + 1.0, torch.zeros(4, 2, dtype=torch.float64))
    >>> exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - a, torch.ones(2, dtype=torch.float64))
    >>> torch.allclose(res.solution, exact.expand(4, 2)), res.iterations < 20
    (True, True)
    """
    _check(z0, tol, max_iter)
    if memory < 1:
        raise ValueError(f"memory must be at least 1, got {memory}")
    batch, shape = z0.shape[0], z0.shape
    xs = torch.zeros(batch, memory, z0[0].numel(), dtype=z0.dtype, device=z0.device)  # past iterates z_i
    fs = torch.zeros_like(xs)  # f(z_i)
    xs[:, 0] = z0.reshape(batch, -1)
    fs[:, 0] = f(z0).reshape(batch, -1)
    z, fz = xs[:, 0], fs[:, 0]
    residual = relative_residual(z, fz)
    iterations = 0
    while residual > tol and iterations < max_iter:
        iterations += 1
        n = min(iterations, memory)
        g = fs[:, :n] - xs[:, :n]  # residuals of the stored iterates, (batch, n, dim)
        gram = g @ g.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1e-300)[:, None, None]
        gram = gram + regularization * scale * torch.eye(n, dtype=z0.dtype, device=z0.device)
        # min ||alpha^T g|| subject to sum(alpha) = 1  <=>  alpha proportional to gram^{-1} 1
        ones = torch.ones(batch, n, 1, dtype=z0.dtype, device=z0.device)
        weights = torch.linalg.solve(gram, ones)
        alpha = weights / weights.sum(dim=1, keepdim=True)
        z = (alpha.transpose(1, 2) @ fs[:, :n]).squeeze(1)
        fz = f(z.reshape(shape)).reshape(batch, -1)
        slot = iterations % memory
        xs[:, slot], fs[:, slot] = z, fz
        residual = relative_residual(z, fz)
    return FixedPointResult(fz.reshape(shape), iterations, residual, residual <= tol)
