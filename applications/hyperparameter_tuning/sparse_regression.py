"""Lasso and elastic-net penalties tuned by hypergradient descent on the validation error.

Inner problem (training split, ``n`` samples, standardized features and target)::

    w*(lam, gamma) = argmin_w  0.5 * ||X w - y||^2 / n + lam * ||w||_1 + 0.5 * gamma * ||w||^2

(the lasso is ``gamma = 0``; ``lam`` may be one number or one penalty per feature). It is
solved by :func:`implicitdiff.fista` inside :func:`implicitdiff.implicit_diff` with
:func:`implicitdiff.proximal_gradient_condition`, so the derivative of ``w*`` with respect to
the penalties comes from the fixed point of the proximal gradient step (a GMRES solve), not
from the FISTA iterations. The smooth part is written with the Gram matrix
``G = X^T X / n`` and ``c = X^T y / n`` (``0.5 w^T G w - c^T w``, equal to the least-squares
term up to a constant), so an inner iteration costs ``O(d^2)`` whatever ``n``.

Outer problem: the validation mean squared error of ``w*``, minimized by Adam on the
log-penalties for a fixed number of steps, warm-starting each inner solve at the previous
solution.

Baselines on the same splits: scikit-learn's ``LassoCV`` and ``ElasticNetCV`` with the
validation split as the one fixed holdout fold (``cv=[(train, val)]``): they pick the
penalty on the validation split, and the chosen model is then refit on the **training split
only** (scikit-learn's own ``refit`` would train on train + validation), so every row of the
table is a model trained on the same data and selected on the same data.
scikit-learn's penalties are ours: ``alpha = lam`` for the lasso, and
``lam = alpha * l1_ratio``, ``gamma = alpha * (1 - l1_ratio)`` for the elastic net.

Datasets: scikit-learn's bundled ``diabetes`` (442 samples, 10 features), and ``digits``
used as a regression of the digit's value (0-9) on its 64 pixels. scikit-learn bundles no
other regression set of useful size (``linnerud`` has 20 samples; ``california_housing`` is
a download), and digits has what the per-feature variant needs: many features, a dozen of
them constant or nearly so, and strongly correlated neighbouring pixels. A linear model is a
poor predictor of the digit's value; the point is the comparison of tuning methods on fixed
data, not the model.

Run ``python -m applications.hyperparameter_tuning.sparse_regression --quick``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import implicitdiff as idiff
from implicitdiff import prox

from .reporting import markdown_table, write_json, write_text

__all__ = [
    "RegressionSplit",
    "load_regression_split",
    "SparseConfig",
    "smooth_loss",
    "make_fit",
    "lasso_closed_form_hypergradient",
    "validation_mse",
    "tune",
    "sklearn_lasso_cv",
    "sklearn_elastic_net_cv",
    "compare",
    "main",
]

DTYPE = torch.float64
TABLE_COLUMNS = [
    "dataset", "method", "hyperparameters", "validation MSE", "test MSE", "nonzeros", "inner fits", "seconds",
]


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class RegressionSplit:
    """Train / validation / test split, features and target standardized with training statistics.

    ``y`` is centred and scaled by the training mean and standard deviation, so the model has no
    intercept and an MSE of 1 is the error of predicting the training mean.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes, load_digits

    if name == "diabetes":
        bunch = load_diabetes()
    elif name == "digits":
        bunch = load_digits()
    else:
        raise ValueError(f"unknown dataset {name!r}; expected 'diabetes' or 'digits'")
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.float64)


def load_regression_split(
    name: str = "diabetes", *, seed: int = 0, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
) -> RegressionSplit:
    """A random (seeded) train / validation / test split of a bundled dataset, standardized on train.

    Examples
    --------
    >>> split = load_regression_split("diabetes", seed=0)
    >>> split.x_train.shape, split.x_val.shape, split.x_test.shape
    (torch.Size([221, 10]), torch.Size([110, 10]), torch.Size([111, 10]))
    """
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    x, y = _raw(name)
    order = np.random.default_rng(seed).permutation(len(y))
    n_train = int(round(fractions[0] * len(y)))
    n_val = int(round(fractions[1] * len(y)))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    mean, scale = x[parts[0]].mean(0), x[parts[0]].std(0)
    scale[scale == 0] = 1.0
    y_mean, y_scale = y[parts[0]].mean(), y[parts[0]].std()

    def tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor((x[rows] - mean) / scale, dtype=DTYPE),
                torch.as_tensor((y[rows] - y_mean) / y_scale, dtype=DTYPE))

    (xt, yt), (xv, yv), (xs, ys) = (tensors(p) for p in parts)
    return RegressionSplit(name, xt, yt, xv, yv, xs, ys)


