"""Meta-training loop: configuration, task samplers, Adam on the meta-parameters, logs, checkpoints.

One meta-iteration samples a meta-batch of tasks, computes the mean query loss after
adaptation (:class:`~applications.meta_learning.algorithms.MetaObjective`), backpropagates
(the core supplies iMAML's implicit meta-gradient), and takes an Adam step. Every iteration
logs the meta-loss, the query metric and -- for iMAML -- the inner solver's relative
optimality residual ``||F(phi)|| / ||F(theta)||`` from the core's optimality check, so that an
inner problem that was not solved (and hence a wrong meta-gradient) is visible.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import implicitdiff as idiff

from . import distributed as mdist
from .algorithms import (
    ALGORITHMS,
    AlgorithmConfig,
    FunctionalModel,
    MetaObjective,
    build_inner_solver,
    task_type_of,
)
from .augmentation import random_affine
from .baseline import BaselineConfig, train_baseline
from .checkpoint import (
    CheckpointError,
    _first_line,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import OmniglotTasks, SinusoidTasks, build_omniglot_splits, load_omniglot
from .models import OmniglotCNN, SinusoidMLP
from .presets import (
    PAPER_OMNIGLOT,
    SINUSOID_DEFAULTS,
    default_inner_lr,
    default_inner_steps,
    default_queries,
)

__all__ = [
    "TrainConfig", "MetaTrainer", "pretraining_config", "NonFiniteMetaLossError", "build_task_splits", "build_network",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: Entries of a meta-training checkpoint that resuming needs.
CHECKPOINT_KEYS = ("config", "iteration", "theta", "optimizer", "rng", "history")
#: What to do about a checkpoint that cannot be resumed from.
RESUME_ADVICE = ("Nothing was changed. Move it away and resume from another (good) copy of checkpoint.pt, "
                 "or start afresh: delete it, or train into another --output directory (without --resume).")
METRIC_FIELDS = ("iteration", "meta_loss", "metric", "inner_residual", "inner_unsolved", "backward_failed", "seconds")


class NonFiniteMetaLossError(RuntimeError):
    """The meta-loss or meta-gradient became NaN/inf; training stopped before the bad update."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a meta-training run (saved in every checkpoint).

    ``None`` fields take task-dependent defaults in :meth:`resolved`: shots (1 for Omniglot,
    10 for sinusoid), queries (15 per class for 5-way, 5 for 20-way), inner steps (16 for 5-way,
    25 for 20-way, the paper's), inner step size (0.1, the paper's; 0.03 for sinusoid, where 0.1
    diverges), meta-batch (32, the paper's; 25 for sinusoid as MAML's), hidden width (64
    filters; 40 units).

    Omniglot only: ``head="prototype"`` starts every task from a cosine head set to its support
    prototypes (:attr:`AlgorithmConfig.prototype_head`); ``pretrain_epochs > 0`` initialises the
    feature extractor by that many epochs of the supervised baseline's training on the training
    characters (:func:`~applications.meta_learning.baseline.train_baseline`, augmented) before
    meta-training; ``augment`` distorts every meta-training image by a random affine map
    (:func:`~applications.meta_learning.augmentation.random_affine`); ``all_characters`` trains
    on every character found (no held-out split: a model for use, not for a table; evaluate it on
    an external source such as the Lake et al. one-shot runs).

    Examples
    --------
    >>> cfg = TrainConfig(task="omniglot", ways=20, shots=1).resolved()
    >>> cfg.inner_steps, cfg.queries, cfg.lam, cfg.cg_steps, cfg.meta_batch, cfg.inner_lr
    (25, 5, 2.0, 5, 32, 0.1)
    >>> TrainConfig(task="sinusoid").resolved().inner_lr
    0.03
    """

    task: str = "omniglot"
    ways: int = 5
    shots: int | None = None
    queries: int | None = None
    algorithm: str = "imaml"
    inner_solver: str = "gd"
    lam: float = 2.0
    inner_steps: int | None = None
    inner_lr: float | None = None
    inner_tol: float | None = None
    hf_cg_steps: int = 5
    cg_steps: int = 5
    meta_solver: str = "cg"
    meta_damping: float = 0.0
    check_optimality: float | None = 0.1
    meta_batch: int | None = None
    meta_lr: float = 1e-3
    iterations: int = 1000
    hidden: int | None = None
    activation: str | None = None
    seed: int = 0
    use_vmap: bool = True
    checkpoint_every: int = 100
    eval_episodes: int = 600
    data: str | None = None
    head: str = "linear"
    pretrain_epochs: int = 0
    augment: bool = False
    all_characters: bool = False

    def resolved(self) -> TrainConfig:
        """A copy with the task-dependent defaults filled in and every field validated."""
        cfg = dataclasses.replace(self)
        task_type_of(cfg.task)  # validates the task name
        if cfg.task == "sinusoid":
            cfg.shots = cfg.shots or SINUSOID_DEFAULTS["shots"]
            cfg.meta_batch = cfg.meta_batch or SINUSOID_DEFAULTS["meta_batch"]
            cfg.hidden = cfg.hidden or SINUSOID_DEFAULTS["hidden"]
            cfg.activation = cfg.activation or SINUSOID_DEFAULTS["activation"]
        else:
            cfg.shots = cfg.shots or 1
            cfg.meta_batch = cfg.meta_batch or PAPER_OMNIGLOT["meta_batch"]
            cfg.hidden = cfg.hidden or 64
            cfg.activation = cfg.activation or "relu"
            if cfg.activation != "relu":
                raise ValueError("the Omniglot CNN uses ReLU (the paper's); --activation applies to the sinusoid MLP")
        if cfg.queries is None:
            cfg.queries = default_queries(cfg.task, cfg.ways, cfg.shots)
        if cfg.inner_steps is None:
            cfg.inner_steps = default_inner_steps(cfg.task, cfg.ways)
        if cfg.inner_lr is None:
            cfg.inner_lr = default_inner_lr(cfg.task)
        for name in ("ways", "shots", "queries", "inner_steps", "meta_batch", "iterations", "checkpoint_every",
                     "eval_episodes", "hf_cg_steps", "cg_steps", "hidden"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("inner_lr", "meta_lr"):
            value = getattr(cfg, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if cfg.head not in TASK_HEADS:
            raise ValueError(f"head must be one of {TASK_HEADS}, got {cfg.head!r}")
        if not isinstance(cfg.pretrain_epochs, int) or cfg.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be an integer >= 0, got {cfg.pretrain_epochs!r}")
        if cfg.task != "omniglot":
            for name, off in (("head", "linear"), ("pretrain_epochs", 0), ("augment", False),
                              ("all_characters", False)):
                if getattr(cfg, name) != off:
                    raise ValueError(f"{name}={getattr(cfg, name)!r} is for Omniglot; the {cfg.task} task has no "
                                     "classifier head, images or characters")
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
        if cfg.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS} for meta-training, got {cfg.algorithm!r}")
        self_check = cfg.algorithm_config()  # validates algorithm / inner solver combinations
        del self_check
        return cfg

    def algorithm_config(self) -> AlgorithmConfig:
        """The :class:`AlgorithmConfig` this run trains with."""
        steps = self.inner_steps if self.inner_steps is not None else default_inner_steps(self.task, self.ways)
        lr = self.inner_lr if self.inner_lr is not None else default_inner_lr(self.task)
        inner = build_inner_solver(self.inner_solver, lr=lr, steps=steps, tol=self.inner_tol,
                                   cg_steps=self.hf_cg_steps)
        return AlgorithmConfig(self.algorithm, lam=self.lam, inner=inner, cg_steps=self.cg_steps,
                               check_optimality=self.check_optimality, meta_solver=self.meta_solver,
                               meta_damping=self.meta_damping, prototype_head=self.head == "prototype")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration fields {sorted(unknown)}")
        return cls(**values)


#: Classifier heads of the meta-learners: the paper's meta-learned linear head, or a cosine head
#: that every task starts from its support-set prototypes (:attr:`AlgorithmConfig.prototype_head`).
TASK_HEADS = ("linear", "prototype")

#: Activations of the sinusoid MLP. ReLU is MAML's; a smooth one makes iMAML's inner problem
#: solvable: with ReLU the proximal objective is only piecewise smooth, its minimizers sit on
#: kinks where the gradient does not vanish, and the optimality check (and the implicit
#: function theorem) cannot be satisfied -- measured: Newton-CG stalls at relative residuals
#: 1e-2..1e-1 with ReLU and reaches 1e-3 in a few steps with SiLU.
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}


def _replace_relu(module: torch.nn.Module, activation: type[torch.nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ReLU):
            setattr(module, name, activation())
        else:
            _replace_relu(child, activation)


def build_network(config: TrainConfig) -> torch.nn.Module:
    """The paper's network for the task: 4-block CNN (Omniglot) or 1-40-40-1 MLP (sinusoid).

    The sinusoid MLP's ReLUs are swapped for ``config.activation`` (SiLU by default, see
    :data:`ACTIVATIONS`).
    """
    if config.task == "omniglot":
        head = "cosine" if config.head == "prototype" else "linear"
        return OmniglotCNN(config.ways, hidden=config.hidden or 64, head=head)
    net = SinusoidMLP(hidden=config.hidden or 40)
    activation = config.activation or "relu"
    if activation != "relu":
        _replace_relu(net, ACTIVATIONS[activation])
    return net


def pretraining_config(config: TrainConfig) -> BaselineConfig:
    """The supervised training that ``pretrain_epochs`` runs: the baseline's, augmented, with the run's seed and width.

    Examples
    --------
    >>> pretraining_config(TrainConfig(pretrain_epochs=15, seed=3).resolved()).epochs
    15
    """
    return BaselineConfig(epochs=config.pretrain_epochs, seed=config.seed, hidden=config.hidden, augment=True)


def build_task_splits(config: TrainConfig, characters=None) -> dict[str, OmniglotTasks | SinusoidTasks]:
    """Task samplers for ``"train"``, ``"val"``, ``"test"``.

    Omniglot: disjoint character splits of the data found from ``config.data``, the
    environment variable or the bundled folder (errors say where the data comes from).
    Sinusoid: the same task distribution (held-out tasks come from different seeds).
    With ``config.all_characters`` only ``"train"`` is returned, over every character.
    """
    if config.task == "sinusoid":
        tasks = SinusoidTasks(shots=config.shots, queries=config.queries)
        return {"train": tasks, "val": tasks, "test": tasks}
    if config.all_characters:
        data = characters if characters is not None else load_omniglot(config.data)
        return {"train": OmniglotTasks(data.images, ways=config.ways, shots=config.shots, queries=config.queries)}
    return build_omniglot_splits(config.data, seed=config.seed, ways=config.ways, shots=config.shots,
                                 queries=config.queries, characters=characters)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class MetaTrainer:
    """Meta-trains ``theta`` with Adam on a task sampler; checkpoints and resumes exactly.

    Parameters
    ----------
    config : TrainConfig
        The run's configuration (resolved here).
    train_tasks : OmniglotTasks or SinusoidTasks
        Sampler of meta-training tasks.
    device : torch.device or str
        Where to train.
    output_dir : path or None
        Where checkpoints, ``metrics.csv`` / ``metrics.json`` and ``learning_curve.png`` go
        (None: nothing is written).
    ctx : DistributedContext
        Rank and world size; each rank takes a share of every meta-batch.

    Examples
    --------
    >>> from applications.meta_learning.data import SinusoidTasks
    >>> cfg = TrainConfig(task="sinusoid", algorithm="fomaml", inner_lr=0.01, inner_steps=1, meta_batch=4, iterations=2)
    >>> trainer = MetaTrainer(cfg, SinusoidTasks(shots=10, queries=10))
    >>> len(trainer.train(progress=False))
    2
    """

    def __init__(
        self,
        config: TrainConfig,
        train_tasks: OmniglotTasks | SinusoidTasks,
        *,
        device: torch.device | str = "cpu",
        output_dir: str | Path | None = None,
        ctx: mdist.DistributedContext = mdist.DistributedContext(),
    ) -> None:
        self.config = config.resolved()
        self.device = torch.device(device)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.ctx = ctx
        self.tasks = train_tasks
        seed_everything(self.config.seed)
        self.module = build_network(self.config).to(self.device)
        self.network = FunctionalModel(self.module)
        self.objective = MetaObjective(self.network, task_type_of(self.config.task), self.config.algorithm_config(),
                                       use_vmap=self.config.use_vmap)
        self.theta = {k: v.requires_grad_() for k, v in self.objective.meta_parameters().items()}
        mdist.broadcast_([t.detach() for t in self.theta.values()], ctx)
        self.optimizer = torch.optim.Adam(self.theta.values(), lr=self.config.meta_lr)
        # The task sampler's own generator (CPU): its state goes into every checkpoint.
        self.generator = torch.Generator().manual_seed(self.config.seed + 1)
        self.iteration = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.pretrained = self.config.pretrain_epochs == 0
        self.pretrain_stats: dict[str, Any] | None = None
        #: Name of the run in error messages (``compare`` sets the method's) and the command-line
        #: flags of its inner step size and step count (named by the non-finite meta-loss error).
        self.label: str | None = None
        self.inner_flags: tuple[str, str] = ("--inner-lr", "--inner-steps")
        #: The pre-trained classifier (the supervised baseline) when this process ran :meth:`pretrain`
        #: (not checkpointed): lets a caller score the starting point on the same episodes.
        self.pretrained_model: torch.nn.Module | None = None

    def pretrain(self, *, progress: bool = False, pretrained: tuple[OmniglotCNN, dict] | None = None) -> None:
        """Initialise the feature extractor with the supervised baseline's training (once).

        Trains :func:`~applications.meta_learning.baseline.train_baseline` on the training
        tasks' images with :func:`pretraining_config` and copies its ``encoder.*`` weights into
        ``theta``; the head stays as initialised (a prototype head is set per task anyway).
        ``pretrained`` takes the ``(model, stats)`` of that same training when the caller
        already has it (``compare`` shares it with the baseline row); either way its wall time
        counts as this run's training time.
        """
        if not isinstance(self.tasks, OmniglotTasks):
            raise ValueError("pre-training needs Omniglot tasks")
        start, reused_seconds = time.perf_counter(), 0.0
        if self.ctx.is_main:
            if pretrained is None:
                model, stats = train_baseline(self.tasks.images, pretraining_config(self.config), device=self.device,
                                              rotations=self.tasks.rotations, progress=progress,
                                              desc="supervised pre-training")
            else:
                model, stats = pretrained
                reused_seconds = float(stats["wall_time_s"])
            self.pretrained_model = model
            encoder = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
            self.pretrain_stats = {k: stats[k] for k in ("wall_time_s", "num_classes", "final_loss",
                                                         "final_train_accuracy")}
            with torch.no_grad():
                for k, v in self.theta.items():
                    if k in encoder:
                        v.copy_(encoder[k])
        mdist.broadcast_([t.detach() for t in self.theta.values()], self.ctx)
        self.pretrained = True
        self.train_seconds += time.perf_counter() - start + reused_seconds

    # -- one meta-iteration -------------------------------------------------------------
    def meta_gradient(self, episode) -> dict[str, float]:
        """Accumulate into ``theta.grad`` this rank's share of the mean meta-gradient of ``episode``.

        Returns the batch's summed query loss and metric (over this rank's tasks), the
        inner-optimality records (count, sum of relative residuals, count above tolerance) and
        the number of meta-gradient solves that failed (e.g. negative curvature of
        ``I + H/lam`` at an unsolved inner point), with or without vmap.
        """
        start, stop = mdist.shard_range(episode.batch_size, self.ctx)
        part = [t[start:stop].to(self.device) for t in episode]
        with warnings.catch_warnings(), idiff.record_solves() as log:
            # Violations and failed backward CG solves are counted from the records and logged,
            # not printed once per task.
            warnings.simplefilter("ignore", idiff.InnerOptimalityWarning)
            warnings.simplefilter("ignore", idiff.LinearSolveWarning)
            result = self.objective.batch(self.theta, *part)
            (result.losses.sum() / episode.batch_size).backward()
        checks = [info for info in log if info.kind == "optimality"]
        residuals = [info.relative_residual for info in checks if info.relative_residual is not None]
        unsolved = sum(1 for info in checks if info.status is not None and not info.status.ok)
        # one record per task, or one per vmapped batch that counts its failed tasks
        failed = float(sum(info.num_failed for info in log if info.kind == "backward"))
        return {
            "loss_sum": float(result.losses.detach().sum()),
            "metric_sum": float(result.metrics.detach().sum()),
            "n_checks": float(len(residuals)),
            "residual_sum": float(sum(residuals)),
            "unsolved": float(unsolved),
            "backward_failed": failed,
        }

    def step(self) -> dict[str, float]:
        """One meta-iteration; raises :class:`NonFiniteMetaLossError` (before updating) on NaN/inf."""
        t0 = time.perf_counter()
        episode = self.tasks.sample(self.config.meta_batch, self.generator)
        if self.config.augment:
            episode = episode._replace(x_support=random_affine(episode.x_support, self.generator),
                                       x_query=random_affine(episode.x_query, self.generator))
        self.optimizer.zero_grad(set_to_none=False)
        try:
            sums = self.meta_gradient(episode)
        except idiff.NonFiniteError as err:
            raise NonFiniteMetaLossError(self._nonfinite_message(f"non-finite values in the meta-gradient solve "
                                                                 f"({err})")) from err
        grads = [p.grad for p in self.theta.values()]
        keys = ("loss_sum", "metric_sum", "n_checks", "residual_sum", "unsolved", "backward_failed")
        stats = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        mdist.all_reduce_sum_([*grads, stats], self.ctx)
        loss_sum, metric_sum, n_checks, residual_sum, unsolved, backward_failed = stats.tolist()
        batch = self.config.meta_batch
        finite_grad = all(bool(torch.isfinite(g).all()) for g in grads)
        if not (math.isfinite(loss_sum) and finite_grad):
            raise NonFiniteMetaLossError(
                self._nonfinite_message(f"non-finite meta-loss ({loss_sum / batch}) or meta-gradient"))
        self.optimizer.step()
        self.iteration += 1
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        record = {
            "iteration": self.iteration,
            "meta_loss": loss_sum / batch,
            "metric": metric_sum / batch,
            "inner_residual": residual_sum / n_checks if n_checks else float("nan"),
            "inner_unsolved": unsolved,
            "backward_failed": backward_failed,
            "seconds": seconds,
        }
        self.history.append(record)
        return record

    def _nonfinite_message(self, what: str) -> str:
        """``what`` at which iteration of which run, with the likely cause (an inner step too large)."""
        cfg = self.config
        prefix = f"{self.label}: " if self.label else f"{cfg.algorithm}: "
        lr_flag, steps_flag = self.inner_flags
        advice = f"lower {lr_flag} (or {steps_flag}) or --meta-lr"
        if cfg.algorithm == "imaml" and cfg.inner_solver == "gd":
            advice += ", or use --inner-solver hf"
        return (f"{prefix}{what} at iteration {self.iteration + 1}. Likely cause: the inner step is too large "
                f"({cfg.inner_steps} {cfg.inner_solver} steps of size {cfg.inner_lr}) and the adaptation "
                f"diverges; {advice}")

    # -- the loop -----------------------------------------------------------------------
    def train(self, iterations: int | None = None, *, progress: bool = True,
              on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train until ``iterations`` (default: ``config.iterations``) meta-iterations are done in total.

        Checkpoints every ``checkpoint_every`` iterations and at the end; on a non-finite
        meta-loss the last good checkpoint is kept and :class:`NonFiniteMetaLossError` raised.
        """
        target = self.config.iterations if iterations is None else iterations
        if not self.pretrained:
            self.pretrain(progress=progress and self.ctx.is_main)
            self.save()  # the pre-trained start is not lost if meta-training is interrupted
        bar = None
        if progress and self.ctx.is_main:
            from tqdm.auto import tqdm

            desc = f"{self.config.algorithm} {self.config.task} meta-training"
            bar = tqdm(total=target, initial=self.iteration, desc=desc, dynamic_ncols=True)
        metric_name = "acc" if self.objective.task_type == "classification" else "mse"
        try:
            while self.iteration < target:
                record = self.step()
                if on_step is not None:
                    on_step(record)
                if bar is not None:
                    postfix = {"loss": f"{record['meta_loss']:.3f}", metric_name: f"{record['metric']:.3f}"}
                    if not math.isnan(record["inner_residual"]):
                        postfix["inner_res"] = f"{record['inner_residual']:.2g}"
                        postfix["unsolved"] = int(sum(r["inner_unsolved"] for r in self.history))
                    if not math.isnan(record["backward_failed"]) and self.config.algorithm == "imaml":
                        postfix["cg_failed"] = int(sum(r.get("backward_failed", 0) for r in self.history))
                    bar.set_postfix(postfix)
                    bar.update(1)
                if self.iteration % self.config.checkpoint_every == 0 and self.iteration < target:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.save()
        return self.history

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: parameters, Adam, RNGs, sampler, history."""
        return {
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "theta": {k: v.detach().cpu().clone() for k, v in self.theta.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng_state(self.generator),
            "history": list(self.history),
            "pretrained": self.pretrained,
            "pretrain_stats": self.pretrain_stats,
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict` (the configuration must describe the same model).

        Everything is checked before anything is changed: a state that lacks an entry or a
        parameter, or has one of another shape, raises :class:`~.checkpoint.CheckpointError`
        (naming ``source``) and leaves the trainer as it was.
        """
        def bad(problem: str) -> CheckpointError:
            return CheckpointError(f"{source} {problem}. {RESUME_ADVICE}")

        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise bad(f"lacks the entries {missing} of a meta-training checkpoint")
        try:
            saved = TrainConfig.from_dict(state["config"])
        except (TypeError, ValueError) as err:
            raise bad(f"holds an unusable configuration ({err})") from err
        for name in ("task", "ways", "hidden", "activation", "algorithm", "head"):
            if getattr(saved, name) != getattr(self.config, name):
                raise ValueError(f"checkpoint was trained with {name}={getattr(saved, name)!r}, "
                                 f"this run has {name}={getattr(self.config, name)!r}")
        theta = state["theta"]
        if not isinstance(theta, dict) or set(theta) != set(self.theta):
            got = sorted(theta) if isinstance(theta, dict) else type(theta).__name__
            raise bad(f"holds the parameters {got}, this model has {sorted(self.theta)}")
        for k, v in self.theta.items():
            if not isinstance(theta[k], torch.Tensor) or theta[k].shape != v.shape:
                raise bad(f"holds parameter {k!r} of shape {tuple(getattr(theta[k], 'shape', ()))}, "
                          f"this model's is {tuple(v.shape)}")
        rng = state["rng"] if isinstance(state["rng"], dict) else {}
        rng_missing = [k for k in ("torch", "numpy", "python", "generator") if k not in rng]
        if rng_missing:
            raise bad(f"lacks the random-number states {rng_missing}")
        try:  # the optimizer checks its own state (and raises ValueError) before it changes
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"holds an optimizer state that does not fit this model ({_first_line(err)})") from err
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(theta[k].to(v.device))
        restore_rng_state(state["rng"], self.generator)
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.history = list(state["history"])
        self.pretrained = bool(state.get("pretrained", True))
        self.pretrain_stats = state.get("pretrain_stats")

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / CHECKPOINT_NAME

    def save(self) -> None:
        """Atomically write the checkpoint and the metric logs (rank 0 only)."""
        if self.output_dir is None or not self.ctx.is_main:
            return
        save_checkpoint(self.checkpoint_path, self.state_dict())
        write_metrics(self.output_dir, self.history, self.objective.task_type)

    def resume(self) -> None:
        """Continue from ``output_dir/checkpoint.pt``."""
        if self.checkpoint_path is None:
            raise ValueError("resume needs an output directory")
        state = load_checkpoint(self.checkpoint_path, required=CHECKPOINT_KEYS, what="checkpoint",
                                advice=RESUME_ADVICE)
        self.load_state_dict(state, source=f"checkpoint {self.checkpoint_path}")


