"""Tune every method on the same small grid, chosen on validation tasks, scored once on test tasks.

A comparison is only as fair as the tuning behind it. :func:`tune` gives every method the same
budget: a grid of settings (the same number of training runs per method), every run trained for
the same number of meta-iterations, every run scored on the same *validation* episodes (seed
``seed + 2000``, never the test episodes), the best one by the validation metric kept, and only
that one scored on the test episodes of ``compare``
(seed ``seed + 1000``). A run whose meta-loss becomes non-finite counts as a failed grid point
(worst validation score) and the tuning goes on.

A *method* here is a label: ``maml``, ``fomaml``, ``imaml-gd`` (iMAML, gradient-descent inner
solver) or ``imaml-hf`` (iMAML, Newton-CG inner solver). :data:`SINUSOID_GRIDS` is the default
grid on the sinusoid task: three values of each method's most sensitive setting (the inner step
size for the GD inner loops, λ for Newton-CG, which has no step size), the rest at the method's
standard values.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .comparison import evaluation_seed, maml_inner_loop
from .data import fixed_episodes
from .evaluation import evaluate
from .trainer import MetaTrainer, NonFiniteMetaLossError, TrainConfig, build_task_splits

__all__ = ["METHOD_SETTINGS", "SINUSOID_GRIDS", "format_tuning_table", "method_settings", "parse_grid", "tune",
           "validation_seed"]

#: What each method label sets on top of the shared configuration on the sinusoid task (its
#: standard inner loop). The MAML variants take ``compare``'s inner loop for MAML
#: (:func:`~applications.meta_learning.comparison.maml_inner_loop`: on sinusoid 5 GD steps of
#: 0.01); on Omniglot the iMAML variants set only the algorithm and inner solver (the shared
#: configuration's inner loop is kept).
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "maml": {"algorithm": "maml"},
    "fomaml": {"algorithm": "fomaml"},
    # iMAML-GD: the default 10 GD steps for sinusoid and the paper's lam = 2, no early stop; the
    # step size is its grid's (0.1, the Omniglot default, diverges on sinusoid for every lam)
    "imaml-gd": {"algorithm": "imaml", "inner_solver": "gd", "inner_steps": 10, "lam": 2.0, "inner_tol": None},
    # iMAML-HF: Newton-CG to 1e-3 (the sinusoid preset's inner solver)
    "imaml-hf": {"algorithm": "imaml", "inner_solver": "hf", "inner_steps": 20, "hf_cg_steps": 5,
                 "inner_tol": 1e-3},
}

#: Default grids on the sinusoid task: three settings per method (equal budgets).
SINUSOID_GRIDS: dict[str, dict[str, list[Any]]] = {
    "maml": {"inner_lr": [0.01, 0.03, 0.1]},
    "fomaml": {"inner_lr": [0.01, 0.03, 0.1]},
    "imaml-gd": {"inner_lr": [0.01, 0.03, 0.1]},
    "imaml-hf": {"lam": [1.0, 2.0, 5.0]},
}


def method_settings(method: str, config: TrainConfig) -> dict[str, Any]:
    """The settings ``method`` adds to the shared ``config`` (see :data:`METHOD_SETTINGS`).

    Examples
    --------
    >>> method_settings("maml", TrainConfig(task="omniglot", inner_steps=20, inner_lr=0.25, inner_tol=0.1))
    {'algorithm': 'maml', 'inner_lr': 0.5, 'inner_steps': 5, 'inner_tol': None}
    >>> method_settings("imaml-hf", TrainConfig(task="omniglot"))
    {'algorithm': 'imaml', 'inner_solver': 'hf'}
    """
    if method not in METHOD_SETTINGS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHOD_SETTINGS)}")
    settings = dict(METHOD_SETTINGS[method])
    if settings["algorithm"] != "imaml":  # MAML's own fixed-step loop, as compare gives it
        return {**settings, **maml_inner_loop(config)}
    if config.task == "sinusoid":
        return settings
    return {k: settings[k] for k in ("algorithm", "inner_solver")}


def validation_seed(config: TrainConfig) -> int:
    """Seed of the validation episodes used for tuning (distinct from training and test seeds)."""
    return config.seed + 2000


def parse_grid(text: str) -> tuple[str, dict[str, list[Any]]]:
    """``"maml:inner_lr=0.01,0.03;inner_steps=1,5"`` -> ``("maml", {"inner_lr": [...], ...})``.

    Values are parsed as int, then float, else kept as strings; keys must be fields of
    :class:`~applications.meta_learning.trainer.TrainConfig`.

    Examples
    --------
    >>> parse_grid("imaml-gd:lam=1,2.5")
    ('imaml-gd', {'lam': [1, 2.5]})
    """
    method, sep, body = text.partition(":")
    method = method.strip()
    if not sep or not body.strip():
        raise ValueError(f"a grid is METHOD:KEY=V1,V2[;KEY=...], got {text!r}")
    if method not in METHOD_SETTINGS:
        raise ValueError(f"unknown method {method!r} in grid {text!r}; choose from {sorted(METHOD_SETTINGS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list[Any]] = {}
    for part in body.split(";"):
        key, eq, values = part.partition("=")
        key = key.strip()
        if not eq or not values.strip():
            raise ValueError(f"a grid entry is KEY=V1,V2, got {part!r} in {text!r}")
        if key not in fields:
            raise ValueError(f"{key!r} in grid {text!r} is not a training setting; choose from {sorted(fields)}")
        grid[key] = [_parse_value(v.strip()) for v in values.split(",") if v.strip()]
    return method, grid


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "accuracy" else a < b


def tune(
    config: TrainConfig,
    grids: Mapping[str, Mapping[str, Sequence[Any]]],
    output_dir: str | Path,
    *,
    validation_episodes: int = 200,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Tune every method of ``grids`` on validation episodes; score each method's best run on the test episodes.

    Parameters
    ----------
    config : TrainConfig
        Shared settings (task, shots, meta-batch, iterations, seed, test episodes, ...); every
        run trains ``config.iterations`` meta-iterations.
    grids : mapping
        ``{method: {setting: [values, ...]}}`` (the Cartesian product of the values is tried),
        methods from :data:`METHOD_SETTINGS`.
    output_dir : path
        Gets ``tuning.md``, ``tuning.json`` (rewritten after every run) and one folder per run.
    validation_episodes : int
        Validation episodes per grid point.

    Returns
    -------
    list of dict
        One row per method: ``method``, ``chosen`` (the winning grid point), ``validation``
        (its mean), ``metric``, ``mean`` / ``ci95`` (test), ``train_seconds`` (the chosen
        run's), ``tuning_seconds`` (all its runs), ``runs`` (every grid point's record).

    Examples
    --------
    >>> import tempfile
    >>> cfg = TrainConfig(task="sinusoid", meta_batch=2, iterations=2, eval_episodes=4, use_vmap=False)
    >>> rows = tune(cfg, {"maml": {"inner_lr": [0.01, 0.02]}}, tempfile.mkdtemp(),
    ...             validation_episodes=4, progress=False)
    >>> len(rows[0]["runs"]), rows[0]["chosen"]["inner_lr"] in (0.01, 0.02)
    (2, True)
    """
    unknown = [m for m in grids if m not in METHOD_SETTINGS]
    if unknown or not grids:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHOD_SETTINGS)}")
    if validation_episodes < 1:
        raise ValueError(f"validation_episodes must be >= 1, got {validation_episodes}")
    config = config.resolved()
    if config.all_characters:
        raise ValueError("tuning scores on held-out tasks: drop --all-characters")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = build_task_splits(config)
    val_episodes = fixed_episodes(splits["val"], validation_episodes, seed=validation_seed(config))
    test_episodes = fixed_episodes(splits["test"], config.eval_episodes, seed=evaluation_seed(config))

    rows: list[dict[str, Any]] = []
    for method, grid in grids.items():
        points = _grid_points(grid)
        if not points:
            raise ValueError(f"the grid of {method} is empty")
        runs: list[dict[str, Any]] = []
        best: tuple[dict[str, Any], MetaTrainer] | None = None
        for index, point in enumerate(points):
            cfg = dataclasses.replace(config, **{**method_settings(method, config), **point}).resolved()
            trainer = MetaTrainer(cfg, splits["train"], device=device, output_dir=output_dir / method / f"run{index}")
            trainer.label = method
            start = time.perf_counter()
            record: dict[str, Any] = {"point": point, "settings": cfg.to_dict()}
            try:
                trainer.train(progress=progress)
            except NonFiniteMetaLossError as err:
                record.update(failed=str(err), validation=None, train_seconds=time.perf_counter() - start)
                runs.append(record)
                continue
            result = evaluate(trainer.objective, trainer.theta, val_episodes, device=device, progress=progress,
                              desc=f"{method} {point} validation")
            record.update(validation=result.mean, validation_ci95=result.ci95, metric=result.metric,
                          train_seconds=trainer.train_seconds)
            runs.append(record)
            if math.isfinite(result.mean) and (best is None or _better(result.metric, result.mean,
                                                                        best[0]["validation"])):
                best = (record, trainer)
        row: dict[str, Any] = {"method": method, "grid": {k: list(v) for k, v in grid.items()}, "runs": runs,
                               "tuning_seconds": sum(r["train_seconds"] for r in runs)}
        if best is None:
            row.update(chosen=None, validation=None, metric=None, mean=None, ci95=None, train_seconds=None,
                       n_episodes=0)
        else:
            record, trainer = best
            result = evaluate(trainer.objective, trainer.theta, test_episodes, device=device, progress=progress,
                              desc=f"{method} test")
            row.update(chosen=record["point"], validation=record["validation"], metric=result.metric,
                       mean=result.mean, ci95=result.ci95, train_seconds=record["train_seconds"],
                       n_episodes=result.n_episodes)
        rows.append(row)
        _write(output_dir, config, validation_episodes, rows)
    return rows


