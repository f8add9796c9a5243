"""The one-shot classification runs of Lake et al. (2015) as an evaluation source.

Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning through probabilistic
program induction", Science 2015, score one-shot learners on 20 runs of 20-way 1-shot
classification, published as the archive ``all_runs.zip`` of the dataset authors' repository
https://github.com/brendenlake/omniglot (``python/one-shot-classification/``). Its layout::

    run01/class_labels.txt
    run01/training/class01.png .. class20.png     (one drawing of each of the 20 classes)
    run01/test/item01.png .. item20.png           (20 queries)
    ...
    run20/...

Every line of ``class_labels.txt`` pairs a query with the training image of its class,
``"test_path training_path"`` with paths relative to the archive root, e.g.
``run01/test/item01.png run01/training/class12.png``. The literature reports the error
rate per run and its mean over the runs.

:func:`load_lake_runs` reads that layout from a folder or a ``.zip`` (also with one extra
top-level folder such as ``all_runs/``), preprocessing every image with the application's
:func:`~applications.meta_learning.data.load_image` (the Omniglot path's resize to 28x28 and
inversion). :func:`evaluate_lake_runs` treats every run as one 20-way 1-shot episode: the
trained algorithm adapts on the training images (as ``evaluate`` does for held-out episodes)
and classifies the queries.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import zipfile
from typing import Any

import torch

from .data import Episode, load_image
from .evaluation import evaluate

__all__ = ["LakeRun", "load_lake_runs", "evaluate_lake_runs", "format_lake_results", "LAKE_SOURCE", "LABELS_FILE"]

LABELS_FILE = "class_labels.txt"
LAKE_SOURCE = "all_runs.zip of https://github.com/brendenlake/omniglot (python/one-shot-classification/)"
_RUN_NAME = re.compile(r"^run\d+$")
_EXAMPLE_LINE = "run01/test/item01.png run01/training/class12.png"


@dataclasses.dataclass
class LakeRun:
    """One run: a ``ways``-way 1-shot episode.

    Attributes
    ----------
    name : str
        ``"run01"`` ...
    x_support : torch.Tensor
        ``[ways, 1, 28, 28]`` training images, class ``i`` at row ``i`` (sorted file names).
    x_query : torch.Tensor
        ``[n_queries, 1, 28, 28]`` test images (sorted file names).
    y_query : torch.Tensor
        int64 ``[n_queries]``: the class (row of ``x_support``) of every query.
    training_files, test_files : list of str
        The archive paths, in the order of the tensors.
    """

    name: str
    x_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    training_files: list[str]
    test_files: list[str]

    @property
    def ways(self) -> int:
        """Number of classes (20 in the published runs)."""
        return int(self.x_support.shape[0])

    def episode(self) -> Episode:
        """The run as a batch of one task (labels ``0..ways-1`` for the support set)."""
        y_support = torch.arange(self.ways)
        return Episode(self.x_support[None], y_support[None], self.x_query[None], self.y_query[None])


class _Store:
    """Files of a folder or a zip, addressed by ``/``-separated paths relative to its root."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise ValueError(f"Lake runs {str(path)!r} is neither a folder nor a .zip archive.")
            self.zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self.names = {n.rstrip("/") for n in self.zip.namelist() if "__MACOSX" not in n}
        elif path.is_dir():
            self.zip = None
            self.names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        else:
            raise FileNotFoundError(f"Lake runs {str(path)!r} does not exist; expected the folder or .zip of "
                                    f"{LAKE_SOURCE}.")

    def label(self, name: str) -> str:
        """How a file is named in messages (``archive.zip:member`` or the file path)."""
        return f"{self.path}:{name}" if self.zip is not None else str(self.path / name)

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _parse_labels(text: str, label: str) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not all(f.lower().endswith(".png") for f in fields):
            raise ValueError(f"Malformed line {number} of {label}: {line.strip()!r}; expected 'test_path "
                             f"training_path' (e.g. {_EXAMPLE_LINE!r}).")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise ValueError(f"{label} lists no 'test_path training_path' pairs.")
    return pairs


def _locate(store: _Store, rel: str, root: str, run_dir: str, number: int, labels_label: str) -> str:
    """The stored name of a path from line ``number`` of a labels file (relative to the root, or to the run)."""
    rel = rel.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    for candidate in (root + rel, f"{run_dir}/{rel}"):
        if candidate in store.names:
            return candidate
    raise FileNotFoundError(f"{store.label(root + rel)} is missing (named on line {number} of {labels_label}).")


