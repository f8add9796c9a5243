"""Networks of the MAML/iMAML few-shot experiments.

* :class:`OmniglotCNN`: 4 blocks of [3x3 conv, stride 2, BatchNorm, ReLU] and a
  linear N-way head (Finn et al., 2017; Rajeswaran et al., 2019), or a
  :class:`CosineHead` (scaled cosine similarity to one weight vector per class).
* :class:`SinusoidMLP`: the 1-40-40-1 ReLU regressor of the MAML sinusoid task.

Both work under :func:`torch.func.functional_call` and :func:`torch.func.vmap`:
batch norm always uses the statistics of the current batch (no running
buffers), so a batch of tasks can be vmapped and each task is normalised with
its own statistics.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CosineHead", "HEADS", "OmniglotCNN", "SinusoidMLP", "build_model"]

#: Classifier heads of :class:`OmniglotCNN`.
HEADS = ("linear", "cosine")


def _conv_output_size(size: int, blocks: int) -> int:
    # A 3x3 conv with stride 2 and padding 1 maps s -> ceil(s / 2).
    for _ in range(blocks):
        size = (size + 1) // 2
    return size


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
    >>> torch.allclose(head(f), 10 * torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T)
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
    padding 1, ``BatchNorm2d(track_running_stats=False)`` (batch statistics in
    training and evaluation alike) and ReLU. A 28x28 input shrinks to
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
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
            ]
            channels = hidden
        self.encoder = nn.Sequential(*blocks)
        self.feature_dim = hidden * _conv_output_size(image_size, self.num_blocks) ** 2
        self.head: nn.Module = nn.Linear(self.feature_dim, ways) if head == "linear" else CosineHead(self.feature_dim, ways)

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
