"""Dataset distillation on ``digits``: one learned synthetic 8x8 image per class.

As in the JAXopt paper's MNIST experiment: the synthetic images ``s`` (one per class, labels
0..9) are the hyperparameters. The inner problem trains an L2-penalized multinomial logistic
regression on those ten images alone,

    w*(s) = argmin_w  CE(w; s, 0..9) + 0.5 * penalty * ||W||^2,

solved by L-BFGS and wrapped with :func:`implicitdiff.implicit_diff`; the outer problem minimizes
the cross-entropy of ``w*(s)`` on the real training set, by Adam on the hypergradient w.r.t. ``s``.
The result is compared on the real test set with ten real training images (one per class, drawn
at random, mean over seeds) and with training on the whole training set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import implicitdiff as idiff

from ..progress import progress_bar
from .datasets import StandardizedSplit, load_split
from .lbfgs import minimize_lbfgs
from .logistic_model import accuracy, cross_entropy, init_params, penalized_cross_entropy
from .reporting import markdown_table, new_figure, new_grid, save_figure, write_json, write_text

__all__ = [
    "DistillationConfig",
    "DistillationRun",
    "make_inner_objective",
    "make_implicit_fit",
    "distillation_loss",
    "distill",
    "train_on",
    "random_real_images_accuracy",
    "run",
]

Params = dict[str, torch.Tensor]


@dataclass
class DistillationConfig:
    """Settings of the dataset-distillation experiment.

    Attributes
    ----------
    seed : int
        Seed of the split and of the random initial images.
    max_samples : int, optional
        Subsample ``digits`` (small test runs).
    inner_penalty : float
        L2 penalty of the logistic regression trained on the ten images (keeps it well posed).
    full_data_penalty : float
        L2 penalty of the reference model trained on the whole training set.
    outer_steps, outer_lr : int, float
        Adam steps and learning rate on the synthetic images (standardized pixel units).
    inner_max_iter, inner_grad_tol : int, float
        L-BFGS budget and gradient tolerance.
    cg_tol, cg_maxiter : float, int
        Backward CG settings.
    random_baseline_seeds : int
        Number of random draws of ten real images for the baseline.
    device : str
        Torch device.
    """

    seed: int = 0
    max_samples: int | None = None
    inner_penalty: float = 1e-2
    full_data_penalty: float = 1e-3
    outer_steps: int = 200
    outer_lr: float = 0.05
    inner_max_iter: int = 1000
    inner_grad_tol: float = 1e-9
    cg_tol: float = 1e-8
    cg_maxiter: int = 1000
    random_baseline_seeds: int = 20
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.inner_penalty <= 0 or self.full_data_penalty <= 0:
            raise ValueError("inner_penalty and full_data_penalty must be positive")
        if self.outer_steps < 1 or self.random_baseline_seeds < 1:
            raise ValueError("outer_steps and random_baseline_seeds must be positive")


def make_inner_objective(penalty: float) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Training objective on a (synthetic) set: mean cross-entropy plus ``0.5 * penalty * ||W||^2``."""

    def inner_objective(params: Params, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return penalized_cross_entropy(params, images.new_tensor(penalty), images, labels)

    return inner_objective


def make_implicit_fit(config: DistillationConfig) -> Callable[[Params, torch.Tensor, torch.Tensor], Params]:
    """L-BFGS training on the synthetic set, differentiable w.r.t. the images by implicit differentiation."""
    objective = make_inner_objective(config.inner_penalty)

    @idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=config.cg_tol, maxiter=config.cg_maxiter))
    def fit(init: Params, images: torch.Tensor, labels: torch.Tensor) -> Params:
        return minimize_lbfgs(
            lambda p: objective(p, images, labels), init, max_iter=config.inner_max_iter, grad_tol=config.inner_grad_tol
        ).solution

    return fit


