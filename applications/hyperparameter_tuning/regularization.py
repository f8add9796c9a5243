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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

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

    def __post_init__(self) -> None:
        if self.init_penalty <= 0:
            raise ValueError(f"init_penalty must be positive, got {self.init_penalty}")
        if self.outer_steps < 1 or self.unrolled_steps < 1:
            raise ValueError("outer_steps and unrolled_steps must be positive")
        if not self.sklearn_cs or min(self.sklearn_cs) <= 0:
            raise ValueError("sklearn_cs must be a non-empty list of positive numbers")


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
    fit: FitFn, log_penalty: torch.Tensor, init: Params, split: StandardizedSplit
) -> tuple[torch.Tensor, torch.Tensor, Params]:
    """Validation loss, its gradient w.r.t. ``log_penalty``, and the inner solution, for one ``fit``.

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
    params = fit(init, log_penalty, split.x_train, split.y_train)
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
        Final per-feature log-penalties.
    params : dict of str to torch.Tensor
        Model trained (precisely, by L-BFGS) on the training set with the final penalties.
    validation_losses : list of float
        Validation loss of the precisely trained model at each outer step (before the update),
        plus the final one: ``outer_steps + 1`` entries.
    seconds : float
        Wall time of the outer loop (hypergradients and updates; not the evaluation solves of the
        unrolled run).
    backward_iterations, backward_residuals : list
        Iterations and final relative residual of each backward CG solve (empty for unrolled).
    """

    method: str
    log_penalty: torch.Tensor
    params: Params
    validation_losses: list[float]
    seconds: float
    backward_iterations: list[int] = field(default_factory=list)
    backward_residuals: list[float] = field(default_factory=list)


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

    Parameters
    ----------
    split : StandardizedSplit
        Data; the inner problem uses ``x_train``, the outer loss ``x_val``.
    config : RegularizationConfig
    method : str
        ``"implicit"`` (L-BFGS + implicit differentiation) or ``"unrolled"`` (autograd through
        ``config.unrolled_steps`` gradient-descent steps, warm-started at the previous iterate).
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
    log_penalty = torch.full((split.n_features,), math.log(config.init_penalty), dtype=dtype, device=device)
    log_penalty.requires_grad_(True)
    optimizer = torch.optim.Adam([log_penalty], lr=config.outer_lr)
    params = init_params(split.n_features, split.n_classes, dtype=dtype, device=device)
    exact = params
    losses: list[float] = []
    iterations: list[int] = []
    residuals: list[float] = []
    seconds = 0.0
    bar = progress_bar(config.outer_steps, f"{config.dataset}: {method} hypergradient descent", unit="step",
                       enabled=progress)
    for _ in range(config.outer_steps):
        if method == "unrolled":  # judge the run by the model its penalties really give, not the truncated iterate
            exact = _exact_fit(log_penalty, exact, split, config)
            losses.append(float(validation_loss(exact, split.x_val, split.y_val)))
        start = time.perf_counter()
        with idiff.record_solves() as log:
            loss, grad, params = hypergradient(fit, log_penalty, params, split)
        optimizer.zero_grad()
        log_penalty.grad = grad
        optimizer.step()
        seconds += time.perf_counter() - start
        if method == "implicit":
            losses.append(float(loss))  # the inner solve is already exact
            for info in log:
                if info.kind == "backward":
                    iterations.append(int(info.iterations))
                    residuals.append(float(info.relative_residual))
        bar.set_postfix(val_loss=f"{float(loss):.4f}")
        bar.update(1)
    bar.close()
    final = _exact_fit(log_penalty.detach(), exact if method == "unrolled" else params, split, config)
    losses.append(float(validation_loss(final, split.x_val, split.y_val)))
    return TuningRun(method, log_penalty.detach(), final, losses, seconds, iterations, residuals)


def sklearn_scalar_cv(split: StandardizedSplit, cs: list[float], *, tol: float = 1e-6) -> dict:
    """scikit-learn's ``LogisticRegressionCV`` choosing one scalar ``C`` on the same validation set.

    ``cv = [(train, val)]`` with ``refit=False`` makes it select ``C`` by validation log-loss and keep
    the model trained on the training set only: the same protocol as the hypergradient runs. In our
    parametrization ``C`` is the scalar penalty ``1 / (C * n_train)`` on every feature.

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


def _start_hypergradient_errors(split: StandardizedSplit, config: RegularizationConfig) -> dict[str, float]:
    """Relative error of each method's first hypergradient against a dense float64 solve."""
    from .dense_reference import minimizer_hypergradient

    dtype, device = split.x_train.dtype, split.x_train.device
    log_penalty = torch.full((split.n_features,), math.log(config.init_penalty), dtype=dtype, device=device)
    init = init_params(split.n_features, split.n_classes, dtype=dtype, device=device)
    solution = _exact_fit(log_penalty, init, split, config)
    reference = minimizer_hypergradient(
        inner_objective,
        lambda w, h, x, y: validation_loss(w, x, y),
        solution,
        log_penalty,
        (split.x_train, split.y_train),
        (split.x_val, split.y_val),
    )
    _, implicit_grad, _ = hypergradient(make_implicit_fit(config), log_penalty, init, split)
    _, unrolled_grad, _ = hypergradient(make_unrolled_fit(config), log_penalty, init, split)
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


