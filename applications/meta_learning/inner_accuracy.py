"""Is iMAML's inner problem solved well enough for the implicit meta-gradient?

The implicit function theorem gives iMAML's meta-gradient at a *solution* of the proximal
inner problem, i.e. where ``F(phi, theta) = grad L_train(phi) / lam + (phi - theta) = 0``; an
inner solver that stops early hands the meta-gradient formula a point where it does not hold.
:func:`inner_accuracy_report` measures, for one meta-parameter ``theta`` and ``N`` held-out
tasks, what each of several inner solvers achieves:

* the relative inner residual ``||F(phi)|| / ||F(theta_i)||`` (``theta_i``: the task's anchor,
  ``theta`` plus its prototype head) -- the quantity the training's optimality check logs --
  as mean, median, 90th percentile and the fraction of tasks above the tolerance;
* wall time per task of the inner solve and of the whole meta-gradient (solve + backward);
* the cosine between each task's meta-gradient and that of a tightly solved *reference*
  solver, and the cosine of the averaged meta-gradients: over all ``N`` tasks and over
  meta-batches of the run's size (what one Adam step sees);
* the distance of each solution from the reference's, ``||phi - phi_ref|| / ||phi_ref - theta_i||``
  (with ReLU networks the residual has a floor above zero -- the minimizer sits on kinks of
  the loss -- while the iterates still converge to it, which this distance shows);
* the query accuracy (or MSE) after adaptation;
* as a yardstick, the cosine between the reference's mean meta-gradients of two different
  meta-batches (the sampling noise of one meta-step's direction).

Solvers are named by specs ``KIND:STEPS[,key=value...]`` (:func:`parse_solver`):

========  =======================================================  ======================
kind      solver                                                    keys
========  =======================================================  ======================
``gd``    gradient descent of step ``lr`` (the recipe's)            ``lr``, ``tol``
``gdls``  gradient descent with a backtracking (Armijo) line        ``lr`` (first trial
          search; the trial step grows x2 after each step           step), ``tol``
          (:class:`BacktrackingGD`, defined here for the study)
``hf``    Hessian-free Newton-CG with a line search (iMAML-HF)      ``cg``, ``tol``
========  =======================================================  ======================

``tol`` stops a solver early once the relative residual is below it (GD's stopping rule is
the same quantity: ``grad G = lam F``); ``meta=K`` sets the Krylov steps of the meta-gradient
(default: the run's ``cg_steps``) and ``grad=fo`` takes the first-order gradient (the
Jacobian of the solution taken as the identity, first-order MAML's) instead of the implicit one.

Command line::

    python -m applications.meta_learning inner-accuracy --checkpoint runs/quick --ways 20 \\
        --tasks 200 --solvers gd:5 "gd:50,lr=0.25,tol=0.1" "hf:10,tol=0.01" --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

import implicitdiff as idiff

from ..progress import progress_bar
from .algorithms import META_SOLVERS, FunctionalModel, MetaObjective, task_type_of
from .checkpoint import CheckpointError, _first_line, load_checkpoint
from .data import fixed_episodes
from .inner_solvers import GradientDescent, LossFn, NewtonCG, Params, proximal_objective
from .presets import OMNIGLOT_RECIPE, apply_preset
from .trainer import ACTIVATIONS, CHECKPOINT_NAME, TrainConfig, _replace_relu, build_network, build_task_splits

__all__ = [
    "BacktrackingGD", "SolverSpec", "parse_solver", "inner_accuracy_report", "format_markdown",
    "add_inner_accuracy_parser", "cmd_inner_accuracy", "DEFAULT_ALTERNATIVES", "DEFAULT_REFERENCE",
]

#: Alternatives to the run's own solver measured when none are named (the docs' study; the first
#: is the recipe's former 5 GD steps of 0.5, the second the recipe's loop).
DEFAULT_ALTERNATIVES = ("gd:5,lr=0.5", "gd:20,lr=0.25,tol=0.1", "gdls:10,tol=0.1", "hf:5,tol=0.1")
#: The reference: 10 Newton-CG steps. On the ReLU CNN the residual has a floor (0.03-0.15) that
#: more steps do not lower, while the iterate has converged (within 0.1% of 40 steps' in the study);
#: a smooth network (``activation=``) is solved to ~1e-4 by e.g. ``gd:100,lr=0.25,tol=1e-4``.
DEFAULT_REFERENCE = "hf:10,cg=5"
SPEC_SYNTAX = ("KIND:STEPS[,key=value...] with KIND gd, gdls or hf and keys lr (gd, gdls), cg (hf), tol, "
               "meta (Krylov steps of the meta-gradient), grad=fo (first-order gradient); e.g. gd:5, "
               "'gd:50,lr=0.25,tol=0.1', 'hf:10,cg=5,tol=1e-3'")


# --------------------------------------------------------------------------------------
# A gradient descent with a line search (the study's; not a training option)
# --------------------------------------------------------------------------------------
def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


@dataclasses.dataclass(frozen=True)
class BacktrackingGD:
    """Gradient descent on the proximal objective with a backtracking (Armijo) line search.

    Each step tries ``t`` (first ``lr``), halves it until
    ``G(phi - t g) <= G(phi) - armijo * t * ||g||^2``, takes the step, and tries ``grow * t``
    next: the step adapts to each task's curvature instead of being fixed for all.

    Examples
    --------
    >>> import torch
    >>> loss = lambda p, x, y: 10 * ((p["w"] - y) ** 2).sum()  # too stiff for a fixed step of 0.5
    >>> phi = BacktrackingGD(lr=0.5, steps=60).solve(loss, {"w": torch.zeros(())}, {"w": torch.zeros(())},
    ...                                              1.0, None, torch.ones(()))
    >>> round(float(phi["w"]), 4)  # argmin of 10 (w-1)^2 + w^2 / 2
    0.9524
    """

    lr: float = 0.5
    steps: int = 20
    tol: float | None = None
    shrink: float = 0.5
    grow: float = 2.0
    armijo: float = 1e-4
    max_backtracks: int = 30

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"line-search first trial step must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"inner steps must be >= 1, got {self.steps}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"inner tolerance must be > 0, got {self.tol}")

    @property
    def vmappable(self) -> bool:
        """The line search branches on values: never run under vmap."""
        return False

    def solve(
        self, loss_fn: LossFn, init: Params, theta: Params, lam: float, x: torch.Tensor, y: torch.Tensor
    ) -> Params:
        """Run the line-searched gradient descent from ``init`` (without autograd; differentiate it implicitly)."""
        objective = proximal_objective(loss_fn, lam)
        grad_and_value = torch.func.grad_and_value(objective)
        phi = {k: v.detach() for k, v in init.items()}
        t, start = self.lr, None
        for _ in range(self.steps):
            g, value = grad_and_value(phi, theta, x, y)
            g_sq = float(_dot(g, g))
            g_norm = math.sqrt(g_sq)
            if start is None:
                start = g_norm
            if g_norm == 0.0 or (self.tol is not None and g_norm <= self.tol * start):
                break
            value = float(value)
            for _ in range(self.max_backtracks):
                trial = {k: phi[k] - t * g[k] for k in phi}
                if float(objective(trial, theta, x, y)) <= value - self.armijo * t * g_sq:
                    break
                t *= self.shrink
            phi = trial
            t *= self.grow
        return phi


# --------------------------------------------------------------------------------------
# Solver specs
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """One inner solver of the study, as :func:`parse_solver` reads it from ``KIND:STEPS[,key=value...]``.

    ``lr`` None takes the run's inner learning rate; ``meta_steps`` None the run's Krylov steps
    for the meta-gradient; ``first_order`` takes first-order MAML's gradient at the solution.
    """

    kind: str
    steps: int
    lr: float | None = None
    tol: float | None = None
    cg: int = 5
    meta_steps: int | None = None
    first_order: bool = False
    label: str = ""

    def build(self, default_lr: float) -> GradientDescent | BacktrackingGD | NewtonCG:
        """The solver object (``lr`` defaults to the run's inner learning rate)."""
        lr = self.lr if self.lr is not None else default_lr
        if self.kind == "gd":
            return GradientDescent(lr=lr, steps=self.steps, tol=self.tol)
        if self.kind == "gdls":
            return BacktrackingGD(lr=lr, steps=self.steps, tol=self.tol)
        return NewtonCG(steps=self.steps, cg_steps=self.cg, tol=self.tol)


#: The keys each kind of solver spec takes.
_KEYS = {"gd": {"lr", "tol", "meta", "grad"}, "gdls": {"lr", "tol", "meta", "grad"},
         "hf": {"cg", "tol", "meta", "grad"}}


def parse_solver(text: str) -> SolverSpec:
    """Parse ``KIND:STEPS[,key=value...]``; bad specs raise ``ValueError`` naming the problem.

    Examples
    --------
    >>> spec = parse_solver("hf:10,cg=5,tol=1e-3")
    >>> spec.kind, spec.steps, spec.cg, spec.tol, spec.label
    ('hf', 10, 5, 0.001, 'hf:10,cg=5,tol=1e-3')
    >>> parse_solver("gd:5,grad=fo").first_order
    True
    """
    spec = text.strip().replace(" ", "")

    def bad(problem: str) -> ValueError:
        return ValueError(f"inner solver {text!r}: {problem}; expected {SPEC_SYNTAX}")

    kind, sep, rest = spec.partition(":")
    if kind not in _KEYS:
        raise bad(f"unknown kind {kind!r}")
    if not sep or not rest:
        raise bad("the number of steps is missing")
    steps_text, *pairs = rest.split(",")
    try:
        steps = int(steps_text)
    except ValueError:
        raise bad(f"steps must be an integer, got {steps_text!r}") from None
    if steps < 1:
        raise bad(f"steps must be >= 1, got {steps}")
    values: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise bad(f"{pair!r} is not key=value")
        if key not in _KEYS[kind]:
            raise bad(f"{kind} takes the keys {sorted(_KEYS[kind])}, not {key!r}")
        if key in values:
            raise bad(f"{key!r} given twice")
        try:
            if key == "grad":
                if value not in ("fo", "implicit"):
                    raise ValueError
                values[key] = value
            elif key in ("cg", "meta"):
                values[key] = int(value)
                if values[key] < 1:
                    raise ValueError
            else:
                values[key] = float(value)
                if not (values[key] > 0 and math.isfinite(values[key])):
                    raise ValueError
        except ValueError:
            what = "'fo' or 'implicit'" if key == "grad" else "a positive integer" if key in ("cg", "meta") \
                else "a positive number"
            raise bad(f"{key} must be {what}, got {value!r}") from None
    return SolverSpec(kind, steps, lr=values.get("lr"), tol=values.get("tol"), cg=values.get("cg", 5),
                      meta_steps=values.get("meta"), first_order=values.get("grad") == "fo", label=spec)


def run_solver_spec(config: TrainConfig) -> str:
    """The spec of the run's own inner solver (e.g. ``gd:20,lr=0.25,tol=0.1`` for the recipe)."""
    if config.inner_solver == "hf":
        tol = f",tol={config.inner_tol:g}" if config.inner_tol is not None else ""
        return f"hf:{config.inner_steps},cg={config.hf_cg_steps}{tol}"
    tol = f",tol={config.inner_tol:g}" if config.inner_tol is not None else ""
    return f"gd:{config.inner_steps},lr={config.inner_lr:g}{tol}"


# --------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------
def _flat(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def _tree_norm(tree: Params) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in tree.values()))


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _SolverRun:
    """The objective of one solver spec and the running sums of its measurements."""

    def __init__(self, spec: SolverSpec, config: TrainConfig, network: FunctionalModel, meta_batch: int) -> None:
        self.spec = spec
        algorithm = config.algorithm_config()
        inner = spec.build(config.inner_lr)
        cfg = dataclasses.replace(algorithm, name="imaml", inner=inner, check_optimality=None,
                                  cg_steps=spec.meta_steps or algorithm.cg_steps)
        self.objective = MetaObjective(network, task_type_of(config.task), cfg, use_vmap=False)
        if spec.first_order:  # first-order MAML's gradient: the solution's Jacobian taken as the identity
            loss_fn, lam = self.objective.loss_fn, cfg.lam

            def adapt(init: Params, theta: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
                return inner.solve(loss_fn, init, theta, lam, x, y)

            solver = META_SOLVERS[cfg.meta_solver](maxiter=cfg.cg_steps, tol=None, damping=cfg.meta_damping)
            self.objective.adapt = idiff.implicit_diff(idiff.proximal_condition(loss_fn, lam), solver=solver,
                                                       mode="one_step", check_optimality=None,
                                                       vmap_inner="loop")(adapt)
        self.condition = idiff.proximal_condition(self.objective.loss_fn, cfg.lam)
        self.meta_batch = meta_batch
        self.residuals: list[float] = []
        self.cosines: list[float] = []
        self.distances: list[float] = []
        self.inner_seconds: list[float] = []
        self.total_seconds: list[float] = []
        self.metrics: list[float] = []
        self.losses: list[float] = []
        self.failed = 0
        self.grad_sum: torch.Tensor | None = None
        self.group_sum: torch.Tensor | None = None
        self.groups: list[torch.Tensor] = []  # the meta-batch mean gradients (for the reference only)
        self.group_cosines: list[float] = []

    def task(self, theta: Params, keys: list[str], xs, ys, xq, yq) -> tuple[torch.Tensor, Params, Params]:
        """Solve one task, record residual / time / metric; return its flattened meta-gradient, the
        solution and the task's anchor (detached)."""
        obj = self.objective
        with warnings.catch_warnings(), idiff.record_solves() as log:
            warnings.simplefilter("ignore", idiff.LinearSolveWarning)
            t0 = time.perf_counter()
            anchor = obj.task_anchor(theta, xs, ys)
            init = {k: v.detach() for k, v in anchor.items()}
            phi = obj.adapt(init, anchor, xs, ys)
            t1 = time.perf_counter()
            loss, metric = obj.score(phi, xq, yq)
            grads = torch.autograd.grad(loss, [theta[k] for k in keys])
            t2 = time.perf_counter()
        self.failed += int(sum(info.num_failed for info in log if info.kind == "backward"))
        fixed = {k: v.detach() for k, v in anchor.items()}
        solution = {k: v.detach() for k, v in phi.items()}
        with torch.enable_grad():
            res = _tree_norm(self.condition(solution, fixed, xs, ys))
            ref = _tree_norm(self.condition(fixed, fixed, xs, ys))
        self.residuals.append(res / ref if ref > 0 else (0.0 if res == 0 else float("inf")))
        self.inner_seconds.append(t1 - t0)
        self.total_seconds.append(t2 - t0)
        self.metrics.append(float(metric))
        self.losses.append(float(loss.detach()))
        return _flat(grads), solution, fixed

    def add(self, grad: torch.Tensor, solution: Params, reference: _SolverRun, reference_grad: torch.Tensor,
            reference_solution: Params, anchor: Params) -> None:
        """Compare with the reference's gradient and solution of the same task; accumulate the batch means."""
        self.cosines.append(_cosine(grad, reference_grad))
        scale = _tree_norm({k: reference_solution[k] - anchor[k] for k in anchor})
        gap = _tree_norm({k: solution[k] - reference_solution[k] for k in anchor})
        self.distances.append(gap / scale if scale > 0 else (0.0 if gap == 0 else float("inf")))
        self.grad_sum = grad.clone() if self.grad_sum is None else self.grad_sum + grad
        self.group_sum = grad.clone() if self.group_sum is None else self.group_sum + grad
        if len(self.cosines) % self.meta_batch == 0:
            if self is reference:
                self.groups.append(self.group_sum)
            self.group_cosines.append(_cosine(self.group_sum, reference.groups[len(self.group_cosines)]))
            self.group_sum = None

    def summary(self, tolerance: float, reference: _SolverRun, per_task: bool) -> dict[str, Any]:
        n = len(self.residuals)
        assert self.grad_sum is not None and reference.grad_sum is not None  # at least one task was measured
        above = sum(1 for r in self.residuals if not r <= tolerance)
        out: dict[str, Any] = {
            "label": self.spec.label,
            "spec": dataclasses.asdict(self.spec),
            "meta_gradient": "first-order" if self.spec.first_order else "implicit",
            "meta_steps": self.objective.config.cg_steps,
            "residual": {"mean": statistics.fmean(self.residuals), "median": statistics.median(self.residuals),
                         "p90": _quantile(self.residuals, 0.9), "max": max(self.residuals)},
            "distance_to_reference": {"mean": statistics.fmean(self.distances),
                                      "median": statistics.median(self.distances), "max": max(self.distances)},
            "above_tolerance": above,
            "fraction_above_tolerance": above / n,
            "seconds_per_task": {"inner": statistics.fmean(self.inner_seconds),
                                 "total": statistics.fmean(self.total_seconds)},
            "cosine": {
                "per_task_mean": statistics.fmean(self.cosines),
                "per_task_median": statistics.median(self.cosines),
                "per_task_min": min(self.cosines),
                "all_tasks_mean_gradient": _cosine(self.grad_sum, reference.grad_sum),
                "meta_batch_mean": statistics.fmean(self.group_cosines) if self.group_cosines else None,
                "meta_batch_min": min(self.group_cosines) if self.group_cosines else None,
            },
            "query_metric": statistics.fmean(self.metrics),
            "query_loss": statistics.fmean(self.losses),
            "meta_solves_failed": self.failed,
        }
        if per_task:
            out["per_task"] = {"residual": self.residuals, "cosine": self.cosines, "distance": self.distances,
                               "inner_seconds": self.inner_seconds, "total_seconds": self.total_seconds}
        return out


def _between_batches(groups: list[torch.Tensor]) -> dict[str, Any]:
    """Cosines between the reference's mean meta-gradients of *different* meta-batches (all pairs):
    how much the direction changes from one Adam step's tasks to another's, a yardstick for the
    solvers' differences."""
    cosines = [_cosine(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    if not cosines:
        return {"meta_batch_pairs": 0, "cosine_mean": None, "cosine_median": None}
    return {"meta_batch_pairs": len(cosines), "cosine_mean": statistics.fmean(cosines),
            "cosine_median": statistics.median(cosines)}


def _theta_from_checkpoint(path: Path) -> tuple[TrainConfig, Params, dict[str, Any]]:
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    state = load_checkpoint(path, required=("config", "theta"), what="meta-training checkpoint",
                            advice="Pass the checkpoint.pt of a 'train' output directory, or no --checkpoint "
                                   "to measure the initial parameters.")
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"meta-training checkpoint {path} holds an unusable configuration "
                              f"({_first_line(err)})") from err
    source = {"source": str(path), "iteration": int(state.get("iteration", 0)),
              "pretrained": bool(state.get("pretrained", True))}
    return config, state["theta"], source


def inner_accuracy_report(
    config: TrainConfig,
    theta: Params | None,
    solvers: Sequence[str | SolverSpec],
    *,
    reference: str | SolverSpec = DEFAULT_REFERENCE,
    tasks: int = 200,
    split: str = "test",
    seed: int | None = None,
    tolerance: float | None = None,
    meta_batch: int | None = None,
    device: torch.device | str = "cpu",
    per_task: bool = True,
    progress: bool = False,
    theta_source: dict[str, Any] | None = None,
    activation: str | None = None,
) -> dict[str, Any]:
    """Measure how well each inner solver solves ``tasks`` held-out inner problems at ``theta``.

    Parameters
    ----------
    config : TrainConfig
        The run's configuration (task, network, λ, meta-gradient solver, the split's seed); its
        own inner solver is not used unless named in ``solvers``.
    theta : dict of tensors or None
        Meta-parameters; None: the network's initial parameters (seeded by ``config.seed``).
    solvers : sequence of str or SolverSpec
        The solvers to measure (:func:`parse_solver`), e.g. the run's own first.
    reference : str or SolverSpec
        The tightly solved solver whose meta-gradients the cosines compare with (it is measured
        too; add it to ``solvers`` to list it first).
    tasks, split, seed
        How many held-out tasks, from which character split, from which episode seed
        (default: the held-out evaluation's, ``config.seed + 1000``).
    tolerance : float or None
        The residual tolerance (default: ``config.check_optimality``, 0.1 as in training).
    meta_batch : int or None
        Size of the groups whose mean gradient is compared (default: ``config.meta_batch``).
    activation : {"silu", "tanh"} or None
        A what-if: replace the network's ReLUs by this smooth activation (same ``theta``) to see
        whether the ReLU kinks are what keeps the inner problem from being solved.

    Returns
    -------
    dict
        ``theta`` / ``tasks`` / ``settings`` descriptions, the ``reference`` label and one
        entry per solver under ``solvers`` (reference included; see the module docstring).
    """
    config = config.resolved()
    specs = [parse_solver(s) if isinstance(s, str) else s for s in solvers]
    ref_spec = parse_solver(reference) if isinstance(reference, str) else reference
    if not specs:
        raise ValueError("name at least one inner solver to measure")
    if len({s.label for s in specs}) != len(specs):
        raise ValueError(f"inner solvers named twice: {[s.label for s in specs]}")
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    if config.algorithm != "imaml":
        raise ValueError(f"the inner-accuracy report is about iMAML's proximal inner problem; this run is "
                         f"{config.algorithm!r}")
    tolerance = config.check_optimality if tolerance is None else tolerance
    if tolerance is None or not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    meta_batch = int(meta_batch or config.meta_batch or 1)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    device = torch.device(device)

    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    torch.manual_seed(config.seed)
    module = build_network(config).to(device)
    if activation is not None and activation != (config.activation or "relu"):
        _replace_relu(module, ACTIVATIONS[activation])
        activation_note = f"{activation} (what-if: replaces the run's {config.activation or 'relu'}, same theta)"
    else:
        activation_note = config.activation or "relu"
    network = FunctionalModel(module)
    runs = {s.label: _SolverRun(s, config, network, meta_batch) for s in specs}
    ref_run = runs.get(ref_spec.label) or _SolverRun(ref_spec, config, network, meta_batch)
    order = [ref_run] + [r for r in runs.values() if r is not ref_run]
    template = ref_run.objective.meta_parameters()
    if theta is None:
        theta = template
    missing = sorted(set(template) - set(theta))
    if missing:
        raise ValueError(f"theta lacks the parameters {missing} of this {config.task} model")
    for k, v in template.items():
        if tuple(theta[k].shape) != tuple(v.shape):
            raise ValueError(f"parameter {k!r} has shape {tuple(theta[k].shape)}, this model's is {tuple(v.shape)} "
                             f"(a linear head is trained for one number of ways: measure at --ways of the run)")
    keys = list(template)
    theta = {k: theta[k].detach().to(device).clone().requires_grad_() for k in keys}

    splits = build_task_splits(config)
    seed = config.seed + 1000 if seed is None else seed
    episodes = fixed_episodes(splits[split], tasks, seed=seed)
    start = time.perf_counter()
    with progress_bar(tasks, "inner-accuracy", unit="task", enabled=progress) as bar:
        for episode in episodes:
            for xs, ys, xq, yq in zip(*episode.to(device)):
                done = {run.spec.label: run.task(theta, keys, xs, ys, xq, yq) for run in order}
                ref_grad, ref_solution, anchor = done[ref_run.spec.label]
                for run in order:
                    grad, solution, _ = done[run.spec.label]
                    run.add(grad, solution, ref_run, ref_grad, ref_solution, anchor)
                bar.update(1)
    seconds = time.perf_counter() - start
    listed = [runs[s.label] for s in specs] + ([] if ref_spec.label in runs else [ref_run])
    shots = "points" if config.task == "sinusoid" else "shot"
    return {
        "theta": theta_source or {"source": "initial parameters (not meta-trained)"},
        "tasks": {"task": config.task, "ways": config.ways, "shots": config.shots, "queries": config.queries,
                  "count": tasks, "split": split, "seed": seed,
                  "describe": (f"{config.task} {config.ways}-way {config.shots}-{shots}" if config.task == "omniglot"
                               else f"sinusoid, {config.shots} {shots}")},
        "settings": {"lam": config.lam, "tolerance": tolerance, "meta_solver": config.meta_solver,
                     "meta_steps": config.cg_steps, "meta_batch": meta_batch, "head": config.head,
                     "activation": activation_note,
                     "inner_lr": config.inner_lr, "run_solver": run_solver_spec(config),
                     "threads": torch.get_num_threads(), "device": str(device), "wall_seconds": seconds},
        "reference": ref_run.spec.label,
        "sampling_yardstick": _between_batches(ref_run.groups),
        "solvers": [r.summary(tolerance, ref_run, per_task) for r in listed],
    }


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def format_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table with a header line (what, where, which theta)."""
    s, t = report["settings"], report["tasks"]
    theta = report["theta"]
    where = theta["source"] + (f" (meta-iteration {theta['iteration']})" if "iteration" in theta else "")
    metric = "query acc" if t["task"] == "omniglot" else "query MSE"
    recipe = next((r for r in report["solvers"] if r["label"] == s["run_solver"]), report["solvers"][0])
    lines = [
        f"### Inner problem: {t['describe']}, {t['count']} {t['split']} tasks, λ = {s['lam']:g}",
        "",
        f"θ: {where}. Tolerance {s['tolerance']:g} on ‖F(φ)‖/‖F(θ)‖; meta-gradient: {s['meta_solver']}, "
        f"{s['meta_steps']} steps unless noted; cosines against `{report['reference']}`; meta-batch "
        f"{s['meta_batch']}; activation {s['activation']}; {s['threads']} thread(s) on {s['device']}. "
        f"Time ratio against `{recipe['label']}`; distance: ‖φ - φ_ref‖/‖φ_ref - θ‖.",
        "",
        "| solver | residual mean | median | > tol | distance | s/task inner | s/task total | time x "
        f"| cos/task mean (min) | cos meta-batch mean (min) | cos {t['count']}-task mean | {metric} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = recipe["seconds_per_task"]["total"]
    for r in report["solvers"]:
        c = r["cosine"]
        label = r["label"] + (" (reference)" if r["label"] == report["reference"] else "")
        mb = ("n/a" if c["meta_batch_mean"] is None else f"{c['meta_batch_mean']:.5f} ({c['meta_batch_min']:.5f})")
        metric_value = (f"{100 * r['query_metric']:.2f}%" if t["task"] == "omniglot" else f"{r['query_metric']:.3f}")
        lines.append(
            f"| `{label}` | {r['residual']['mean']:.3g} | {r['residual']['median']:.3g} | "
            f"{r['above_tolerance']}/{t['count']} ({100 * r['fraction_above_tolerance']:.1f}%) | "
            f"{r['distance_to_reference']['mean']:.3g} | "
            f"{r['seconds_per_task']['inner']:.3f} | {r['seconds_per_task']['total']:.3f} | "
            f"{r['seconds_per_task']['total'] / base:.1f} | {c['per_task_mean']:.5f} ({c['per_task_min']:.5f}) | "
            f"{mb} | {c['all_tasks_mean_gradient']:.5f} | {metric_value} |")
    yard = report.get("sampling_yardstick", {})
    if yard.get("meta_batch_pairs"):
        lines += ["", "Yardstick: the reference's mean meta-gradients of two different meta-batches of "
                      f"{s['meta_batch']} tasks have a cosine of {yard['cosine_mean']:.3f} on average "
                      f"({yard['meta_batch_pairs']} pairs)."]
    failed = [f"`{r['label']}` {r['meta_solves_failed']}" for r in report["solvers"] if r["meta_solves_failed"]]
    if failed:
        lines += ["", "Meta-gradient solves that reported a failure: " + ", ".join(failed) + "."]
    ref = next(r for r in report["solvers"] if r["label"] == report["reference"])
    if ref["residual"]["max"] > 1e-3:
        lines += ["", f"Note: the reference's largest residual is {ref['residual']['max']:.2g} (> 1e-3): not every "
                      "task is solved tightly. Give it more steps, or see whether the residual has a floor "
                      "(ReLU kinks: compare --activation silu)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Command line (registered by cli.py as the 'inner-accuracy' subcommand)
# --------------------------------------------------------------------------------------
def add_inner_accuracy_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``inner-accuracy`` subcommand to ``sub`` (an ``add_subparsers`` object)."""
    p = sub.add_parser("inner-accuracy",
                       help="how well inner solvers solve iMAML's inner problem, and what it does to the "
                            "meta-gradient (residuals, time, cosine with a tightly solved reference)")
    p.add_argument("--checkpoint", help="checkpoint file or 'train' output directory (default: the initial, "
                                        "untrained parameters of --preset / the recipe)")
    p.add_argument("--preset", help="settings without a checkpoint (default: the Omniglot recipe)")
    p.add_argument("--ways", type=int, help="classes per task (default: the run's; a prototype head takes any)")
    p.add_argument("--shots", type=int, help="support examples per class (default: the run's)")
    p.add_argument("--queries", type=int, help="query examples per class (default: 15 for 5-way, 5 above)")
    p.add_argument("--tasks", type=int, default=200, help="held-out tasks (default 200)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--seed", type=int, help="episode seed (default: the held-out evaluation's)")
    p.add_argument("--data", help="Omniglot location (default: the run's)")
    p.add_argument("--solvers", nargs="+", metavar="SPEC",
                   help=f"inner solvers to measure, {SPEC_SYNTAX} (default: the run's own, then "
                        f"{', '.join(DEFAULT_ALTERNATIVES)})")
    p.add_argument("--reference", default=DEFAULT_REFERENCE, metavar="SPEC",
                   help=f"the tightly solved reference (default {DEFAULT_REFERENCE})")
    p.add_argument("--tolerance", type=float, help="residual tolerance (default: the run's check_optimality, 0.1)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS),
                   help="what-if: measure with the network's ReLUs replaced by this activation (same theta)")
    p.add_argument("--no-per-task", action="store_true", help="leave the per-task values out of the JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads of torch")
    p.add_argument("--output", default="runs/inner_accuracy",
                   help="writes inner_accuracy.json and inner_accuracy.md here (default runs/inner_accuracy)")
    p.add_argument("--name", default="inner_accuracy", help="file name stem of the outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_inner_accuracy(args: argparse.Namespace) -> int:
    """Run :func:`inner_accuracy_report` from parsed arguments; print the table, write JSON + markdown."""
    if args.checkpoint:
        if args.preset:
            raise ValueError("--preset describes an untrained model; a --checkpoint brings its own settings")
        config, theta, source = _theta_from_checkpoint(Path(args.checkpoint))
    else:
        values = apply_preset(args.preset) if args.preset else {"task": "omniglot", **OMNIGLOT_RECIPE}
        config, theta, source = TrainConfig(**values), None, None
    changes: dict[str, Any] = {}
    for key in ("ways", "shots", "queries", "data"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if ("ways" in changes or "shots" in changes) and "queries" not in changes:
        changes["queries"] = None  # the default for the new task shape
    config = dataclasses.replace(config, **changes).resolved()
    own = run_solver_spec(config)
    solvers = args.solvers or [own, *(spec for spec in DEFAULT_ALTERNATIVES if spec != own)]
    report = inner_accuracy_report(config, theta, solvers, reference=args.reference, tasks=args.tasks,
                                   split=args.split, seed=args.seed, tolerance=args.tolerance, device=args.device,
                                   per_task=not args.no_per_task, progress=not args.no_progress,
                                   theta_source=source, activation=args.activation)
    text = format_markdown(report)
    print(text, end="")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{args.name}.md").write_text(text)
    print(f"written {out / (args.name + '.json')}, {out / (args.name + '.md')}")
    return 0
