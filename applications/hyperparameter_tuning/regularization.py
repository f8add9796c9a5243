"""One L2 penalty per feature, tuned by hypergradient descent on the validation loss.

The inner problem is L2-penalized logistic regression (multinomial on ``digits``, binary on
``breast_cancer``) with a separate penalty ``exp(log_penalty[j])`` on the weights of feature ``j``:

    w*(log_penalty) = argmin_w  CE_train(w) + 0.5 * sum_j exp(log_penalty[j]) * ||w_j||^2.

It is solved to high precision by torch's L-BFGS, an off-the-shelf solver wrapped with
:func:`implicitdiff.implicit_diff`; the hypergradient of the validation cross-entropy
``CE_val(w*(log_penalty))`` then comes from the implicit function theorem (a CG solve with the
Hessian of the training objective). Adam follows it in log-penalty space.

Two baselines run on the same split:

* scikit-learn's ``LogisticRegressionCV`` choosing one scalar ``C`` on the same validation set
  (``cv = [(train, val)]``, ``refit=False``, so it too is trained on the training set only);
* the same outer loop with the hypergradient obtained by differentiating through an unrolled
  inner loop of gradient descent (warm-started at the previous inner solution).

Two guards against overfitting the validation split (options of :class:`RegularizationConfig`):

* ``early_stopping``: the validation split is cut in two (stratified, seeded); the hypergradient
  sees one part only, the other ("stopping" part) scores every outer step, and the penalties of the
  step with the lowest stopping loss are kept (optionally the loop stops after ``patience`` steps
  without improvement);
* ``groups``: penalties tied by feature group (:func:`feature_groups`: ``k x k`` pixel blocks,
  rings around the image centre, ...); the outer variable is one log-penalty per group, expanded to
  the features by indexing, so the hypergradient flows through the expansion by plain autograd.

Every run records the test loss and accuracy of each outer step's model, to show overfitting of the
validation split as it happens (never used for any decision).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import implicitdiff as idiff

from ..progress import progress_bar
from .datasets import StandardizedSplit, load_split
from .lbfgs import minimize_lbfgs
from .logistic_model import accuracy, cross_entropy, init_params, penalized_cross_entropy
from .reporting import markdown_table, new_figure, save_figure, write_json, write_text

__all__ = [
    "RegularizationConfig",
    "TuningRun",
    "GuardVariant",
    "DEFAULT_GUARDS",
    "feature_groups",
    "expand_penalty",
    "early_stopping_split",
    "add_noise_features",
    "inner_objective",
    "validation_loss",
    "make_implicit_fit",
    "make_unrolled_fit",
    "gradient_lipschitz_bound",
    "hypergradient",
    "tune_penalties",
    "sklearn_scalar_cv",
    "run",
]

_GROUP_SPECS = "None or 'feature', 'blocks:K', 'rings', 'modulo:K', 'consecutive:K', or one group index per feature"

Params = dict[str, torch.Tensor]
FitFn = Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], Params]


@dataclass
class RegularizationConfig:
    """Settings of the per-feature regularization experiment.

    Attributes
    ----------
    dataset : str
        ``"digits"`` or ``"breast_cancer"``.
    seed : int
        Seed of the train / validation / test split.
    max_samples : int, optional
        Subsample the dataset (small test runs).
    init_penalty : float
        Starting value of every per-feature penalty (the outer loop starts from ``log`` of it).
    outer_steps, outer_lr : int, float
        Adam steps and learning rate in log-penalty space.
    inner_max_iter, inner_grad_tol : int, float
        L-BFGS budget and gradient tolerance of the inner solve.
    cg_tol, cg_maxiter : float, int
        Relative tolerance and budget of the CG solve in the backward pass.
    cg_on_failure : str
        CG's failure policy. Small learned penalties make the Hessian ill-conditioned and CG may
        stop at its budget a little short of ``cg_tol``; by default that is not warned about
        but recorded (``TuningRun.backward_residuals``) and reported.
    unrolled_steps : int
        Gradient-descent steps differentiated through by the unrolled baseline (per outer step).
    sklearn_cs : list of float
        Grid of scalar inverse penalties ``C`` for ``LogisticRegressionCV``.
    device : str
        Torch device.
    early_stopping : bool
        Guard against overfitting the validation split: the hypergradient uses only part of it, the
        rest (``stopping_fraction`` of it, stratified, seeded by ``seed``) scores each outer step, and
        the penalties of the step with the lowest stopping loss are kept (see ``tune_penalties``).
    stopping_fraction : float
        Fraction of the validation split held out for early stopping (in ``(0, 1)``).
    patience : int, optional
        With ``early_stopping``: end the outer loop once the stopping loss has not improved for this
        many outer steps (``None``: run all ``outer_steps``). Ignored without early stopping.
    groups : str or list of int, optional
        Tie the penalties by feature group (see :func:`feature_groups`): ``None`` or ``"feature"``
        (one penalty per feature), ``"blocks:K"`` (``K x K`` pixel blocks of an image dataset),
        ``"rings"`` (pixels binned by whole units of distance from the image centre), ``"modulo:K"``
        (feature ``j`` in group ``j % K``), ``"consecutive:K"`` (runs of ``K`` features), or a list
        with the group index of every feature.
    noise_features : int
        Append this many features of pure standard-Gaussian noise (seeded by ``seed``) to every split:
        a synthetic regime with irrelevant features, which one scalar penalty cannot single out.
        Outputs are then named ``<dataset>_noise<k>_*``; image group specs do not apply.
    """

    dataset: str = "digits"
    seed: int = 0
    max_samples: int | None = None
    init_penalty: float = 1e-2
    outer_steps: int = 100
    outer_lr: float = 0.1
    inner_max_iter: int = 2000
    inner_grad_tol: float = 1e-9
    cg_tol: float = 1e-6
    cg_maxiter: int = 1000
    cg_on_failure: str = "ignore"
    unrolled_steps: int = 100
    sklearn_cs: list[float] = field(default_factory=lambda: np.logspace(-4, 4, 33).tolist())
    device: str = "cpu"
    early_stopping: bool = False
    stopping_fraction: float = 0.5
    patience: int | None = None
    groups: str | list[int] | None = None
    noise_features: int = 0

    def __post_init__(self) -> None:
        if self.init_penalty <= 0:
            raise ValueError(f"init_penalty must be positive, got {self.init_penalty}")
        if self.outer_steps < 1 or self.unrolled_steps < 1:
            raise ValueError("outer_steps and unrolled_steps must be positive")
        if not self.sklearn_cs or min(self.sklearn_cs) <= 0:
            raise ValueError("sklearn_cs must be a non-empty list of positive numbers")
        if not 0.0 < self.stopping_fraction < 1.0:
            raise ValueError(f"stopping_fraction must be in (0, 1), got {self.stopping_fraction}")
        if self.noise_features < 0:
            raise ValueError(f"noise_features must be non-negative, got {self.noise_features}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive number of outer steps or None, got {self.patience}")
        if isinstance(self.groups, str):
            _parse_group_spec(self.groups)  # syntax only; the dataset is checked by feature_groups


def _parse_group_spec(spec: str) -> tuple[str, int | None]:
    """``"blocks:2"`` -> ``("blocks", 2)``; ``"rings"`` -> ``("rings", None)``; errors name the accepted forms."""
    name, _, arg = spec.partition(":")
    if name in ("feature", "rings"):
        if arg:
            raise ValueError(f"group spec {spec!r} takes no argument; expected {_GROUP_SPECS}")
        return name, None
    if name in ("blocks", "modulo", "consecutive"):
        try:
            size = int(arg)
        except ValueError:
            message = f"group spec {spec!r} needs an integer, e.g. '{name}:2'; expected {_GROUP_SPECS}"
            raise ValueError(message) from None
        if size < 1:
            raise ValueError(f"group spec {spec!r}: the integer must be positive")
        return name, size
    raise ValueError(f"unknown group spec {spec!r}; expected {_GROUP_SPECS}")


def feature_groups(
    spec: str | Sequence[int] | torch.Tensor | None,
    n_features: int,
    image_shape: tuple[int, int] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Group index of every feature, for penalties tied by group.

    Parameters
    ----------
    spec : str, sequence of int, tensor or None
        ``None`` or ``"feature"``: every feature its own group. ``"blocks:K"``: ``K x K`` blocks of
        pixels of an image (``K`` must divide both sides), numbered row by row. ``"rings"``: pixels
        binned by ``floor`` of their distance from the image centre (5 rings on an 8x8 image).
        ``"modulo:K"``: feature ``j`` in group ``j % K`` (on breast_cancer, ``"modulo:10"`` ties the
        mean, standard error and worst value of each of the 10 measurements). ``"consecutive:K"``:
        features ``0..K-1`` in group 0, the next ``K`` in group 1, ... (on breast_cancer,
        ``"consecutive:10"`` gives the 3 statistics). Otherwise an explicit group index per feature.
    n_features : int
    image_shape : tuple of int, optional
        Needed by the image specs (``blocks``, ``rings``); features are the pixels in row-major order.

    Returns
    -------
    torch.Tensor
        ``(n_features,)`` long tensor; the groups are ``0..G-1``, each with at least one feature.

    Examples
    --------
    >>> feature_groups("blocks:2", 16, (4, 4)).tolist()
    [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    >>> feature_groups("consecutive:10", 30).unique().tolist()
    [0, 1, 2]
    """
    if spec is None or isinstance(spec, str):
        name, size = _parse_group_spec(spec or "feature")
        index = np.arange(n_features)
        if name == "feature":
            groups = index
        elif name in ("modulo", "consecutive"):
            if size > n_features:
                raise ValueError(f"group spec {spec!r}: {size} exceeds the number of features ({n_features})")
            groups = index % size if name == "modulo" else index // size
        else:
            if image_shape is None:
                raise ValueError(f"group spec {spec!r} needs image data (an image_shape); this dataset has none")
            height, width = image_shape
            if height * width != n_features:
                raise ValueError(f"image_shape {image_shape} does not match {n_features} features")
            rows, cols = np.divmod(index, width)
            if name == "blocks":
                if height % size or width % size:
                    raise ValueError(f"group spec {spec!r}: {size} does not divide the image sides {image_shape}")
                groups = (rows // size) * (width // size) + cols // size
            else:  # rings
                distance = np.hypot(rows - (height - 1) / 2, cols - (width - 1) / 2)
                groups = np.unique(np.floor(distance).astype(np.int64), return_inverse=True)[1]
        return torch.as_tensor(groups, dtype=torch.long, device=device)
    values = torch.as_tensor(spec, device=device)
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.dim() != 1:
        raise ValueError(f"explicit groups must be a 1-d sequence of integers; expected {_GROUP_SPECS}")
    if values.numel() != n_features:
        raise ValueError(f"explicit groups have {values.numel()} entries but the data has {n_features} features")
    values = values.long()
    if int(values.min()) < 0:
        raise ValueError("explicit group indices must be non-negative")
    count = int(values.max()) + 1
    if int((torch.bincount(values, minlength=count) > 0).sum()) != count:
        raise ValueError(f"explicit groups must use every index 0..{count - 1} (some group has no feature)")
    return values


def expand_penalty(log_penalty: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Per-feature log-penalties from per-group ones (``log_penalty[groups]``; identity for ``None``).

    Plain autograd differentiates the indexing: the gradient of a group is the sum of the gradients
    of its features.
    """
    return log_penalty if groups is None else log_penalty[groups]


def add_noise_features(split: StandardizedSplit, count: int, seed: int) -> StandardizedSplit:
    """The split with ``count`` standard-Gaussian noise features appended (train, validation and test).

    The noise is drawn from a generator seeded by ``seed``; the result is no longer an image dataset
    (``image_shape`` is ``None``) and its ``name`` is ``"<name>_noise<count>"``.
    """
    if count == 0:
        return split
    generator = torch.Generator().manual_seed(seed + 3)
    dtype, device = split.x_train.dtype, split.x_train.device

    def noisy(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[0], count, generator=generator, dtype=dtype).to(device)
        return torch.cat([x, noise], dim=1)

    return dataclasses.replace(
        split,
        name=f"{split.name}_noise{count}",
        x_train=noisy(split.x_train),
        x_val=noisy(split.x_val),
        x_test=noisy(split.x_test),
        feature_mean=torch.cat([split.feature_mean, torch.zeros(count, dtype=dtype, device=device)]),
        feature_scale=torch.cat([split.feature_scale, torch.ones(count, dtype=dtype, device=device)]),
        image_shape=None,
    )


def early_stopping_split(
    split: StandardizedSplit, fraction: float, seed: int
) -> tuple[StandardizedSplit, torch.Tensor, torch.Tensor, np.ndarray]:
    """Cut the validation split into a hypergradient part and a held-out stopping part.

    The cut is stratified by class and seeded. Returns the split whose ``x_val``/``y_val``/``val_index``
    are the hypergradient part only, and the stopping part's features, labels and dataset row indices.
    """
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(split.y_val))
    labels = split.y_val.cpu().numpy()
    hyper, stop = train_test_split(positions, test_size=fraction, stratify=labels, random_state=seed + 2)
    hyper, stop = np.sort(hyper), np.sort(stop)
    to_index = torch.as_tensor
    device = split.x_val.device
    outer = dataclasses.replace(
        split,
        x_val=split.x_val[to_index(hyper, device=device)],
        y_val=split.y_val[to_index(hyper, device=device)],
        val_index=split.val_index[hyper],
    )
    rows = to_index(stop, device=device)
    return outer, split.x_val[rows], split.y_val[rows], split.val_index[stop]


def inner_objective(params: Params, log_penalty: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Training cross-entropy plus the per-feature L2 penalty ``exp(log_penalty)``."""
    return penalized_cross_entropy(params, torch.exp(log_penalty), x, y)


def validation_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Outer objective: mean cross-entropy on held-out data."""
    return cross_entropy(params, x, y)


def make_implicit_fit(config: RegularizationConfig) -> FitFn:
    """Inner solver (L-BFGS to ``inner_grad_tol``) made differentiable by the implicit function theorem.

    The training objective's Hessian is positive definite (positive penalties, pinned reference
    intercept), so the backward linear system is solved with CG.
    """

    solver = idiff.CG(tol=config.cg_tol, maxiter=config.cg_maxiter, on_failure=config.cg_on_failure)

    @idiff.implicit_diff(objective=inner_objective, solver=solver)
    def fit(init: Params, log_penalty: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Params:
        result = minimize_lbfgs(
            lambda p: inner_objective(p, log_penalty, x, y),
            init,
            max_iter=config.inner_max_iter,
            grad_tol=config.inner_grad_tol,
        )
        return result.solution

    return fit


def gradient_lipschitz_bound(x: torch.Tensor, log_penalty: torch.Tensor) -> float:
    """Upper bound on the Lipschitz constant of the training objective's gradient.

    The cross-entropy Hessian w.r.t. the logits is ``diag(p) - p p^T``, whose eigenvalues are at
    most 1/2, so the data term is bounded by ``0.5 * lambda_max([x, 1]^T [x, 1] / n)``; the penalty
    adds at most ``max exp(log_penalty)``.
    """
    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    data_term = 0.5 * float(torch.linalg.eigvalsh(design.T @ design / x.shape[0]).max())
    return data_term + float(torch.exp(log_penalty.detach()).max())


def make_unrolled_fit(config: RegularizationConfig) -> FitFn:
    """Baseline: ``unrolled_steps`` of gradient descent (step ``1/L``), differentiated by plain autograd."""

    @idiff.implicit_diff(objective=inner_objective, mode="unrolled")
    def fit(init: Params, log_penalty: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Params:
        step = 1.0 / gradient_lipschitz_bound(x, log_penalty)
        params = init
        for _ in range(config.unrolled_steps):
            g = torch.func.grad(inner_objective)(params, log_penalty, x, y)
            params = {k: params[k] - step * g[k] for k in params}
        return params

    return fit


def hypergradient(
    fit: FitFn,
    log_penalty: torch.Tensor,
    init: Params,
    split: StandardizedSplit,
    *,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """Validation loss, its gradient w.r.t. ``log_penalty``, and the inner solution, for one ``fit``.

    With ``groups`` (a group index per feature, :func:`feature_groups`), ``log_penalty`` holds one
    entry per group, expanded to the features before the inner solve; its gradient is then the sum
    of the per-feature hypergradients over each group (autograd through the indexing).

    Examples
    --------
    >>> split = load_split("breast_cancer", max_samples=120)
    >>> cfg = RegularizationConfig(dataset="breast_cancer")
    >>> lp = torch.zeros(split.n_features, dtype=torch.float64)
    >>> loss, grad, _ = hypergradient(make_implicit_fit(cfg), lp, init_params(30, 2), split)
    >>> grad.shape
    torch.Size([30])
    """
    log_penalty = log_penalty.detach().requires_grad_(True)
    params = fit(init, expand_penalty(log_penalty, groups), split.x_train, split.y_train)
    loss = validation_loss(params, split.x_val, split.y_val)
    (grad,) = torch.autograd.grad(loss, log_penalty)
    return loss.detach(), grad, {k: v.detach() for k, v in params.items()}


@dataclass
class TuningRun:
    """Result of one hypergradient-descent run.

    Attributes
    ----------
    method : str
        ``"implicit"`` or ``"unrolled"``.
    log_penalty : torch.Tensor
        Per-feature log-penalties kept: the final ones, or those of ``selected_step`` with early
        stopping.
    params : dict of str to torch.Tensor
        Model trained (precisely, by L-BFGS) on the training set with the kept penalties.
    validation_losses : list of float
        Loss of the precisely trained model at each outer step (before the update), plus the final
        one (``steps_run + 1`` entries), on the validation data the hypergradient uses (the whole
        validation split, or its hypergradient part with early stopping).
    seconds : float
        Wall time of the outer loop (hypergradients and updates; not the evaluation solves of the
        unrolled run nor the test evaluations).
    backward_iterations, backward_residuals : list
        Iterations and final relative residual of each backward CG solve (empty for unrolled).
    test_losses, test_accuracies : list of float
        Test cross-entropy and accuracy of the same models as ``validation_losses`` (recorded for
        the reader, never used by the method).
    stopping_losses : list of float
        With early stopping, the loss of the same models on the held-out stopping part; else empty.
    selected_step : int
        Index (into the lists above) of the kept model: the argmin of ``stopping_losses`` with early
        stopping, else the last entry.
    groups : list of int, optional
        Group index of every feature when the penalties are tied by group.
    group_log_penalty : torch.Tensor, optional
        The kept per-group log-penalties (the outer variable) when the penalties are grouped.
    hypergradient_index, stopping_index : numpy.ndarray, optional
        With early stopping, dataset row indices of the validation rows the hypergradient uses and
        of the held-out stopping rows (disjoint).
    """

    method: str
    log_penalty: torch.Tensor
    params: Params
    validation_losses: list[float]
    seconds: float
    backward_iterations: list[int] = field(default_factory=list)
    backward_residuals: list[float] = field(default_factory=list)
    test_losses: list[float] = field(default_factory=list)
    test_accuracies: list[float] = field(default_factory=list)
    stopping_losses: list[float] = field(default_factory=list)
    selected_step: int = -1
    groups: list[int] | None = None
    group_log_penalty: torch.Tensor | None = None
    hypergradient_index: np.ndarray | None = None
    stopping_index: np.ndarray | None = None

    @property
    def steps_run(self) -> int:
        """Outer steps (Adam updates) performed: ``outer_steps``, or fewer if early stopping ended the loop."""
        return len(self.validation_losses) - 1


def _exact_fit(
    log_penalty: torch.Tensor, init: Params, split: StandardizedSplit, config: RegularizationConfig
) -> Params:
    return minimize_lbfgs(
        lambda p: inner_objective(p, log_penalty.detach(), split.x_train, split.y_train),
        init,
        max_iter=config.inner_max_iter,
        grad_tol=config.inner_grad_tol,
    ).solution


def tune_penalties(
    split: StandardizedSplit, config: RegularizationConfig, method: str = "implicit", *, progress: bool = False
) -> TuningRun:
    """Minimize the validation loss over per-feature log-penalties with Adam on the hypergradient.

    With ``config.groups`` the outer variable is one log-penalty per feature group (expanded to the
    features); with ``config.early_stopping`` the hypergradient uses part of the validation split,
    each outer step's model is scored on the held-out rest, and the penalties of the step with the
    lowest held-out loss are kept (``TuningRun.selected_step``); ``config.patience`` may end the loop
    early. The test loss and accuracy of every step's model are recorded, never used.

    Parameters
    ----------
    split : StandardizedSplit
        Data; the inner problem uses ``x_train``, the outer loss ``x_val`` (or its hypergradient part).
    config : RegularizationConfig
    method : str
        ``"implicit"`` (L-BFGS + implicit differentiation) or ``"unrolled"`` (autograd through
        ``config.unrolled_steps`` gradient-descent steps, warm-started at the previous iterate; its
        curves and stopping decisions use the precisely solved model at the same penalties).
    progress : bool
        Show a progress bar over the outer steps (rate and ETA) on stderr.

    Returns
    -------
    TuningRun
    """
    if method not in ("implicit", "unrolled"):
        raise ValueError(f"method must be 'implicit' or 'unrolled', got {method!r}")
    fit = make_implicit_fit(config) if method == "implicit" else make_unrolled_fit(config)
    dtype, device = split.x_train.dtype, split.x_train.device
    groups = None
    if config.groups is not None and config.groups != "feature":
        groups = feature_groups(config.groups, split.n_features, split.image_shape, device=device)
    n_outer = split.n_features if groups is None else int(groups.max()) + 1
    outer_split, x_stop, y_stop, stop_index = split, None, None, None
    if config.early_stopping:
        outer_split, x_stop, y_stop, stop_index = early_stopping_split(split, config.stopping_fraction, config.seed)
    log_penalty = torch.full((n_outer,), math.log(config.init_penalty), dtype=dtype, device=device)
    log_penalty.requires_grad_(True)
    optimizer = torch.optim.Adam([log_penalty], lr=config.outer_lr)
    params = init_params(split.n_features, split.n_classes, dtype=dtype, device=device)
    exact = params
    losses: list[float] = []
    test_losses: list[float] = []
    test_accuracies: list[float] = []
    stopping_losses: list[float] = []
    penalties: list[torch.Tensor] = []
    models: list[Params] = []
    iterations: list[int] = []
    residuals: list[float] = []
    seconds = 0.0

    def record(model: Params, loss: float, penalty: torch.Tensor) -> None:
        losses.append(loss)
        test_losses.append(float(validation_loss(model, split.x_test, split.y_test)))
        test_accuracies.append(accuracy(model, split.x_test, split.y_test))
        if x_stop is not None:
            stopping_losses.append(float(validation_loss(model, x_stop, y_stop)))
        penalties.append(penalty.detach().clone())
        models.append(model)

    bar = progress_bar(config.outer_steps, f"{config.dataset}: {method} hypergradient descent", unit="step",
                       enabled=progress)
    for _ in range(config.outer_steps):
        current = log_penalty.detach().clone()
        if method == "unrolled":  # judge the run by the model its penalties really give, not the truncated iterate
            exact = _exact_fit(expand_penalty(current, groups), exact, outer_split, config)
        start = time.perf_counter()
        with idiff.record_solves() as log:
            loss, grad, params = hypergradient(fit, log_penalty, params, outer_split, groups=groups)
        optimizer.zero_grad()
        log_penalty.grad = grad
        optimizer.step()
        seconds += time.perf_counter() - start
        if method == "implicit":  # the inner solve is already exact
            record(params, float(loss), current)
            for info in log:
                if info.kind == "backward":
                    iterations.append(int(info.iterations))
                    residuals.append(float(info.relative_residual))
        else:
            record(exact, float(validation_loss(exact, outer_split.x_val, outer_split.y_val)), current)
        postfix = {"val_loss": f"{losses[-1]:.4f}", "test_loss": f"{test_losses[-1]:.4f}"}
        if stopping_losses:
            postfix["stop_loss"] = f"{stopping_losses[-1]:.4f}"
        bar.set_postfix(**postfix)
        bar.update(1)
        if stopping_losses and config.patience is not None:
            if len(stopping_losses) - 1 - int(np.argmin(stopping_losses)) >= config.patience:
                break
    bar.close()
    final_penalty = log_penalty.detach().clone()
    warm = exact if method == "unrolled" else params
    final = _exact_fit(expand_penalty(final_penalty, groups), warm, outer_split, config)
    record(final, float(validation_loss(final, outer_split.x_val, outer_split.y_val)), final_penalty)
    selected = int(np.argmin(stopping_losses)) if stopping_losses else len(losses) - 1
    kept = penalties[selected]
    return TuningRun(
        method=method,
        log_penalty=expand_penalty(kept, groups),
        params=models[selected],
        validation_losses=losses,
        seconds=seconds,
        backward_iterations=iterations,
        backward_residuals=residuals,
        test_losses=test_losses,
        test_accuracies=test_accuracies,
        stopping_losses=stopping_losses,
        selected_step=selected,
        groups=None if groups is None else groups.cpu().tolist(),
        group_log_penalty=None if groups is None else kept,
        hypergradient_index=outer_split.val_index if config.early_stopping else None,
        stopping_index=stop_index,
    )


def sklearn_scalar_cv(split: StandardizedSplit, cs: list[float], *, tol: float = 1e-6) -> dict:
    """scikit-learn's ``LogisticRegressionCV`` choosing one scalar ``C`` on the same validation set.

    ``cv = [(train, val)]`` with ``refit=False`` makes it select ``C`` by validation log-loss and keep
    the model trained on the training set only: the same protocol as the hypergradient runs. In our
    parametrization ``C`` is the scalar penalty ``1 / (C * n_train)`` on every feature.

    scikit-learn runs with as many BLAS / OpenMP threads as torch has intra-op threads
    (``torch.get_num_threads()``, which ``--threads`` sets), so that both sides of the timing get the
    same cores: left to its default, OpenBLAS took 9 to 85 times longer on a 2-core machine shared with other jobs.

    Returns
    -------
    dict
        ``best_C``, ``equivalent_penalty``, ``validation_loss``, ``test_loss``, ``test_accuracy``,
        ``seconds`` (wall time of the whole grid search).
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import log_loss

    x_train, y_train = split.x_train.cpu().numpy(), split.y_train.cpu().numpy()
    x_val, y_val = split.x_val.cpu().numpy(), split.y_val.cpu().numpy()
    x_test, y_test = split.x_test.cpu().numpy(), split.y_test.cpu().numpy()
    n_train = len(y_train)
    folds = [(np.arange(n_train), np.arange(n_train, n_train + len(y_val)))]
    model = LogisticRegressionCV(
        Cs=list(cs),
        l1_ratios=(0.0,),
        cv=folds,
        scoring="neg_log_loss",
        refit=False,
        tol=tol,
        max_iter=10_000,
        use_legacy_attributes=False,
    )
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=torch.get_num_threads()):
        start = time.perf_counter()
        model.fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
        seconds = time.perf_counter() - start
    labels = np.arange(split.n_classes)
    best_c = float(np.ravel(model.C_)[0])
    return {
        "best_C": best_c,
        "equivalent_penalty": 1.0 / (best_c * n_train),
        "validation_loss": float(log_loss(y_val, model.predict_proba(x_val), labels=labels)),
        "test_loss": float(log_loss(y_test, model.predict_proba(x_test), labels=labels)),
        "test_accuracy": float((model.predict(x_test) == y_test).mean()),
        "seconds": seconds,
    }


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


