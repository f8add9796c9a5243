"""Kernel SVM: the regularization C and the RBF width tuned by hypergradient descent on the SVM dual.

Inner problem (training split, ``n`` samples, labels ``y`` in {-1, +1}, standardized features)::

    alpha*(C, gamma) = argmin_alpha  0.5 * alpha^T (y y^T * K_gamma) alpha - 1^T alpha
                       s.t.  0 <= alpha <= C,  y^T alpha = 0,

the dual of the soft-margin SVM with the RBF kernel ``K_gamma(i, j) = exp(-gamma ||x_i - x_j||^2)``.
The hyperparameters are ``theta = (log C, log gamma)``, so both stay positive. ``alpha*`` is
characterized by :func:`implicitdiff.projected_gradient_condition` with
:func:`implicitdiff.projections.box_section` (the set ``{0 <= alpha <= C, y^T alpha = 0}``, params
``(0, C, y, 0)``): ``C`` enters through the projection's parameters, ``gamma`` through the
objective's arguments, and the derivative of ``alpha*`` with respect to both comes from one GMRES
solve with the Jacobian of the projected-gradient fixed point, not from the solver's iterations.

The inner solver (:func:`solve_dual`) is :func:`implicitdiff.projected_gradient` (accelerated, with
adaptive restart, fixed step ``1 / lambda_max(K)``), run in rounds of tightening tolerance
(``1e-4``, ``1e-5``, ...); after each round the solution is **polished**: a few primal-dual
active-set steps solve the KKT system of the free block exactly (bound coordinates fixed at 0 or
C, :func:`active_set_solution`), and the result is accepted only if it is feasible and its
projected-gradient residual is at most ``1e-13 * max(1, ||alpha||)``: the solution is then exact
to rounding, which the implicit gradient needs (it is right only at a solution). Otherwise
projected gradient goes on, down to its own tolerance ``1e-12``. The residual of every solve is
recorded and checked by the decorator's optimality check, so the inner accuracy is reported, not
assumed (``--no-polish`` runs projected gradient alone).

Outer problem: the validation **logistic loss of the decision function**
``f(x) = sum_i alpha_i y_i K(x_i, x) + b`` (a smooth surrogate: the 0-1 loss has a zero gradient
almost everywhere), minimized by Adam on ``(log C, log gamma)`` for a fixed number of steps from
scikit-learn's defaults (``C = 1``, ``gamma = 1 / d``, which is ``gamma="scale"`` on standardized
features), warm-starting each inner solve at the previous solution. The bias ``b`` is recovered
from ``alpha*`` differentiably (:func:`intercept`): the mean of ``y_i - sum_j alpha_j y_j K_ij``
over the free support vectors ``0 < alpha_i < C`` (at an exact solution every free support vector
gives the same value, the multiplier of ``y^T alpha = 0``); when there is none, the midpoint of
the interval of biases that the bound support vectors allow, which is what libsvm does.

Baseline on the same splits: ``sklearn.svm.SVC(kernel="rbf")`` fitted on the training split at
every point of a C x gamma grid, selected on the validation split by validation accuracy (the
usual choice, ``GridSearchCV``'s default scoring, first best point on ties) and by the same
validation logistic loss; every grid model is trained on the training split only, so the selected
model needs no refit, and every row of the table is a model trained on the same data and selected
on the same data.

Data: scikit-learn's bundled ``breast_cancer`` (569 samples, 30 features, benign = +1), split
50 / 25 / 25 % (stratified, seed 0) by :func:`applications.hyperparameter_tuning.datasets.load_split`.

Run ``python -m applications.hyperparameter_tuning svm-dual --quick`` (or
``python -m applications.hyperparameter_tuning.svm_dual --quick``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import implicitdiff as idiff
from implicitdiff import projections

from ..progress import progress_bar
from .datasets import load_split
from .reporting import markdown_table, new_figure, save_figure, write_json, write_text

__all__ = [
    "SVMProblem",
    "load_problem",
    "check_labels",
    "SVMConfig",
    "rbf_kernel",
    "dual_objective",
    "active_set_solution",
    "InnerInfo",
    "solve_dual",
    "make_fit",
    "fit_dual",
    "intercept",
    "decision_values",
    "logistic_loss",
    "SVMSolution",
    "solve",
    "hypergradient",
    "finite_difference_hypergradient",
    "dense_kkt_hypergradient",
    "gradient_check",
    "TuningResult",
    "tune",
    "grid_search",
    "compare",
    "tables",
    "run",
    "quick_config",
    "main",
]

DTYPE = torch.float64
TABLE_COLUMNS = [
    "method", "C", "gamma", "validation loss", "validation accuracy", "test loss", "test accuracy", "SVM fits",
    "seconds", "CPU seconds",
]
GRADIENT_COLUMNS = ["hypergradient", "d loss / d log C", "d loss / d log gamma", "rel. error vs implicit", "seconds"]


# ----------------------------------------------------------------------------- data
def check_labels(y: torch.Tensor, name: str = "y") -> None:
    """Raise ``ValueError`` unless ``y`` is a 1-D floating tensor of -1 / +1 with both classes present."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or not y.is_floating_point():
        raise ValueError(f"{name} must be a 1-D floating tensor of labels in {{-1, +1}}, got {_describe(y)}")
    values = set(torch.unique(y).tolist())
    if not values <= {-1.0, 1.0}:
        raise ValueError(f"{name}: SVM labels must be -1 or +1, got the values {sorted(values)[:10]}")
    if values != {-1.0, 1.0}:
        raise ValueError(f"{name}: both classes (-1 and +1) must be present, got only {sorted(values)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` (exact differences, not the Gram-matrix shortcut: the diagonal is exactly 0)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2


@dataclass(frozen=True)
class SVMProblem:
    """A train / validation / test split prepared for the kernel SVM.

    Features are standardized with training statistics (by ``load_split``); labels are -1 / +1.
    The squared distances to the training points are computed once: the kernel of any ``gamma`` is
    ``exp(-gamma * sq_*)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    sq_train: torch.Tensor  # (n_train, n_train)
    sq_val: torch.Tensor  # (n_val, n_train)
    sq_test: torch.Tensor  # (n_test, n_train)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @classmethod
    def from_arrays(
        cls, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
        x_test: torch.Tensor, y_test: torch.Tensor, name: str = "custom",
    ) -> SVMProblem:
        """Build a problem from tensors (labels in {-1, +1}); checks shapes and labels."""
        parts = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
        for part, (x, y) in parts.items():
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
                raise ValueError(f"x_{part} must be a 2-D floating tensor (samples, features), got {_describe(x)}")
            check_labels(y, f"y_{part}")
            if x.shape[0] != y.shape[0] or x.shape[1] != x_train.shape[1] or y.dtype != x.dtype:
                raise ValueError(f"x_{part} {tuple(x.shape)} and y_{part} {tuple(y.shape)} do not match the "
                                 f"training features ({x_train.shape[1]}) or each other (rows, dtype)")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"x_{part} has non-finite entries")
        return cls(name, x_train, y_train, x_val, y_val, x_test, y_test, _squared_distances(x_train, x_train),
                   _squared_distances(x_val, x_train), _squared_distances(x_test, x_train))


def load_problem(seed: int = 0, max_samples: int | None = None, device: str | torch.device = "cpu") -> SVMProblem:
    """``breast_cancer`` split 50 / 25 / 25 % (stratified, seeded), standardized on train, benign = +1.

    Examples
    --------
    >>> problem = load_problem(seed=0)
    >>> problem.n_train, problem.n_features, problem.sq_val.shape
    (284, 30, torch.Size([142, 284]))
    """
    split = load_split("breast_cancer", seed=seed, max_samples=max_samples, dtype=DTYPE, device=device)

    def signs(labels: torch.Tensor) -> torch.Tensor:
        return (2 * labels - 1).to(DTYPE)

    return SVMProblem.from_arrays(split.x_train, signs(split.y_train), split.x_val, signs(split.y_val),
                                  split.x_test, signs(split.y_test), name="breast_cancer")


# ----------------------------------------------------------------------------- configuration
@dataclass
class SVMConfig:
    """Settings of the runs.

    Attributes
    ----------
    outer_steps, outer_lr : int, float
        Adam steps and learning rate on ``(log C, log gamma)``.
    init_C, init_gamma : float or None
        Start of the descent; ``init_gamma=None`` is ``1 / d`` (scikit-learn's ``gamma="scale"`` on
        standardized features).
    inner_maxiter : int
        Projected-gradient budget per inner solve (all chunks together).
    inner_tol : float
        Projected gradient's final stopping tolerance (relative step length), reached when
        polishing is off or never succeeds.
    polish : bool
        Polish with active-set steps between rounds of projected gradient (see :func:`solve_dual`).
    polish_start_tol : float
        Projected gradient's tolerance in the first round (divided by 10 at each further round).
    polish_steps : int
        Active-set steps per polishing attempt.
    polish_tol : float
        A polished point is accepted when its projected-gradient residual is at most this times
        ``max(1, ||alpha||)``.
    gmres_tol, gmres_restart, gmres_maxiter
        The backward GMRES solve (``restart`` above the number of free support vectors makes it
        exact in one cycle).
    fd_step : float
        Step of the central finite differences in ``(log C, log gamma)`` for the gradient check.
    grid_C, grid_gamma : list of float
        The baseline grid (scikit-learn ``SVC`` at every pair).
    sklearn_tol : float
        libsvm's stopping tolerance in the grid search (scikit-learn's default 1e-3).
    max_samples : int or None
        Subsample the dataset (stratified) before splitting.
    """

    outer_steps: int = 60
    outer_lr: float = 0.2
    init_C: float = 1.0
    init_gamma: float | None = None
    inner_maxiter: int = 100_000
    inner_tol: float = 1e-12
    polish: bool = True
    polish_start_tol: float = 1e-4
    polish_steps: int = 5
    polish_tol: float = 1e-13
    gmres_tol: float = 1e-12
    gmres_restart: int = 200
    gmres_maxiter: int = 2000
    fd_step: float = 1e-4
    grid_C: list[float] = field(default_factory=lambda: [10.0 ** (e / 2) for e in range(-2, 9)])
    grid_gamma: list[float] = field(default_factory=lambda: [10.0 ** (e / 2) for e in range(-10, 1)])
    sklearn_tol: float = 1e-3
    max_samples: int | None = None

    def __post_init__(self) -> None:
        positive = ("outer_lr", "init_C", "inner_tol", "polish_start_tol", "polish_tol", "gmres_tol", "fd_step",
                    "sklearn_tol")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"SVMConfig.{name} must be a positive finite number, got {value!r}")
        if self.init_gamma is not None and not (math.isfinite(self.init_gamma) and self.init_gamma > 0):
            raise ValueError(f"SVMConfig.init_gamma must be positive (or None for 1 / d), got {self.init_gamma!r}")
        for name in ("outer_steps", "inner_maxiter", "polish_steps", "gmres_restart", "gmres_maxiter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "outer_steps" else 1):
                raise ValueError(f"SVMConfig.{name} must be a positive int, got {value!r}")
        for name in ("grid_C", "grid_gamma"):
            values = getattr(self, name)
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"SVMConfig.{name} must be a non-empty list of positive numbers, got {values!r}")

    def start(self, n_features: int) -> tuple[float, float]:
        """The starting ``(C, gamma)``."""
        return self.init_C, (1.0 / n_features if self.init_gamma is None else self.init_gamma)


# ----------------------------------------------------------------------------- inner problem
def rbf_kernel(sqdist: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """``exp(-gamma * sqdist)`` with ``gamma = exp(log_gamma)``."""
    return torch.exp(-log_gamma.exp() * sqdist)


def dual_objective(alpha: torch.Tensor, log_gamma: torch.Tensor, sqdist: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``0.5 (alpha * y)^T K_gamma (alpha * y) - sum(alpha)``: the SVM dual's objective (to minimize)."""
    v = alpha * y
    return 0.5 * v @ (rbf_kernel(sqdist, log_gamma) @ v) - alpha.sum()