def load_lake_runs(path: str | os.PathLike) -> list[LakeRun]:
    """Read the one-shot runs of Lake et al. (2015) from a folder or ``.zip``.

    Parameters
    ----------
    path : str or path
        The ``all_runs`` folder (holding ``run01`` ...), or the archive of it.

    Returns
    -------
    list of LakeRun
        The runs, sorted by name.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist, holds no ``runNN/class_labels.txt``, or a file named in a
        ``class_labels.txt`` is missing (the message names both).
    ValueError
        A malformed line (naming the file and the line), a run whose queries name no
        training image or an unreadable image (naming the file).

    Examples
    --------
    >>> runs = load_lake_runs("all_runs.zip")  # doctest: +SKIP
    >>> len(runs), runs[0].ways, runs[0].x_query.shape  # doctest: +SKIP
    (20, 20, torch.Size([20, 1, 28, 28]))
    """
    store = _Store(pathlib.Path(path).expanduser())
    try:
        label_files = sorted(n for n in store.names
                             if n.split("/")[-1] == LABELS_FILE and _RUN_NAME.match(n.split("/")[-2] if "/" in n
                                                                                   else ""))
        if not label_files:
            raise FileNotFoundError(f"Lake runs {str(store.path)!r} hold no runNN/{LABELS_FILE}; expected the "
                                    f"layout of {LAKE_SOURCE}.")
        runs = []
        for labels_name in label_files:
            run_dir = labels_name.rsplit("/", 1)[0]
            root = run_dir.rsplit("/", 1)[0] + "/" if "/" in run_dir else ""
            labels_label = store.label(labels_name)
            text = store.read(labels_name).decode("utf-8", errors="replace")
            pairs = _parse_labels(text, labels_label)

            located = [tuple(_locate(store, rel, root, run_dir, i, labels_label) for rel in pair)
                       for i, pair in enumerate(pairs, start=1)]
            training = sorted({c for _, c in located})
            index = {c: i for i, c in enumerate(training)}
            located.sort()
            images: dict[str, torch.Tensor] = {}
            for name in training + [t for t, _ in located]:
                if name not in images:
                    images[name] = load_image(store.read(name), name=store.label(name))
            runs.append(LakeRun(
                name=run_dir.rsplit("/", 1)[-1],
                x_support=torch.stack([images[c] for c in training]),
                x_query=torch.stack([images[t] for t, _ in located]),
                y_query=torch.tensor([index[c] for _, c in located], dtype=torch.int64),
                training_files=training,
                test_files=[t for t, _ in located],
            ))
    finally:
        store.close()
    return runs


def evaluate_lake_runs(
    objective: Any,
    theta: dict[str, torch.Tensor],
    runs: list[LakeRun],
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Error rate of every run (adapt on its training images, classify its queries) and their mean.

    Parameters
    ----------
    objective : MetaObjective
        A ``ways``-way classification objective with the trained algorithm's inner solver.
    theta : dict of tensors
        Meta-learned parameters.
    runs : list of LakeRun
        From :func:`load_lake_runs`.
    device : torch.device or str
    progress : bool
        Progress bar over the runs (``--no-progress`` turns it off).

    Returns
    -------
    dict
        ``runs``: ``[{"run", "error", "errors", "queries"}]``; ``mean_error``: the mean of
        the per-run error rates (as the literature reports it); ``n_runs``.
    """
    result = evaluate(objective, theta, [run.episode() for run in runs], device=device, progress=progress,
                      desc="Lake one-shot runs")
    per_run = []
    for run, accuracy in zip(runs, result.per_episode):
        n = int(run.y_query.numel())
        errors = int(round((1.0 - accuracy) * n))
        per_run.append({"run": run.name, "error": errors / n, "errors": errors, "queries": n, "ways": run.ways})
    mean_error = sum(r["error"] for r in per_run) / len(per_run)
    return {"runs": per_run, "mean_error": mean_error, "n_runs": len(per_run)}


def format_lake_results(results: dict[str, Any]) -> str:
    """One line per run and the overall line, e.g. ``Lake run01 error 35.00% (7/20)``."""
    lines = [f"Lake {r['run']} error {100 * r['error']:.2f}% ({r['errors']}/{r['queries']})" for r in results["runs"]]
    lines.append(f"Lake one-shot overall error {100 * results['mean_error']:.2f}% "
                 f"(mean over {results['n_runs']} runs)")
    return "\n".join(lines)