def _outer_setup(
    split: StandardizedSplit, config: RegularizationConfig
) -> tuple[StandardizedSplit, torch.Tensor | None, int]:
    """Validation data the hypergradient uses, feature groups (or ``None``) and number of outer variables."""
    groups = None
    if config.groups is not None and config.groups != "feature":
        groups = feature_groups(config.groups, split.n_features, split.image_shape, device=split.x_train.device)
    outer_split = split
    if config.early_stopping:
        outer_split = early_stopping_split(split, config.stopping_fraction, config.seed)[0]
    return outer_split, groups, split.n_features if groups is None else int(groups.max()) + 1


def _start_hypergradient_errors(split: StandardizedSplit, config: RegularizationConfig) -> dict[str, float]:
    """Relative error of each method's first hypergradient against a dense float64 solve.

    With grouped penalties the reference is the dense per-feature hypergradient summed over each group.
    """
    from .dense_reference import minimizer_hypergradient

    dtype, device = split.x_train.dtype, split.x_train.device
    outer_split, groups, n_outer = _outer_setup(split, config)
    log_penalty = torch.full((n_outer,), math.log(config.init_penalty), dtype=dtype, device=device)
    per_feature = expand_penalty(log_penalty, groups)
    init = init_params(split.n_features, split.n_classes, dtype=dtype, device=device)
    solution = _exact_fit(per_feature, init, outer_split, config)
    reference = minimizer_hypergradient(
        inner_objective,
        lambda w, h, x, y: validation_loss(w, x, y),
        solution,
        per_feature,
        (outer_split.x_train, outer_split.y_train),
        (outer_split.x_val, outer_split.y_val),
    )
    if groups is not None:
        reference = torch.zeros(n_outer, dtype=dtype, device=device).index_add_(0, groups, reference)
    _, implicit_grad, _ = hypergradient(make_implicit_fit(config), log_penalty, init, outer_split, groups=groups)
    _, unrolled_grad, _ = hypergradient(make_unrolled_fit(config), log_penalty, init, outer_split, groups=groups)
    return {
        "implicit": _relative_error(implicit_grad, reference),
        "unrolled": _relative_error(unrolled_grad, reference),
    }