def _format_metric(metric: str | None, mean: float | None, ci95: float | None = None) -> str:
    if mean is None or metric is None:
        return "failed"
    if metric == "accuracy":
        return f"{100 * mean:.2f}%" + ("" if ci95 is None else f" +- {100 * ci95:.2f}%")
    return f"{mean:.3f}" + ("" if ci95 is None else f" +- {ci95:.3f}")


def format_tuning_table(rows: list[dict[str, Any]], config: TrainConfig, validation_episodes: int) -> str:
    """Markdown: per method the grid, every grid point's validation score, the choice and its test score."""
    config = config.resolved()
    lines = [f"### {config.task}: every method tuned on the same grid budget",
             "",
             f"{config.iterations} meta-iterations per run, meta-batch {config.meta_batch}; grid points scored on "
             f"{validation_episodes} validation episodes (seed {validation_seed(config)}), the chosen one on "
             f"{config.eval_episodes} test episodes (seed {evaluation_seed(config)}).",
             "",
             "| method | grid (validation score per point) | chosen | test (mean +- 95% CI) | "
             "train time (chosen) | tuning time (all runs) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        scores = ", ".join(
            f"{_fmt_point(run['point'])}: {_format_metric(run.get('metric'), run['validation'])}"
            for run in r["runs"])
        chosen = _fmt_point(r["chosen"]) if r["chosen"] is not None else "none"
        test = _format_metric(r["metric"], r["mean"], r["ci95"])
        train = f"{r['train_seconds']:.0f} s" if r["train_seconds"] is not None else "-"
        lines.append(f"| {r['method']} | {scores} | {chosen} | {test} | {train} | {r['tuning_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def _fmt_point(point: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def _write(output_dir: Path, config: TrainConfig, validation_episodes: int, rows: list[dict[str, Any]]) -> None:
    (output_dir / "tuning.md").write_text(format_tuning_table(rows, config, validation_episodes))
    (output_dir / "tuning.json").write_text(json.dumps(
        {"config": config.to_dict(), "validation_episodes": validation_episodes,
         "validation_seed": validation_seed(config), "test_seed": evaluation_seed(config), "results": rows},
        indent=1))
