"""Meta-learning algorithms: iMAML, MAML and first-order MAML as one meta-objective.

All three adapt the meta-parameters ``theta`` to a task's support set with an inner solver
and score the adapted parameters ``phi`` on the query set; they differ only in how the
gradient of the query loss reaches ``theta``, which is the ``mode`` of
:func:`implicitdiff.implicit_diff` applied to the inner solver with the proximal
optimality condition ``F(phi, theta) = grad L_train(phi) / lam + (phi - theta)``:

========  ==================================================  =========================
name      inner problem                                        meta-gradient (``mode``)
========  ==================================================  =========================
imaml     ``L_train(phi) + lam/2 ||phi - theta||^2``           ``(I + H/lam)^-1 g`` by CG
                                                               (``"implicit"``)
maml      K GD steps on ``L_train`` from ``theta``             backprop through the steps
                                                               (``"unrolled"``)
fomaml    K GD steps on ``L_train`` from ``theta``             ``g`` itself (``"one_step"``:
                                                               ``dF/dphi`` taken as ``I``)
========  ==================================================  =========================

with ``g = grad L_test(phi)``. There is no meta-gradient code here: the core computes it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as nnf

import implicitdiff as idiff

from .inner_solvers import GradientDescent, InnerSolver, LossFn, NewtonCG, Params

__all__ = ["ALGORITHMS", "AlgorithmConfig", "FunctionalModel", "MetaObjective", "TaskBatchResult", "task_type_of"]

ALGORITHMS = ("imaml", "maml", "fomaml")
#: The head weights that :attr:`AlgorithmConfig.prototype_head` sets per task.
PROTOTYPE_KEY = "head.weight"
TaskType = Literal["classification", "regression"]
_MODES = {"imaml": "implicit", "maml": "unrolled", "fomaml": "one_step"}


def task_type_of(task: str) -> TaskType:
    """``"classification"`` for Omniglot, ``"regression"`` for sinusoid."""
    if task == "omniglot":
        return "classification"
    if task == "sinusoid":
        return "regression"
    raise ValueError(f"unknown task {task!r}; expected 'omniglot' or 'sinusoid'")


#: Krylov solvers for iMAML's meta-gradient system, by CLI name.
META_SOLVERS = {"cg": idiff.CG, "minres": idiff.MINRES}


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    r"""What to meta-learn with.

    Parameters
    ----------
    name : {"imaml", "maml", "fomaml"}
        The algorithm.
    lam : float
        iMAML's proximal regularization strength (ignored by MAML / first-order MAML, whose
        inner loop is plain gradient descent on the support loss).
    inner : GradientDescent or NewtonCG
        Inner solver. MAML needs fixed-step :class:`GradientDescent` (it is unrolled).
    cg_steps : int
        CG iterations for iMAML's meta-gradient linear system (a fixed budget, as the paper).
    meta_solver : {"cg", "minres"}
        Krylov method for the meta-gradient system :math:`(I + H/\lambda) u = g`. CG is the
        paper's; MINRES also handles the indefinite systems met early in training, when the
        inner problem is far from convex (CG stops there at the first negative curvature).
    meta_damping : float
        Levenberg-Marquardt damping of that system (solve with :math:`I + H/\lambda + \delta I`).
    prototype_head : bool
        Start every task from a head built from its own support set instead of a meta-learned
        one (needs a network with a :class:`~applications.meta_learning.models.CosineHead`):
        the task's anchor is ``theta`` plus ``head.weight`` = the mean normalised feature of
        each class's support examples under ``theta``, i.e. the cosine nearest-prototype
        classifier (as Proto-MAML, Triantafillou et al. 2020, does for a linear head). The
        anchor is a differentiable function of ``theta``, so the meta-gradient reaches the
        feature extractor both through the implicit solve and through the prototypes.
    check_optimality : float or None
        iMAML only: tolerance of the core's inner-optimality check,
        ``||F(phi)|| <= check_optimality * ||F(theta)||``. Violations are counted and logged.

    Examples
    --------
    >>> cfg = AlgorithmConfig("imaml", lam=2.0, inner=GradientDescent(lr=0.1, steps=16), cg_steps=5)
    >>> cfg.mode, cfg.inner_lam
    ('implicit', 2.0)
    """

    name: str = "imaml"
    lam: float = 2.0
    inner: InnerSolver = dataclasses.field(default_factory=lambda: GradientDescent(lr=0.1, steps=16))
    cg_steps: int = 5
    check_optimality: float | None = 0.1
    meta_solver: str = "cg"
    meta_damping: float = 0.0
    prototype_head: bool = False

    def __post_init__(self) -> None:
        if self.meta_solver not in META_SOLVERS:
            raise ValueError(f"meta_solver must be one of {sorted(META_SOLVERS)}, got {self.meta_solver!r}")
        if not self.meta_damping >= 0:
            raise ValueError(f"meta_damping must be >= 0, got {self.meta_damping}")
        if self.name not in ALGORITHMS:
            raise ValueError(
                f"unknown algorithm {self.name!r}; expected one of {ALGORITHMS} (or 'baseline' in the CLI)"
            )
        if self.name == "imaml" and not self.lam > 0:
            raise ValueError(f"iMAML needs lam > 0, got {self.lam}")
        if self.cg_steps < 1:
            raise ValueError(f"cg_steps must be >= 1, got {self.cg_steps}")
        if self.name != "imaml" and not isinstance(self.inner, GradientDescent):
            raise ValueError(f"{self.name} adapts with gradient descent; the 'hf' (Newton-CG) inner solver is iMAML's")
        if self.name == "maml" and self.inner.tol is not None:
            raise ValueError("MAML backpropagates through a fixed number of inner steps; drop the inner tolerance")
        if self.check_optimality is not None and not self.check_optimality > 0:
            raise ValueError(f"check_optimality must be > 0 or None, got {self.check_optimality}")

    @property
    def mode(self) -> str:
        """The :func:`implicitdiff.implicit_diff` mode that gives this algorithm's meta-gradient."""
        return _MODES[self.name]

    @property
    def inner_lam(self) -> float:
        """Proximal strength used by the inner solver (0 for MAML-style plain fine-tuning)."""
        return self.lam if self.name == "imaml" else 0.0

    @property
    def optimality_tol(self) -> float | None:
        """The optimality-check tolerance, only meaningful where the inner problem is solved (iMAML)."""
        return self.check_optimality if self.name == "imaml" else None