def _evaluate(params: Params, split: StandardizedSplit) -> dict[str, float]:
    return {
        "validation_loss": float(validation_loss(params, split.x_val, split.y_val)),
        "test_loss": float(validation_loss(params, split.x_test, split.y_test)),
        "test_accuracy": accuracy(params, split.x_test, split.y_test),
    }


@dataclass(frozen=True)
class GuardVariant:
    """One guarded hypergradient run of the comparison in :func:`run` (implicit hypergradient).

    Attributes
    ----------
    groups : str or list of int, optional
        Penalty groups (:attr:`RegularizationConfig.groups`); ``None``: one penalty per feature.
    early_stopping : bool
        Hold out part of the validation split to choose the outer step (:attr:`RegularizationConfig.early_stopping`).
    from_scalar_cv : bool
        Start the outer loop at the scalar penalty chosen by ``LogisticRegressionCV`` (every penalty
        ``1 / (C n_train)``) instead of ``init_penalty``; the run's seconds then include the grid search.
    """

    groups: str | tuple[int, ...] | None = None
    early_stopping: bool = True
    from_scalar_cv: bool = False

    def label(self, split: StandardizedSplit) -> str:
        """Row label, e.g. ``"2x2 blocks (16 penalties) + early stopping"``."""
        text = _describe(self.groups, self.early_stopping, split)
        return text + (", started at CV's C" if self.from_scalar_cv else "")


