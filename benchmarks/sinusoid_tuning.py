"""The sinusoid comparison with every method tuned on the same budget: one table from ``tune`` runs.

``tune`` runs may be split by method to use several cores (each method's grid points run in
one process); this script joins their ``tuning.json`` into one table after checking that they
share every setting that makes them comparable (iterations, meta-batch, seeds, episodes). The
runs, one core each, side by side on the 2-core CPU::

    T="python -m applications.meta_learning tune --preset sinusoid --iterations 200 --threads 1"
    $T --methods imaml-hf --output runs/i15/tune_hf
    $T --methods maml,fomaml,imaml-gd --output runs/i15/tune_rest
    python -m benchmarks.sinusoid_tuning runs/i15/tune_rest runs/i15/tune_hf

writes ``sinusoid_tuning.json`` / ``.md`` / ``.rst`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from applications.meta_learning.trainer import TrainConfig
from applications.meta_learning.tuning import format_tuning_table

from ._tables import write_results
from ._timing import machine_info

#: Settings that must agree between the joined runs (the methods' own settings may differ).
SHARED = ("task", "shots", "queries", "meta_batch", "meta_lr", "iterations", "hidden", "activation", "seed",
          "eval_episodes")


def join(paths: list[Path]) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """The shared configuration, validation-episode count and all rows of the ``tune`` outputs ``paths``."""
    runs = [json.loads((p / "tuning.json").read_text()) for p in paths]
    first = runs[0]
    for path, run in zip(paths[1:], runs[1:]):
        differ = [k for k in SHARED if run["config"][k] != first["config"][k]]
        if run["validation_episodes"] != first["validation_episodes"]:
            differ.append("validation_episodes")
        if differ:
            raise ValueError(f"{path} was tuned with other {differ} than {paths[0]}: not one comparison")
    rows = [row for run in runs for row in run["results"]]
    methods = [r["method"] for r in rows]
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method was tuned twice in {[str(p) for p in paths]}: {methods}")
    return first["config"], first["validation_episodes"], rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of tune")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="sinusoid_tuning")
    args = parser.parse_args(argv)
    config, validation_episodes, rows = join(args.runs)
    text = format_tuning_table(rows, TrainConfig.from_dict(config), validation_episodes)
    print(text)
    result = {"machine": machine_info("cpu"), "config": config, "validation_episodes": validation_episodes,
              "sources": [str(p) for p in args.runs], "results": rows}
    write_results(args.out, args.stem, result, text)
    return result


if __name__ == "__main__":
    main()
