"""Does iMAML's second-order part pay? iMAML, first-order MAML and the baseline on two character splits.

Collects the ``compare`` runs of the Omniglot recipe into one table per number of ways: for
each character split (``--seed`` 0 and 1 draw different held-out characters and episodes), the
test accuracy (mean and 95% CI over the same 600 held-out episodes for every method of a split),
the training wall time, and for iMAML the fraction of inner problems that ended above the
optimality tolerance. Two iMAML rows: the recipe (5 GD steps of 0.5) and the inner problem
solved (up to 20 GD steps of 0.25, stopped at relative residual 0.1: the recipe since this
comparison). The runs, one core each, two side by side on the 2-core CPU::

    C="python -m applications.meta_learning compare --no-vmap --threads 1 --no-progress"
    BEFORE="--inner-steps 5 --inner-lr 0.5 --inner-tol off"   # the recipe as it was
    $C --preset recipe-5way-1shot --seed S --methods imaml,fomaml,baseline $BEFORE --output runs/i15/w5sS
    $C --preset recipe-5way-1shot --seed S --methods imaml --output runs/i15/w5sSacc
    # ... the same with recipe-20way-1shot into runs/i15/w20sS and runs/i15/w20sSacc

then::

    python -m benchmarks.meta_learning_splits --runs runs/i15

writes ``meta_learning_splits.json`` / ``.md`` / ``.rst`` / ``.png`` into ``--out``. (A separate
``compare`` run for the solved iMAML is the same as a row of the first: the split, the
pre-trained start and the test episodes depend on the seed only.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from applications.meta_learning.stats import mean_confidence_interval

from ._tables import markdown_to_rst, write_results
from ._timing import machine_info

#: The row every other is compared with, episode by episode.
REFERENCE = "iMAML, inner problem solved (the recipe)"
#: (folder suffix, method in that run's comparison.json, row label)
ROWS = (
    ("acc", "imaml-gd", REFERENCE),
    ("", "imaml-gd", "iMAML, 5 GD steps of 0.5 (the recipe before)"),
    ("", "fomaml", "first-order MAML, 5 GD steps of 0.5"),
    ("", "baseline (prototype)", "supervised baseline (prototype)"),
)


def _unsolved_fraction(run_dir: Path, method_folder: str) -> float | None:
    """Inner problems above the optimality tolerance, over the whole training (from metrics.json)."""
    path = run_dir / method_folder / "metrics.json"
    if not path.exists():
        return None
    history = json.loads(path.read_text())["history"]
    config = json.loads((run_dir / "comparison.json").read_text())["config"]
    tasks = len(history) * config["meta_batch"]
    return sum(h["inner_unsolved"] for h in history) / tasks if tasks else None


def _per_episode(run_dir: Path, method: str, row: dict[str, Any]) -> list[float] | None:
    """Per-episode metrics: from the row (``compare`` keeps them), else from ``<method>/evaluation.json``.

    The latter is what ``evaluate --checkpoint RUN/METHOD --output RUN/METHOD`` writes for runs
    made before ``compare`` kept them (the same episodes: they depend on the seed only).
    """
    if row.get("per_episode"):
        return row["per_episode"]
    folder = "imaml" if method.startswith("imaml") else method
    path = run_dir / folder / "evaluation.json"
    if path.exists():
        values = json.loads(path.read_text()).get("per_episode")
        if values and len(values) == row["n_episodes"]:
            return values
    return None


def add_paired_differences(records: list[dict[str, Any]]) -> None:
    """``paired_difference`` / ``paired_ci95``: each row minus :data:`REFERENCE`, episode by episode."""
    for r in records:
        ref = next((q for q in records if q["row"] == REFERENCE and q["ways"] == r["ways"]
                    and q["seed"] == r["seed"]), None)
        r["paired_difference"] = r["paired_ci95"] = None
        if ref is None or r is ref or r["per_episode"] is None or ref["per_episode"] is None:
            continue
        diff = [a - b for a, b in zip(r["per_episode"], ref["per_episode"])]
        r["paired_difference"], r["paired_ci95"] = mean_confidence_interval(diff)


def collect(runs: Path, ways: int, seeds: list[int]) -> list[dict[str, Any]]:
    """One record per (row, seed) found under ``runs`` (missing runs are skipped)."""
    records = []
    for suffix, method, label in ROWS:
        for seed in seeds:
            run_dir = runs / f"w{ways}s{seed}{suffix}"
            path = run_dir / "comparison.json"
            if not path.exists():
                continue
            found = [r for r in json.loads(path.read_text())["results"] if r["method"] == method]
            if not found:
                continue
            r = found[0]
            records.append({"ways": ways, "seed": seed, "row": label, "method": method,
                            "accuracy": r["mean"], "ci95": r["ci95"], "train_seconds": r["train_seconds"],
                            "n_episodes": r["n_episodes"],
                            "unsolved_fraction": (_unsolved_fraction(run_dir, "imaml")
                                                  if method.startswith("imaml") else None),
                            "per_episode": _per_episode(run_dir, method, r),
                            "settings": r.get("settings"), "source": str(path)})
    add_paired_differences(records)
    return records


def table(records: list[dict[str, Any]], ways: int, seeds: list[int]) -> str:
    header = ["method"]
    for seed in seeds:
        header += [f"split {seed}: accuracy", f"split {seed}: minus recipe", f"split {seed}: time",
                   f"split {seed}: inner above tol"]
    lines = [f"Omniglot {ways}-way 1-shot: 600 held-out episodes per split (the same for every method of a "
             "split), the accuracy difference to the iMAML recipe (inner problem solved) on the same episodes "
             "(paired, percentage points, 95% CI), "
             "training wall time (1 thread), fraction of inner problems above tolerance 0.1 during training.",
             "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, _, label in ROWS:
        cells = [label]
        mine = {r["seed"]: r for r in records if r["row"] == label}
        if not mine:
            continue
        for seed in seeds:
            r = mine.get(seed)
            if r is None:
                cells += ["-", "-", "-", "-"]
                continue
            unsolved = "-" if r["unsolved_fraction"] is None else f"{100 * r['unsolved_fraction']:.0f}%"
            paired = ("-" if r["paired_difference"] is None else
                      f"{100 * r['paired_difference']:+.2f} +- {100 * r['paired_ci95']:.2f}")
            cells += [f"{100 * r['accuracy']:.2f}% +- {100 * r['ci95']:.2f}%", paired,
                      f"{r['train_seconds']:.0f} s", unsolved]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways_list = sorted({r["ways"] for r in records})
    fig, axes = plt.subplots(1, len(ways_list), figsize=(6 * len(ways_list), 4), squeeze=False)
    for ax, ways in zip(axes[0], ways_list):
        mine = [r for r in records if r["ways"] == ways]
        seeds = sorted({r["seed"] for r in mine})
        labels = [label for _, _, label in ROWS if any(r["row"] == label for r in mine)]
        width = 0.8 / max(len(seeds), 1)
        for j, seed in enumerate(seeds):
            xs, ys, es = [], [], []
            for i, label in enumerate(labels):
                r = next((r for r in mine if r["row"] == label and r["seed"] == seed), None)
                if r is not None:
                    xs.append(i + (j - (len(seeds) - 1) / 2) * width)
                    ys.append(100 * r["accuracy"])
                    es.append(100 * r["ci95"])
            ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=f"split {seed}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([label.split(" (")[0].replace(", ", "\n") for label in labels], fontsize=8)
        low = min(100 * r["accuracy"] for r in mine) - 3
        ax.set_ylim(max(low, 0), 100)
        ax.set_ylabel("test accuracy (%), 95% CI")
        ax.set_title(f"Omniglot {ways}-way 1-shot")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/i15"), help="folder of the compare runs")
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", default="meta_learning_splits")
    args = parser.parse_args(argv)
    records: list[dict[str, Any]] = []
    tables: list[tuple[int, str]] = []
    for ways in args.ways:
        mine = collect(args.runs, ways, args.seeds)
        if mine:
            records += mine
            tables.append((ways, table(mine, ways, args.seeds)))
    if not records:
        raise SystemExit(f"no compare runs found under {args.runs} (expected w5s0/comparison.json, ...)")
    text = "\n".join(part for _, part in tables)
    print(text)
    result = {"machine": machine_info("cpu"), "records": records}  # the runs ran here too
    write_results(args.out, args.stem, result, text)
    # one RST per table as well: the docs include them where they discuss each
    for ways, part in tables:
        (args.out / f"{args.stem}_{ways}way.rst").write_text(markdown_to_rst(part))
    plot(records, args.out / f"{args.stem}.png")
    return result


if __name__ == "__main__":
    main()