#: Guarded runs of ``run(..., guards=True)`` per dataset: untied penalties with early stopping,
#: then penalties tied by group (with early stopping).
#: The same from the scalar penalty chosen by ``LogisticRegressionCV``. Datasets with appended noise
#: features (no image groups) use ``DEFAULT_GUARDS["noise"]``.
DEFAULT_GUARDS: dict[str, list[GuardVariant]] = {
    "digits": [
        GuardVariant(None, True),
        GuardVariant("blocks:2", True),
        GuardVariant(None, True, from_scalar_cv=True),
        GuardVariant("blocks:2", True, from_scalar_cv=True),
        GuardVariant("rings", True, from_scalar_cv=True),
    ],
    "breast_cancer": [
        GuardVariant(None, True),
        GuardVariant("modulo:10", True),
        GuardVariant("consecutive:10", True),
        GuardVariant(None, True, from_scalar_cv=True),
        GuardVariant("consecutive:10", True, from_scalar_cv=True),
    ],
    "noise": [GuardVariant(None, True), GuardVariant(None, True, from_scalar_cv=True)],
}


def _describe(groups_spec, early_stopping: bool, split: StandardizedSplit) -> str:
    unit = "pixel" if split.image_shape is not None else "feature"
    if groups_spec is None or groups_spec == "feature":
        text = f"per-{unit} ({split.n_features} penalties)"
    else:
        count = int(feature_groups(groups_spec, split.n_features, split.image_shape).max()) + 1
        if isinstance(groups_spec, str):
            name, size = _parse_group_spec(groups_spec)
            kind = {
                "blocks": f"{size}x{size} blocks",
                "rings": "rings around the centre",
                "modulo": f"features j mod {size}",
                "consecutive": f"runs of {size} features",
            }[name]
            if split.name == "breast_cancer" and groups_spec == "modulo:10":
                kind = "by measurement"
            if split.name == "breast_cancer" and groups_spec == "consecutive:10":
                kind = "by statistic (mean / se / worst)"
        else:
            kind = "explicit groups"
        text = f"{kind} ({count} penalties)"
    return text + (" + early stopping" if early_stopping else "")


