"""An equilibrium (implicit) layer ``z = tanh(W z + U x + b)`` trained on ``digits``.

The layer's output is the fixed point ``z*(x)``, found by Anderson acceleration (or plain
fixed-point iteration) and made differentiable with ``implicit_diff(fixed_point=...)``: the
backward pass solves ``(I - d step/dz)^T v = dL/dz`` for the adjoint ``v``. ``W`` is rescaled to
spectral norm ``contraction < 1`` (and ``tanh`` is 1-Lipschitz), so the map is a contraction: the
fixed point exists, is unique, and the Neumann series for the adjoint converges.

The experiment trains the same model twice, once with GMRES and once with the Neumann series in
the backward pass, and reports iterations, time and accuracy of the gradient against a dense
solve (``I - d step/dz`` is block diagonal, one ``hidden x hidden`` block per sample, so the dense
reference is exact and cheap).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import implicitdiff as idiff

from ..progress import progress_bar
from .datasets import StandardizedSplit, load_split
from .dense_reference import fixed_point_gradient
from .fixed_point_solvers import anderson_acceleration, fixed_point_iteration
from .reporting import markdown_table, new_figure, save_figure, write_json, write_text

__all__ = [
    "EquilibriumConfig",
    "TrainingRun",
    "init_model",
    "make_equilibrium_step",
    "make_equilibrium_layer",
    "classification_loss",
    "make_backward_solver",
    "train",
    "gradient_accuracy",
    "run",
]

Params = dict[str, torch.Tensor]
StepFn = Callable[[torch.Tensor, Params, torch.Tensor], torch.Tensor]


@dataclass
class EquilibriumConfig:
    """Settings of the equilibrium-layer experiment.

    Attributes
    ----------
    seed : int
        Seed of the split and of the initial weights.
    max_samples : int, optional
        Subsample ``digits`` (small test runs).
    hidden : int
        Size of the equilibrium state ``z``.
    contraction : float
        Spectral norm given to ``W`` (in (0, 1)).
    forward_solver : str
        ``"anderson"`` or ``"iteration"``.
    forward_tol, forward_max_iter : float, int
        Relative residual tolerance and budget of the forward solve.
    backward_tol, backward_maxiter : float, int
        Relative tolerance and budget of the backward linear solve during training.
    gmres_restart : int
        GMRES restart length.
    train_steps, lr : int, float
        Full-batch Adam steps and learning rate.
    device : str
        Torch device.
    """

    seed: int = 0
    max_samples: int | None = None
    hidden: int = 64
    contraction: float = 0.99
    forward_solver: str = "anderson"
    forward_tol: float = 1e-10
    forward_max_iter: int = 500
    backward_tol: float = 1e-8
    backward_maxiter: int = 1000
    gmres_restart: int = 20
    train_steps: int = 150
    lr: float = 1e-2
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 < self.contraction < 1.0:
            raise ValueError(f"contraction must be in (0, 1) for the map to be contractive, got {self.contraction}")
        if self.forward_solver not in ("anderson", "iteration"):
            raise ValueError(f"forward_solver must be 'anderson' or 'iteration', got {self.forward_solver!r}")
        if self.hidden < 1 or self.train_steps < 1:
            raise ValueError("hidden and train_steps must be positive")


def init_model(
    n_features: int,
    hidden: int,
    n_classes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> Params:
    """Random initial weights: ``W (h, h)``, ``U (h, d)``, ``b (h,)`` of the layer; ``V (k, h)``, ``c (k,)``
    of the readout.

    Examples
    --------
    >>> sorted(init_model(64, 8, 10))
    ['U', 'V', 'W', 'b', 'c']
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator, dtype=dtype)).to(device)

    return {
        "W": normal(hidden, hidden, scale=1.0 / math.sqrt(hidden)),
        "U": normal(hidden, n_features, scale=1.0 / math.sqrt(n_features)),
        "b": torch.zeros(hidden, dtype=dtype, device=device),
        "V": normal(n_classes, hidden, scale=1.0 / math.sqrt(hidden)),
        "c": torch.zeros(n_classes, dtype=dtype, device=device),
    }


