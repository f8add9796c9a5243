"""Seeded, standardized train / validation / test splits of scikit-learn's bundled datasets.

Every application in this package works on one of these splits, so that the hypergradient
methods and the scikit-learn baselines they are compared with see exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DATASETS", "StandardizedSplit", "load_split"]

#: Bundled datasets that :func:`load_split` knows, with the image shape of one sample (or ``None``).
DATASETS: dict[str, tuple[int, int] | None] = {"digits": (8, 8), "breast_cancer": None}


@dataclass(frozen=True)
class StandardizedSplit:
    """A dataset split three ways, features standardized with training statistics.

    Attributes
    ----------
    name : str
        Name of the bundled dataset.
    x_train, x_val, x_test : torch.Tensor
        Standardized features, shape ``(n, d)``.
    y_train, y_val, y_test : torch.Tensor
        Integer labels in ``[0, n_classes)``, shape ``(n,)``.
    feature_mean, feature_scale : torch.Tensor
        Training mean and standard deviation (1 for constant features) used to standardize;
        ``x * feature_scale + feature_mean`` maps back to raw features.
    n_classes : int
        Number of classes.
    image_shape : tuple of int or None
        Shape of one sample as an image (``(8, 8)`` for digits), ``None`` if not an image.
    train_index, val_index, test_index : numpy.ndarray
        Row indices into the raw dataset, in the order of the rows of ``x_train`` etc.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_mean: torch.Tensor
    feature_scale: torch.Tensor
    n_classes: int
    image_shape: tuple[int, int] | None
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray

    @property
    def n_features(self) -> int:
        """Number of features ``d``."""
        return int(self.x_train.shape[1])

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        """Map standardized features back to the raw feature scale."""
        return x * self.feature_scale + self.feature_mean


def _raw_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_digits

    loaders = {"digits": load_digits, "breast_cancer": load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(loaders)}")
    bunch = loaders[name]()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def load_split(
    name: str = "digits",
    *,
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
    seed: int = 0,
    max_samples: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> StandardizedSplit:
    """Load a bundled dataset and split it into standardized train / validation / test sets.

    The split is stratified by class and fully determined by ``seed``.

    Parameters
    ----------
    name : str
        ``"digits"`` (1797 8x8 images, 10 classes) or ``"breast_cancer"`` (569 samples, 30 features,
        2 classes).
    fractions : tuple of float
        Fractions of the samples that go to train, validation and test; must be positive and sum to 1.
    seed : int
        Seed of the permutation.
    max_samples : int, optional
        Use only a stratified random subset of this many samples (for small, fast test runs).
    dtype, device
        Floating dtype and device of the returned tensors.

    Returns
    -------
    StandardizedSplit

    Examples
    --------
    >>> split = load_split("digits", seed=0)
    >>> split.x_train.shape, split.n_classes
    (torch.Size([898, 64]), 10)
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    from sklearn.model_selection import train_test_split

    x, y = _raw_dataset(name)
    index = np.arange(len(y))
    if max_samples is not None:
        if not 3 * len(np.unique(y)) <= max_samples <= len(y):
            raise ValueError(f"max_samples must be in [{3 * len(np.unique(y))}, {len(y)}], got {max_samples}")
        if max_samples < len(y):
            index, _ = train_test_split(index, train_size=max_samples, stratify=y, random_state=seed)
    train_frac, val_frac, _ = fractions
    train_index, rest = train_test_split(index, train_size=train_frac, stratify=y[index], random_state=seed)
    val_index, test_index = train_test_split(
        rest, train_size=val_frac / (1.0 - train_frac), stratify=y[rest], random_state=seed + 1
    )
    mean = x[train_index].mean(axis=0)
    scale = x[train_index].std(axis=0)
    scale[scale == 0.0] = 1.0  # constant pixels (always blank in digits) stay at zero after centering

    def features(rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x[rows] - mean) / scale, dtype=dtype, device=device)

    def labels(rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y[rows], dtype=torch.long, device=device)

    return StandardizedSplit(
        name=name,
        x_train=features(train_index),
        y_train=labels(train_index),
        x_val=features(val_index),
        y_val=labels(val_index),
        x_test=features(test_index),
        y_test=labels(test_index),
        feature_mean=torch.as_tensor(mean, dtype=dtype, device=device),
        feature_scale=torch.as_tensor(scale, dtype=dtype, device=device),
        n_classes=len(np.unique(y)),
        image_shape=DATASETS[name],
        train_index=np.asarray(train_index),
        val_index=np.asarray(val_index),
        test_index=np.asarray(test_index),
    )