def _guard_row(label: str, run_: TuningRun, split: StandardizedSplit, n_penalties: int) -> dict:
    return {
        "method": label,
        "penalties": n_penalties,
        **_evaluate(run_.params, split),
        "seconds": run_.seconds,
        "outer steps run": run_.steps_run,
        "kept step": run_.selected_step,
        "stopping-part loss": run_.stopping_losses[run_.selected_step] if run_.stopping_losses else "-",
    }


def _run_record(run_: TuningRun) -> dict:
    """JSON-ready curves and choices of one run."""
    record = {
        "method": run_.method,
        "validation_losses": run_.validation_losses,
        "test_losses": run_.test_losses,
        "test_accuracies": run_.test_accuracies,
        "stopping_losses": run_.stopping_losses,
        "selected_step": run_.selected_step,
        "steps_run": run_.steps_run,
        "seconds": run_.seconds,
        "learned_log10_penalty": (run_.log_penalty / math.log(10.0)).cpu().tolist(),
    }
    if run_.groups is not None:
        record["groups"] = run_.groups
        record["learned_group_log10_penalty"] = (run_.group_log_penalty / math.log(10.0)).cpu().tolist()
    if run_.stopping_index is not None:
        record["hypergradient_rows"] = run_.hypergradient_index.tolist()
        record["stopping_rows"] = run_.stopping_index.tolist()
    return record


