"""Train several methods on the same splits, evaluate them on the same held-out episodes, one table.

Methods: the meta-learners of :mod:`.algorithms` (``imaml``, ``maml``, ``fomaml``) and the
supervised pre-training ``baseline`` of :mod:`.baseline` (Omniglot only). Every method sees
the same training split, seed and test episodes; the table reports the mean query accuracy
(or post-adaptation MSE for sinusoid) with its 95% CI and the training wall time. A supervised
training shared by the baseline row and the meta-learners' pre-trained start
(``pretrain_epochs``) runs once; its time counts in every row that uses it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .baseline import BaselineConfig, evaluate_baseline, train_baseline
from .data import fixed_episodes
from .evaluation import evaluate
from .presets import MAML_OMNIGLOT, MAML_SINUSOID
from .trainer import MetaTrainer, TrainConfig, build_task_splits, pretraining_config

__all__ = ["METHODS", "compare", "describe_settings", "format_table", "evaluation_seed", "maml_inner_loop"]

METHODS = ("imaml", "maml", "fomaml", "baseline")


def evaluation_seed(config: TrainConfig) -> int:
    """Seed of the held-out evaluation episodes (distinct from the training sampler's)."""
    return config.seed + 1000


def maml_inner_loop(config: TrainConfig, inner_lr: float | None = None,
                    inner_steps: int | None = None) -> dict[str, Any]:
    """The changes of ``config`` that give (first-order) MAML its own inner loop in ``compare``.

    MAML differentiates through a fixed number of GD steps: sinusoid takes MAML's own loop
    (``presets.MAML_SINUSOID``: 5 steps of 0.01; iMAML's would diverge), an Omniglot run whose
    inner loop solves to a tolerance (the recipe's) takes
    :data:`~applications.meta_learning.presets.MAML_OMNIGLOT`, any other keeps the run's steps;
    ``inner_lr`` / ``inner_steps`` (``--maml-inner-*``) win.

    Examples
    --------
    >>> maml_inner_loop(TrainConfig(task="omniglot", inner_steps=20, inner_lr=0.25, inner_tol=0.1))
    {'inner_lr': 0.5, 'inner_steps': 5, 'inner_tol': None}
    >>> maml_inner_loop(TrainConfig(task="omniglot", inner_steps=16), inner_lr=0.2)
    {'inner_lr': 0.2}
    """
    if config.task == "sinusoid":
        changes: dict[str, Any] = dict(MAML_SINUSOID)
    else:
        changes = dict(MAML_OMNIGLOT) if config.inner_tol is not None else {}
    if inner_lr is not None:
        changes["inner_lr"] = inner_lr
    if inner_steps is not None:
        changes["inner_steps"] = inner_steps
    if config.inner_tol is not None:
        changes["inner_tol"] = None  # (first-order) MAML take a fixed number of steps
    if config.inner_solver != "gd":
        changes["inner_solver"] = "gd"
    return changes


def compare(
    config: TrainConfig,
    methods: Sequence[str],
    output_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    overrides: dict[str, dict[str, Any]] | None = None,
    baseline_config: BaselineConfig | None = None,
    progress: bool = True,
    characters=None,
) -> list[dict[str, Any]]:
    """Train and evaluate ``methods``; write ``comparison.md`` and ``comparison.json`` to ``output_dir``.

    Parameters
    ----------
    config : TrainConfig
        Shared settings (task, ways, shots, iterations, seed, evaluation episodes, ...).
    methods : sequence of str
        Subset of :data:`METHODS`.
    overrides : dict, optional
        Per-method changes of ``config`` (e.g. ``{"maml": {"inner_lr": 0.01}}``).
    baseline_config : BaselineConfig, optional
        Settings of the supervised baseline.

    Returns
    -------
    list of dict
        One row per method: ``method``, ``metric``, ``mean``, ``ci95``, ``train_seconds``, ``n_episodes``,
        ``per_episode`` (the metric of every test episode, in order: rows can be compared pairwise).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    config = config.resolved()
    if "baseline" in methods and config.task != "omniglot":
        raise ValueError("the supervised baseline is a classifier: use it with --task omniglot")
    if config.all_characters:
        raise ValueError("compare scores every method on held-out characters: drop --all-characters")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    splits = build_task_splits(config, characters)
    episodes = fixed_episodes(splits["test"], config.eval_episodes, seed=evaluation_seed(config))
    supervised_runs: dict[tuple, tuple] = {}

    def supervised(bcfg: BaselineConfig) -> tuple:
        # The baseline row and the meta-learners' pre-training are often the same training: run it once.
        key = dataclasses.astuple(bcfg)
        if key not in supervised_runs:
            supervised_runs[key] = train_baseline(splits["train"].images, bcfg, device=device, progress=progress,
                                                  desc="supervised training (baseline and pre-training)")
        return supervised_runs[key]

    rows: list[dict[str, Any]] = []
    for method in methods:
        if method == "baseline":
            bcfg = baseline_config or BaselineConfig(seed=config.seed, hidden=config.hidden)
            model, stats = supervised(bcfg)
            seconds = stats["wall_time_s"]
            result = evaluate_baseline(model, episodes, head=bcfg.head, device=device, progress=progress,
                                       desc="baseline evaluation")
            row = {"method": f"baseline ({bcfg.head})", "metric": "accuracy", "mean": result["accuracy"],
                   "ci95": result["ci95"], "train_seconds": seconds, "n_episodes": result["n_episodes"],
                   "per_episode": [float(a) for a in result["accuracies"]], "settings": dataclasses.asdict(bcfg)}
        else:
            cfg = dataclasses.replace(config, algorithm=method, **(overrides or {}).get(method, {})).resolved()
            trainer = MetaTrainer(cfg, splits["train"], device=device, output_dir=output_dir / method)
            if cfg.pretrain_epochs > 0:
                trainer.pretrain(pretrained=supervised(pretraining_config(cfg)))
            trainer.label = method
            if method in ("maml", "fomaml"):
                trainer.inner_flags = ("--maml-inner-lr", "--maml-inner-steps")
            trainer.train(progress=progress)
            result = evaluate(trainer.objective, trainer.theta, episodes, device=device, progress=progress,
                              desc=f"{method} evaluation")
            label = method if method != "imaml" else f"imaml-{cfg.inner_solver}"
            residuals = [h["inner_residual"] for h in trainer.history if h["inner_residual"] == h["inner_residual"]]
            row = {"method": label, "metric": result.metric, "mean": result.mean, "ci95": result.ci95,
                   "train_seconds": trainer.train_seconds, "n_episodes": result.n_episodes,
                   "final_inner_residual": residuals[-1] if residuals else None,
                   "per_episode": [float(v) for v in result.per_episode], "settings": cfg.to_dict()}
        rows.append(row)
        write_comparison(output_dir, config, rows)
    return rows


def describe_settings(method: str, config: TrainConfig) -> str:
    """One line with the inner-loop settings a method trains with (what ``compare`` prints).

    Examples
    --------
    >>> describe_settings("maml", TrainConfig(task="sinusoid", algorithm="maml", inner_lr=0.01, inner_steps=5))
    'maml: inner gd, 5 steps of size 0.01, meta-lr 0.001, meta-batch 25'
    """
    cfg = dataclasses.replace(config, algorithm=method).resolved()
    text = f"{method}: inner {cfg.inner_solver}, {cfg.inner_steps} steps of size {cfg.inner_lr}"
    if cfg.inner_solver == "hf":
        text = f"{method}: inner hf (Newton-CG), up to {cfg.inner_steps} steps x {cfg.hf_cg_steps} CG"
    if cfg.inner_tol is not None:
        text += f", to tolerance {cfg.inner_tol}"
    if method == "imaml":
        text += f", lam {cfg.lam}, {cfg.cg_steps} {cfg.meta_solver} steps for the meta-gradient"
    return text + f", meta-lr {cfg.meta_lr}, meta-batch {cfg.meta_batch}"


def format_table(rows: list[dict[str, Any]], config: TrainConfig) -> str:
    """Markdown table of the comparison."""
    if config.task == "omniglot":
        title = f"Omniglot {config.ways}-way {config.shots}-shot, held-out characters"
        recipe = [text for text, on in ((f"{config.head} head", config.head != "linear"),
                                        (f"{config.pretrain_epochs} pre-training epochs", config.pretrain_epochs > 0),
                                        ("augmented tasks", config.augment)) if on]
        if recipe:
            title += f" (meta-learners: {', '.join(recipe)})"
    else:
        title = f"Sinusoid regression, {config.shots} shots"
    lines = [f"### {title}", "",
             "| method | test metric (mean +- 95% CI) | episodes | training wall time |",
             "|---|---|---|---|"]
    for r in rows:
        if r["metric"] == "accuracy":
            value = f"accuracy {100 * r['mean']:.2f}% +- {100 * r['ci95']:.2f}%"
        else:
            value = f"MSE {r['mean']:.4f} +- {r['ci95']:.4f}"
        lines.append(f"| {r['method']} | {value} | {r['n_episodes']} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def write_comparison(output_dir: Path, config: TrainConfig, rows: list[dict[str, Any]]) -> None:
    """``comparison.md`` and ``comparison.json``."""
    (output_dir / "comparison.md").write_text(format_table(rows, config))
    (output_dir / "comparison.json").write_text(json.dumps({"config": config.to_dict(), "results": rows}, indent=1))