def _quadratic(alpha: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """The dual objective with ``Q = y y^T * K`` formed once (what the inner iterations use)."""
    return 0.5 * alpha @ (Q @ alpha) - alpha.sum()


def _box(C: Any, y: torch.Tensor) -> tuple[Any, Any, torch.Tensor, float]:
    """The parameters of :func:`implicitdiff.projections.box_section` for the SVM dual's feasible set."""
    return (0.0, C, y, 0.0)


def _hessian(K: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y[:, None] * y[None, :]) * K


def _step(K: torch.Tensor) -> float:
    """``1 / lambda_max(K)`` (``y y^T * K`` has the spectrum of ``K``, since ``y`` is -1 / +1)."""
    return 1.0 / float(torch.linalg.eigvalsh(K.detach()).max())


def _residual(alpha: torch.Tensor, Q: torch.Tensor, y: torch.Tensor, C: float, step: float) -> float:
    """``||alpha - P(alpha - step * grad)||``: the norm of the projected-gradient condition."""
    moved = alpha - step * (Q @ alpha - 1.0)
    return float(torch.linalg.vector_norm(alpha - projections.box_section(moved, _box(C, y))))


def active_set_solution(
    Q: torch.Tensor, y: torch.Tensor, C: Any, free: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The dual solution and bias on a given active set, by one dense KKT solve (differentiable).

    Bound coordinates are fixed (``alpha_i = C`` where ``upper``, 0 elsewhere off ``free``); the
    free block solves the equality-constrained system

    .. math::

        \begin{pmatrix} Q_{FF} & y_F \\ y_F^\top & 0 \end{pmatrix}
        \begin{pmatrix} \alpha_F \\ b \end{pmatrix} =
        \begin{pmatrix} 1 - Q_{FB}\alpha_B \\ -y_B^\top \alpha_B \end{pmatrix},

    whose multiplier ``b`` of :math:`y^\top\alpha = 0` is the SVM's bias. Written in torch
    operations, so autograd differentiates it with respect to ``Q`` and ``C``. Returns
    ``(alpha, b)``; ``b`` is ``None`` when there is no free coordinate.
    """
    C_t = torch.as_tensor(C, dtype=Q.dtype, device=Q.device)
    alpha_bound = torch.where(upper & ~free, C_t, torch.zeros((), dtype=Q.dtype, device=Q.device))
    index = torch.nonzero(free).reshape(-1)
    if index.numel() == 0:
        return alpha_bound, None
    k = index.numel()
    y_f = y[index]
    top = torch.cat([Q[index][:, index], y_f[:, None]], dim=1)
    bottom = torch.cat([y_f, torch.zeros(1, dtype=Q.dtype, device=Q.device)])[None, :]
    rhs = torch.cat([1.0 - Q[index] @ alpha_bound, -(y @ alpha_bound).reshape(1)])
    solution = torch.linalg.solve(torch.cat([top, bottom]), rhs)
    alpha = alpha_bound.index_put((index,), solution[:k])
    return alpha, solution[k]


def _polish(
    alpha: torch.Tensor, Q: torch.Tensor, y: torch.Tensor, C: float, step: float, config: SVMConfig
) -> torch.Tensor | None:
    """The exact solution on the active set, found by a few primal-dual active-set steps from ``alpha``.

    The first active set is that of one projected gradient step from ``alpha``; each step solves
    the KKT system on the current set (:func:`active_set_solution`) and re-reads the set from the
    step ``alpha - step * (Q alpha - 1 + b y)`` of the Lagrangian's gradient (a semismooth Newton
    step on the projected-gradient fixed point; Hintermueller, Ito and Kunisch 2002). Returns the
    solution once it is feasible with a projected-gradient residual of at most
    ``polish_tol * max(1, ||alpha||)``, else ``None`` (after ``polish_steps`` steps, a repeated
    set, or a singular free block).
    """
    box = _box(C, y)
    moved = projections.box_section(alpha - step * (Q @ alpha - 1.0), box)
    for _ in range(config.polish_steps):
        upper = moved >= C
        free = (moved > 0) & ~upper
        try:
            candidate, b = active_set_solution(Q, y, C, free, upper)
        except RuntimeError:  # a singular free block (duplicate points): no polishing on this set
            return None
        if not bool(torch.isfinite(candidate).all()):
            return None
        if bool((candidate >= 0).all()) and bool((candidate <= C).all()):
            scale = max(1.0, float(torch.linalg.vector_norm(candidate)))
            if _residual(candidate, Q, y, C, step) <= config.polish_tol * scale:
                return candidate
        gradient = Q @ candidate - 1.0
        if b is None:  # no free coordinate: the multiplier comes from the projection
            moved = projections.box_section(candidate - step * gradient, box)
        else:
            moved = candidate - step * (gradient + b * y)
        if torch.equal(moved >= C, upper) and torch.equal((moved > 0) & ~(moved >= C), free):
            return None  # the set repeats but its solution was rejected
    return None


@dataclass(frozen=True)
class InnerInfo:
    """How one inner solve went: projected-gradient iterations, whether the polished active-set
    solution was accepted, the final projected-gradient residual (step ``1 / lambda_max``)."""

    iterations: int
    polished: bool
    residual: float
    converged: bool


def solve_dual(
    Q: torch.Tensor, y: torch.Tensor, C: float, init: torch.Tensor, step: float, config: SVMConfig | None = None
) -> tuple[torch.Tensor, InnerInfo]:
    """Solve the SVM dual: projected gradient in rounds of tightening tolerance, each followed by a polish.

    ``Q = y y^T * K``, ``step = 1 / lambda_max(Q)``. Round ``r`` runs
    :func:`implicitdiff.projected_gradient` (accelerated, fixed step), warm-started at the previous
    round's end, to the tolerance ``polish_start_tol * 10^-r`` (never below ``inner_tol``), then
    tries :func:`_polish` (a few active-set steps). The polished point is returned as soon as it is
    accepted (feasible, residual at most ``polish_tol * max(1, ||alpha||)``); otherwise the rounds
    go on until projected gradient meets ``inner_tol`` or ``inner_maxiter`` iterations are spent.
    With ``polish=False``: projected gradient alone to ``inner_tol``. Not differentiable (see
    :func:`make_fit`).
    """
    config = config or SVMConfig()
    alpha = init.detach()
    iterations, polished, converged = 0, False, False
    tol = config.polish_start_tol if config.polish else config.inner_tol
    while iterations < config.inner_maxiter:
        tol = max(tol, config.inner_tol)
        result = idiff.projected_gradient(_quadratic, projections.box_section, alpha, _box(C, y), Q, stepsize=step,
                                          maxiter=config.inner_maxiter - iterations, tol=tol)
        iterations += result.iterations
        alpha = result.x
        if config.polish:
            candidate = _polish(alpha, Q, y, C, step, config)
            if candidate is not None:
                alpha, polished, converged = candidate, True, True
                break
        if result.converged and tol <= config.inner_tol:
            converged = True
            break
        tol *= 0.1
    return alpha, InnerInfo(iterations, polished, _residual(alpha, Q, y, C, step), converged)


def make_fit(step: float, config: SVMConfig | None = None) -> idiff.ImplicitFunction:
    """The differentiable inner solver ``fit(alpha0, params, log_gamma, sqdist, y) -> (alpha*, InnerInfo)``.

    ``params = (0, C, y, 0)`` are :func:`implicitdiff.projections.box_section`'s (``C`` a tensor to
    differentiate); ``log_gamma`` enters :func:`dual_objective` with the training squared distances.
    ``step`` is ``1 / lambda_max(K)``, the solver's step and the condition's (it does not move the
    solution; it scales the backward Jacobian).
    """
    config = config or SVMConfig()
    condition = idiff.projected_gradient_condition(dual_objective, projections.box_section, stepsize=step)
    solver = idiff.GMRES(tol=config.gmres_tol, restart=config.gmres_restart, maxiter=config.gmres_maxiter)

    @idiff.implicit_diff(condition, solver=solver, has_aux=True)
    def fit(alpha0: torch.Tensor, params: tuple[Any, ...], log_gamma: torch.Tensor, sqdist: torch.Tensor,
            y: torch.Tensor) -> tuple[torch.Tensor, InnerInfo]:
        C = float(params[1])
        Q = _hessian(rbf_kernel(sqdist, log_gamma), y)
        return solve_dual(Q, y, C, alpha0, step, config)

    return fit


def _check_positive(name: str, value: Any) -> float:
    number = float(value.detach()) if isinstance(value, torch.Tensor) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(number)


def fit_dual(
    x: torch.Tensor, y: torch.Tensor, C: float, gamma: float, config: SVMConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, InnerInfo]:
    """Fit the RBF SVM on ``(x, y)``: returns ``(alpha, b, info)`` (not differentiated; see :func:`solve`).

    Checks its inputs: ``y`` must be -1 / +1 with both classes, ``C`` and ``gamma`` positive.
    """
    C = _check_positive("C", C)
    gamma = _check_positive("gamma", gamma)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating tensor (samples, features), got {_describe(x)}")
    check_labels(y)
    if y.shape[0] != x.shape[0] or y.dtype != x.dtype:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have as many rows and the same dtype")
    K = rbf_kernel(_squared_distances(x, x), torch.tensor(math.log(gamma), dtype=x.dtype, device=x.device))
    alpha, info = solve_dual(_hessian(K, y), y, C, torch.zeros_like(y), _step(K), config)
    return alpha, intercept(alpha, K, y, C), info


def intercept(alpha: torch.Tensor, K: torch.Tensor, y: torch.Tensor, C: float) -> torch.Tensor:
    """The bias ``b`` of the decision function, differentiable through ``alpha`` and ``K``.

    With ``g_i = y_i - sum_j alpha_j y_j K_ij``: the mean of ``g`` over the free support vectors
    ``0 < alpha_i < C`` (all equal at an exact solution: ``b`` is the multiplier of
    ``y^T alpha = 0``). With no free support vector ``b`` is only confined to an interval by the
    bound ones (``alpha_i = 0``: ``y_i f(x_i) >= 1``; ``alpha_i = C``: ``y_i f(x_i) <= 1``), and
    its midpoint is returned, as libsvm does.
    """
    a = alpha.detach()
    g = y - K @ (alpha * y)
    free = (a > 0) & (a < C)
    if bool(free.any()):
        return g[free].mean()
    at_zero, at_c = a <= 0, a >= C
    lower = (at_zero & (y > 0)) | (at_c & (y < 0))  # b >= g_i
    upper = (at_zero & (y < 0)) | (at_c & (y > 0))  # b <= g_i
    bounds = [g[lower].max() if bool(lower.any()) else None, g[upper].min() if bool(upper.any()) else None]
    present = [v for v in bounds if v is not None]
    return sum(present) / len(present)  # type: ignore[return-value]


def decision_values(alpha: torch.Tensor, b: torch.Tensor, K_eval: torch.Tensor, y_train: torch.Tensor) -> torch.Tensor:
    """``f(x) = sum_i alpha_i y_i K(x_i, x) + b`` for the rows of ``K_eval`` (evaluation x training)."""
    return K_eval @ (alpha * y_train) + b


def logistic_loss(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean ``log(1 + exp(-y f))``: the outer objective."""
    return torch.nn.functional.softplus(-y * f).mean()