_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
_MARKERS = ["o", "s", "^", "D", "v", "x"]


def _style_legend(ax, method_handles: list, styles: list[tuple[str, str]], **legend_options) -> None:
    """Legend with one entry per method (colour and marker) and one per line style (what is drawn)."""
    from matplotlib.lines import Line2D

    handles = list(method_handles)
    for linestyle, text in styles:
        handles.append(Line2D([], [], color="0.3", ls=linestyle, marker="*" if linestyle == "" else None,
                              markersize=9, label=text))
    ax.legend(handles=handles, **({"loc": "best"} | legend_options))


def _plot_validation_curves(
    runs: list[tuple[str, TuningRun]], sklearn_result: dict, title: str, path: Path
) -> Path:
    """Validation loss (solid) and test loss (dashed) per outer step of each run, scalar-C levels as lines.

    With early stopping, the stopping-part loss is dotted and the kept step starred.
    """
    from matplotlib.lines import Line2D

    legend_height = 0.25 + 0.22 * (len(runs) + 1)
    fig, axes = _mosaic_figure([["main"], ["legend"]], 7.0, 4.0 + legend_height, [4.0, legend_height])
    ax, legend_ax = axes["main"], axes["legend"]
    method_handles = []
    any_stopping = False
    for i, (label, run_) in enumerate(runs):
        colour, marker = _COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]
        common = {"color": colour, "marker": marker, "markevery": 0.1, "markersize": 4}
        ax.plot(run_.validation_losses, ls="-", **common)
        ax.plot(run_.test_losses, ls="--", **common)
        if run_.stopping_losses:
            any_stopping = True
            ax.plot(run_.stopping_losses, ls=":", **common)
            ax.plot([run_.selected_step], [run_.test_losses[run_.selected_step]], marker="*", color=colour,
                    markersize=12, markeredgecolor="k", ls="", markevery=[0], zorder=5)
        method_handles.append(Line2D([], [], color=colour, marker=marker, markersize=4, ls="-", label=label))
    ax.axhline(sklearn_result["validation_loss"], color="k", lw=1.0, ls="-")
    ax.axhline(sklearn_result["test_loss"], color="k", lw=1.0, ls="--")
    scalar_label = f"LogisticRegressionCV, scalar C = {sklearn_result['best_C']:.3g}"
    method_handles.append(Line2D([], [], color="k", lw=1.0, label=scalar_label))
    styles = [("-", "solid: validation loss (optimized)"), ("--", "dashed: test loss (only recorded)")]
    if any_stopping:
        styles += [(":", "dotted: held-out stopping part"), ("", "star: kept step (test loss)")]
    legend_ax.axis("off")
    _style_legend(legend_ax, method_handles, styles, loc="center", ncol=2, frameon=False)
    ax.set_xlabel("outer step (Adam updates of the log-penalties)")
    ax.set_ylabel("mean cross-entropy (nats)")
    ax.set_title(title)
    return save_figure(fig, path)


def _mosaic_figure(
    layout: list[list[str]], width: float, height: float, height_ratios: list[float],
    width_ratios: list[float] | None = None,
):
    """A figure of named axes (``plt.subplot_mosaic``) in the style of :func:`new_figure`."""
    import matplotlib.pyplot as plt

    from .reporting import FIGURE_STYLE, LINE_CYCLE

    with plt.rc_context(FIGURE_STYLE):
        fig, axes = plt.subplot_mosaic(layout, figsize=(width, height), height_ratios=height_ratios,
                                       width_ratios=width_ratios)
    for ax in axes.values():
        ax.set_prop_cycle(LINE_CYCLE)
        ax.grid(True, alpha=0.3)
    return fig, axes


