"""Truncated back-propagation against implicit differentiation on the ridge benchmark.

``mode="truncated"`` differentiates k gradient-descent steps taken from the inner solution
(Shaban et al., AISTATS 2019); its error against the exact hypergradient decays like the
contraction factor of the step to the power k, and its graph, hence its memory, grows
linearly in k. ``mode="implicit"`` (CG) is exact to its tolerance with a graph of fixed size.
The problem is the ridge benchmark's (``benchmarks/ridge_hypergradient.py``: per-feature
penalties, AR(1) features, exact hypergradient by a dense float64 solve).

Run::

    python -m benchmarks.truncated_vs_implicit            # d = 200, k up to 3000
    python -m benchmarks.truncated_vs_implicit --quick    # seconds

Writes ``truncated_vs_implicit.json`` / ``.md`` / ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import implicitdiff as idiff

from ._tables import write_results
from ._timing import graph_saved_bytes, machine_info, time_call
from .ridge_hypergradient import inner_objective, make_problem, outer_loss


def run(d: int, n: int, ks: list[int], repeats: int, seed: int) -> dict[str, Any]:
    p = make_problem(n, n, d, seed=seed, device=torch.device("cpu"))
    lr = 1.0 / p.lipschitz  # the classic safe step: contraction factor 1 - mu / L
    rate = 1.0 - p.strong_convexity / p.lipschitz
    data = (p.X_train, p.y_train)

    def closed_form(w0: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return p.closed_form(log_lam)

    def gd_step(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return w - lr * torch.func.grad(inner_objective)(w, log_lam, X, y)

    def measure(fit: idiff.ImplicitFunction, label: str, k: int | None) -> dict[str, Any]:
        def forward(_: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
            log_lam = p.fresh_log_lam()
            w = fit(torch.zeros(d, dtype=p.X_train.dtype), log_lam, *data)
            return outer_loss(w, p.X_val, p.y_val), log_lam

        loss, log_lam = forward()
        saved = graph_saved_bytes(loss, exclude=(p.X_train, p.y_train, p.X_val, p.y_val))
        (h,) = torch.autograd.grad(loss, log_lam)
        error = float((h - p.exact).norm() / p.exact.norm())
        timing = time_call(lambda _: torch.autograd.grad(*forward()), repeats=repeats)
        return {"method": label, "k": k, "relative_error": error, "graph_bytes": saved,
                "seconds": timing.median, "cpu_seconds": timing.cpu_median}

    rows = [measure(idiff.implicit_diff(objective=inner_objective, solver=idiff.CG(tol=1e-10))(closed_form),
                    "implicit (CG, tol 1e-10)", None)]
    for k in ks:
        fit = idiff.implicit_diff(objective=inner_objective, mode="truncated", truncated_steps=k, step=gd_step)(
            closed_form
        )
        rows.append(measure(fit, f"truncated, k = {k}", k))
        rows[-1]["predicted_rate_k"] = rate**k
    return {
        "problem": {"d": d, "n_train": n, "n_val": n, "seed": seed, "step": lr, "condition_number": p.condition_number,
                    "contraction_rate": rate},
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    pr = result["problem"]
    lines = [
        f"Ridge, d = {pr['d']}, n = {pr['n_train']}, condition number {pr['condition_number']:.1f}; GD step 1/L "
        f"(contraction {pr['contraction_rate']:.4f}). Time: forward + backward from the closed-form solution, "
        "median wall seconds; graph: bytes the autograd graph holds (data excluded).",
        "",
        "| method | relative error | rate^k | graph (KiB) | time (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rate = "--" if r["k"] is None else f"{r['predicted_rate_k']:.1e}"
        lines.append(f"| {r['method']} | {r['relative_error']:.1e} | {rate} | {r['graph_bytes'] / 1024:.0f} | "
                     f"{1e3 * r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trunc = [r for r in result["rows"] if r["k"] is not None]
    implicit = next(r for r in result["rows"] if r["k"] is None)
    ks = [r["k"] for r in trunc]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.loglog(ks, [r["relative_error"] for r in trunc], "o-", label="truncated (measured)")
    ax1.loglog(ks, [r["predicted_rate_k"] for r in trunc], "k:", label="contraction$^k$")
    ax1.axhline(implicit["relative_error"], color="C1", ls="--", label="implicit (CG)")
    ax1.set_xlabel("k (differentiated steps)")
    ax1.set_ylabel("relative error of the hypergradient")
    ax1.legend(fontsize=8)
    ax2.loglog(ks, [r["graph_bytes"] / 2**20 for r in trunc], "o-", label="truncated")
    ax2.axhline(implicit["graph_bytes"] / 2**20, color="C1", ls="--", label="implicit (CG)")
    ax2.set_xlabel("k (differentiated steps)")
    ax2.set_ylabel("autograd graph (MiB)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"ridge d = {result['problem']['d']}: truncated back-propagation vs implicit", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = args.d or (30 if args.quick else 200)
    ks = [1, 10, 100] if args.quick else [1, 10, 30, 100, 300, 1000, 3000]
    result = run(d, 200 if args.quick else args.n, ks, 1 if args.quick else 3, args.seed)
    result["machine"] = machine_info("cpu")
    stem = "truncated_vs_implicit" + ("_quick" if args.quick else "")
    table = to_markdown(result)
    write_results(args.out, stem, result, table)
    plot(result, args.out / f"{stem}.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