def write_metrics(output_dir: Path, history: list[dict[str, float]], task_type: str) -> None:
    """``metrics.csv``, ``metrics.json`` and ``learning_curve.png`` from the per-iteration history."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    metric = "accuracy" if task_type == "classification" else "mse"
    (output_dir / "metrics.json").write_text(json.dumps({"metric": metric, "history": history}, indent=1,
                                                        allow_nan=True))
    if history:
        plot_learning_curves(history, metric, output_dir / "learning_curve.png")


def _run_settings(path: Path) -> dict[str, Any]:
    """The run's settings for the figure: ``config.json`` beside it (``train``), or the
    ``comparison.json`` of a ``compare`` run one folder up; empty if neither is readable."""
    for candidate in (path.parent / "config.json", path.parent.parent / "comparison.json"):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        settings = data.get("config", data) if isinstance(data, dict) else {}
        if isinstance(settings, dict):
            if candidate.name == "comparison.json":  # the method's own settings, if listed
                for row in data.get("results", []):
                    if isinstance(row, dict) and row.get("method") == path.parent.name:
                        settings = {**settings, **row.get("settings", {}), "algorithm": path.parent.name}
            return settings
    return {}


def _describe_run(settings: dict[str, Any]) -> str:
    if not settings:
        return ""
    if settings.get("task") == "sinusoid":
        task = f"sinusoid, {settings.get('shots')} shots"
    else:
        task = f"Omniglot {settings.get('ways')}-way {settings.get('shots')}-shot"
    parts = [str(settings.get("algorithm", "")), task]
    if settings.get("meta_batch"):
        parts.append(f"meta-batch {settings['meta_batch']}")
    if settings.get("lam") is not None and settings.get("algorithm") == "imaml":
        parts.append(f"λ = {settings['lam']:g}")
    if settings.get("inner_steps"):
        lr = settings.get("inner_lr")
        step = f" of {lr:g}" if isinstance(lr, (int, float)) else ""
        parts.append(f"{settings['inner_steps']} inner steps{step}")
    if settings.get("seed") is not None:
        parts.append(f"seed {settings['seed']}")
    return ", ".join(p for p in parts if p)


def plot_learning_curves(
    history: list[dict[str, float]],
    metric: str,
    path: Path,
    *,
    chance: float | None = None,
    description: str | None = None,
    tolerance: float | None = None,
) -> None:
    """Meta-loss, query metric and inner residual per meta-iteration, with a moving average.

    Every panel has a y label with its unit and a legend for each of its lines: the value per
    meta-iteration (thin) and its moving average over a twentieth of the run (thick); the
    accuracy panel has the chance level (``1/ways``) and the residual panel the optimality
    check's tolerance. ``chance``, ``tolerance`` and the title's run ``description`` (task,
    algorithm, meta-batch, inner steps, seed) default to what the run's ``config.json``
    beside ``path`` (or a ``compare`` run's ``comparison.json``) says.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = _run_settings(path)
    classification = metric == "accuracy"
    if chance is None and classification and settings.get("ways"):
        chance = 1.0 / int(settings["ways"])
    if tolerance is None and isinstance(settings.get("check_optimality"), (int, float)):
        tolerance = float(settings["check_optimality"])
    if description is None:
        description = _describe_run(settings)

    its = np.array([h["iteration"] for h in history])
    loss_unit = "cross-entropy, nats" if classification else "mean squared error"
    panels = [
        ("meta_loss", "meta-loss", f"query loss after adaptation ({loss_unit})"),
        ("metric", f"query {metric}",
         "query accuracy after adaptation (fraction)" if classification else "query MSE after adaptation"),
    ]
    if any(not math.isnan(h["inner_residual"]) for h in history):
        panels.append(("inner_residual", "inner problems", "mean relative inner residual ‖F(φ)‖ / ‖F(θ)‖"))
    with plt.rc_context({"font.size": 10, "legend.fontsize": 8.5, "axes.titlesize": 10.5}):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8))
        window = max(1, len(history) // 20)
        for ax, (key, title, ylabel) in zip(np.atleast_1d(axes), panels):
            values = np.array([h[key] for h in history], dtype=float)
            ax.plot(its, values, alpha=0.4, lw=0.8, color="tab:blue", label="per meta-iteration")
            if window > 1:
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ax.plot(its[window - 1:], smooth, lw=1.8, color="tab:orange",
                        label=f"moving average ({window} iterations)")
            if key == "metric" and chance is not None:
                ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance ({chance:.2g})")
                ax.set_ylim(0, 1)
            if key == "inner_residual":
                ax.set_yscale("log")
                if tolerance is not None:
                    ax.axhline(tolerance, color="tab:red", ls=":", lw=1.2,
                               label=f"optimality-check tolerance ({tolerance:g})")
            ax.set_title(title)
            ax.set_xlabel("meta-iteration")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        if description:
            fig.suptitle(description, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
