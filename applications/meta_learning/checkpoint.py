"""Atomic checkpoints with every random-number state, so that a resumed run continues exactly.

A checkpoint holds the meta-parameters, the meta-optimizer state, the iteration counter,
the metric history, and the states of all random number generators the training loop
touches: torch (CPU and CUDA), numpy, Python's ``random`` and the task sampler's
``torch.Generator``. It is written to a temporary file in the same directory and moved into
place with :func:`os.replace`, so an interruption mid-write never leaves a broken file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state"]


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Snapshot of the global RNGs (and of ``generator``, the task sampler's, when given).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> state = capture_rng_state(g); a = torch.rand(2, generator=g)
    >>> restore_rng_state(state, g); bool((torch.rand(2, generator=g) == a).all())
    True
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        if "generator" not in state:
            raise ValueError("checkpoint holds no task-sampler generator state")
        generator.set_state(state["generator"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory + ``os.replace``).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> p = save_checkpoint(d / "ckpt.pt", {"iteration": 3})
    >>> load_checkpoint(p)["iteration"]
    3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a file written by 'train' in its output directory)")
    # weights_only=False: the file holds numpy / python RNG states next to tensors; only load your own checkpoints.
    return torch.load(path, map_location=map_location, weights_only=False)
