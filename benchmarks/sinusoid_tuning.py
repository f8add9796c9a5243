"""The sinusoid comparison with every method tuned on the same budget: one table from ``tune`` runs.

``tune`` runs may be split by method, or a method's grid into parts, to use several cores; this
script joins their ``tuning.json`` into one table after checking that they share every setting
that makes them comparable (iterations, meta-batch, seeds, episodes). A method tuned in parts
gets the union of its grid points and the better part's choice (each part scored its own best
on the test episodes, and the best of the union is one of them). The runs, one core each, two
side by side on the 2-core CPU::

    T="python -m applications.meta_learning tune --preset sinusoid --iterations 200 --threads 1"
    $T --methods imaml-hf --grid "imaml-hf:lam=1,2" --output runs/i15/tune_hf
    $T --methods maml,fomaml,imaml-gd --output runs/i15/tune_rest    # then, on that core:
    $T --methods imaml-hf --grid "imaml-hf:lam=5" --output runs/i15/tune_hf5
    python -m benchmarks.sinusoid_tuning runs/i15/tune_rest runs/i15/tune_hf runs/i15/tune_hf5

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
    rows: dict[str, dict[str, Any]] = {}
    for row in (row for run in runs for row in run["results"]):
        if row["method"] in rows:
            rows[row["method"]] = _merge(rows[row["method"]], row)
        else:
            rows[row["method"]] = row
    return first["config"], first["validation_episodes"], list(rows.values())


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One method's grid run in two parts: the union of the points; the better part's choice and test score.

    Each part scored its own best point on the test episodes; the best of the union is one of them.
    """
    points = [r["point"] for r in a["runs"] + b["runs"]]
    if any(points.count(p) > 1 for p in points):
        raise ValueError(f"{a['method']}: a grid point was tuned twice ({points})")
    scored = [r for r in (a, b) if r["validation"] is not None]
    lower_is_better = (scored[0]["metric"] != "accuracy") if scored else True
    best = (min if lower_is_better else max)(scored, key=lambda r: r["validation"]) if scored else a
    grid = {k: list(dict.fromkeys([*a.get("grid", {}).get(k, []), *b.get("grid", {}).get(k, [])]))
            for k in {**a.get("grid", {}), **b.get("grid", {})}}
    return {**best, "grid": grid, "runs": a["runs"] + b["runs"],
            "tuning_seconds": a["tuning_seconds"] + b["tuning_seconds"]}


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
