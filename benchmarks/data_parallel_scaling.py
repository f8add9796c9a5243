"""Weak scaling of the data-parallel hypergradient (``implicit_diff(..., distributed=DataParallel(...))``).

Each process holds the same number of rows of a logistic-regression problem (one L2 penalty
per feature); the inner problem is solved by Newton on all-reduced gradients and Hessians, and
the hypergradient's CG products are all-reduced (one ``all_reduce`` of d numbers per product).
With perfect weak scaling the time per hypergradient stays flat as processes (and data) are
added. Started with 1, 2, ... processes through ``torchrun`` (gloo on CPU, one thread per
process; nccl with one GPU per process with ``--device cuda``).

Run::

    python -m benchmarks.data_parallel_scaling                 # 1 and 2 CPU processes
    python -m benchmarks.data_parallel_scaling --quick
    python -m benchmarks.data_parallel_scaling --device cuda --procs 1 2 4 8

Writes ``data_parallel_scaling[_DEVICE].json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import implicitdiff as idiff

DT = torch.float64


def objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (log_lam.exp() * w**2).sum()


def worker(rows: int, d: int, repeats: int, out: Path, device_kind: str) -> None:
    import torch.distributed as dist

    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own rows
    w_true = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=DT)
    X = torch.randn(rows, d, generator=g, dtype=DT)
    t = (torch.rand(rows, generator=g, dtype=DT) < torch.sigmoid(X @ w_true)).to(DT)
    X, t, w_true = X.to(device), t.to(device), w_true.to(device)
    X_val = torch.randn(1000, d, generator=torch.Generator().manual_seed(1), dtype=DT).to(device)

    def newton(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lam = log_lam.exp()
        for _ in range(30):
            p = torch.sigmoid(X @ w)
            grad = X.T @ (p - t) / len(X)
            hess = X.T @ (X * (p * (1 - p))[:, None]) / len(X)
            dist.all_reduce(grad)
            dist.all_reduce(hess)
            grad = grad / world + lam * w
            if float(grad.norm()) < 1e-12:
                break
            w = w - torch.linalg.solve(hess / world + torch.diag(lam), grad)
        return w

    fit = idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-10),
                              distributed=idiff.DataParallel(sharded=["X", "t"]))(newton)
    log_lam = torch.full((d,), -3.0, dtype=DT, device=device, requires_grad=True)
    forward_times, backward_times = [], []
    for i in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        start = time.perf_counter()
        w = fit(torch.zeros(d, dtype=DT, device=device), log_lam, X, t)
        loss = ((X_val @ (w - w_true)) ** 2).mean()
        _sync(device)
        mid = time.perf_counter()
        (h,) = torch.autograd.grad(loss, log_lam)
        _sync(device)
        end = time.perf_counter()
        if i:
            forward_times.append(mid - start)
            backward_times.append(end - mid)
    info = fit.last_backward
    if rank == 0:
        out.write_text(json.dumps({
            "processes": world, "rows_per_process": rows, "total_rows": rows * world, "d": d,
            "forward_seconds": statistics.median(forward_times), "backward_seconds": statistics.median(backward_times),
            "cg_iterations": info.iterations, "status": info.status.name, "relative_residual": info.relative_residual,
            "hypergradient_norm": float(h.norm()),
        }))
    dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def launch(procs: int, rows: int, d: int, repeats: int, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "benchmarks.data_parallel_scaling", "--worker", "--rows", str(rows), "--features", str(d),
               "--repeats", str(repeats), "--device", device, "--result", str(out)]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {procs} processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def to_markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = rows[0]["backward_seconds"]
    lines = [
        f"Logistic regression, d = {result['d']}, {result['rows_per_process']} rows per process, device "
        f"{result['device']} ({'gloo' if result['device'] == 'cpu' else 'nccl'}), one thread per process; CG to tol "
        "1e-10 with all-reduced products; medians of "
        f"{result['repeats']} repeats. Weak-scaling efficiency = backward time with 1 process / with P.",
        "",
        "| processes | total rows | inner solve (ms) | hypergradient (ms) | CG iterations | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['total_rows']} | {1e3 * r['forward_seconds']:.1f} | "
                     f"{1e3 * r['backward_seconds']:.1f} | {r['cg_iterations']} | {base / r['backward_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, default=None, help="rows per process (default 100000, quick 5000)")
    ap.add_argument("--features", type=int, default=100, help="d, the number of features")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = args.rows or (5000 if args.quick else 100_000)
    repeats = args.repeats or (2 if args.quick else 5)
    if args.worker:
        worker(rows, args.features, repeats, args.result, args.device)
        return None
    results = []
    for p in args.procs:
        results.append(launch(p, rows, args.features, repeats, args.device))
        print(f"  {p} process(es): backward {1e3 * results[-1]['backward_seconds']:.1f} ms", flush=True)
    from ._tables import write_results
    from ._timing import machine_info

    result = {"d": args.features, "rows_per_process": rows, "repeats": repeats, "device": args.device, "rows": results,
              "machine": machine_info(args.device)}
    stem = "data_parallel_scaling" + ("" if args.device == "cpu" else f"_{args.device}") + ("_quick" if args.quick else "")
    table = to_markdown(result)
    write_results(args.out, stem, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