def _accuracy(f: torch.Tensor, y: torch.Tensor) -> float:
    return float(((f > 0) == (y > 0)).to(DTYPE).mean())


# ----------------------------------------------------------------------------- outer objective
@dataclass
class SVMSolution:
    """The trained SVM at ``(log C, log gamma)`` and its validation loss (a graph to the hyperparameters)."""

    loss: torch.Tensor
    alpha: torch.Tensor
    b: torch.Tensor
    info: InnerInfo
    step: float


def solve(
    problem: SVMProblem, log_C: torch.Tensor, log_gamma: torch.Tensor, alpha0: torch.Tensor | None = None,
    config: SVMConfig | None = None,
) -> SVMSolution:
    """Fit the SVM at ``(exp(log_C), exp(log_gamma))`` and evaluate the validation logistic loss.

    Differentiable with respect to ``log_C`` and ``log_gamma`` (implicit differentiation of the dual
    solution, autograd through the kernel and :func:`intercept`). ``alpha0``: warm start.
    """
    config = config or SVMConfig()
    C = log_C.exp()
    K = rbf_kernel(problem.sq_train, log_gamma)
    step = _step(K)
    init = torch.zeros_like(problem.y_train) if alpha0 is None else alpha0.detach()
    alpha, info = make_fit(step, config)(init, _box(C, problem.y_train), log_gamma, problem.sq_train, problem.y_train)
    b = intercept(alpha, K, problem.y_train, float(C.detach()))
    f = decision_values(alpha, b, rbf_kernel(problem.sq_val, log_gamma), problem.y_train)
    return SVMSolution(logistic_loss(f, problem.y_val), alpha, b, info, step)


