"""Atomic checkpoints with every random-number state, so that a resumed run continues exactly.

A checkpoint holds the meta-parameters, the meta-optimizer state, the iteration counter,
the metric history, and the states of all random number generators the training loop
touches: torch (CPU and CUDA), numpy, Python's ``random`` and the task sampler's
``torch.Generator``. It is written to a temporary file in the same directory and moved into
place with :func:`os.replace`, so an interruption mid-write never leaves a broken file.

Every checkpoint or saved model the application reads goes through :func:`load_checkpoint`:
a file that is unreadable, empty, truncated (a copy cut short, a full disk), corrupt, not a
checkpoint at all, or missing entries raises :class:`CheckpointError`, whose message names the
file, says what is wrong with it and what to do. Loading never writes anything.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state"]

#: What to do about a bad checkpoint, when the caller does not say.
DEFAULT_ADVICE = ("Delete or move it away, then resume from another (good) checkpoint, "
                  "or start afresh (train without --resume).")


class CheckpointError(ValueError):
    """A checkpoint or saved-model file that cannot be used.

    Unreadable, empty, truncated or corrupt, not a checkpoint, or missing expected entries.
    The message names the file and what to do; the command line prints it without a traceback.
    """


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _what_it_holds(state: dict) -> str:
    """A guess at what kind of file a loaded dictionary came from (for error messages)."""
    if {"baseline", "model"} <= set(state):
        return "a supervised-baseline checkpoint (baseline.pt, written by 'train --algorithm baseline')"
    if {"theta", "optimizer", "iteration"} <= set(state):
        return "a meta-training checkpoint (checkpoint.pt, written by 'train')"
    keys = sorted(map(str, state))
    return f"a dictionary with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    *,
    required: tuple[str, ...] = (),
    what: str = "checkpoint",
    advice: str = DEFAULT_ADVICE,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; every failure is a clear :class:`CheckpointError`.

    Parameters
    ----------
    path
        The file.
    map_location
        Passed to :func:`torch.load`.
    required
        Top-level entries the caller needs; a file without one of them is rejected.
    what
        What the file should be, for messages (``"checkpoint"``, ``"meta-training checkpoint"``...).
    advice
        What to do about a bad file, appended to the message.
    weights_only
        Passed to :func:`torch.load` (tensors and plain containers only). Training checkpoints
        hold numpy / Python RNG states and need ``False``: only load your own checkpoints.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointError
        The file cannot be read, is empty, truncated or corrupt, is not a checkpoint, or lacks
        one of ``required``. Nothing is written either way.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> bad = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
    >>> _ = bad.write_bytes(b"")
    >>> try:
    ...     load_checkpoint(bad)
    ... except CheckpointError as err:
    ...     print(err)
    checkpoint /.../checkpoint.pt is empty (0 bytes): it was cut short, ... or start afresh (train without --resume).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path} (expected a file written by 'train' in its output directory)")

    def error(problem: str) -> CheckpointError:
        return CheckpointError(f"{what} {path} {problem}. {advice}")

    try:
        stream = open(path, "rb")
    except OSError as err:
        raise error(f"cannot be read ({err.strerror or _first_line(err)})") from err
    with stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            raise error("is empty (0 bytes): it was cut short, e.g. by an interrupted copy or a full disk")
        head = stream.read(4)
        stream.seek(0)
        # torch.save writes a zip archive ("PK\x03\x04"); torch < 1.6 wrote a pickle ("\x80" + protocol)
        if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
            if head[:1] in (b"{", b"[") or (head.isascii() and head.decode("ascii").isprintable()):
                raise error(f"is not a PyTorch checkpoint: it holds JSON or text (it starts with {head!r})")
            raise error(f"is corrupt or not a checkpoint at all: it does not start like a PyTorch archive "
                        f"(it starts with {head!r})")
        try:
            # weights_only=False (the default here): training checkpoints hold numpy / python RNG
            # states next to tensors; only load your own checkpoints.
            state = torch.load(stream, map_location=map_location, weights_only=weights_only)
        except MemoryError:
            raise
        except Exception as err:  # torch reports a cut-off archive as OSError, RuntimeError, EOFError, pickle errors...
            raise error(f"is truncated or corrupt ({size} bytes; torch.load failed: {_first_line(err)})") from err
    if not isinstance(state, dict):
        raise error(f"is not a checkpoint: it holds a {type(state).__name__}, not a dictionary of saved state")
    missing = [key for key in required if key not in state]
    if missing:
        raise error(f"lacks the entries {missing} of a {what}: it is {_what_it_holds(state)}")
    return state
