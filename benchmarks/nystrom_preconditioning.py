"""Nyström preconditioning of the ill-conditioned backward systems of per-pixel L2 regularization on digits.

The application ``applications/hyperparameter_tuning/regularization.py`` tunes 64 per-pixel L2
penalties of a multinomial logistic regression on scikit-learn's digits (649 parameters) by
hypergradient descent; as the learned penalties spread over six decades (10^-5.7 .. 10^0.6 after
its 100 Adam steps), its backward CG solves (Hessian of the training objective, tol 1e-6, 1000
iterations) hit their budget short of the tolerance (docs/hyperparameter_tuning.rst).

This script reproduces such systems with the application's own functions: its hypergradient
descent (``make_implicit_fit``: warm-started L-BFGS to a gradient of 1e-9, CG backward;
``hypergradient``; Adam in log-penalty space, here with a larger step, ``--lr 0.3``, so that the
penalties spread as far in ``--steps 30`` steps), keeping the penalties and the inner solution at
the ``--snapshots`` steps. At each snapshot it times the hypergradient, from the given inner
solution to the gradient (forward, validation loss, backward solve), with CG at tol 1e-6 and
1000 iterations:

* without a preconditioner;
* Jacobi: the exact Hessian diagonal in closed form (softmax curvature times squared features,
  plus the penalties), counted in the time;
* ``NystromPreconditioner(rank)`` for each ``--ranks``, built from ``rank + 1`` Hessian products
  (one batched call): the first call includes the build, the second call at the same solution
  reuses it (one product to recognize the operator).

It reports CG's iterations, the true relative residual (recomputed by the library after the
solve), the hypergradient's relative error against a dense float64 solve
(``dense_reference.minimizer_hypergradient``), and the spectrum of the Hessian (dense
``eigvalsh``): the largest eigenvalue, the one after the sketched ones, the smallest.

Usage::

    python benchmarks/nystrom_preconditioning.py [--steps 30] [--lr 0.3] [--snapshots 20 25 30]
        [--ranks 10 25 50 100 200] [--repeats 3] [--threads 1] [--out benchmarks/results]
        [--render results.json]

Writes ``nystrom_preconditioning.json``, ``.md`` (markdown table), ``.rst`` (the table included by
``docs/solvers.rst``) and ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import implicitdiff as idiff  # noqa: E402
from applications.hyperparameter_tuning import regularization as reg  # noqa: E402
from applications.hyperparameter_tuning.datasets import StandardizedSplit, load_split  # noqa: E402
from applications.hyperparameter_tuning.dense_reference import flatten, minimizer_hypergradient, unflatten  # noqa: E402
from applications.hyperparameter_tuning.logistic_model import init_params, logits  # noqa: E402
from benchmarks._timing import machine_info  # noqa: E402

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- the systems
def trajectory(split: StandardizedSplit, config: reg.RegularizationConfig, steps: int, keep: list[int],
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The application's hypergradient descent (its fit, hypergradient and Adam), kept at the ``keep`` steps.

    A snapshot is the system the application's backward CG solved at that step: the penalties before the
    step and the inner solution its warm-started L-BFGS returned for them.
    """
    fit = reg.make_implicit_fit(config)
    dtype = split.x_train.dtype
    log_penalty = torch.full((split.n_features,), math.log(config.init_penalty), dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([log_penalty], lr=config.outer_lr)
    params = init_params(split.n_features, split.n_classes, dtype=dtype)
    snapshots = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        penalties = log_penalty.detach().clone()
        with idiff.record_solves() as records, warnings.catch_warnings():
            warnings.simplefilter("ignore", idiff.InnerOptimalityWarning)  # L-BFGS's float64 floor, as in the app
            _, grad, params = reg.hypergradient(fit, log_penalty, params, split)
        optimizer.zero_grad()
        log_penalty.grad = grad
        optimizer.step()
        if step in keep:
            backward = [r for r in records if r.kind == "backward"][-1]
            log10 = penalties / math.log(10.0)
            snapshots.append({
                "step": step, "log_penalty": penalties, "params": params,
                "log10_penalty_range": [float(log10.min()), float(log10.max())],
                "app_cg": {"iterations": backward.iterations, "relative_residual": backward.relative_residual},
            })
            log(f"step {step:3d}: log10 penalties in [{float(log10.min()):.2f}, {float(log10.max()):.2f}], "
                f"the application's CG: {backward.iterations} iterations, relative residual "
                f"{backward.relative_residual:.1e} ({time.perf_counter() - start:.0f} s)")
    return snapshots


def hessian_spectrum(params: Params, log_penalty: torch.Tensor, split: StandardizedSplit) -> torch.Tensor:
    """Eigenvalues (descending) of the training objective's Hessian, from a dense float64 Hessian."""
    flat = flatten(params)
    hess = torch.func.hessian(lambda v: reg.inner_objective(unflatten(v, params), log_penalty, split.x_train,
                                                            split.y_train))(flat)
    return torch.linalg.eigvalsh(0.5 * (hess + hess.T)).flip(0)


def jacobi_preconditioner(params: Params, log_penalty: torch.Tensor, x: torch.Tensor) -> Callable[[Params], Params]:
    """``v -> v / diag(H)``: the Hessian's diagonal in closed form (multinomial model; class 0's bias is pinned)."""
    p = torch.softmax(logits(params, x), dim=-1)
    curvature = p * (1.0 - p)  # d^2 CE / d logit_c^2 per sample
    diagonal = {
        "weight": (x * x).T @ curvature / x.shape[0] + torch.exp(log_penalty)[:, None],
        "bias": curvature[:, 1:].mean(dim=0),
    }
    return lambda v: {k: v[k] / diagonal[k] for k in v}


# ---------------------------------------------------------------------------- measurements
def measure(snapshot: dict[str, Any], split: StandardizedSplit, config: reg.RegularizationConfig, method: str,
            rank: int | None, repeats: int, reference: torch.Tensor) -> dict[str, Any]:
    """First and second hypergradient call at the snapshot, ``repeats`` times with a fresh preconditioner."""
    lp, params = snapshot["log_penalty"], snapshot["params"]
    x, y = split.x_train, split.y_train
    times: dict[str, list[float]] = {"first": [], "second": [], "first_cpu": [], "second_cpu": []}
    row: dict[str, Any] = {}
    for _ in range(repeats):
        nystrom = idiff.NystromPreconditioner(rank) if rank is not None else None
        state: dict[str, Any] = {}

        def call(nystrom: idiff.NystromPreconditioner | None = nystrom, state: dict[str, Any] = state) -> tuple:
            if method == "jacobi":
                if "jacobi" not in state:  # built at the first call, kept for the second (as a user would)
                    state["jacobi"] = jacobi_preconditioner(params, lp, x)
                pre: Any = state["jacobi"]
            else:
                pre = nystrom
            solver = idiff.CG(tol=config.cg_tol, maxiter=config.cg_maxiter, on_failure="ignore", preconditioner=pre)
            fit = idiff.implicit_diff(objective=reg.inner_objective, solver=solver, check_optimality=None)(
                given_solution)
            hyper = lp.clone().requires_grad_(True)
            with idiff.record_solves() as records:
                loss = reg.validation_loss(fit(params, hyper, x, y), split.x_val, split.y_val)
                (grad,) = torch.autograd.grad(loss, hyper)
            return grad, [r for r in records if r.kind == "backward"][-1]

        outcomes = []
        for which in ("first", "second"):
            wall, cpu = time.perf_counter(), time.process_time()
            outcomes.append(call())
            times[which].append(time.perf_counter() - wall)
            times[which + "_cpu"].append(time.process_time() - cpu)
        (grad, info), (grad2, info2) = outcomes
        row = {
            "method": method if rank is None else f"nystrom-{rank}",
            "rank": rank,
            "iterations": info.iterations,
            "status": info.status.name,
            "relative_residual": info.relative_residual,
            "hypergradient_relative_error": _relative_error(grad, reference),
            "second_call_iterations": info2.iterations,
            "second_call_relative_error": _relative_error(grad2, reference),
            "builds_after_two_calls": None if nystrom is None else nystrom.builds,
            "products_for_preconditioner": None if nystrom is None else nystrom.products,
        }
    for key, values in times.items():
        row[f"{key}_call_s" if not key.endswith("cpu") else f"{key[:-4]}_call_cpu_s"] = statistics.median(values)
    row["repeats"] = repeats
    return row


def given_solution(init: Params, log_penalty: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Params:
    """The inner 'solver' of the timed calls: the snapshot's L-BFGS solution, passed in as ``init``."""
    return init


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


def run_snapshot(snapshot: dict[str, Any], split: StandardizedSplit, config: reg.RegularizationConfig,
                 ranks: list[int], repeats: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    lp, params = snapshot["log_penalty"], snapshot["params"]
    reference = minimizer_hypergradient(
        reg.inner_objective, lambda w, h, x, y: reg.validation_loss(w, x, y), params, lp,
        (split.x_train, split.y_train), (split.x_val, split.y_val),
    )
    eigenvalues = hessian_spectrum(params, lp, split)
    n = len(eigenvalues)
    spectrum = {
        "n": n,
        "largest": float(eigenvalues[0]),
        "smallest": float(eigenvalues[-1]),
        "condition_number": float(eigenvalues[0] / eigenvalues[-1]),
        "after_rank": {str(k): float(eigenvalues[min(k, n - 1)]) for k in ranks},  # lambda_{k+1}
        "quantiles_log10": [float(torch.log10(eigenvalues[int(q * (n - 1))])) for q in (0.0, 0.25, 0.5, 0.75, 1.0)],
    }
    rows = []
    for method, rank in [("none", None), ("jacobi", None), *[("nystrom", k) for k in ranks]]:
        row = measure(snapshot, split, config, method, rank, repeats, reference)
        rows.append(row)
        log("  " + _row_line(row))
    return {
        "step": snapshot["step"],
        "log10_penalty_range": snapshot["log10_penalty_range"],
        "app_cg": snapshot["app_cg"],
        "spectrum": spectrum,
        "rows": rows,
    }


# ---------------------------------------------------------------------------- reporting
def _label(row: dict[str, Any]) -> str:
    if row["rank"] is not None:
        return f"Nyström, rank {row['rank']}"
    return {"none": "none", "jacobi": "Jacobi (exact diagonal)"}[row["method"]]


def _iterations(row: dict[str, Any], cap: int) -> str:
    return f"{row['iterations']} (cap)" if row["status"] != "CONVERGED" and row["iterations"] >= cap else str(
        row["iterations"])


def _row_line(row: dict[str, Any]) -> str:
    return (f"{_label(row):26s} iterations {row['iterations']:5d}  residual {row['relative_residual']:.1e}  "
            f"error {row['hypergradient_relative_error']:.1e}  first {row['first_call_s'] * 1e3:7.1f} ms  "
            f"second {row['second_call_s'] * 1e3:7.1f} ms")


def to_markdown(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    cap = cfg["cg_maxiter"]
    lines = [
        "# Nyström preconditioning of the digits per-pixel regularization backward systems",
        "",
        f"Multinomial logistic regression on digits (n_train = {cfg['n_train']}, {cfg['n_parameters']} parameters), "
        f"64 per-pixel L2 penalties after {cfg['steps']} steps of the application's hypergradient descent "
        f"(Adam, lr {cfg['outer_lr']}); backward CG at tol {cfg['cg_tol']:g}, maxiter {cap}, float64. "
        "Times: from the inner solution to the hypergradient (forward, validation loss, backward), median of "
        f"{cfg['repeats']} repeats, CPU time of the process; the first call includes building the preconditioner, "
        "the second reuses it at the same solution. Residual: true relative residual of the backward system "
        "recomputed after the solve; error: relative error of the hypergradient against a dense float64 solve.",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch_version']} with "
        f"{m['torch_threads']} thread(s), load average {m.get('load_average_1_5_15_min', ['?'])[0]} at start. "
        f"Total run time {result.get('total_time_s', float('nan')):.0f} s.",
        "",
        "| step | log10 penalties | Hessian eigenvalues | preconditioner | CG iterations | rel. residual | "
        "hypergradient error | first call (ms) | second call (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for snap in result["snapshots"]:
        spec = snap["spectrum"]
        lo, hi = snap["log10_penalty_range"]
        head = [str(snap["step"]), f"{lo:.1f} .. {hi:.1f}",
                f"{spec['largest']:.2g} .. {spec['smallest']:.1e} (κ {spec['condition_number']:.1e})"]
        for i, row in enumerate(snap["rows"]):
            cells = head if i == 0 else ["", "", ""]
            label = _label(row)
            if row["rank"] is not None:
                label += f" (λ_{row['rank'] + 1} = {spec['after_rank'][str(row['rank'])]:.2g})"
            lines.append("| " + " | ".join([
                *cells, label, _iterations(row, cap), f"{row['relative_residual']:.1e}",
                f"{row['hypergradient_relative_error']:.1e}", f"{row['first_call_cpu_s'] * 1e3:.0f}",
                f"{row['second_call_cpu_s'] * 1e3:.0f}",
            ]) + " |")
    lines += [
        "",
        "Reproduce: `" + " ".join(["python benchmarks/nystrom_preconditioning.py", *result["argv"]]) + "`.",
        "",
    ]
    return "\n".join(lines)


def to_rst(result: dict[str, Any]) -> str:
    """The table as an RST list-table (included by docs/solvers.rst): one row per preconditioner."""
    cfg, m = result["config"], result["machine"]
    cap, snaps = cfg["cg_maxiter"], result["snapshots"]
    last = snaps[-1]
    out = [".. list-table::", "   :header-rows: 1", "", "   * - preconditioner"]
    for snap in snaps:
        lo, hi = snap["log10_penalty_range"]
        out.append(f"     - step {snap['step']} (penalties 1e{lo:.1f} .. 1e{hi:.1f}, "
                   f"κ {snap['spectrum']['condition_number']:.1e}): iterations, residual")
    out.append(f"     - step {last['step']}: hypergradient error")
    out.append(f"     - step {last['step']}: first / second call (ms)")
    for j, row in enumerate(last["rows"]):
        out.append(f"   * - {_label(row)}")
        for snap in snaps:
            r = snap["rows"][j]
            out.append(f"     - {_iterations(r, cap)}, {r['relative_residual']:.1e}")
        out.append(f"     - {row['hypergradient_relative_error']:.1e}")
        out.append(f"     - {row['first_call_cpu_s'] * 1e3:.0f} / {row['second_call_cpu_s'] * 1e3:.0f}")
    spec = last["spectrum"]
    ranks = ", ".join(f"λ_{int(k) + 1} = {v:.2g}" for k, v in spec["after_rank"].items())
    out += [
        "",
        f"{cfg['n_parameters']} parameters, n_train = {cfg['n_train']}, CG tol {cfg['cg_tol']:g}, maxiter {cap}, "
        f"float64; residual: true relative residual after the solve; error: against a dense float64 solve. "
        f"Hessian at step {last['step']}: eigenvalues {spec['largest']:.2g} .. {spec['smallest']:.1e} ({ranks}). "
        f"Times: CPU, median of {cfg['repeats']} repeats, from the inner solution to the hypergradient; the first "
        f"call builds the preconditioner, the second reuses it. Machine: {m['cpu_model']}, {m['usable_cores']} "
        f"cores, torch {m['torch_version']}, {m['torch_threads']} thread.",
    ]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """CG iterations, final residual and first-call time per preconditioner, one group of bars per snapshot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = result["snapshots"]
    labels = [_label(r) for r in snaps[0]["rows"]]
    width = 0.8 / len(labels)
    colors = plt.get_cmap("viridis")([i / max(1, len(labels) - 1) for i in range(len(labels))])
    with plt.rc_context({"font.size": 10, "axes.titlesize": 10.5, "legend.fontsize": 9}):
        fig, (ax_i, ax_r, ax_t) = plt.subplots(1, 3, figsize=(14.5, 4.3))
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(snaps))]
            ax_i.bar(xs, [s["rows"][j]["iterations"] for s in snaps], width, color=colors[j], label=label)
            ax_r.bar(xs, [s["rows"][j]["relative_residual"] for s in snaps], width, color=colors[j])
            ax_t.bar(xs, [s["rows"][j]["first_call_cpu_s"] * 1e3 for s in snaps], width, color=colors[j])
        ticks = [f"step {s['step']}\nlog10 λ: {s['log10_penalty_range'][0]:.1f}..{s['log10_penalty_range'][1]:.1f}"
                 for s in snaps]
        for ax in (ax_i, ax_r, ax_t):
            ax.set_xticks(range(len(snaps)), ticks)
            ax.grid(axis="y", alpha=0.3)
        ax_i.axhline(result["config"]["cg_maxiter"], color="k", ls="--", lw=0.8)
        ax_i.set_ylabel("CG iterations (dashed: budget)")
        ax_i.set_title(f"iterations to tol {result['config']['cg_tol']:g}")
        ax_r.set_yscale("log")
        ax_r.axhline(result["config"]["cg_tol"], color="k", ls="--", lw=0.8)
        ax_r.set_ylabel("true relative residual (dashed: tol)")
        ax_r.set_title("where CG stopped")
        ax_t.set_ylabel("first call, CPU ms (build included)")
        ax_t.set_title("time to the hypergradient")
        fig.legend(loc="lower center", ncol=min(len(labels), 7), frameon=False)
        m = result["machine"]
        fig.suptitle(f"digits, 64 per-pixel penalties: backward CG preconditioners; {m['cpu_model']}, "
                     f"{m['torch_threads']} thread", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "nystrom_preconditioning"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".rst").write_text(to_rst(result))
    plot(result, stem.with_suffix(".png"))
    print()
    print(md)
    print(f"wrote {stem}.{{json,md,rst,png}}")


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="hypergradient-descent steps of the application")
    ap.add_argument("--lr", type=float, default=0.3, help="Adam step in log-penalty space (the application's is 0.1)")
    ap.add_argument("--snapshots", type=int, nargs="+", default=[20, 25, 30], help="steps whose systems are measured")
    ap.add_argument("--ranks", type=int, nargs="+", default=[10, 25, 50, 100, 200], help="Nyström ranks")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (fresh preconditioner each)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON", help="re-render outputs from a saved JSON")
    args = ap.parse_args(argv)
    if any(s < 1 or s > args.steps for s in args.snapshots):
        ap.error("--snapshots must be between 1 and --steps")
    if args.repeats < 1 or any(k < 1 for k in args.ranks):
        ap.error("--repeats and --ranks must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        write_results(result, args.out)
        return result
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = reg.RegularizationConfig(dataset="digits", outer_lr=args.lr)
    split = load_split("digits", seed=config.seed)
    machine = machine_info("cpu")
    print(f"machine: {machine['cpu_model']}, torch {machine['torch_version']}, {machine['torch_threads']} thread(s)")
    snapshots = trajectory(split, config, args.steps, sorted(set(args.snapshots)))
    n_parameters = sum(t.numel() for t in snapshots[0]["params"].values())
    result: dict[str, Any] = {
        "benchmark": "nystrom_preconditioning",
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {
            "dataset": "digits", "n_train": len(split.y_train), "n_parameters": n_parameters, "steps": args.steps,
            "outer_lr": args.lr, "snapshots": args.snapshots, "ranks": args.ranks, "repeats": args.repeats,
            "cg_tol": config.cg_tol, "cg_maxiter": config.cg_maxiter, "inner_grad_tol": config.inner_grad_tol,
            "inner_max_iter": config.inner_max_iter, "dtype": "float64",
        },
        "machine": machine,
        "implicitdiff_version": idiff.__version__,
        "snapshots": [],
    }
    for snapshot in snapshots:
        print(f"step {snapshot['step']}:")
        result["snapshots"].append(run_snapshot(snapshot, split, config, args.ranks, args.repeats))
    result["total_time_s"] = time.perf_counter() - start
    write_results(result, args.out)
    print(f"total {result['total_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