def _plot_guard_curves(
    runs: list[tuple[str, TuningRun]], sklearn_result: dict, title: str, path: Path
) -> Path:
    """Two panels: the validation losses each run sees (hypergradient and stopping parts), and the
    test loss with the kept step starred; the legend below them."""
    from matplotlib.lines import Line2D

    legend_height = 0.3 + 0.24 * len(runs)
    fig, axes = _mosaic_figure([["val", "test"], ["legend", "legend"]], 11.0, 4.0 + legend_height, [4.0, legend_height])
    left, right, legend_ax = axes["val"], axes["test"], axes["legend"]
    handles = []
    for i, (label, run_) in enumerate(runs):
        colour, marker = _COLOURS[i % len(_COLOURS)], _MARKERS[i % len(_MARKERS)]
        common = {"color": colour, "marker": marker, "markevery": 0.1, "markersize": 4}
        left.plot(run_.validation_losses, ls="-", **common)
        if run_.stopping_losses:
            left.plot(run_.stopping_losses, ls=":", **common)
        right.plot(run_.test_losses, ls="--", **common)
        step = run_.selected_step
        right.plot([step], [run_.test_losses[step]], marker="*", color=colour, markersize=13, markeredgecolor="k",
                   ls="", markevery=[0], zorder=5)
        handles.append(Line2D([], [], color=colour, marker=marker, markersize=4, label=label))
    right.axhline(sklearn_result["test_loss"], color="k", lw=1.0, ls="--")
    handles.append(Line2D([], [], color="k", lw=1.0, ls="--",
                          label=f"LogisticRegressionCV, scalar C = {sklearn_result['best_C']:.3g} (test loss)"))
    left.set_title("validation split (what the outer loop sees)")
    right.set_title("test split (recorded, never used)")
    for ax in (left, right):
        ax.set_xlabel("outer step (Adam updates)")
        ax.set_ylabel("mean cross-entropy (nats)")
    legend_ax.axis("off")
    styles = [("-", "solid: validation rows the hypergradient uses"),
              (":", "dotted: held-out stopping rows"),
              ("--", "dashed: test loss"), ("", "star: kept step")]
    _style_legend(legend_ax, handles, styles, loc="center", ncol=2, frameon=False)
    fig.suptitle(title)
    return save_figure(fig, path)


def _plot_penalties(log_penalty: torch.Tensor, split: StandardizedSplit, path: Path, title: str | None = None) -> Path:
    values = (log_penalty / math.log(10.0)).cpu().numpy()
    if split.image_shape is not None:
        fig, (ax,) = new_figure(width=4.2, height=3.6)
        image = ax.imshow(values.reshape(split.image_shape), cmap="viridis")
        fig.colorbar(image, ax=ax, label="log10 penalty")
        ax.set_title(title or "learned per-pixel L2 penalty")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        fig, (ax,) = new_figure(width=7.0)
        ax.bar(np.arange(len(values)), values)
        ax.set_xlabel("feature")
        ax.set_ylabel("log10 penalty")
        ax.set_title(title or "learned per-feature L2 penalty")
    return save_figure(fig, path)


