"""Networks of the MAML/iMAML few-shot experiments.

* :class:`OmniglotCNN`: 4 blocks of [3x3 conv, stride 2, BatchNorm, ReLU] and a
  linear N-way head (Finn et al., 2017; Rajeswaran et al., 2019).
* :class:`SinusoidMLP`: the 1-40-40-1 ReLU regressor of the MAML sinusoid task.

Both work under :func:`torch.func.functional_call` and :func:`torch.func.vmap`:
batch norm always uses the statistics of the current batch (no running
buffers), so a batch of tasks can be vmapped and each task is normalised with
its own statistics.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OmniglotCNN", "SinusoidMLP", "build_model"]


def _conv_output_size(size: int, blocks: int) -> int:
    # A 3x3 conv with stride 2 and padding 1 maps s -> ceil(s / 2).
    for _ in range(blocks):
        size = (size + 1) // 2
    return size


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

    Examples
    --------
    >>> model = OmniglotCNN(ways=5)
    >>> x = torch.rand(10, 1, 28, 28)
    >>> model(x).shape, model.features(x).shape
    (torch.Size([10, 5]), torch.Size([10, 256]))
    """

    num_blocks = 4

    def __init__(self, ways: int, *, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
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
        self.head = nn.Linear(self.feature_dim, ways)

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