def make_equilibrium_step(contraction: float) -> StepFn:
    """The fixed-point map ``step(z, params, x) = tanh(z W_c^T + x U^T + b)``, ``W_c = contraction * W / ||W||_2``.

    Examples
    --------
    >>> step = make_equilibrium_step(0.9)
    >>> p = init_model(4, 3, 2)
    >>> step(torch.zeros(5, 3, dtype=torch.float64), p, torch.ones(5, 4, dtype=torch.float64)).shape
    torch.Size([5, 3])
    """

    def step(z: torch.Tensor, params: Params, x: torch.Tensor) -> torch.Tensor:
        w = params["W"] * (contraction / torch.linalg.matrix_norm(params["W"], ord=2))
        return torch.tanh(z @ w.T + x @ params["U"].T + params["b"])

    return step


def classification_loss(z: torch.Tensor, params: Params, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the linear readout ``z V^T + c``."""
    return F.cross_entropy(z @ params["V"].T + params["c"], y)


def make_backward_solver(name: str, tol: float | None, maxiter: int, restart: int = 20):
    """``idiff.GMRES`` or ``idiff.Neumann`` (``tol=None``: a fixed budget of ``maxiter`` iterations)."""
    if name == "gmres":
        return idiff.GMRES(tol=tol, maxiter=maxiter, restart=restart)
    if name == "neumann":
        return idiff.Neumann(tol=tol, maxiter=maxiter)
    raise ValueError(f"backward solver must be 'gmres' or 'neumann', got {name!r}")


def make_equilibrium_layer(config: EquilibriumConfig, backward_solver) -> tuple[Callable[..., torch.Tensor], list[int]]:
    """The implicit layer ``layer(init, params, x) -> z*`` and a list collecting its forward iteration counts."""
    step = make_equilibrium_step(config.contraction)
    forward_iterations: list[int] = []

    @idiff.implicit_diff(fixed_point=step, solver=backward_solver)
    def layer(init: torch.Tensor, params: Params, x: torch.Tensor) -> torch.Tensor:
        solve = anderson_acceleration if config.forward_solver == "anderson" else fixed_point_iteration
        result = solve(lambda z: step(z, params, x), init, tol=config.forward_tol, max_iter=config.forward_max_iter)
        forward_iterations.append(result.iterations)
        return result.solution

    return layer, forward_iterations


@dataclass
class TrainingRun:
    """Result of :func:`train`.

    Attributes
    ----------
    backward : str
        ``"gmres"`` or ``"neumann"``.
    params : dict of str to torch.Tensor
        Trained weights.
    losses : list of float
        Training loss at each step.
    forward_iterations, backward_iterations : list of int
        Iterations of the forward fixed-point solve and of the backward linear solve, per step.
    backward_relative_residuals : list of float
        Final relative residual of each backward solve (from ``idiff.record_solves``).
    seconds : float
        Wall time of training.
    test_accuracy : float
        Accuracy on the test set after training.
    """

    backward: str
    params: Params
    losses: list[float]
    forward_iterations: list[int]
    backward_iterations: list[int]
    backward_relative_residuals: list[float]
    seconds: float
    test_accuracy: float


def _predict(layer: Callable[..., torch.Tensor], params: Params, x: torch.Tensor, hidden: int) -> torch.Tensor:
    with torch.no_grad():
        z = layer(x.new_zeros(x.shape[0], hidden), params, x)
        return (z @ params["V"].T + params["c"]).argmax(dim=-1)


def train(
    split: StandardizedSplit, config: EquilibriumConfig, backward: str = "gmres", *, progress: bool = False
) -> TrainingRun:
    """Full-batch Adam training of the equilibrium model with the given backward solver.

    ``progress``: a progress bar over the training steps (rate and ETA) on stderr.

    Examples
    --------
    >>> split = load_split("digits", max_samples=200)
    >>> run_ = train(split, EquilibriumConfig(hidden=8, train_steps=2))
    >>> len(run_.losses), run_.backward_iterations[0] > 0
    (2, True)
    """
    dtype, device = split.x_train.dtype, split.x_train.device
    params = {
        k: v.requires_grad_(True)
        for k, v in init_model(
            split.n_features, config.hidden, split.n_classes, seed=config.seed, dtype=dtype, device=device
        ).items()
    }
    solver = make_backward_solver(backward, config.backward_tol, config.backward_maxiter, config.gmres_restart)
    layer, forward_iterations = make_equilibrium_layer(config, solver)
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
    z = split.x_train.new_zeros(split.x_train.shape[0], config.hidden)
    losses, backward_iterations, residuals = [], [], []
    start = time.perf_counter()
    bar = progress_bar(config.train_steps, f"equilibrium training ({backward} backward)", unit="step",
                       enabled=progress)
    for _ in range(config.train_steps):
        with idiff.record_solves() as log:
            z_star = layer(z, params, split.x_train)
            loss = classification_loss(z_star, params, split.y_train)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        z = z_star.detach()  # warm start of the next forward solve
        solves = [info for info in log if info.kind == "backward"]
        if len(solves) != 1:
            raise RuntimeError(f"expected one backward solve per step, the log has {len(solves)}")
        backward_iterations.append(int(solves[0].iterations))
        residuals.append(float(solves[0].relative_residual))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    trained = {k: v.detach() for k, v in params.items()}
    predictions = _predict(layer, trained, split.x_test, config.hidden)
    test_accuracy = float((predictions == split.y_test).double().mean())
    return TrainingRun(
        backward, trained, losses, forward_iterations[: config.train_steps], backward_iterations, residuals, seconds,
        test_accuracy,
    )


def _flat(tree: Params) -> torch.Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def gradient_accuracy(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EquilibriumConfig,
    settings: list[tuple[str, float | None, int]],
    repeats: int = 3,
) -> list[dict]:
    """Compare backward solvers with a dense solve: gradient error, iterations, residual, time.

    Parameters
    ----------
    params : dict
        Model weights at which the gradient is taken.
    x, y : torch.Tensor
        Batch.
    settings : list of (name, tol, maxiter)
        Backward solvers to compare (``name`` in ``{"gmres", "neumann"}``).
    repeats : int
        The time reported is the fastest of this many backward passes.

    Returns
    -------
    list of dict
        One row per setting.
    """
    step = make_equilibrium_step(config.contraction)
    z_start = x.new_zeros(x.shape[0], config.hidden)
    forward = anderson_acceleration(
        lambda z: step(z, params, x), z_start, tol=config.forward_tol, max_iter=config.forward_max_iter
    )
    reference = _flat(fixed_point_gradient(step, classification_loss, forward.solution, params, x, y))
    rows = []
    for name, tol, maxiter in settings:
        layer, _ = make_equilibrium_layer(config, make_backward_solver(name, tol, maxiter, config.gmres_restart))
        best = math.inf
        for _ in range(repeats):
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            z_star = layer(forward.solution, leaves, x)  # forward already converged: this times the backward pass
            loss = classification_loss(z_star, leaves, y)
            with idiff.record_solves() as log:
                start = time.perf_counter()
                grads = torch.autograd.grad(loss, list(leaves.values()))
                best = min(best, time.perf_counter() - start)
        info = next(i for i in log if i.kind == "backward")
        estimate = _flat(dict(zip(leaves, grads)))
        rows.append(
            {
                "backward solver": "GMRES" if name == "gmres" else "Neumann",
                "tol": "fixed budget" if tol is None else tol,
                "iterations": int(info.iterations),
                "relative residual": float(info.relative_residual),
                "backward seconds": best,
                "gradient rel. error vs dense": float((estimate - reference).norm() / reference.norm()),
            }
        )
    return rows


def _forward_comparison(params: Params, x: torch.Tensor, config: EquilibriumConfig) -> list[dict]:
    step = make_equilibrium_step(config.contraction)
    z_start = x.new_zeros(x.shape[0], config.hidden)
    rows = []
    solvers = (("fixed-point iteration", fixed_point_iteration), ("Anderson acceleration (m=5)", anderson_acceleration))
    for label, solve in solvers:
        start = time.perf_counter()
        result = solve(lambda z: step(z, params, x), z_start, tol=config.forward_tol, max_iter=config.forward_max_iter)
        seconds = time.perf_counter() - start
        rows.append(
            {"forward solver": label, "iterations": result.iterations, "residual": result.residual, "seconds": seconds}
        )
    return rows


def _plot_training(runs: list[TrainingRun], path: Path) -> Path:
    fig, (left, right) = new_figure(ncols=2, width=4.5)
    for run_ in runs:
        label = "GMRES" if run_.backward == "gmres" else "Neumann"
        left.plot(run_.losses, label=label)
        right.plot(run_.backward_iterations, label=label)
    left.set_xlabel("training step (Adam, full batch)")
    left.set_ylabel("training cross-entropy")
    left.set_yscale("log")
    left.legend()
    right.set_xlabel("training step")
    right.set_ylabel("backward iterations")
    right.legend()
    return save_figure(fig, path)


def run(config: EquilibriumConfig, out_dir: Path, *, progress: bool = False) -> dict:
    """Train with GMRES and with Neumann backward passes, compare gradients with a dense solve, write results.

    Writes ``results.json``, ``training_table.md``, ``gradient_table.md``, ``forward_table.md`` and
    ``training.png`` to ``out_dir``; returns the JSON content. ``progress``: progress bars of the two
    trainings on stderr.
    """
    torch.manual_seed(config.seed)
    split = load_split("digits", seed=config.seed, max_samples=config.max_samples, device=config.device)
    runs = [train(split, config, "gmres", progress=progress), train(split, config, "neumann", progress=progress)]
    training_rows = [
        {
            "backward solver": "GMRES" if r.backward == "gmres" else "Neumann",
            "final training loss": r.losses[-1],
            "test accuracy": r.test_accuracy,
            "mean backward iterations": sum(r.backward_iterations) / len(r.backward_iterations),
            "max backward rel. residual": max(r.backward_relative_residuals),
            "mean forward iterations": sum(r.forward_iterations) / len(r.forward_iterations),
            "training seconds": r.seconds,
        }
        for r in runs
    ]
    trained = runs[0].params
    settings = [
        ("gmres", 1e-4, config.backward_maxiter),
        ("gmres", 1e-8, config.backward_maxiter),
        ("neumann", 1e-4, config.backward_maxiter),
        ("neumann", 1e-8, config.backward_maxiter),
        ("neumann", None, 10),
    ]
    gradient_rows = gradient_accuracy(trained, split.x_train, split.y_train, config, settings)
    forward_rows = _forward_comparison(trained, split.x_train, config)
    out_dir = Path(out_dir)
    results = {
        "config": asdict(config),
        "split_sizes": {"train": len(split.y_train), "validation": len(split.y_val), "test": len(split.y_test)},
        "training": training_rows,
        "gradient_accuracy": gradient_rows,
        "forward": forward_rows,
        "losses": {r.backward: r.losses for r in runs},
        "backward_iterations": {r.backward: r.backward_iterations for r in runs},
    }
    write_json(results, out_dir / "results.json")
    write_text(markdown_table(training_rows), out_dir / "training_table.md")
    write_text(markdown_table(gradient_rows), out_dir / "gradient_table.md")
    write_text(markdown_table(forward_rows), out_dir / "forward_table.md")
    _plot_training(runs, out_dir / "training.png")
    return results