def distillation_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Outer objective: cross-entropy of the model trained on the synthetic images, on real data."""
    return cross_entropy(params, x, y)


def train_on(x: torch.Tensor, y: torch.Tensor, penalty: float, n_classes: int, config: DistillationConfig) -> Params:
    """Train the logistic regression on ``(x, y)`` precisely (no differentiation)."""
    objective = make_inner_objective(penalty)
    init = init_params(x.shape[1], n_classes, dtype=x.dtype, device=x.device)
    return minimize_lbfgs(
        lambda p: objective(p, x, y), init, max_iter=config.inner_max_iter, grad_tol=config.inner_grad_tol
    ).solution


@dataclass
class DistillationRun:
    """Result of :func:`distill`.

    Attributes
    ----------
    images : torch.Tensor
        Learned synthetic images, standardized, shape ``(n_classes, d)``; row ``c`` has label ``c``.
    params : dict of str to torch.Tensor
        Model trained on ``images``.
    losses : list of float
        Outer (real training set) loss before each Adam step, then the final one.
    test_accuracies : list of float
        Test accuracy of the model trained on the images, at the same points.
    seconds : float
        Wall time of the outer loop.
    """

    images: torch.Tensor
    params: Params
    losses: list[float]
    test_accuracies: list[float]
    seconds: float


def distill(split: StandardizedSplit, config: DistillationConfig, *, progress: bool = False) -> DistillationRun:
    """Learn one synthetic image per class by hypergradient descent on the real training loss.

    ``progress``: a progress bar over the outer steps (rate and ETA) on stderr.

    Examples
    --------
    >>> split = load_split("digits", max_samples=300)
    >>> result = distill(split, DistillationConfig(outer_steps=2))
    >>> result.images.shape, len(result.losses)
    (torch.Size([10, 64]), 3)
    """
    dtype, device = split.x_train.dtype, split.x_train.device
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.randn(split.n_classes, split.n_features, generator=generator, dtype=dtype).to(device)
    images.requires_grad_(True)
    labels = torch.arange(split.n_classes, device=device)
    optimizer = torch.optim.Adam([images], lr=config.outer_lr)
    fit = make_implicit_fit(config)
    params = init_params(split.n_features, split.n_classes, dtype=dtype, device=device)
    losses: list[float] = []
    test_accuracies: list[float] = []
    seconds = 0.0
    bar = progress_bar(config.outer_steps, "distillation: hypergradient descent", unit="step", enabled=progress)
    for _ in range(config.outer_steps):
        start = time.perf_counter()
        trained = fit(params, images, labels)
        loss = distillation_loss(trained, split.x_train, split.y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        params = {k: v.detach() for k, v in trained.items()}  # warm start of the next inner solve
        losses.append(float(loss.detach()))
        test_accuracies.append(accuracy(params, split.x_test, split.y_test))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", test_acc=f"{test_accuracies[-1]:.3f}")
        bar.update(1)
    bar.close()
    final = train_on(images.detach(), labels, config.inner_penalty, split.n_classes, config)
    losses.append(float(distillation_loss(final, split.x_train, split.y_train)))
    test_accuracies.append(accuracy(final, split.x_test, split.y_test))
    return DistillationRun(images.detach(), final, losses, test_accuracies, seconds)


def random_real_images_accuracy(split: StandardizedSplit, config: DistillationConfig) -> list[float]:
    """Test accuracies of models trained on one random real training image per class, one per seed."""
    rng = np.random.default_rng(config.seed)
    y = split.y_train.cpu().numpy()
    labels = torch.arange(split.n_classes, device=split.x_train.device)
    accuracies = []
    for _ in range(config.random_baseline_seeds):
        rows = [int(rng.choice(np.flatnonzero(y == c))) for c in range(split.n_classes)]
        model = train_on(split.x_train[rows], labels, config.inner_penalty, split.n_classes, config)
        accuracies.append(accuracy(model, split.x_test, split.y_test))
    return accuracies


def _plot_images(images: torch.Tensor, split: StandardizedSplit, path: Path) -> Path:
    """Top row: the images in raw pixels; bottom row: their deviation from the mean training digit.

    The learned images share a mean-digit-like blob; what separates the classes is the
    deviation (in standardized units), shown on a symmetric colour scale.
    """
    pixels = split.unstandardize(images).cpu().numpy()
    deviation = images.cpu().numpy()  # standardized: 0 is the mean training digit
    limit = float(abs(deviation).max())
    fig, axes = new_grid(2, split.n_classes)
    for c in range(split.n_classes):
        axes[0][c].imshow(pixels[c].reshape(split.image_shape), cmap="gray_r")
        axes[0][c].set_title(str(c))
        axes[1][c].imshow(deviation[c].reshape(split.image_shape), cmap="RdBu_r", vmin=-limit, vmax=limit)
        for row in (0, 1):
            axes[row][c].set_xticks([])
            axes[row][c].set_yticks([])
    axes[0][0].set_ylabel("pixels")
    axes[1][0].set_ylabel("vs mean")
    return save_figure(fig, path)


def _plot_curves(result: DistillationRun, path: Path) -> Path:
    fig, (left, right) = new_figure(ncols=2, width=4.2)
    left.plot(result.losses)
    left.set_xlabel("outer step (Adam)")
    left.set_ylabel("real training cross-entropy")
    right.plot(result.test_accuracies)
    right.set_xlabel("outer step (Adam)")
    right.set_ylabel("real test accuracy")
    return save_figure(fig, path)


def run(config: DistillationConfig, out_dir: Path, *, progress: bool = False) -> dict:
    """Distill ``digits`` into ten images, compare with the baselines, write results to ``out_dir``.

    Writes ``results.json``, ``table.md``, ``distilled_images.png`` and ``curves.png``; returns the
    JSON content. ``progress``: a progress bar of the distillation on stderr.
    """
    torch.manual_seed(config.seed)
    split = load_split("digits", seed=config.seed, max_samples=config.max_samples, device=config.device)
    result = distill(split, config, progress=progress)
    random_accuracies = random_real_images_accuracy(split, config)
    start = time.perf_counter()
    full_model = train_on(split.x_train, split.y_train, config.full_data_penalty, split.n_classes, config)
    full_seconds = time.perf_counter() - start
    rows = [
        {
            "training set": "10 random noise images (start)",
            "images": split.n_classes,
            "test accuracy": result.test_accuracies[0],
        },
        {
            "training set": f"10 random real images (mean ± std over {config.random_baseline_seeds} draws)",
            "images": split.n_classes,
            "test accuracy": f"{np.mean(random_accuracies):.4f} ± {np.std(random_accuracies):.4f}",
        },
        {"training set": "10 distilled images", "images": split.n_classes, "test accuracy": result.test_accuracies[-1]},
        {
            "training set": "full training set",
            "images": len(split.y_train),
            "test accuracy": accuracy(full_model, split.x_test, split.y_test),
        },
    ]
    out_dir = Path(out_dir)
    results = {
        "config": asdict(config),
        "split_sizes": {"train": len(split.y_train), "validation": len(split.y_val), "test": len(split.y_test)},
        "table": rows,
        "distilled_test_accuracy": result.test_accuracies[-1],
        "start_test_accuracy": result.test_accuracies[0],
        "random_real_test_accuracies": random_accuracies,
        "full_training_set_test_accuracy": rows[-1]["test accuracy"],
        "outer_losses": result.losses,
        "test_accuracies": result.test_accuracies,
        "outer_loop_seconds": result.seconds,
        "full_training_set_seconds": full_seconds,
        "distilled_images_raw_pixels": split.unstandardize(result.images).cpu().tolist(),
    }
    write_json(results, out_dir / "results.json")
    write_text(markdown_table(rows), out_dir / "table.md")
    _plot_images(result.images, split, out_dir / "distilled_images.png")
    _plot_curves(result, out_dir / "curves.png")
    return results