class FunctionalModel:
    """A ``torch.nn.Module`` used as a pure function ``(params, x) -> output``.

    Buffers (if any) are taken from the module and kept fixed; the models of this application
    use batch statistics only, so nothing is mutated during a forward pass.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def initial_params(self) -> Params:
        """The module's parameters, detached copies (the meta-parameters to learn)."""
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        buffers = dict(self.module.named_buffers())
        return torch.func.functional_call(self.module, (params, buffers), (x,))

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The flattened output of the module's ``encoder`` (the input of its head)."""
        encoder = getattr(self.module, "encoder", None)
        if encoder is None:
            raise ValueError(f"{type(self.module).__name__} has no 'encoder' to compute features with")
        prefix = "encoder."
        inner = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        buffers = {k[len(prefix):]: v for k, v in self.module.named_buffers() if k.startswith(prefix)}
        return torch.func.functional_call(encoder, (inner, buffers), (x,)).flatten(1)


@dataclasses.dataclass
class TaskBatchResult:
    """Per-task query losses (differentiable w.r.t. theta) and metrics (accuracy or MSE) of a batch."""

    losses: torch.Tensor
    metrics: torch.Tensor


class MetaObjective:
    """Adapt-then-score objective of a meta-batch of tasks, differentiable w.r.t. ``theta``.

    Parameters
    ----------
    model : FunctionalModel
        The network, used functionally.
    task_type : {"classification", "regression"}
        Cross-entropy + accuracy, or mean squared error (reported as the metric too).
    config : AlgorithmConfig
        Algorithm, inner solver and meta-gradient settings.
    use_vmap : bool
        Batch the tasks with ``torch.func.vmap`` (the inner solver itself is batched too when
        it is written in plain tensor ops) instead of a Python loop over tasks.

    Examples
    --------
    >>> import torch
    >>> net = FunctionalModel(torch.nn.Linear(1, 1))
    >>> cfg = AlgorithmConfig("imaml", inner=GradientDescent(0.1, 50))
    >>> obj = MetaObjective(net, "regression", cfg, use_vmap=False)
    >>> theta = {k: v.requires_grad_() for k, v in net.initial_params().items()}
    >>> x = torch.randn(4, 3, 1); out = obj.batch(theta, x, 2 * x, x, 2 * x)
    >>> out.losses.mean().backward(); sorted(theta)
    ['bias', 'weight']
    """

    def __init__(
        self, model: FunctionalModel, task_type: TaskType, config: AlgorithmConfig, *, use_vmap: bool = True
    ) -> None:
        if task_type not in ("classification", "regression"):
            raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
        self.model = model
        self.task_type = task_type
        self.config = config
        self.use_vmap = use_vmap
        if config.prototype_head:
            head = getattr(model.module, "head", None)
            if task_type != "classification" or not hasattr(head, "scale"):
                raise ValueError("prototype_head needs a classifier with a cosine head (OmniglotCNN(head='cosine'))")
            self.ways = int(head.weight.shape[0])
        self.loss_fn: LossFn = self._make_loss()
        self.adapt = self._make_adapt()

    @property
    def per_task_keys(self) -> tuple[str, ...]:
        """Parameters set per task from the support set (not meta-parameters): the prototype head."""
        return (PROTOTYPE_KEY,) if self.config.prototype_head else ()

    def meta_parameters(self) -> Params:
        """Initial meta-parameters: the network's parameters less :attr:`per_task_keys` (detached copies)."""
        return {k: v for k, v in self.model.initial_params().items() if k not in self.per_task_keys}

    def task_anchor(self, theta: Params, x_support: torch.Tensor, y_support: torch.Tensor) -> Params:
        """The point a task's inner problem is anchored at (and started from): ``theta``, plus
        the support set's class prototypes as head weights when :attr:`AlgorithmConfig.prototype_head`.
        """
        if not self.config.prototype_head:
            return theta
        features = nnf.normalize(self.model.features(theta, x_support), dim=-1)
        # one-hot by comparison (vmap-friendly, unlike nnf.one_hot's data-dependent check)
        one_hot = (y_support.unsqueeze(-1) == torch.arange(self.ways, device=y_support.device)).to(features.dtype)
        prototypes = (one_hot.T @ features) / one_hot.sum(0).clamp_min(1).unsqueeze(-1)
        return {**theta, PROTOTYPE_KEY: prototypes}

    # -- pieces -------------------------------------------------------------------------
    def _make_loss(self) -> LossFn:
        model = self.model
        if self.task_type == "classification":

            def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return nnf.cross_entropy(model(params, x), y)

        else:

            def loss_fn(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return nnf.mse_loss(model(params, x), y)

        return loss_fn

    def _make_adapt(self) -> Callable[..., Params]:
        cfg = self.config
        loss_fn, inner, inner_lam = self.loss_fn, cfg.inner, cfg.inner_lam

        def adapt(init: Params, theta: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
            return inner.solve(loss_fn, init, theta, inner_lam, x, y)

        adapt.__name__ = f"{cfg.name}_{type(inner).__name__}"
        # The proximal condition with any lam > 0 defines the same one_step gradient (identity),
        # so first-order MAML and MAML use it with the configured lam.
        condition = idiff.proximal_condition(loss_fn, cfg.lam)
        return idiff.implicit_diff(
            condition,
            solver=META_SOLVERS[cfg.meta_solver](maxiter=cfg.cg_steps, tol=None, damping=cfg.meta_damping),
            mode=cfg.mode,
            check_optimality=cfg.optimality_tol,
            vmap_inner="batched" if inner.vmappable else "loop",
        )(adapt)

    def adapt_to(self, theta: Params, x_support: torch.Tensor, y_support: torch.Tensor) -> Params:
        """Adapted parameters for one task (differentiable w.r.t. ``theta`` per the algorithm)."""
        anchor = self.task_anchor(theta, x_support, y_support)
        # MAML's unrolled mode differentiates through the start point too, so it starts at the anchor itself.
        init = anchor if self.config.mode == "unrolled" else {k: v.detach() for k, v in anchor.items()}
        return self.adapt(init, anchor, x_support, y_support)

    def score(self, phi: Params, x_query: torch.Tensor, y_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss (differentiable) and metric (accuracy for classification, MSE for regression)."""
        out = self.model(phi, x_query)
        if self.task_type == "classification":
            loss = nnf.cross_entropy(out, y_query)
            metric = (out.detach().argmax(-1) == y_query).float().mean()
        else:
            loss = nnf.mse_loss(out, y_query)
            metric = loss.detach()
        return loss, metric

    def _one_task(self, theta: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor):
        return self.score(self.adapt_to(theta, xs, ys), xq, yq)

    def batch(
        self,
        theta: Params,
        x_support: torch.Tensor,
        y_support: torch.Tensor,
        x_query: torch.Tensor,
        y_query: torch.Tensor,
    ) -> TaskBatchResult:
        """Query losses and metrics of a batch of tasks (leading dimension = task)."""
        if x_support.shape[0] == 0:
            raise ValueError("empty batch of tasks")
        if self.use_vmap:
            losses, metrics = torch.func.vmap(self._one_task, in_dims=(None, 0, 0, 0, 0), randomness="same")(
                theta, x_support, y_support, x_query, y_query
            )
        else:
            pairs = [self._one_task(theta, *t) for t in zip(x_support, y_support, x_query, y_query)]
            losses = torch.stack([p[0] for p in pairs])
            metrics = torch.stack([p[1] for p in pairs])
        return TaskBatchResult(losses, metrics)

    def adapt_batch(self, theta: Params, x_support: torch.Tensor, y_support: torch.Tensor) -> list[Params] | Params:
        """Adapt without meta-gradients (evaluation): batched dict under vmap, else a list of dicts."""
        theta = {k: v.detach() for k, v in theta.items()}
        solve = self.config.inner.solve
        lam = self.config.inner_lam

        def adapt_one(x: torch.Tensor, y: torch.Tensor) -> Params:
            anchor = self.task_anchor(theta, x, y)
            return solve(self.loss_fn, anchor, anchor, lam, x, y)

        if self.use_vmap and self.config.inner.vmappable:
            return torch.func.vmap(adapt_one)(x_support, y_support)
        return [adapt_one(x, y) for x, y in zip(x_support, y_support)]

    def evaluate_batch(
        self,
        theta: Params,
        x_support: torch.Tensor,
        y_support: torch.Tensor,
        x_query: torch.Tensor,
        y_query: torch.Tensor,
    ) -> torch.Tensor:
        """Per-task post-adaptation metric (accuracy or MSE), no meta-gradient."""
        adapted = self.adapt_batch(theta, x_support, y_support)
        if isinstance(adapted, dict):
            return torch.func.vmap(lambda p, x, y: self.score(p, x, y)[1])(adapted, x_query, y_query).detach()
        return torch.stack([self.score(p, x, y)[1] for p, x, y in zip(adapted, x_query, y_query)]).detach()


def build_inner_solver(
    kind: str, *, lr: float, steps: int, tol: float | None = None, cg_steps: int = 5
) -> InnerSolver:
    """``"gd"`` -> :class:`GradientDescent`, ``"hf"`` -> :class:`NewtonCG` (Hessian-free Newton-CG).

    Examples
    --------
    >>> build_inner_solver("hf", lr=0.1, steps=8, tol=1e-3).steps
    8
    """
    if kind == "gd":
        return GradientDescent(lr=lr, steps=steps, tol=tol)
    if kind == "hf":
        return NewtonCG(steps=steps, cg_steps=cg_steps, tol=tol)
    raise ValueError(f"unknown inner solver {kind!r}; expected 'gd' (gradient descent) or 'hf' (Newton-CG)")
