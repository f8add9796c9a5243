"""Command line: ``python -m applications.hyperparameter_tuning {regularization,distillation,equilibrium,svm-dual}``.

``--quick`` runs a small version (seconds to a minute on a laptop CPU); ``--out`` chooses the output
folder (default ``outputs/hyperparameter_tuning/<app>/``); progress bars (rate and ETA) go to stderr
unless ``--no-progress``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch

from . import distillation, equilibrium, regularization, svm_dual

APPS = ("regularization", "distillation", "equilibrium", "svm-dual")


def _regularization(args: argparse.Namespace, out: Path) -> list[Path]:
    written = []
    for dataset in args.datasets:
        config = regularization.RegularizationConfig(dataset=dataset, seed=args.seed, device=args.device,
                                                     max_samples=args.max_samples,
                                                     early_stopping=args.early_stopping,
                                                     stopping_fraction=args.stopping_fraction,
                                                     patience=args.patience, groups=args.groups,
                                                     noise_features=args.noise_features)
        if args.quick:
            config.outer_steps, config.unrolled_steps = 15, 30
            config.sklearn_cs = [10.0**e for e in range(-4, 5)]
        if args.outer_steps is not None:
            config.outer_steps = args.outer_steps
        regularization.run(config, out, progress=not args.no_progress, guards=args.guards)
        prefix = f"{dataset}_noise{args.noise_features}" if args.noise_features else dataset
        table = out / f"{prefix}_table.md"
        print(f"\n{prefix}:\n{table.read_text()}")
        written.append(table)
        if args.guards:
            guards_table = out / f"{prefix}_guards_table.md"
            print(f"\n{prefix}, guarded runs:\n{guards_table.read_text()}")
            written.append(guards_table)
    return written


def _distillation(args: argparse.Namespace, out: Path) -> list[Path]:
    config = distillation.DistillationConfig(seed=args.seed, device=args.device, max_samples=args.max_samples)
    if args.quick:
        config.outer_steps, config.random_baseline_seeds = 25, 5
    distillation.run(config, out, progress=not args.no_progress)
    print((out / "table.md").read_text())
    return [out / "table.md"]


def _equilibrium(args: argparse.Namespace, out: Path) -> list[Path]:
    config = equilibrium.EquilibriumConfig(seed=args.seed, device=args.device, max_samples=args.max_samples)
    if args.quick:
        config.train_steps, config.hidden = 15, 32
    equilibrium.run(config, out, progress=not args.no_progress)
    for name in ("training_table.md", "gradient_table.md", "forward_table.md"):
        print((out / name).read_text())
    return [out / "training_table.md"]


def _svm_dual(args: argparse.Namespace, out: Path) -> list[Path]:
    config = svm_dual.quick_config() if args.quick else svm_dual.SVMConfig()
    if args.max_samples is not None:
        config.max_samples = args.max_samples
    svm_dual.run(config, out, seed=args.seed, device=args.device, progress=not args.no_progress)
    print((out / "svm_dual.md").read_text())
    return [out / "svm_dual.md"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one application, print its tables."""
    parser = argparse.ArgumentParser(prog="python -m applications.hyperparameter_tuning", description=__doc__)
    parser.add_argument("app", choices=APPS, help="which application to run")
    parser.add_argument("--quick", action="store_true", help="small, fast version")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default outputs/hyperparameter_tuning/<app>)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and initializations")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["digits", "breast_cancer"],
        choices=["digits", "breast_cancer"],
        help="datasets of the regularization application",
    )
    regularization_group = parser.add_argument_group("regularization: guards against overfitting the validation split")
    regularization_group.add_argument(
        "--early-stopping", action="store_true",
        help="hold out part of the validation split; keep the outer step with the lowest held-out loss",
    )
    regularization_group.add_argument("--stopping-fraction", type=float, default=0.5,
                                      help="fraction of the validation split held out for early stopping")
    regularization_group.add_argument("--patience", type=int, default=None,
                                      help="with --early-stopping: stop after this many steps without improvement")
    regularization_group.add_argument(
        "--groups", default=None,
        help="tie penalties by group: feature, blocks:K, rings, modulo:K, consecutive:K (default: per feature)",
    )
    regularization_group.add_argument(
        "--guards", action="store_true",
        help="also run per-feature + early stopping and grouped + early stopping; write <dataset>_guards_*",
    )
    regularization_group.add_argument("--noise-features", type=int, default=0,
                                      help="append this many pure-noise features (synthetic irrelevant features)")
    regularization_group.add_argument("--outer-steps", type=int, default=None,
                                      help="outer (Adam) steps of hypergradient runs (default 100, 15 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--max-samples", type=int, default=None, help="subsample the dataset (quick checks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.device(args.device)  # fail early on a malformed device string
    out = args.out or Path("outputs") / "hyperparameter_tuning" / args.app
    start, wall_start = time.perf_counter(), time.time() - 1.0  # (file times may be rounded to the second)
    runner = {"regularization": _regularization, "distillation": _distillation, "equilibrium": _equilibrium,
              "svm-dual": _svm_dual}[args.app]
    runner(args, out)
    written = sorted(p.name for p in Path(out).iterdir() if p.is_file() and p.stat().st_mtime >= wall_start)
    print(f"wrote results to {out}/ in {time.perf_counter() - start:.1f} s: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