def _evaluate(problem: SVMProblem, log_gamma: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        out = {}
        for part, sq, y in (("validation", problem.sq_val, problem.y_val), ("test", problem.sq_test, problem.y_test)):
            f = decision_values(alpha, b, rbf_kernel(sq, log_gamma), problem.y_train)
            out[f"{part} loss"] = float(logistic_loss(f, y))
            out[f"{part} accuracy"] = _accuracy(f, y)
    return out


def _theta(problem: SVMProblem, log_C: float, log_gamma: float,
           requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    device = problem.y_train.device
    return (torch.tensor(log_C, dtype=DTYPE, device=device, requires_grad=requires_grad),
            torch.tensor(log_gamma, dtype=DTYPE, device=device, requires_grad=requires_grad))


def hypergradient(
    problem: SVMProblem, log_C: float, log_gamma: float, alpha0: torch.Tensor | None = None,
    config: SVMConfig | None = None,
) -> tuple[float, torch.Tensor, SVMSolution]:
    """Validation loss and its implicit gradient with respect to ``(log C, log gamma)`` (a 2-vector)."""
    lc, lg = _theta(problem, log_C, log_gamma, requires_grad=True)
    solution = solve(problem, lc, lg, alpha0, config)
    grads = torch.autograd.grad(solution.loss, (lc, lg))
    return float(solution.loss.detach()), torch.stack([g.detach() for g in grads]), solution


def finite_difference_hypergradient(
    problem: SVMProblem, log_C: float, log_gamma: float, alpha0: torch.Tensor | None = None,
    config: SVMConfig | None = None, h: float | None = None,
) -> torch.Tensor:
    """Central finite differences of the validation loss in ``(log C, log gamma)`` (4 tight inner solves)."""
    config = config or SVMConfig()
    h = config.fd_step if h is None else h
    values = []
    with torch.no_grad():
        for d_c, d_g in ((h, 0.0), (-h, 0.0), (0.0, h), (0.0, -h)):
            solution = solve(problem, *_theta(problem, log_C + d_c, log_gamma + d_g), alpha0, config)
            values.append(float(solution.loss.detach()))
    return torch.tensor([(values[0] - values[1]) / (2 * h), (values[2] - values[3]) / (2 * h)], dtype=DTYPE,
                        device=problem.y_train.device)


def dense_kkt_hypergradient(problem: SVMProblem, log_C: float, log_gamma: float, alpha: torch.Tensor) -> torch.Tensor:
    """The hypergradient through :func:`active_set_solution` on the active set of the solution ``alpha``.

    The free support vectors ``0 < alpha_i < C`` solve the dense equality-constrained KKT system,
    the bound ones are fixed at 0 or ``C``; autograd differentiates the dense solve, the kernel and
    the bias. Valid where the active set is locally constant (strict complementarity).
    """
    lc, lg = _theta(problem, log_C, log_gamma, requires_grad=True)
    C = lc.exp()
    a = alpha.detach()
    c_value = float(C.detach())
    free, upper = (a > 0) & (a < c_value), a >= c_value
    K = rbf_kernel(problem.sq_train, lg)
    reference, _ = active_set_solution(_hessian(K, problem.y_train), problem.y_train, C, free, upper)
    b = intercept(reference, K, problem.y_train, c_value)
    f = decision_values(reference, b, rbf_kernel(problem.sq_val, lg), problem.y_train)
    grads = torch.autograd.grad(logistic_loss(f, problem.y_val), (lc, lg))
    return torch.stack([g.detach() for g in grads])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def gradient_check(problem: SVMProblem, config: SVMConfig, log_C: float | None = None,
                   log_gamma: float | None = None) -> dict[str, Any]:
    """The implicit hypergradient at the start against central finite differences and the dense KKT solve.

    Reports (no assertion) both gradients, their relative errors ``||g - g_implicit|| / ||g||``,
    the inner solution's residual and active set, and the backward GMRES solve.
    """
    C0, gamma0 = config.start(problem.n_features)
    log_C = math.log(C0) if log_C is None else log_C
    log_gamma = math.log(gamma0) if log_gamma is None else log_gamma
    start = time.perf_counter()
    with idiff.record_solves() as log:
        loss, implicit, solution = hypergradient(problem, log_C, log_gamma, None, config)
    implicit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fd = finite_difference_hypergradient(problem, log_C, log_gamma, solution.alpha.detach(), config)
    fd_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dense = dense_kkt_hypergradient(problem, log_C, log_gamma, solution.alpha)
    dense_seconds = time.perf_counter() - start
    alpha = solution.alpha.detach()
    C = math.exp(log_C)
    backward = [info for info in log if info.kind == "backward"]
    optimality = [info for info in log if info.kind == "optimality"]
    return {
        "log_C": log_C,
        "log_gamma": log_gamma,
        "validation_loss": loss,
        "implicit": implicit.tolist(),
        "finite_differences": fd.tolist(),
        "fd_step": config.fd_step,
        "dense_kkt": dense.tolist(),
        "relative_error_finite_differences": _relative(implicit, fd),
        "relative_error_dense_kkt": _relative(implicit, dense),
        "seconds": {"implicit": implicit_seconds, "finite_differences": fd_seconds, "dense_kkt": dense_seconds},
        "free_support_vectors": int(((alpha > 0) & (alpha < C)).sum()),
        "bound_support_vectors": int((alpha >= C).sum()),
        "inner_residual": solution.info.residual,
        "inner_polished": solution.info.polished,
        "inner_iterations": solution.info.iterations,
        "optimality_check_residual": optimality[0].residual_norm if optimality else None,
        "gmres_iterations": backward[0].iterations if backward else None,
        "gmres_relative_residual": backward[0].relative_residual if backward else None,
    }


def _gradient_rows(check: dict[str, Any]) -> list[dict[str, Any]]:
    seconds = check["seconds"]
    return [
        {"hypergradient": "implicit (GMRES, projected-gradient condition)", "d loss / d log C": check["implicit"][0],
         "d loss / d log gamma": check["implicit"][1], "rel. error vs implicit": 0.0, "seconds": seconds["implicit"]},
        {"hypergradient": f"central finite differences (h = {check['fd_step']:g})",
         "d loss / d log C": check["finite_differences"][0], "d loss / d log gamma": check["finite_differences"][1],
         "rel. error vs implicit": check["relative_error_finite_differences"],
         "seconds": seconds["finite_differences"]},
        {"hypergradient": "dense KKT solve on the active set", "d loss / d log C": check["dense_kkt"][0],
         "d loss / d log gamma": check["dense_kkt"][1], "rel. error vs implicit": check["relative_error_dense_kkt"],
         "seconds": seconds["dense_kkt"]},
    ]


# ----------------------------------------------------------------------------- tuning
@dataclass
class TuningResult:
    """A hypergradient run: final hyperparameters and model, and per-step records.

    ``log_C``/``log_gamma``/``validation_losses`` hold the point and loss before each step and after
    the last (``outer_steps + 1`` entries); ``inner_fits`` counts the inner solves.
    """

    method: str
    log_C: list[float]
    log_gamma: list[float]
    validation_losses: list[float]
    alpha: torch.Tensor
    b: torch.Tensor
    inner_fits: int
    seconds: float
    cpu_seconds: float
    inner_iterations: list[int]
    inner_residuals: list[float]
    polished: list[bool]
    gmres_iterations: list[int]
    optimality_residuals: list[float]


def tune(problem: SVMProblem, config: SVMConfig, *, progress: bool = False) -> TuningResult:
    """Adam on ``(log C, log gamma)`` following the implicit hypergradient of the validation logistic loss."""
    started, cpu_started = time.perf_counter(), time.process_time()
    C0, gamma0 = config.start(problem.n_features)
    theta = torch.tensor([math.log(C0), math.log(gamma0)], dtype=DTYPE, device=problem.y_train.device,
                         requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=config.outer_lr)
    alpha = torch.zeros_like(problem.y_train)
    result = TuningResult(f"hypergradient (Adam, {config.outer_steps} steps)", [], [], [], alpha, alpha.new_zeros(()),
                          config.outer_steps + 1, 0.0, 0.0, [], [], [], [], [])

    def record(point: torch.Tensor, solution: SVMSolution, log: list[idiff.SolveInfo]) -> None:
        result.log_C.append(float(point[0]))
        result.log_gamma.append(float(point[1]))
        result.validation_losses.append(float(solution.loss.detach()))
        result.inner_iterations.append(solution.info.iterations)
        result.inner_residuals.append(solution.info.residual)
        result.polished.append(solution.info.polished)
        result.gmres_iterations += [int(i.iterations) for i in log if i.kind == "backward" and i.iterations is not None]
        result.optimality_residuals += [float(i.residual_norm) for i in log
                                        if i.kind == "optimality" and i.residual_norm is not None]

    bar = progress_bar(config.outer_steps, f"{problem.name}: SVM dual hypergradient descent", unit="step",
                       enabled=progress)
    for _ in range(config.outer_steps):
        with idiff.record_solves() as log:
            solution = solve(problem, theta[0], theta[1], alpha, config)
            optimizer.zero_grad()
            solution.loss.backward()
        record(theta.detach(), solution, log)
        optimizer.step()
        alpha = solution.alpha.detach()
        bar.set_postfix(val_loss=f"{float(solution.loss.detach()):.4f}", C=f"{math.exp(float(theta[0].detach())):.3g}",
                        gamma=f"{math.exp(float(theta[1].detach())):.3g}")
        bar.update(1)
    bar.close()
    with idiff.record_solves() as log, torch.no_grad():
        solution = solve(problem, theta[0], theta[1], alpha, config)
    record(theta.detach(), solution, log)
    result.alpha, result.b = solution.alpha.detach(), solution.b.detach()
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu_started
    return result


# ----------------------------------------------------------------------------- baseline
def grid_search(problem: SVMProblem, config: SVMConfig, *, progress: bool = False) -> dict[str, Any]:
    """``sklearn.svm.SVC(kernel="rbf")`` on the training split at every ``(C, gamma)`` of the grid.

    Returns the validation loss / accuracy and test accuracy of every grid point (arrays of shape
    ``(len(grid_C), len(grid_gamma))``), the picks by validation accuracy (first best in grid order,
    as ``GridSearchCV``) and by validation logistic loss, and the wall time of all the fits and
    evaluations.
    """
    from sklearn.svm import SVC

    x_train, y_train = problem.x_train.cpu().numpy(), problem.y_train.cpu().numpy()
    parts = {"validation": (problem.x_val.cpu().numpy(), problem.y_val.cpu().numpy()),
             "test": (problem.x_test.cpu().numpy(), problem.y_test.cpu().numpy())}
    shape = (len(config.grid_C), len(config.grid_gamma))
    table = {f"{p} {m}": np.zeros(shape) for p in parts for m in ("loss", "accuracy")}
    bar = progress_bar(shape[0] * shape[1], f"{problem.name}: SVC grid search", unit="fit", enabled=progress)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, C in enumerate(config.grid_C):
        for j, gamma in enumerate(config.grid_gamma):
            model = SVC(C=C, kernel="rbf", gamma=gamma, tol=config.sklearn_tol).fit(x_train, y_train)
            for part, (x, y) in parts.items():
                f = model.decision_function(x)
                table[f"{part} loss"][i, j] = float(np.mean(np.logaddexp(0.0, -y * f)))
                table[f"{part} accuracy"][i, j] = float(np.mean((f > 0) == (y > 0)))
            bar.update(1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    bar.close()
    picks = {}
    for criterion, flat in (("validation accuracy", int(np.argmax(table["validation accuracy"]))),
                            ("validation loss", int(np.argmin(table["validation loss"])))):
        row, col = (int(k) for k in np.unravel_index(flat, shape))
        picks[criterion] = {"C": config.grid_C[row], "gamma": config.grid_gamma[col],
                            **{k: float(v[row, col]) for k, v in table.items()}}
    return {"grid_C": list(config.grid_C), "grid_gamma": list(config.grid_gamma), "fits": shape[0] * shape[1],
            "seconds": seconds, "cpu_seconds": cpu_seconds, "picks": picks, **{k: v.tolist() for k, v in table.items()}}


# ----------------------------------------------------------------------------- comparison
def compare(problem: SVMProblem, config: SVMConfig, *, progress: bool = False) -> dict[str, Any]:
    """The gradient check at the start, the grid search, the hypergradient run, and the table rows."""
    check = gradient_check(problem, config)
    C0, gamma0 = config.start(problem.n_features)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        lc, lg = _theta(problem, math.log(C0), math.log(gamma0))
        first = solve(problem, lc, lg, None, config)
    start_seconds, start_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rows = [{"method": "start (scikit-learn defaults: C = 1, gamma = 1/d)", "C": C0, "gamma": gamma0,
             **_evaluate(problem, lg, first.alpha, first.b), "SVM fits": 1, "seconds": start_seconds,
             "CPU seconds": start_cpu}]
    grid = grid_search(problem, config, progress=progress)
    for criterion, pick in grid["picks"].items():
        rows.append({"method": f"SVC grid search {len(config.grid_C)} x {len(config.grid_gamma)}, "
                               f"selected by {criterion}",
                     "C": pick["C"], "gamma": pick["gamma"],
                     **{k: pick[k] for k in ("validation loss", "validation accuracy", "test loss", "test accuracy")},
                     "SVM fits": grid["fits"], "seconds": grid["seconds"], "CPU seconds": grid["cpu_seconds"]})
    tuned = tune(problem, config, progress=progress)
    lg_final = torch.tensor(tuned.log_gamma[-1], dtype=DTYPE, device=problem.y_train.device)
    rows.append({"method": tuned.method, "C": math.exp(tuned.log_C[-1]), "gamma": math.exp(tuned.log_gamma[-1]),
                 **_evaluate(problem, lg_final, tuned.alpha, tuned.b), "SVM fits": tuned.inner_fits,
                 "seconds": tuned.seconds, "CPU seconds": tuned.cpu_seconds})
    return {"rows": rows, "gradient_check": check, "grid": grid, "tuning": tuned}


def _plot(results: dict[str, Any], path: Path) -> Path:
    grid, tuned = results["grid"], results["tuning"]
    fig, (ax,) = new_figure(width=6.4, height=4.8)
    log_c, log_g = np.log10(grid["grid_C"]), np.log10(grid["grid_gamma"])
    loss = np.asarray(grid["validation loss"])
    levels = np.quantile(loss, np.linspace(0, 1, 15))
    contour = ax.contourf(log_g, log_c, loss, levels=np.unique(levels), cmap="viridis_r")
    fig.colorbar(contour, ax=ax, label="validation logistic loss (SVC)")
    ln10 = math.log(10.0)
    ax.plot(np.asarray(tuned.log_gamma) / ln10, np.asarray(tuned.log_C) / ln10, color="tab:red", marker="o",
            markersize=3, markevery=1, linestyle="-", label="hypergradient (Adam)")
    points = [("start", tuned.log_gamma[0] / ln10, tuned.log_C[0] / ln10, "s", "white")]
    points += [(f"grid pick ({criterion})", math.log10(pick["gamma"]), math.log10(pick["C"]), marker, "tab:orange")
               for (criterion, pick), marker in zip(grid["picks"].items(), ("^", "D"))]
    for label, x, y, marker, color in points:
        ax.scatter([x], [y], marker=marker, s=70, color=color, edgecolors="black", zorder=5, clip_on=False,
                   label=label)
    ax.set_xlabel("log10 gamma")
    ax.set_ylabel("log10 C")
    ax.set_title("breast_cancer: RBF SVM, validation loss landscape and descent")
    ax.legend(loc="upper right", framealpha=0.9)
    return save_figure(fig, path)


def _json(results: dict[str, Any], config: SVMConfig, problem: SVMProblem, seed: int) -> dict[str, Any]:
    tuned: TuningResult = results["tuning"]
    trajectory = {k: getattr(tuned, k) for k in ("log_C", "log_gamma", "validation_losses", "inner_iterations",
                                                 "inner_residuals", "polished", "gmres_iterations",
                                                 "optimality_residuals")}
    return {
        "config": asdict(config),
        "seed": seed,
        "split_sizes": {"train": problem.n_train, "validation": int(problem.y_val.shape[0]),
                        "test": int(problem.y_test.shape[0])},
        "rows": results["rows"],
        "gradient_check": results["gradient_check"],
        "trajectory": trajectory,
        "grid": results["grid"],
        "environment": {"torch": torch.__version__, "scikit-learn": _sklearn_version(),
                        "torch_threads": torch.get_num_threads()},
    }


def _load_average() -> float | None:
    """The machine's 1-minute load average (other jobs slow the wall times down), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def tables(content: dict[str, Any]) -> str:
    """The markdown of a run: the comparison table and the gradient-check table (``svm_dual.md``)."""
    table = markdown_table(content["rows"], TABLE_COLUMNS)
    gradient_table = markdown_table(_gradient_rows(content["gradient_check"]), GRADIENT_COLUMNS)
    return f"{table}\n\nHypergradient at the start:\n\n{gradient_table}"


def run(config: SVMConfig, out_dir: Path | None, *, seed: int = 0, device: str | torch.device = "cpu",
        progress: bool = False) -> dict[str, Any]:
    """Run :func:`compare` on ``breast_cancer`` and write ``svm_dual.{json,md,png}`` to ``out_dir`` (if given).

    ``svm_dual.md`` holds the comparison table and the gradient-check table (:func:`tables`),
    ``svm_dual.png`` the descent over the grid search's validation-loss landscape. Returns the JSON
    content. ``progress``: progress bars of the grid search and the descent on stderr.
    """
    load_before = _load_average()
    problem = load_problem(seed=seed, max_samples=config.max_samples, device=device)
    results = compare(problem, config, progress=progress)
    content = _json(results, config, problem, seed)
    content["environment"]["load_average_1min"] = {"start": load_before, "end": _load_average()}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(content, out_dir / "svm_dual.json")
        write_text(tables(content), out_dir / "svm_dual.md")
        _plot(results, out_dir / "svm_dual.png")
    return content


def quick_config() -> SVMConfig:
    """The ``--quick`` settings: 200 samples (100 for training), 10 outer steps, a 5 x 5 grid."""
    return SVMConfig(outer_steps=10, outer_lr=0.2, max_samples=200, grid_C=[10.0**e for e in range(-1, 4)],
                     grid_gamma=[10.0**e for e in range(-4, 1)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 samples, 10 outer steps, a 5 x 5 grid")
    parser.add_argument("--outer-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-polish", action="store_true", help="projected gradient alone (no active-set solve)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=None, help="write svm_dual.{json,md,png} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = quick_config() if args.quick else SVMConfig()
    if args.outer_steps is not None:
        config.outer_steps = args.outer_steps
    config.polish = not args.no_polish
    content = run(config, args.out, seed=args.seed, progress=not args.no_progress)
    print(tables(content))
    return content


if __name__ == "__main__":
    main()
