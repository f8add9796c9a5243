"""Networks of the MAML/iMAML few-shot experiments.

* :class:`OmniglotCNN`: 4 blocks of [3x3 conv, stride 2, BatchNorm, ReLU] and a
  linear N-way head (Finn et al., 2017; Rajeswaran et al., 2019), or a
  :class:`CosineHead` (scaled cosine similarity to one weight vector per class).
* :class:`SinusoidMLP`: the 1-40-40-1 ReLU regressor of the MAML sinusoid task.

Both work under :func:`torch.func.functional_call` and :func:`torch.func.vmap`:
batch norm always uses the statistics of the current batch (no running
buffers), so a batch of tasks can be vmapped and each task is normalised with
its own statistics. Under vmap the batch norm (:class:`BatchStatNorm2d`) computes
those statistics with plain tensor ops, because the derivatives of torch's fused
batch norm are wrong there at second order (MAML's meta-gradient was off by
percents; outside vmap the fused kernel is exact and faster, and is used).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BatchStatNorm2d", "batch_norm_by_hand", "CosineHead", "HEADS", "OmniglotCNN", "SinusoidMLP", "build_model"]

#: Classifier heads of :class:`OmniglotCNN`.
HEADS = ("linear", "cosine")


def _conv_output_size(size: int, blocks: int) -> int:
    # A 3x3 conv with stride 2 and padding 1 maps s -> ceil(s / 2).
    for _ in range(blocks):
        size = (size + 1) // 2
    return size


def _is_vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by a :func:`torch.func.vmap` (at any level of nested functorch transforms)."""
    functorch = getattr(torch._C, "_functorch", None)
    try:
        while functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t):
                return True
            t = functorch.get_unwrapped(t)
    except AttributeError:  # functorch internals renamed in a future torch: take the path that is always right
        return True
    return False


def batch_norm_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch norm of ``x`` ``[batch, channels, ...]`` with its own batch statistics, in plain tensor ops.

    ``(x - mean) / sqrt(var + eps) * weight + bias`` with the per-channel mean and biased
    variance over every dimension but the channel one -- what :func:`torch.nn.functional.batch_norm`
    computes in training mode, but differentiable to any order under :func:`torch.func.vmap`.

    Examples
    --------
    >>> x, w, b = torch.randn(6, 3, 4, 4), torch.rand(3), torch.randn(3)
    >>> ref = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    >>> torch.allclose(batch_norm_by_hand(x, w, b, 1e-5), ref, atol=1e-6)
    True
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - x.mean(dim=dims, keepdim=True)
    var = (centred * centred).mean(dim=dims, keepdim=True)
    return torch.addcmul(bias.view(shape), centred, weight.view(shape) * torch.rsqrt(var + eps))


class BatchStatNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d(num_features, track_running_stats=False)`` that is exact under :func:`torch.func.vmap`.

    It always normalises with the statistics of the current batch (training and evaluation
    alike; no buffers), like its parent with ``track_running_stats=False``. Its parameters
    (``weight``, ``bias``) and state dict are the parent's, so checkpoints are interchangeable.

    Under vmap (a meta-batch of tasks batched with :func:`torch.func.vmap`, every task normalised
    with its own statistics) it computes the statistics by hand (:func:`batch_norm_by_hand`):
    second-order derivatives of torch's fused batch norm are wrong under vmap (an upstream
    functorch limitation), which made MAML's meta-gradient through it 0.6-2.4% off. Elsewhere it
    calls the fused kernel, exact and faster.

    Examples
    --------
    >>> norm = BatchStatNorm2d(3)
    >>> x = torch.randn(8, 3, 5, 5)
    >>> torch.allclose(norm(x), torch.func.vmap(norm)(x.unsqueeze(0))[0], atol=1e-6)
    True
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchStatNorm2d expects input [batch, channels, height, width], got {tuple(x.shape)}.")
        if _is_vmapped(x) or _is_vmapped(self.weight) or _is_vmapped(self.bias):
            return batch_norm_by_hand(x, self.weight, self.bias, self.eps)
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class CosineHead(nn.Module):
    r"""Scaled cosine similarity classifier: :math:`z_k = s \cos(f, w_k)`.

    The logits of features :math:`f` are :math:`s\, \hat f^\top \hat w_k` with
    :math:`\hat v = v / \|v\|`, a weight vector :math:`w_k` per class and a learned
    temperature :math:`s` (initially ``scale``). With :math:`w_k` set to the mean normalised
    feature of class :math:`k`'s support examples this is the cosine nearest-prototype
    classifier of the supervised baseline, which makes it the natural head to start
    a few-shot adaptation from.

    Parameters
    ----------
    in_features, ways
        Feature dimension and number of classes.
    scale
        Initial temperature :math:`s`.

    Examples
    --------
    >>> head = CosineHead(4, 3)
    >>> f = torch.randn(2, 4)
    >>> normalize = torch.nn.functional.normalize
    >>> torch.allclose(head(f), 10 * normalize(f, dim=1) @ normalize(head.weight, dim=1).T)
    True
    """

    def __init__(self, in_features: int, ways: int, *, scale: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ways, in_features) / in_features**0.5)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, ways]``."""
        weight = nn.functional.normalize(self.weight, dim=-1)
        return self.scale * nn.functional.normalize(features, dim=-1) @ weight.T


class OmniglotCNN(nn.Module):
    """The 4-block convolutional network of the MAML/iMAML Omniglot experiments.

    Each block is a 3x3 convolution with ``hidden`` filters, stride 2 and
    padding 1, batch norm with batch statistics in training and evaluation alike
    (:class:`BatchStatNorm2d`, exact under vmap) and ReLU. A 28x28 input shrinks to
    14, 7, 4, 2 pixels, giving ``hidden * 2 * 2 = 256`` features for the
    linear ``ways``-way head.

    Parameters
    ----------
    ways
        Number of output classes.
    in_channels
        Input channels (1 for Omniglot).
    hidden
        Filters per convolution.
    image_size
        Input height/width.
    head
        ``"linear"`` (the paper's) or ``"cosine"`` (:class:`CosineHead`).

    Examples
    --------
    >>> model = OmniglotCNN(ways=5)
    >>> x = torch.rand(10, 1, 28, 28)
    >>> model(x).shape, model.features(x).shape
    (torch.Size([10, 5]), torch.Size([10, 256]))
    """

    num_blocks = 4

    def __init__(
        self, ways: int, *, in_channels: int = 1, hidden: int = 64, image_size: int = 28, head: str = "linear"
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}.")
        sizes = {"ways": ways, "in_channels": in_channels, "hidden": hidden, "image_size": image_size}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.ways, self.in_channels, self.hidden, self.image_size = ways, in_channels, hidden, image_size
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(self.num_blocks):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, stride=2, padding=1),
                BatchStatNorm2d(hidden),
                nn.ReLU(),
            ]
            channels = hidden
        self.encoder = nn.Sequential(*blocks)
        self.feature_dim = hidden * _conv_output_size(image_size, self.num_blocks) ** 2
        self.head: nn.Module = (
            nn.Linear(self.feature_dim, ways) if head == "linear" else CosineHead(self.feature_dim, ways)
        )

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"OmniglotCNN expects input [batch, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {tuple(x.shape)}."
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``feature_dim``-dimensional embedding before the linear head."""
        self._check_input(x)
        return self.encoder(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, ways]``."""
        return self.head(self.features(x))


class SinusoidMLP(nn.Module):
    """The MAML sinusoid regressor: 1 -> hidden -> ReLU -> hidden -> ReLU -> 1.

    Examples
    --------
    >>> SinusoidMLP()(torch.zeros(7, 1)).shape
    torch.Size([7, 1])
    """

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}.")
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions ``[batch, 1]`` for inputs ``[batch, 1]``."""
        if x.dim() < 1 or x.shape[-1] != 1:
            raise ValueError(f"SinusoidMLP expects inputs [..., 1], got {tuple(x.shape)}.")
        return self.net(x)


def build_model(task: str, ways: int | None = None) -> nn.Module:
    """The network for a task: ``"omniglot"`` (needs ``ways``) or ``"sinusoid"``.

    Examples
    --------
    >>> type(build_model("omniglot", 20)).__name__
    'OmniglotCNN'
    """
    if task == "omniglot":
        if ways is None:
            raise ValueError("build_model('omniglot', ways) needs the number of ways.")
        return OmniglotCNN(ways)
    if task == "sinusoid":
        return SinusoidMLP()
    raise ValueError(f"Unknown task {task!r}; expected 'omniglot' or 'sinusoid'.")