def _plot_guard_penalties(runs: list[tuple[str, TuningRun]], split: StandardizedSplit, path: Path) -> Path:
    """Kept log10 penalties of each run, as images (image datasets) or bars, on one colour / value scale."""
    import textwrap

    columns = min(3, len(runs))
    rows = -(-len(runs) // columns)
    names = [f"run{i}" for i in range(len(runs))] + ["."] * (rows * columns - len(runs))
    layout = [names[r * columns:(r + 1) * columns] for r in range(rows)]
    is_image = split.image_shape is not None
    if is_image:  # a narrow colour-bar column spanning all rows
        layout = [[*row, "colorbar"] for row in layout]
    cell = (3.0, 3.1) if is_image else (4.2, 3.0)
    fig, axes = _mosaic_figure(layout, cell[0] * columns + (0.9 if is_image else 0), cell[1] * rows, [1.0] * rows,
                               [1.0] * columns + [0.08] if is_image else None)
    values = [(r.log_penalty / math.log(10.0)).cpu().numpy() for _, r in runs]
    low, high = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    for i, ((label, run_), v) in enumerate(zip(runs, values)):
        ax = axes[f"run{i}"]
        if is_image:
            image = ax.imshow(v.reshape(split.image_shape), cmap="viridis", vmin=low, vmax=high)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        else:
            ax.bar(np.arange(len(v)), v)
            ax.set_ylim(low - 0.2, high + 0.2)
            ax.set_xlabel("feature index")
            ax.set_ylabel("log10 penalty")
        ax.set_title("\n".join(textwrap.wrap(f"{label}; kept step {run_.selected_step}", 34)), fontsize=8.5)
    if is_image:
        fig.colorbar(image, cax=axes["colorbar"], label="log10 penalty")
    return save_figure(fig, path)


def _main_label(method: str, config: RegularizationConfig, split: StandardizedSplit) -> str:
    if method == "implicit":
        base = "implicit (L-BFGS + CG)"
    else:
        base = f"unrolled ({config.unrolled_steps} GD steps)"
    guarded = config.early_stopping or (config.groups is not None and config.groups != "feature")
    if not guarded:
        unit = "pixel" if split.image_shape is not None else "feature"
        return f"per-{unit}, {base}"
    return f"{_describe(config.groups, config.early_stopping, split)}, {base}"


def run(
    config: RegularizationConfig,
    out_dir: Path,
    *,
    progress: bool = False,
    guards: bool | Sequence[GuardVariant] = False,
) -> dict:
    """Run the full comparison on ``config.dataset`` and write ``<dataset>_*`` files to ``out_dir``.

    Writes ``<dataset>_results.json``, ``<dataset>_table.md``, ``<dataset>_validation_loss.png``
    (validation and test loss per outer step) and ``<dataset>_penalties.png``; returns the JSON
    content. The implicit and unrolled runs use ``config`` as it is (guards included, if set).
    ``progress``: progress bars of the hypergradient-descent runs on stderr.

    ``guards``: also run the guarded variants (``True``: :data:`DEFAULT_GUARDS` of the dataset, or a
    list of :class:`GuardVariant`), implicit hypergradient, same outer settings otherwise, and write
    ``<dataset>_guards_table.md`` (scalar C, the main implicit run, the variants),
    ``<dataset>_guards.png`` (curves) and ``<dataset>_guards_penalties.png``; the JSON then has a
    ``"guards"`` entry.

    Examples
    --------
    >>> cfg = RegularizationConfig(dataset="breast_cancer", max_samples=150, outer_steps=3, unrolled_steps=5)
    >>> results = run(cfg, Path("/tmp/reg_example"))  # doctest: +SKIP
    """
    torch.manual_seed(config.seed)
    split = load_split(config.dataset, seed=config.seed, max_samples=config.max_samples, device=config.device)
    split = add_noise_features(split, config.noise_features, config.seed)
    dtype, device = split.x_train.dtype, split.x_train.device
    start_penalty = torch.full((split.n_features,), math.log(config.init_penalty), dtype=dtype, device=device)
    start_init = init_params(split.n_features, split.n_classes, dtype=dtype, device=device)
    start_model = _exact_fit(start_penalty, start_init, split, config)
    gradient_errors = _start_hypergradient_errors(split, config)
    implicit_run = tune_penalties(split, config, "implicit", progress=progress)
    unrolled_run = tune_penalties(split, config, "unrolled", progress=progress)
    sklearn_result = sklearn_scalar_cv(split, config.sklearn_cs)

    rows = [
        {"method": f"start (every penalty {config.init_penalty:g})", **_evaluate(start_model, split), "seconds": 0.0},
        {
            "method": "LogisticRegressionCV, scalar C",
            **{k: sklearn_result[k] for k in ("validation_loss", "test_loss", "test_accuracy", "seconds")},
        },
    ]
    labels = {r.method: _main_label(r.method, config, split) for r in (implicit_run, unrolled_run)}
    for run_ in (implicit_run, unrolled_run):
        rows.append({"method": labels[run_.method], **_evaluate(run_.params, split), "seconds": run_.seconds})
    for row in rows:
        method = row["method"]
        key = "implicit" if "implicit" in method else "unrolled" if "unrolled" in method else None
        row["start hypergradient rel. error"] = gradient_errors[key] if key else "-"
        row["median CG iterations"] = int(np.median(implicit_run.backward_iterations)) if key == "implicit" else "-"
        row["max CG rel. residual"] = max(implicit_run.backward_residuals) if key == "implicit" else "-"
    if config.early_stopping:
        for row, run_ in zip(rows[2:], (implicit_run, unrolled_run)):
            row["kept step"] = run_.selected_step
        rows[0]["kept step"] = rows[1]["kept step"] = "-"

    prefix = split.name
    out_dir = Path(out_dir)
    table = markdown_table(rows)
    results = {
        "config": asdict(config),
        "split_sizes": {"train": len(split.y_train), "validation": len(split.y_val), "test": len(split.y_test)},
        "table": rows,
        "sklearn": sklearn_result,
        "start_hypergradient_relative_error": gradient_errors,
        "validation_losses": {r.method: r.validation_losses for r in (implicit_run, unrolled_run)},
        "test_losses": {r.method: r.test_losses for r in (implicit_run, unrolled_run)},
        "test_accuracies": {r.method: r.test_accuracies for r in (implicit_run, unrolled_run)},
        "stopping_losses": {r.method: r.stopping_losses for r in (implicit_run, unrolled_run)},
        "selected_step": {r.method: r.selected_step for r in (implicit_run, unrolled_run)},
        "backward_cg_iterations": implicit_run.backward_iterations,
        "backward_cg_relative_residuals": implicit_run.backward_residuals,
        "learned_log10_penalty": {
            r.method: (r.log_penalty / math.log(10.0)).cpu().tolist() for r in (implicit_run, unrolled_run)
        },
    }
    unit = "pixel" if split.image_shape is not None else "feature"
    settings = f"seed {config.seed}, Adam lr {config.outer_lr:g}, {config.outer_steps} steps"
    if guards:
        default = DEFAULT_GUARDS["noise"] if config.noise_features else DEFAULT_GUARDS.get(config.dataset, [])
        variants = list(default) if guards is True else list(guards)
        main_label = _describe(config.groups, config.early_stopping, split)
        if not (config.early_stopping or (config.groups is not None and config.groups != "feature")):
            main_label += ", no guard"
        guarded: list[tuple[str, TuningRun]] = [(main_label, implicit_run)]
        n_main = implicit_run.group_log_penalty.numel() if implicit_run.groups is not None else split.n_features
        guard_rows = [
            {
                "method": f"LogisticRegressionCV, scalar C = {sklearn_result['best_C']:.3g}",
                "penalties": 1,
                **{k: sklearn_result[k] for k in ("validation_loss", "test_loss", "test_accuracy", "seconds")},
                "outer steps run": "-",
                "kept step": "-",
                "stopping-part loss": "-",
            },
            _guard_row(main_label, implicit_run, split, n_main),
        ]
        guard_records = {main_label: _run_record(implicit_run)}
        for variant in variants:
            variant_config = dataclasses.replace(
                config,
                groups=list(variant.groups) if isinstance(variant.groups, tuple) else variant.groups,
                early_stopping=variant.early_stopping,
            )
            if variant.from_scalar_cv:
                variant_config.init_penalty = sklearn_result["equivalent_penalty"]
            run_ = tune_penalties(split, variant_config, "implicit", progress=progress)
            if variant.from_scalar_cv:
                run_.seconds += sklearn_result["seconds"]
            label = variant.label(split)
            count = split.n_features if run_.groups is None else run_.group_log_penalty.numel()
            guard_rows.append(_guard_row(label, run_, split, count))
            guard_records[label] = _run_record(run_)
            guarded.append((label, run_))
        results["guards"] = {"table": guard_rows, "runs": guard_records}
        write_text(markdown_table(guard_rows), out_dir / f"{prefix}_guards_table.md")
        _plot_guard_curves(guarded, sklearn_result, f"{prefix}: guarded hypergradient runs ({settings})",
                           out_dir / f"{prefix}_guards.png")
        _plot_guard_penalties(guarded, split, out_dir / f"{prefix}_guards_penalties.png")
    write_json(results, out_dir / f"{prefix}_results.json")
    write_text(table, out_dir / f"{prefix}_table.md")
    _plot_validation_curves(
        [(labels[r.method], r) for r in (implicit_run, unrolled_run)],
        sklearn_result,
        f"{prefix}: per-{unit} L2 penalties ({settings})",
        out_dir / f"{prefix}_validation_loss.png",
    )
    _plot_penalties(implicit_run.log_penalty, split, out_dir / f"{prefix}_penalties.png")
    return results