def _plot_validation_curves(runs: list[TuningRun], sklearn_result: dict, title: str, path: Path) -> Path:
    fig, (ax,) = new_figure()
    for run_ in runs:
        ax.plot(run_.validation_losses, label=f"{run_.method} hypergradient")
    ax.axhline(sklearn_result["validation_loss"], color="k", ls="--", label="LogisticRegressionCV (scalar C)")
    ax.set_xlabel("outer step (Adam)")
    ax.set_ylabel("validation cross-entropy")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def _plot_penalties(log_penalty: torch.Tensor, split: StandardizedSplit, path: Path) -> Path:
    values = (log_penalty / math.log(10.0)).cpu().numpy()
    if split.image_shape is not None:
        fig, (ax,) = new_figure(width=4.2, height=3.6)
        image = ax.imshow(values.reshape(split.image_shape), cmap="viridis")
        fig.colorbar(image, ax=ax, label="log10 penalty")
        ax.set_title("learned per-pixel L2 penalty")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        fig, (ax,) = new_figure(width=7.0)
        ax.bar(np.arange(len(values)), values)
        ax.set_xlabel("feature")
        ax.set_ylabel("log10 penalty")
        ax.set_title("learned per-feature L2 penalty")
    return save_figure(fig, path)


def run(config: RegularizationConfig, out_dir: Path, *, progress: bool = False) -> dict:
    """Run the full comparison on ``config.dataset`` and write ``<dataset>_*`` files to ``out_dir``.

    Writes ``<dataset>_results.json``, ``<dataset>_table.md``, ``<dataset>_validation_loss.png`` and
    ``<dataset>_penalties.png``; returns the JSON content. ``progress``: progress bars of the
    hypergradient-descent runs on stderr.

    Examples
    --------
    >>> cfg = RegularizationConfig(dataset="breast_cancer", max_samples=150, outer_steps=3, unrolled_steps=5)
    >>> results = run(cfg, Path("/tmp/reg_example"))  # doctest: +SKIP
    """
    torch.manual_seed(config.seed)
    split = load_split(config.dataset, seed=config.seed, max_samples=config.max_samples, device=config.device)
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
    for run_ in (implicit_run, unrolled_run):
        label = (
            "per-feature, implicit (L-BFGS + CG)"
            if run_.method == "implicit"
            else f"per-feature, unrolled ({config.unrolled_steps} GD steps)"
        )
        rows.append({"method": label, **_evaluate(run_.params, split), "seconds": run_.seconds})
    for row in rows:
        method = row["method"]
        key = "implicit" if "implicit" in method else "unrolled" if "unrolled" in method else None
        row["start hypergradient rel. error"] = gradient_errors[key] if key else "-"
        row["median CG iterations"] = int(np.median(implicit_run.backward_iterations)) if key == "implicit" else "-"
        row["max CG rel. residual"] = max(implicit_run.backward_residuals) if key == "implicit" else "-"

    prefix = config.dataset
    out_dir = Path(out_dir)
    table = markdown_table(rows)
    results = {
        "config": asdict(config),
        "split_sizes": {"train": len(split.y_train), "validation": len(split.y_val), "test": len(split.y_test)},
        "table": rows,
        "sklearn": sklearn_result,
        "start_hypergradient_relative_error": gradient_errors,
        "validation_losses": {r.method: r.validation_losses for r in (implicit_run, unrolled_run)},
        "backward_cg_iterations": implicit_run.backward_iterations,
        "backward_cg_relative_residuals": implicit_run.backward_residuals,
        "learned_log10_penalty": {
            r.method: (r.log_penalty / math.log(10.0)).cpu().tolist() for r in (implicit_run, unrolled_run)
        },
    }
    write_json(results, out_dir / f"{prefix}_results.json")
    write_text(table, out_dir / f"{prefix}_table.md")
    _plot_validation_curves(
        [implicit_run, unrolled_run],
        sklearn_result,
        f"{prefix}: per-feature L2 penalties",
        out_dir / f"{prefix}_validation_loss.png",
    )
    _plot_penalties(implicit_run.log_penalty, split, out_dir / f"{prefix}_penalties.png")
    return results
