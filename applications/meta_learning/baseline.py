"""The supervised pre-training baseline for few-shot classification (Chen et al., ICLR 2019).

An ordinary classifier (the same :class:`~applications.meta_learning.models.OmniglotCNN`
as the meta-learners) is trained with cross-entropy on all meta-training classes,
where every (character, rotation) pair is a class. A new episode is then solved in
the network's feature space, either by

* ``"prototype"``: the nearest class mean of the support features under cosine
  similarity, or
* ``"finetune"``: a fresh linear softmax head fitted to the support features
  (the feature extractor stays frozen).

Features are computed with batch statistics of the episode: support and query
images of one task go through the network together, so both are normalised by
the same statistics (as the meta-learners' batch norm also uses batch
statistics at test time).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from .augmentation import random_affine
from .data import Episode
from .models import OmniglotCNN
from .stats import mean_confidence_interval

__all__ = ["BaselineConfig", "train_baseline", "evaluate_baseline", "episode_features"]

_HEADS = ("prototype", "finetune")


@dataclass
class BaselineConfig:
    """Hyperparameters of the supervised baseline.

    Attributes
    ----------
    epochs
        Passes over all training images (every rotation of every drawing).
    batch_size
        Images per Adam step.
    lr, weight_decay
        Adam settings for pre-training.
    seed
        Fixes the initialisation and the data order.
    hidden
        Filters per convolution of :class:`OmniglotCNN` (``None``: the
        network's default, 64).
    head
        Episode classifier used at evaluation: ``"prototype"`` or ``"finetune"``.
    finetune_steps, finetune_lr
        Full-batch Adam steps and step size of the ``"finetune"`` head.
    augment
        Distort every training image by a fresh random affine map
        (:func:`~applications.meta_learning.augmentation.random_affine`: up to 15 degrees,
        10% scale, 10% shift). Measured on the bundled data (15 epochs, 600 held-out
        episodes): 5-way 1-shot 89.8% without, 94.6% with; 20-way 1-shot 75.2% / 84.7%.

    Examples
    --------
    >>> BaselineConfig(epochs=3).head
    'prototype'
    """

    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    hidden: int | None = 64
    head: str = "prototype"
    finetune_steps: int = 100
    finetune_lr: float = 0.01
    augment: bool = True

    def __post_init__(self) -> None:
        if self.hidden is None:
            self.hidden = 64
        for name in ("epochs", "batch_size", "hidden", "finetune_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BaselineConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("lr", "finetune_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"BaselineConfig.{name} must be a positive number, got {value!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"BaselineConfig.weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.batch_size < 2:
            raise ValueError(
                f"BaselineConfig.batch_size must be >= 2 (batch norm needs a batch), got {self.batch_size}."
            )
        _check_head(self.head)


def _check_head(head: str) -> None:
    if head not in _HEADS:
        raise ValueError(f"Unknown baseline head {head!r}; expected one of {_HEADS}.")


def _rotated_batch(
    images: torch.Tensor, index: torch.Tensor, n_rotations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and class labels for flat indices over (character, rotation, drawer)."""
    n_drawers = images.shape[1]
    character = index // (n_rotations * n_drawers)
    turn = (index // n_drawers) % n_rotations
    drawer = index % n_drawers
    batch = images[character, drawer]
    if n_rotations > 1:
        batch = batch.clone()
        for k in range(1, n_rotations):
            mask = turn == k
            if mask.any():
                batch[mask] = torch.rot90(batch[mask], k, dims=(-2, -1))
    return batch, character * n_rotations + turn


def train_baseline(
    train_images: torch.Tensor,
    config: BaselineConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    rotations: bool = True,
    progress: bool = True,
    desc: str = "baseline training",
) -> tuple[OmniglotCNN, dict]:
    """Train an ordinary cross-entropy classifier over all training classes.

    Parameters
    ----------
    train_images
        ``[n_characters, n_drawers, C, H, W]`` images of the meta-training split.
    config
        Hyperparameters (defaults to :class:`BaselineConfig`).
    device
        Where to train.
    rotations
        Treat each of the 4 rotations of a character as its own class.
    progress
        Show a progress bar over epochs (rate and ETA) on stderr.
    desc
        Its description.

    Returns
    -------
    model : OmniglotCNN
        The trained network (its ``features`` give the episode embeddings).
    stats : dict
        ``wall_time_s``, ``num_classes``, ``num_images``, ``steps``,
        per-epoch ``loss_history`` / ``accuracy_history``, ``final_loss``,
        ``final_train_accuracy`` and the ``config`` as a dict.

    Examples
    --------
    >>> images = torch.rand(6, 4, 1, 28, 28)
    >>> model, stats = train_baseline(images, BaselineConfig(epochs=1, hidden=8), progress=False)
    >>> stats["num_classes"]
    24
    """
    config = config if config is not None else BaselineConfig()
    if not isinstance(train_images, torch.Tensor) or train_images.dim() != 5:
        shape = tuple(train_images.shape) if isinstance(train_images, torch.Tensor) else type(train_images).__name__
        raise ValueError(f"train_images must be [n_characters, n_drawers, C, H, W], got {shape}.")
    n_characters, n_drawers, channels, height, width = train_images.shape
    if rotations and height != width:
        raise ValueError(f"rotations need square images, got {height}x{width}.")
    n_rotations = 4 if rotations else 1
    num_classes = n_characters * n_rotations
    if num_classes < 2:
        raise ValueError(f"The baseline needs at least 2 training classes, got {num_classes}.")
    device = torch.device(device)
    images = train_images.to(device=device, dtype=torch.float32)
    num_images = num_classes * n_drawers

    # Seed only inside a forked RNG so the caller's global random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = OmniglotCNN(num_classes, in_channels=channels, hidden=config.hidden, image_size=height)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)

    bar = progress_bar(config.epochs, desc, unit="epoch", enabled=progress)
    loss_history, accuracy_history, steps = [], [], 0
    model.train()
    start = time.perf_counter()
    for _ in range(config.epochs):
        order = torch.randperm(num_images, generator=generator).to(device)
        # Running sums stay on the device: no host synchronisation per step.
        total_loss = torch.zeros((), device=device)
        total_correct = torch.zeros((), device=device)
        seen = 0
        for begin in range(0, num_images, config.batch_size):
            index = order[begin : begin + config.batch_size]
            if index.numel() < 2:  # batch norm needs more than one example
                continue
            x, y = _rotated_batch(images, index, n_rotations)
            if config.augment:
                x = random_affine(x, generator)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            seen += index.numel()
            total_loss += loss.detach() * index.numel()
            total_correct += (logits.detach().argmax(1) == y).sum()
        loss_history.append(float(total_loss) / seen)
        accuracy_history.append(float(total_correct) / seen)
        bar.set_postfix(loss=f"{loss_history[-1]:.3f}", acc=f"{accuracy_history[-1]:.3f}")
        bar.update(1)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_time = time.perf_counter() - start
    model.eval()
    stats = {
        "wall_time_s": wall_time,
        "num_classes": num_classes,
        "num_images": num_images,
        "steps": steps,
        "loss_history": loss_history,
        "accuracy_history": accuracy_history,
        "final_loss": loss_history[-1],
        "final_train_accuracy": accuracy_history[-1],
        "config": asdict(config),
    }
    return model, stats


@torch.no_grad()
def episode_features(model: OmniglotCNN, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query features ``[B, N*K, D]``, ``[B, N*Q, D]`` of a batch of episodes.

    Each task's support and query images pass through the network together,
    so batch norm uses that task's own statistics. (A Python loop over tasks:
    on CPU it is faster than ``torch.func.vmap`` over the convolutions.)

    Examples
    --------
    >>> from applications.meta_learning.data import OmniglotTasks
    >>> tasks = OmniglotTasks(torch.rand(8, 5, 1, 28, 28), ways=3, shots=2, queries=1)
    >>> support, query = episode_features(OmniglotCNN(3), tasks.sample(4, torch.Generator().manual_seed(0)))
    >>> tuple(support.shape), tuple(query.shape)
    ((4, 6, 256), (4, 3, 256))
    """
    n_support = episode.x_support.shape[1]
    images = torch.cat([episode.x_support, episode.x_query], dim=1)
    features = torch.stack([model.features(task_images) for task_images in images])
    return features[:, :n_support], features[:, n_support:]


def _prototype_predictions(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    """Nearest class mean of the L2-normalised support features under cosine similarity."""
    one_hot = F.one_hot(labels, ways).to(support.dtype)  # [B, NK, N]
    prototypes = one_hot.transpose(1, 2) @ F.normalize(support, dim=-1)
    prototypes = prototypes / one_hot.sum(1).unsqueeze(-1)
    similarity = F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    return similarity.argmax(-1)


def _finetune_predictions(
    support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, ways: int, steps: int, lr: float
) -> torch.Tensor:
    """Fit a fresh linear softmax head per task on frozen support features."""
    batch, _, dim = support.shape
    weight = torch.zeros(batch, dim, ways, device=support.device, requires_grad=True)
    bias = torch.zeros(batch, 1, ways, device=support.device, requires_grad=True)
    # Adam acts elementwise and the tasks' losses are summed, so this equals one Adam run per task.
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = support @ weight + bias
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            loss = loss.view(batch, -1).mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (query @ weight + bias).argmax(-1)


def evaluate_baseline(
    model: OmniglotCNN,
    episodes: Sequence[Episode],
    *,
    head: str = "prototype",
    device: torch.device | str = "cpu",
    finetune_steps: int = 100,
    finetune_lr: float = 0.01,
    progress: bool = False,
    desc: str = "baseline evaluation",
) -> dict:
    """Accuracy of the pre-trained features on few-shot episodes.

    Parameters
    ----------
    model
        A network with a ``features`` method (e.g. from :func:`train_baseline`).
    episodes
        Batches of classification tasks (e.g. from
        :func:`~applications.meta_learning.data.fixed_episodes`).
    head
        ``"prototype"`` (cosine nearest class mean) or ``"finetune"`` (a
        fresh linear head fitted with ``finetune_steps`` full-batch Adam steps
        of size ``finetune_lr`` on the support features).
    device
        Where to compute.
    progress
        Show a progress bar over the episodes (rate and ETA) on stderr.
    desc
        Its description.

    Returns
    -------
    dict
        ``accuracy`` (mean over episodes), ``ci95`` (half-width, see
        :func:`~applications.meta_learning.stats.mean_confidence_interval`),
        ``accuracies`` (per episode), ``n_episodes``, ``head``, ``wall_time_s``.

    Examples
    --------
    >>> from applications.meta_learning.data import OmniglotTasks, fixed_episodes
    >>> tasks = OmniglotTasks(torch.rand(8, 5, 1, 28, 28), ways=3, shots=1, queries=2)
    >>> result = evaluate_baseline(OmniglotCNN(3), fixed_episodes(tasks, 4, seed=0))
    >>> result["n_episodes"]
    4
    """
    _check_head(head)
    if len(episodes) == 0:
        raise ValueError("evaluate_baseline needs at least one episode batch.")
    device = torch.device(device)
    model = model.to(device).eval()
    start = time.perf_counter()
    accuracies = []
    total = sum(episode.batch_size for episode in episodes)
    with progress_bar(total, desc, unit="episode", enabled=progress) as bar:
        for episode in episodes:
            if episode.y_support.dtype != torch.int64:
                raise ValueError("evaluate_baseline needs classification episodes (int64 labels).")
            episode = episode.to(device)
            ways = int(episode.y_support.max()) + 1
            support, query = episode_features(model, episode)
            if head == "prototype":
                predictions = _prototype_predictions(support, episode.y_support, query, ways)
            else:
                predictions = _finetune_predictions(
                    support, episode.y_support, query, ways, finetune_steps, finetune_lr
                )
            accuracies.append((predictions == episode.y_query).float().mean(1).cpu())
            bar.update(episode.batch_size)
    per_episode = torch.cat(accuracies)
    mean, half_width = mean_confidence_interval(per_episode)
    return {
        "accuracy": mean,
        "ci95": half_width,
        "accuracies": per_episode.tolist(),
        "n_episodes": per_episode.numel(),
        "head": head,
        "wall_time_s": time.perf_counter() - start,
    }
