"""Random affine distortions of character images (training-time data augmentation).

Omniglot's small background set has only 20 drawings of each of 169 training
characters; a network trained on it overfits the exact strokes. Small random
rotations, scalings and shifts of every training image (new draws every time an
image is used) are the classic cure for handwritten characters. Held-out
episodes are never augmented.

The distortion is applied with :func:`torch.nn.functional.affine_grid` /
:func:`~torch.nn.functional.grid_sample` (bilinear), with zeros outside the image:
the Omniglot images of this application are strokes (1) on a background (0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine"]


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    max_rotation: float = 15.0,
    max_scale: float = 0.1,
    max_shift: float = 0.1,
) -> torch.Tensor:
    r"""Distort each image by its own random rotation, scale and shift.

    For every image, an angle :math:`\alpha \sim U(-r, r)` degrees, a scale
    :math:`s \sim U(1 - m, 1 + m)` and a shift :math:`t \sim U(-d, d)^2` (as a fraction of
    half the image side) are drawn, and the image is resampled at the points
    :math:`R(\alpha) x / s + t` (output coordinates :math:`x` in :math:`[-1, 1]^2`).

    Parameters
    ----------
    images
        ``[..., C, H, W]`` floating images with background 0 (any leading dimensions:
        a batch, or tasks x examples).
    generator
        Source of the random draws (CPU); the same generator state gives the same output.
    max_rotation
        :math:`r`, largest rotation in degrees.
    max_scale
        :math:`m`, largest relative change of size (``0.1``: 90% to 110%).
    max_shift
        :math:`d`, largest shift as a fraction of half the image side.

    Returns
    -------
    torch.Tensor
        Distorted images of the same shape, dtype and device.

    Examples
    --------
    >>> x = torch.zeros(4, 1, 28, 28); x[..., 10:18, 13:15] = 1.0
    >>> y = random_affine(x, torch.Generator().manual_seed(0))
    >>> y.shape, bool(y.min() >= 0), bool((y - x).abs().sum() > 0)
    (torch.Size([4, 1, 28, 28]), True, True)
    """
    if not isinstance(images, torch.Tensor) or images.dim() < 3 or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"random_affine needs floating images [..., C, H, W], got {got}.")
    for name, value in (("max_rotation", max_rotation), ("max_scale", max_scale), ("max_shift", max_shift)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    if not max_scale < 1:
        raise ValueError(f"max_scale must be < 1 (a scale of 0 or less is not an image), got {max_scale}.")
    shape = images.shape
    flat = images.reshape(-1, *shape[-3:])
    n = flat.shape[0]

    def uniform(*size: int) -> torch.Tensor:
        # Drawn on the CPU generator, then moved: identical draws on every device.
        return (2 * torch.rand(*size, generator=generator, dtype=torch.float64) - 1).to(flat.device, flat.dtype)

    angle = uniform(n) * math.radians(max_rotation)
    scale = 1 + uniform(n) * max_scale
    shift = uniform(n, 2) * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    matrix = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    )
    grid = F.affine_grid(matrix, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(shape)
