"""Multinomial (and binary) logistic regression as pure functions of a parameter dict.

The parameters are ``{"weight": (d, c), "bias": (k - 1,)}`` where ``k`` is the number of classes and
``c = k`` for ``k > 2`` (softmax) or ``c = 1`` for ``k = 2`` (a single logit). The first class's intercept
is pinned to zero: softmax is invariant to shifting all intercepts, so leaving all ``k`` free would
make the Hessian of the (unpenalized-intercept) training objective singular, and the implicit
function theorem needs it invertible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["init_params", "logits", "cross_entropy", "accuracy", "penalized_cross_entropy"]

Params = dict[str, torch.Tensor]


def init_params(
    n_features: int, n_classes: int, *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
) -> Params:
    """All-zero parameters of a logistic regression with ``n_features`` inputs and ``n_classes`` classes.

    Examples
    --------
    >>> p = init_params(64, 10)
    >>> p["weight"].shape, p["bias"].shape
    (torch.Size([64, 10]), torch.Size([9]))
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    if n_features < 1:
        raise ValueError(f"n_features must be positive, got {n_features}")
    n_outputs = 1 if n_classes == 2 else n_classes
    return {
        "weight": torch.zeros(n_features, n_outputs, dtype=dtype, device=device),
        "bias": torch.zeros(n_classes - 1, dtype=dtype, device=device),
    }


def logits(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Class scores ``(n, k)`` of the samples ``x`` of shape ``(n, d)``.

    Examples
    --------
    >>> logits(init_params(3, 2), torch.ones(5, 3, dtype=torch.float64)).shape
    torch.Size([5, 2])
    """
    scores = x @ params["weight"]
    if scores.shape[-1] == 1:  # binary: the single logit scores class 1 against class 0
        return F.pad(scores + params["bias"], (1, 0))
    return scores + F.pad(params["bias"], (1, 0))


def cross_entropy(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (negative log-likelihood) of the labels ``y`` under the model."""
    return F.cross_entropy(logits(params, x), y)


def accuracy(params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples whose most likely class is the label."""
    return float((logits(params, x).argmax(dim=-1) == y).double().mean())


def penalized_cross_entropy(
    params: Params, penalty: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Training objective: mean cross-entropy plus ``0.5 * sum_j penalty_j * ||weight[j]||^2``.

    ``penalty`` is a scalar (one penalty for all weights) or a vector with one entry per feature
    (row of ``weight``); the intercept is not penalized.

    Examples
    --------
    >>> p = init_params(2, 3)
    >>> x, y = torch.eye(2, dtype=torch.float64), torch.tensor([0, 2])
    >>> round(float(penalized_cross_entropy(p, torch.tensor(1.0), x, y)), 4)  # log(3) at zero weights
    1.0986
    """
    weight = params["weight"]
    if penalty.dim() == 1 and penalty.shape[0] != weight.shape[0]:
        raise ValueError(f"penalty has {penalty.shape[0]} entries but the model has {weight.shape[0]} features")
    if penalty.dim() > 1:
        raise ValueError(f"penalty must be a scalar or a vector, got shape {tuple(penalty.shape)}")
    per_feature = (weight**2).sum(dim=-1)
    return cross_entropy(params, x, y) + 0.5 * (penalty * per_feature).sum()
