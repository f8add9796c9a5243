"""Command line: ``python -m applications.meta_learning {train,evaluate,compare,tune,inner-accuracy} ...``.

Examples
--------
Quick run on the bundled Omniglot (2-core CPU, a few minutes)::

    python -m applications.meta_learning train --preset quick --output runs/quick

The paper's 5-way 1-shot iMAML-GD (GPU)::

    python -m applications.meta_learning train --task omniglot --ways 5 --shots 1 --iterations 30000 --device cuda

Evaluate a checkpoint on 600 held-out episodes, compare methods on the same episodes::

    python -m applications.meta_learning evaluate --checkpoint runs/quick/checkpoint.pt
    python -m applications.meta_learning compare --preset quick --methods imaml,maml,fomaml,baseline --output runs/cmp

Every method tuned on the same grid budget (validation tasks), each best scored once on test tasks::

    python -m applications.meta_learning tune --preset sinusoid --iterations 200 --output runs/tune

A final model on every character, scored on the 20 one-shot runs of Lake et al. (2015)::

    python -m applications.meta_learning train --all-characters --output runs/final --lake-runs all_runs.zip
    python -m applications.meta_learning evaluate --checkpoint runs/final --lake-runs all_runs.zip
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from . import distributed as mdist
from .algorithms import ALGORITHMS
from .baseline import BaselineConfig, evaluate_baseline, train_baseline
from .checkpoint import CheckpointError, save_checkpoint
from .comparison import METHODS, compare, describe_settings, evaluation_seed, format_table, maml_inner_loop
from .data import (
    OMNIGLOT_ENV_VAR,
    OMNIGLOT_SOURCE_URL,
    fixed_episodes,
    resolve_omniglot_root,
)
from .evaluation import MIN_PAPER_EPISODES, evaluate
from .inner_accuracy import add_inner_accuracy_parser, cmd_inner_accuracy
from .lake import LakeRun, evaluate_lake_runs, format_lake_results, load_lake_runs
from .learner import MetaLearner
from .presets import OMNIGLOT_RECIPE, PRESETS, apply_preset
from .trainer import (
    CHECKPOINT_NAME,
    TASK_HEADS,
    MetaTrainer,
    NonFiniteMetaLossError,
    TrainConfig,
    build_task_splits,
)
from .tuning import METHOD_SETTINGS, SINUSOID_GRIDS, format_tuning_table, parse_grid, tune

__all__ = ["main", "build_parser", "config_from_args"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(ValueError):
    """Bad command-line input (reported without a traceback, exit code 2)."""


def _tolerance_or_off(text: str) -> float | str:
    return "off" if text.lower() in ("off", "none") else float(text)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named settings; explicit flags override them")
    g.add_argument("--task", choices=("omniglot", "sinusoid"))
    g.add_argument("--ways", type=int, help="classes per task (Omniglot)")
    g.add_argument("--shots", type=int, help="support examples per class (default 1; sinusoid 10 points)")
    g.add_argument("--queries", type=int, help="query examples per class (default 15 for 5-way, 5 for 20-way)")
    g.add_argument("--data", help=f"Omniglot location (else ${OMNIGLOT_ENV_VAR}, else ../shared/data/omniglot)")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", choices=(*ALGORITHMS, "baseline"),
                   help="meta-learner, or (train only) the supervised pre-training baseline")
    g.add_argument("--inner-solver", choices=("gd", "hf"), help="gradient descent or Hessian-free Newton-CG")
    g.add_argument("--lam", type=float, help="iMAML proximal strength (paper: 2.0)")
    g.add_argument("--inner-steps", type=int, help="inner GD / Newton steps (paper: 16 for 5-way, 25 for 20-way)")
    g.add_argument("--inner-lr", type=float, help="inner GD step size (paper: 0.1)")
    g.add_argument("--inner-tol", type=_tolerance_or_off,
                   help="stop the inner solver at this relative gradient norm ('off': run every step; the "
                        "Omniglot recipe's is 0.1)")
    g.add_argument("--hf-cg-steps", type=int, help="CG steps per Newton step of the hf inner solver")
    g.add_argument("--cg-steps", type=int, help="Krylov steps for the iMAML meta-gradient (paper: 5)")
    g.add_argument("--meta-solver", choices=("cg", "minres"),
                   help="solver of the meta-gradient system (paper: cg; minres handles indefinite systems)")
    g.add_argument("--meta-damping", type=float, help="damping added to the meta-gradient system (default 0)")
    g.add_argument("--check-optimality", type=_tolerance_or_off,
                   help="tolerance of the inner-optimality check ||F(phi)|| <= tol ||F(theta)|| ('off' to disable)")
    g.add_argument("--head", choices=TASK_HEADS,
                   help="Omniglot head: 'linear' (the paper's, meta-learned) or 'prototype' (a cosine head every "
                        "task starts from its support prototypes)")
    g.add_argument("--pretrain-epochs", type=int,
                   help="Omniglot: initialise the CNN by this many epochs of supervised pre-training (default 0)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="Omniglot: random affine distortion of meta-training images (default off)")
    g = p.add_argument_group("training")
    g.add_argument("--meta-batch", type=int, help="tasks per meta-iteration (paper: 32)")
    g.add_argument("--meta-lr", type=float, help="Adam meta learning rate (paper: 1e-3)")
    g.add_argument("--iterations", type=int, help="meta-iterations")
    g.add_argument("--hidden", type=int, help="CNN filters / MLP units (64 / 40)")
    g.add_argument("--activation", choices=("relu", "silu", "tanh"),
                   help="sinusoid MLP activation (default silu: smooth, so iMAML's inner problem is solvable)")
    g.add_argument("--seed", type=int)
    g.add_argument("--vmap", action=argparse.BooleanOptionalAction, default=None,
                   help="batch the tasks of a meta-batch with torch.func.vmap (default on)")
    g.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    g.add_argument("--eval-episodes", type=int, help=f"held-out test episodes (default {MIN_PAPER_EPISODES})")
    g.add_argument("--all-characters", action="store_true", default=None,
                   help="Omniglot: train on every character, no held-out split (a model for use, not for a "
                        "table); the held-out evaluation is skipped (use --lake-runs)")


def _add_run_arguments(p: argparse.ArgumentParser, *, output_default: str) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's; 1 on a busy machine)")
    p.add_argument("--output", default=output_default, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the three subcommands."""
    parser = argparse.ArgumentParser(prog="python -m applications.meta_learning",
                                     description="iMAML / MAML / first-order MAML meta-learning (implicitdiff).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="meta-train, then evaluate on held-out tasks")
    _add_config_arguments(train)
    _add_run_arguments(train, output_default="runs/meta")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    train.add_argument("--lake-runs", metavar="DIR",
                       help="after training, also score the Lake et al. (2015) one-shot runs (all_runs folder "
                            "or .zip)")

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out episodes")
    ev.add_argument("--checkpoint", required=True, help="checkpoint file or the training output directory")
    ev.add_argument("--episodes", type=int, default=MIN_PAPER_EPISODES, help="number of test episodes")
    ev.add_argument("--split", choices=("test", "val"), default="test")
    ev.add_argument("--data", help="Omniglot location (default: the one used in training)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--threads", type=int, help="CPU threads of torch")
    ev.add_argument("--output", help="write evaluation.json / lake_runs.json here (default: next to the checkpoint)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--lake-runs", metavar="DIR",
                    help="score the 20 one-shot runs of Lake et al. (2015) (the all_runs folder or .zip of "
                         "github.com/brendenlake/omniglot) instead of held-out episodes; writes lake_runs.json")

    cmp_ = sub.add_parser("compare", help="train several methods, evaluate them on the same episodes, one table")
    _add_config_arguments(cmp_)
    _add_run_arguments(cmp_, output_default="runs/compare")
    cmp_.add_argument("--methods", default="imaml,maml,fomaml,baseline", help=f"comma-separated subset of {METHODS}")
    cmp_.add_argument("--maml-inner-lr", type=float,
                      help="inner step size for maml/fomaml (default: sinusoid 0.01, MAML's; Omniglot 0.5 when "
                           "the run's inner loop has a tolerance (the recipe's), else --inner-lr)")
    cmp_.add_argument("--maml-inner-steps", type=int,
                      help="inner steps for maml/fomaml (default: sinusoid 5; Omniglot 5 when the run's inner "
                           "loop has a tolerance, else --inner-steps)")
    cmp_.add_argument("--baseline-epochs", type=int, default=None, help="pre-training epochs of the baseline")

    tune_ = sub.add_parser("tune", help="tune every method on the same grid budget (validation tasks), then test "
                                        "each method's best once")
    _add_config_arguments(tune_)
    _add_run_arguments(tune_, output_default="runs/tune")
    tune_.add_argument("--methods", default=",".join(SINUSOID_GRIDS),
                       help=f"comma-separated subset of {sorted(METHOD_SETTINGS)} (default grids: sinusoid's)")
    tune_.add_argument("--grid", action="append", default=[], metavar="METHOD:KEY=V1,V2[;KEY=...]",
                       help="a method's grid (repeatable; replaces its default grid)")
    tune_.add_argument("--validation-episodes", type=int, default=200, help="validation episodes per grid point")
    add_inner_accuracy_parser(sub)
    return parser


_CONFIG_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _explicit_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration fields given on the command line."""
    values: dict[str, Any] = {}
    for key in _CONFIG_KEYS:
        arg = "vmap" if key == "use_vmap" else key
        value = getattr(args, arg, None)
        if value is not None:
            values[key] = value
    for key in ("check_optimality", "inner_tol"):
        if values.get(key) == "off":
            values[key] = None
    return values


def _validated(values: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig(**values).resolved()
    except ValueError as err:
        raise UsageError(str(err)) from err


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset (for Omniglot without one: :data:`~.presets.OMNIGLOT_RECIPE`), then explicit flags; validated.

    Fields neither names take :class:`~.trainer.TrainConfig`'s defaults (the paper's).
    """
    flags = _explicit_flags(args)
    values: dict[str, Any] = {}
    if args.preset:
        values.update(apply_preset(args.preset))
    elif flags.get("task", "omniglot") == "omniglot":
        values.update(OMNIGLOT_RECIPE)
    values.update(flags)
    return _validated(values)


#: Fields that only mean something for Omniglot (dropped when falling back to the sinusoid task).
_OMNIGLOT_ONLY = ("shots", "queries", "meta_batch", "hidden", "activation", "inner_steps", "data", "head",
                  "pretrain_epochs", "augment", "all_characters")


def _omniglot_or_fallback(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Switch to the sinusoid task (with a message) when no Omniglot data is found anywhere.

    The sinusoid run keeps only the explicit flags that apply to it (no preset, no recipe).
    """
    if config.task != "omniglot":
        return config
    root = resolve_omniglot_root(config.data)  # raises FileNotFoundError for an explicit bad path
    if root is not None:
        return dataclasses.replace(config, data=str(root))
    print(f"No Omniglot data found (no --data, ${OMNIGLOT_ENV_VAR} unset, nothing in ../shared/data/omniglot).\n"
          f"Get the archives images_background.zip / images_evaluation.zip from the dataset authors' repository "
          f"{OMNIGLOT_SOURCE_URL} (python/ folder) and pass --data DIR.\n"
          "Running the sinusoid regression task instead.", file=sys.stderr)
    flags = {k: v for k, v in _explicit_flags(args).items() if k not in _OMNIGLOT_ONLY}
    return _validated({**flags, "task": "sinusoid"})


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=1))


def _train_baseline(args: argparse.Namespace) -> int:
    """``train --algorithm baseline``: the supervised baseline on the run's split, scored on its test episodes."""
    config = config_from_args(argparse.Namespace(**{**vars(args), "algorithm": None}))
    root = resolve_omniglot_root(config.data) if config.task == "omniglot" else None
    if root is None:
        raise UsageError("--algorithm baseline is an Omniglot classifier and needs the Omniglot data "
                         f"(--data, ${OMNIGLOT_ENV_VAR} or ../shared/data/omniglot)")
    config = dataclasses.replace(config, data=str(root))
    splits = build_task_splits(config)
    # the recipe's pre-training length when it has one, else the baseline's default
    kw = {"epochs": config.pretrain_epochs} if config.pretrain_epochs > 0 else {}
    bcfg = BaselineConfig(seed=config.seed, hidden=config.hidden, **kw)
    model, stats = train_baseline(splits["train"].images, bcfg, device=args.device, progress=not args.no_progress)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    save_checkpoint(output / "baseline.pt", {"config": config.to_dict(), "baseline": dataclasses.asdict(bcfg),
                                             "model": model.state_dict()})
    summary: dict[str, Any] = {"config": config.to_dict(), "baseline": dataclasses.asdict(bcfg),
                               "train_seconds": stats["wall_time_s"],
                               "final_train_accuracy": stats["final_train_accuracy"]}
    if config.all_characters:
        print(NO_HELD_OUT, file=sys.stderr)
        summary["test"] = None
        summary["held_out_evaluation"] = NO_HELD_OUT
    elif not args.no_eval:
        episodes = fixed_episodes(splits["test"], config.eval_episodes, seed=evaluation_seed(config))
        result = evaluate_baseline(model, episodes, head=bcfg.head, device=args.device,
                                   progress=not args.no_progress)
        summary["test"] = {k: result[k] for k in ("accuracy", "ci95", "n_episodes", "head")}
        print(f"test accuracy {100 * result['accuracy']:.2f}% +- {100 * result['ci95']:.2f}% "
              f"({result['n_episodes']} episodes)  (training {stats['wall_time_s']:.0f} s)")
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"outputs in {output}/: baseline.pt, summary.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.algorithm == "baseline":
        return _train_baseline(args)
    config = _omniglot_or_fallback(config_from_args(args), args)
    lake = _lake_runs(config, args.lake_runs) if args.lake_runs else None
    device = torch.device(args.device)
    ctx = mdist.init_distributed(device)
    output = Path(args.output)
    try:
        splits = build_task_splits(config)
        trainer = MetaTrainer(config, splits["train"], device=device, output_dir=output, ctx=ctx)
        if args.resume:
            if not trainer.checkpoint_path.is_file():
                raise UsageError(f"--resume: no checkpoint at {trainer.checkpoint_path}")
            trainer.resume()
            if ctx.is_main:
                print(f"resumed at iteration {trainer.iteration} from {trainer.checkpoint_path}", file=sys.stderr)
        if ctx.is_main:
            output.mkdir(parents=True, exist_ok=True)
            (output / "config.json").write_text(json.dumps(trainer.config.to_dict(), indent=1))
        try:
            trainer.train(progress=not args.no_progress)
        except NonFiniteMetaLossError as err:
            kept = trainer.checkpoint_path if trainer.checkpoint_path.is_file() else "none written yet"
            print(f"error: {err}\nstopped; last good checkpoint: {kept}", file=sys.stderr)
            return EXIT_FAILURE
        summary: dict[str, Any] = {"config": trainer.config.to_dict(), "iterations": trainer.iteration,
                                   "train_seconds": trainer.train_seconds}
        if config.all_characters and ctx.is_main:
            print(NO_HELD_OUT, file=sys.stderr)
            summary["test"] = None
            summary["held_out_evaluation"] = NO_HELD_OUT
        elif not args.no_eval and ctx.is_main:
            episodes = fixed_episodes(splits["test"], config.eval_episodes, seed=evaluation_seed(config))
            if trainer.pretrained_model is not None:
                # the starting point, scored as the supervised baseline on the same episodes
                start = evaluate_baseline(trainer.pretrained_model, episodes, device=device,
                                          progress=not args.no_progress, desc="pre-trained start evaluation")
                summary["pretrained_baseline"] = {k: start[k] for k in ("accuracy", "ci95", "n_episodes", "head")}
                print(f"supervised baseline (the pre-trained start, prototype head): accuracy "
                      f"{100 * start['accuracy']:.2f}% +- {100 * start['ci95']:.2f}% ({start['n_episodes']} episodes)")
            result = evaluate(trainer.objective, trainer.theta, episodes, device=device,
                              progress=not args.no_progress, desc=f"{config.algorithm} evaluation")
            summary["test"] = result.to_dict()
            print(f"test {result.describe()}  (training {trainer.train_seconds:.0f} s)")
        if args.lake_runs and ctx.is_main:
            learner = MetaLearner(trainer.config, {k: v.detach() for k, v in trainer.theta.items()}, device=device)
            summary["lake_runs"] = _evaluate_lake(learner, lake, args.lake_runs, device=device,
                                                  progress=not args.no_progress)
        if ctx.is_main:
            (output / "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"outputs in {output}/: {CHECKPOINT_NAME}, metrics.csv, metrics.json, learning_curve.png, "
                  "summary.json")
        return 0
    finally:
        mdist.shutdown(ctx)


NO_HELD_OUT = ("trained on all characters (--all-characters): no held-out split, so no held-out evaluation; "
               "score the model on an external source (evaluate --lake-runs DIR)")


def _lake_runs(config: TrainConfig, source: str) -> list[LakeRun]:
    """The Lake et al. one-shot runs at ``source`` (read before any training: bad input fails fast)."""
    if config.task != "omniglot":
        raise UsageError(f"--lake-runs are Omniglot one-shot runs; this is a {config.task} model")
    runs = load_lake_runs(source)
    ways = {run.ways for run in runs}
    if len(ways) != 1:
        raise UsageError(f"the Lake runs in {source} have different numbers of classes {sorted(ways)}")
    (n_ways,) = ways
    if n_ways != config.ways and config.head != "prototype":
        raise UsageError(f"the Lake runs are {n_ways}-way and this model's linear head is "
                         f"{config.ways}-way: train with --ways {n_ways}, or with --head prototype "
                         "(a head set from the support images, any number of ways)")
    return runs


def _evaluate_lake(learner: MetaLearner, runs: list[LakeRun], source: str, *, device: Any,
                   progress: bool) -> dict[str, Any]:
    """Score ``learner`` on the Lake et al. one-shot ``runs`` (from ``source``); print per-run and overall errors.

    A checkpoint with a prototype head adapts to any number of ways (its head is set per task
    from the support images); one with the paper's linear head must have been trained with the
    runs' number of ways (20).
    """
    n_ways = runs[0].ways
    if n_ways != learner.config.ways:  # a prototype head (checked by _lake_runs): rebuild it n_ways-wide
        learner = MetaLearner(dataclasses.replace(learner.config, ways=n_ways), learner.theta, device=learner.device)
    learner.objective.use_vmap = False
    results = evaluate_lake_runs(learner.objective, learner.theta, runs, device=device, progress=progress)
    print(format_lake_results(results))
    return {"source": str(source), **results}


def cmd_evaluate(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    learner = MetaLearner.load(path, device=args.device)
    config = learner.config
    out = Path(args.output) if args.output else path.parent
    if args.lake_runs:
        runs = _lake_runs(config, args.lake_runs)
        results = _evaluate_lake(learner, runs, args.lake_runs, device=args.device, progress=not args.no_progress)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lake_runs.json").write_text(json.dumps({"checkpoint": str(path), **results}, indent=1))
        print(f"written {out / 'lake_runs.json'}")
        return 0
    if config.all_characters:
        raise UsageError(f"{path} was {NO_HELD_OUT}")
    if args.data is not None:
        config = dataclasses.replace(config, data=args.data)
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    if args.episodes < MIN_PAPER_EPISODES:
        print(f"note: {args.episodes} episodes (< {MIN_PAPER_EPISODES}, the literature's count)", file=sys.stderr)
    splits = build_task_splits(config)
    episodes = fixed_episodes(splits[args.split], args.episodes, seed=evaluation_seed(config))
    learner.objective.use_vmap = config.use_vmap
    result = evaluate(learner.objective, learner.theta, episodes, device=args.device,
                      progress=not args.no_progress, desc=f"{args.split} evaluation")
    print(f"{args.split} {result.describe()}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({"checkpoint": str(path), "split": args.split,
                                                     **result.to_dict(per_episode=True)}, indent=1))
    print(f"written {out / 'evaluation.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config = _omniglot_or_fallback(config_from_args(args), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    overrides = {method: maml_inner_loop(config, args.maml_inner_lr, args.maml_inner_steps)
                 for method in ("maml", "fomaml")}
    baseline_config = None
    if "baseline" in methods:
        kw: dict[str, Any] = {"seed": config.seed, "hidden": config.hidden}
        if args.baseline_epochs is not None:
            kw["epochs"] = args.baseline_epochs
        baseline_config = BaselineConfig(**kw)
    for method in methods:
        if method != "baseline":
            print("settings " + describe_settings(method, dataclasses.replace(config, **overrides.get(method, {}))))
    try:
        rows = compare(config, methods, args.output, device=args.device, overrides=overrides,
                       baseline_config=baseline_config, progress=not args.no_progress)
    except NonFiniteMetaLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_table(rows, config))
    trained = [m for m in methods if m != "baseline"]
    per_method = f"; per method (checkpoint, metrics, learning curve): {', '.join(trained)}/" if trained else ""
    print(f"outputs in {args.output}/: comparison.md, comparison.json{per_method}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = _omniglot_or_fallback(config_from_args(args), args)
    given = dict(parse_grid(text) for text in args.grid)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods += [m for m in given if m not in methods]
    grids = {}
    for method in methods:
        if method in given:
            grids[method] = given[method]
        elif method in SINUSOID_GRIDS and config.task == "sinusoid":
            grids[method] = SINUSOID_GRIDS[method]
        elif method in METHOD_SETTINGS:
            raise UsageError(f"no default grid for {method} on {config.task}: pass --grid {method}:KEY=V1,V2")
        else:
            raise UsageError(f"unknown method {method!r}; choose from {sorted(METHOD_SETTINGS)}")
    # a diverging grid point is recorded by tune, which goes on
    rows = tune(config, grids, args.output, validation_episodes=args.validation_episodes, device=args.device,
                progress=not args.no_progress)
    print(format_tuning_table(rows, config, args.validation_episodes))
    print(f"outputs in {args.output}/: tuning.md, tuning.json, one folder per run")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input exits with code 2 and a one-line message (no traceback).

    Bad input includes a checkpoint that cannot be loaded (``train --resume``, ``evaluate``):
    the message names the file, what is wrong with it and what to do; nothing is written.
    """
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return EXIT_USAGE
        torch.set_num_threads(args.threads)
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare, "tune": cmd_tune,
                "inner-accuracy": cmd_inner_accuracy}
    try:
        return handlers[args.command](args)
    except (UsageError, CheckpointError, ValueError, FileNotFoundError) as err:
        # CheckpointError: an unreadable / truncated / corrupt / foreign checkpoint, named in the message
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; resume with the same command plus --resume", file=sys.stderr)
        return 130
