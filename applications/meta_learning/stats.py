"""Summary statistics for few-shot evaluation."""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["mean_confidence_interval"]


def mean_confidence_interval(values: Iterable[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval.

    The half-width is ``1.96 * std / sqrt(n)`` with the sample standard
    deviation (``n - 1`` in the denominator), as reported for per-episode
    accuracies in the few-shot literature. With a single value the half-width
    is ``nan`` (the spread is unknown).

    Parameters
    ----------
    values
        Per-episode measurements (e.g. accuracies).

    Raises
    ------
    ValueError
        If ``values`` is empty or contains non-finite numbers.

    Examples
    --------
    >>> mean, half_width = mean_confidence_interval([0.5, 0.7, 0.6, 0.6])
    >>> round(mean, 3), round(half_width, 4)
    (0.6, 0.08)
    """
    data = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values), dtype=torch.float64)
    data = data.detach().flatten().cpu()
    if data.numel() == 0:
        raise ValueError("mean_confidence_interval needs at least one value.")
    if not torch.isfinite(data).all():
        raise ValueError("mean_confidence_interval got non-finite values.")
    n = data.numel()
    mean = float(data.mean())
    if n == 1:
        return mean, math.nan
    return mean, float(1.96 * data.std(unbiased=True) / math.sqrt(n))