# ----------------------------------------------------------------------------- model
def smooth_loss(w: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``0.5 w^T G w - c^T w``: the least-squares term ``0.5 ||X w - y||^2 / n`` up to a constant."""
    return 0.5 * w @ (G @ w) - c @ w


def lasso_prox(x: torch.Tensor, log_lam: torch.Tensor, scaling: Any = 1.0) -> torch.Tensor:
    """Soft thresholding with ``lam = exp(log_lam)`` (a scalar or one per feature)."""
    return prox.l1(x, log_lam.exp(), scaling)


def elastic_net_prox(x: torch.Tensor, log_params: torch.Tensor, scaling: Any = 1.0) -> torch.Tensor:
    """Elastic-net prox with ``(lam, gamma) = exp(log_params)`` (``log_params``: 2 entries, or ``d + 1``
    entries: one ``lam`` per feature and a shared ``gamma``)."""
    return prox.elastic_net(x, (log_params[:-1].exp(), log_params[-1].exp()), scaling)


def gram(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``G = X^T X / n``, ``c = X^T y / n`` and the step ``1 / lambda_max(G)``."""
    G = x.T @ x / x.shape[0]
    c = x.T @ y / x.shape[0]
    return G, c, 1.0 / float(torch.linalg.eigvalsh(G).max())


@dataclass
class SparseConfig:
    """Settings of the tuning runs.

    Attributes
    ----------
    outer_steps, outer_lr : int, float
        Adam steps and learning rate on the log-penalties.
    init_lam, init_gamma : float
        Starting penalties.
    inner_maxiter : int
        FISTA budget per inner solve (warm-started).
    inner_tol : float or None
        FISTA's tolerance (``None``: its default, ``3.7e-11`` in float64).
    gmres_tol : float
        Tolerance of the backward GMRES solve.
    n_alphas : int
        Grid size of the scikit-learn baselines.
    l1_ratios : tuple of float
        ``ElasticNetCV``'s grid of ``l1_ratio``.
    """

    outer_steps: int = 60
    outer_lr: float = 0.1
    init_lam: float = 0.01
    init_gamma: float = 0.1
    inner_maxiter: int = 50_000
    inner_tol: float | None = None
    gmres_tol: float = 1e-12
    n_alphas: int = 100
    l1_ratios: tuple[float, ...] = (0.1, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0)


def make_fit(kind: str, step: float, config: SparseConfig | None = None) -> idiff.ImplicitFunction:
    """The differentiable inner solver ``fit(w0, log_params, G, c) -> w*``.

    ``kind``: ``"lasso"`` (``log_params`` = log lam, scalar or per feature) or ``"elastic_net"``
    (``log_params`` = ``[log lam..., log gamma]``). ``step``: ``1 / lambda_max(G)``, the FISTA
    step and the condition's (so the backward Jacobian is well scaled).
    """
    config = config or SparseConfig()
    penalty = {"lasso": lasso_prox, "elastic_net": elastic_net_prox}[kind]
    condition = idiff.proximal_gradient_condition(smooth_loss, penalty, stepsize=step)

    @idiff.implicit_diff(condition, solver=idiff.GMRES(tol=config.gmres_tol, maxiter=1000))
    def fit(w0: torch.Tensor, log_params: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        result = idiff.fista(smooth_loss, penalty, w0, log_params.detach(), G, c, stepsize=step,
                             maxiter=config.inner_maxiter, tol=config.inner_tol)
        return result.x

    return fit


def validation_mse(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``x @ w`` (the outer loss)."""
    return ((x @ w - y) ** 2).mean()


def lasso_closed_form_hypergradient(
    w: torch.Tensor, log_lam: torch.Tensor, G: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
    gamma: float = 0.0,
) -> torch.Tensor:
    r"""Exact d validation_mse(w*) / d log lam from the active set of the solution ``w``.

    On the support :math:`S` the solution is :math:`w_S = (G_{SS} + \gamma I)^{-1}(c_S - \lambda_S s_S)`
    with :math:`s = \operatorname{sign}(w)`, so :math:`\partial w_S/\partial\log\lambda_j =
    -(G_{SS} + \gamma I)^{-1} e_j \lambda_j s_j` and the hypergradient is
    :math:`-\lambda_S \odot s_S \odot (G_{SS} + \gamma I)^{-1} g_S` with :math:`g` the validation
    gradient (zero off the support). Returns a tensor shaped like ``log_lam`` (a scalar lam:
    the sum over the support).
    """
    support = w != 0
    g = torch.func.grad(validation_mse)(w, x_val, y_val)[support]
    s = torch.sign(w[support])
    lam = log_lam.exp().expand_as(w)[support]
    u = torch.linalg.solve(G[support][:, support] + gamma * torch.eye(int(support.sum()), dtype=w.dtype), g)
    per_feature = torch.zeros_like(w)
    per_feature[support] = -lam * s * u
    return per_feature.sum() if log_lam.dim() == 0 else per_feature


# ----------------------------------------------------------------------------- tuning
@dataclass
class TuningResult:
    method: str
    log_params: torch.Tensor
    w: torch.Tensor
    validation_losses: list[float]
    inner_fits: int
    seconds: float


def tune(split: RegressionSplit, kind: str, per_feature: bool, config: SparseConfig) -> TuningResult:
    """Adam on the log-penalties, following the implicit hypergradient of the validation MSE.

    ``validation_losses`` holds the loss before each step and after the last (``outer_steps + 1``
    entries); ``inner_fits`` counts the FISTA solves (``outer_steps + 1``).
    """
    start = time.perf_counter()
    G, c, step = gram(split.x_train, split.y_train)
    fit = make_fit(kind, step, config)
    d = split.n_features
    n_lam = d if per_feature else 1
    init = [math.log(config.init_lam)] * n_lam + ([math.log(config.init_gamma)] if kind == "elastic_net" else [])
    log_params = torch.tensor(init, dtype=DTYPE)
    if kind == "lasso" and not per_feature:
        log_params = log_params[0]
    log_params.requires_grad_(True)
    optimizer = torch.optim.Adam([log_params], lr=config.outer_lr)
    w = torch.zeros(d, dtype=DTYPE)
    losses: list[float] = []
    for _ in range(config.outer_steps):
        w_new = fit(w, log_params, G, c)
        loss = validation_mse(w_new, split.x_val, split.y_val)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        w = w_new.detach()
    with torch.no_grad():
        w = fit(w, log_params.detach(), G, c)
    losses.append(float(validation_mse(w, split.x_val, split.y_val)))
    label = {"lasso": "lasso", "elastic_net": "elastic net"}[kind]
    method = f"hypergradient {label}, " + ("one lam per feature" if per_feature else "scalar")
    return TuningResult(method, log_params.detach(), w, losses, config.outer_steps + 1, time.perf_counter() - start)


# ----------------------------------------------------------------------------- baselines
def _numpy(split: RegressionSplit) -> dict[str, np.ndarray]:
    return {k: getattr(split, k).numpy() for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}


def _holdout(a: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    n_train, n_val = len(a["y_train"]), len(a["y_val"])
    folds = [(np.arange(n_train), np.arange(n_train, n_train + n_val))]
    return np.concatenate([a["x_train"], a["x_val"]]), np.concatenate([a["y_train"], a["y_val"]]), folds


def sklearn_lasso_cv(split: RegressionSplit, config: SparseConfig) -> dict[str, Any]:
    """``LassoCV`` on the validation holdout, the chosen alpha refit on the training split only."""
    from sklearn.linear_model import Lasso, LassoCV

    a = _numpy(split)
    x, y, folds = _holdout(a)
    start = time.perf_counter()
    cv = LassoCV(alphas=config.n_alphas, cv=folds, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(x, y)
    model = Lasso(alpha=cv.alpha_, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(a["x_train"], a["y_train"])
    seconds = time.perf_counter() - start
    return {"method": "sklearn LassoCV (validation holdout)", "coef": model.coef_, "hyperparameters": 1,
            "inner_fits": len(cv.alphas_) + 1, "seconds": seconds, "alpha": float(cv.alpha_)}


def sklearn_elastic_net_cv(split: RegressionSplit, config: SparseConfig) -> dict[str, Any]:
    """``ElasticNetCV`` over ``(alpha, l1_ratio)`` on the validation holdout, refit on train only."""
    from sklearn.linear_model import ElasticNet, ElasticNetCV

    a = _numpy(split)
    x, y, folds = _holdout(a)
    start = time.perf_counter()
    cv = ElasticNetCV(l1_ratio=list(config.l1_ratios), alphas=config.n_alphas, cv=folds, fit_intercept=False,
                      tol=1e-10, max_iter=100_000).fit(x, y)
    model = ElasticNet(alpha=cv.alpha_, l1_ratio=cv.l1_ratio_, fit_intercept=False, tol=1e-10,
                       max_iter=100_000).fit(a["x_train"], a["y_train"])
    seconds = time.perf_counter() - start
    return {"method": "sklearn ElasticNetCV (validation holdout)", "coef": model.coef_, "hyperparameters": 2,
            "inner_fits": int(np.size(cv.alphas_)) + 1, "seconds": seconds, "alpha": float(cv.alpha_),
            "l1_ratio": float(cv.l1_ratio_)}


def _row(split: RegressionSplit, method: str, w: torch.Tensor, hyperparameters: int, fits: int,
         seconds: float) -> dict[str, Any]:
    w = torch.as_tensor(np.asarray(w), dtype=DTYPE)
    return {
        "dataset": split.name,
        "method": method,
        "hyperparameters": hyperparameters,
        "validation MSE": float(validation_mse(w, split.x_val, split.y_val)),
        "test MSE": float(validation_mse(w, split.x_test, split.y_test)),
        "nonzeros": int((w != 0).sum()),
        "inner fits": fits,
        "seconds": seconds,
    }


def compare(dataset: str, config: SparseConfig, seed: int = 0) -> list[dict[str, Any]]:
    """The table rows of one dataset: the start point, the two scikit-learn baselines and the
    three hypergradient runs (scalar lasso, scalar elastic net, per-feature lasso)."""
    split = load_regression_split(dataset, seed=seed)
    G, c, step = gram(split.x_train, split.y_train)
    with torch.no_grad():
        w0 = make_fit("lasso", step, config)(torch.zeros(split.n_features, dtype=DTYPE),
                                               torch.tensor(math.log(config.init_lam), dtype=DTYPE), G, c)
    rows = [_row(split, f"start: lasso, lam = {config.init_lam:g}", w0, 0, 1, 0.0)]
    for baseline in (sklearn_lasso_cv(split, config), sklearn_elastic_net_cv(split, config)):
        rows.append(_row(split, baseline["method"], baseline["coef"], baseline["hyperparameters"],
                         baseline["inner_fits"], baseline["seconds"]))
    for kind, per_feature in (("lasso", False), ("elastic_net", False), ("lasso", True)):
        result = tune(split, kind, per_feature, config)
        rows.append(_row(split, result.method, result.w, result.log_params.numel(), result.inner_fits,
                         result.seconds))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 outer steps, diabetes and digits")
    parser.add_argument("--datasets", nargs="+", default=["diabetes", "digits"])
    parser.add_argument("--outer-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write sparse_regression.{json,md} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = SparseConfig(outer_steps=args.outer_steps or (20 if args.quick else 60))
    rows = [row for name in args.datasets for row in compare(name, config, seed=args.seed)]
    table = markdown_table(rows, TABLE_COLUMNS)
    print(table)
    if args.out is not None:
        write_json({"config": asdict(config), "seed": args.seed, "rows": rows}, args.out / "sparse_regression.json")
        write_text(table, args.out / "sparse_regression.md")
    return rows


if __name__ == "__main__":
    main()
