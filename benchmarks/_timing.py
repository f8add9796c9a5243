"""Timing and machine description shared by the benchmarks.

Timings are wall-clock medians over repeats after warm-up runs: the median resists the
occasional slow repeat caused by other processes on a shared machine. A CUDA device is
synchronized before and after every timed call so that asynchronous kernels are counted.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["Timing", "time_call", "machine_info", "graph_saved_bytes"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Times of the repeats of one measured call, in seconds.

    Attributes
    ----------
    times : tuple of float
        Wall-clock time of each timed repeat (warm-up runs excluded).
    cpu_times : tuple of float
        CPU time of this process during each repeat. On a shared, loaded machine it is far
        less sensitive than wall time to other processes (it does not count time spent
        waiting for a core), so comparisons of single-threaded CPU runs use it.
    """

    times: tuple[float, ...]
    cpu_times: tuple[float, ...] = ()

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    body: Callable[[Any], Any],
    *,
    setup: Callable[[], Any] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> Timing:
    """Time ``body(setup())``, counting only ``body``.

    Parameters
    ----------
    body : callable
        The measured work; receives what ``setup`` returned (None without setup).
    setup : callable, optional
        Untimed preparation run before each call of ``body`` (e.g. building the forward
        graph whose backward pass ``body`` times).
    repeats : int
        Timed repeats (at least 1).
    warmup : int
        Untimed runs first (allocator, lazy initialization, caches).
    device : torch.device or str
        Synchronized around each timed call when it is a CUDA device.

    Returns
    -------
    Timing

    Examples
    --------
    >>> t = time_call(lambda _: sum(range(1000)), repeats=3)
    >>> len(t.times), len(t.cpu_times), t.median >= 0
    (3, 3, True)
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    times, cpu_times = [], []
    for i in range(warmup + repeats):
        state = setup() if setup is not None else None
        _sync(device)
        cpu_start = time.process_time()
        start = time.perf_counter()
        body(state)
        _sync(device)
        elapsed = time.perf_counter() - start
        cpu_elapsed = time.process_time() - cpu_start
        if i >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu_elapsed)
    return Timing(tuple(times), tuple(cpu_times))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """Describe the machine a benchmark ran on (CPU model, cores, versions, threads, device)."""
    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):  # other processes on a shared machine inflate wall times
        info["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def graph_saved_bytes(output: torch.Tensor, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct tensors an autograd graph holds for its backward pass.

    Walks the graph from ``output`` and counts each saved tensor once (by storage), except
    the ``exclude`` tensors (the data set, which exists anyway). This is the memory a graph
    holds between the forward and the backward pass: the cost that grows with the
    iterations of an unrolled solver. (Saved-tensor hooks cannot be used: torch.func
    transforms refuse to run under them.)

    Examples
    --------
    >>> x = torch.ones(1000, dtype=torch.float64, requires_grad=True)
    >>> graph_saved_bytes((x.exp() * x).sum()) >= 8000
    True
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(t, (tuple, list)):
            for item in t:
                add(item)

    stack = [output.grad_fn] if output.grad_fn is not None else []
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    add(getattr(node, name))
                except RuntimeError:  # already freed by a backward pass
                    pass
        if hasattr(node, "saved_tensors"):  # custom autograd.Function nodes
            try:
                add(node.saved_tensors)
            except RuntimeError:
                pass
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(seen.values())
