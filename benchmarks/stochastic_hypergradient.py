"""Bias and variance of minibatch hypergradients against the full-batch one, versus batch size.

Logistic regression with one L2 penalty per feature on 10^5 synthetic samples (generated
in-process, seeded). The inner problem is solved on all the data (Newton); only the backward
pass uses minibatches (:class:`implicitdiff.Minibatch`). Two estimators:

* ``Neumann, fresh batch per product``: K Richardson steps, each product on its own batch,
  then B^T u on another: unbiased for the full-batch K-term Neumann hypergradient, whose own
  truncation error is reported separately;
* ``CG, one batch per solve``: CG to tol 1e-10 on one batch's system, B^T u on another:
  biased (E[A_b^{-1}] != A^{-1}), the bias falling with the batch size.

For each batch size, R independent backward calls at the same inner solution give the
relative bias ||mean - exact|| / ||exact|| (with its standard error), the relative spread
sqrt(E||h - mean||^2) / ||exact|| and the relative RMSE, plus the median time per call.

Run::

    python -m benchmarks.stochastic_hypergradient            # n = 100000
    python -m benchmarks.stochastic_hypergradient --quick    # seconds

Writes ``stochastic_hypergradient.json`` / ``.md`` / ``.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import implicitdiff as idiff

from ._tables import write_results
from ._timing import machine_info

DT = torch.float64


def make_data(n: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.linspace(0.3, 2.0, d, dtype=DT)  # uneven scales
    w_true = torch.randn(d, generator=g, dtype=DT)
    t = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ w_true)).to(DT)
    X_val = torch.randn(2000, d, generator=g, dtype=DT) * torch.linspace(0.3, 2.0, d, dtype=DT)
    t_val = (torch.rand(2000, generator=g, dtype=DT) < torch.sigmoid(X_val @ w_true)).to(DT)
    return X, t, X_val, t_val


def objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (log_lam.exp() * w**2).sum()


def newton(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    lam = log_lam.exp()
    for _ in range(50):
        p = torch.sigmoid(X @ w)
        g = X.T @ (p - t) / len(X) + lam * w
        if float(g.norm()) < 1e-13:
            break
        H = X.T @ (X * (p * (1 - p))[:, None]) / len(X) + torch.diag(lam)
        w = w - torch.linalg.solve(H, g)
    return w


def sampler(size: int):
    def sample(generator: torch.Generator, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor):
        idx = torch.randint(len(X), (size,), generator=generator)
        return log_lam, X[idx], t[idx]

    return sample


def hessian(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(X @ w)
    return X.T @ (X * (p * (1 - p))[:, None]) / len(X) + torch.diag(log_lam.exp())


def run(n: int, d: int, sizes: list[int], repeats: int, neumann_terms: int, seed: int) -> dict[str, Any]:
    X, t, X_val, t_val = make_data(n, d, seed)
    log_lam = torch.full((d,), math.log(1e-3), dtype=DT)
    w0 = torch.zeros(d, dtype=DT)

    def outer(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(X_val @ w, t_val)

    def hypergradients(fit: idiff.ImplicitFunction, count: int) -> tuple[list[torch.Tensor], list[float]]:
        lam = log_lam.clone().requires_grad_()
        loss = outer(fit(w0, lam, X, t))  # one inner solve; every backward draws its own batches
        draws, times = [], []
        for _ in range(count):
            start = time.perf_counter()
            draws.append(torch.autograd.grad(loss, lam, retain_graph=True)[0])
            times.append(time.perf_counter() - start)
        return draws, times

    exact_fit = idiff.implicit_diff(objective=objective, solver=idiff.Direct())(newton)
    (exact,) = hypergradients(exact_fit, 1)[0]
    cg_full = idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-10))(newton)
    _, cg_times = hypergradients(cg_full, 5)
    w_star = newton(w0, log_lam, X, t)
    eig = torch.linalg.eigvalsh(hessian(w_star, log_lam, X))
    step = 1.0 / float(eig[-1])
    neumann = idiff.Neumann(step_size=step, tol=None, maxiter=neumann_terms)
    truncated_full = hypergradients(idiff.implicit_diff(objective=objective, solver=neumann)(newton), 1)[0][0]
    _, neumann_full_times = hypergradients(idiff.implicit_diff(objective=objective, solver=neumann)(newton), 3)
    norm = float(exact.norm())

    def summarize(draws: list[torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        H = torch.stack(draws)
        mean = H.mean(0)
        spread = float(((H - mean) ** 2).sum(1).mean().sqrt())
        return {
            "relative_bias": float((mean - target).norm()) / norm,
            "bias_standard_error": spread / math.sqrt(len(draws)) / norm,
            "relative_spread": spread / norm,
            "relative_rmse": float(((H - target) ** 2).sum(1).mean().sqrt()) / norm,
        }

    rows = []
    for size in sizes:
        for label, solver in (("Neumann, fresh batch per product", neumann), ("CG, one batch per solve",
                                                                               idiff.CG(tol=1e-10))):
            fit = idiff.implicit_diff(objective=objective, solver=solver,
                                      minibatch=idiff.Minibatch(sampler(size), seed=seed + size))(newton)
            draws, times = hypergradients(fit, repeats)
            row = {"estimator": label, "batch": size, "seconds": statistics.median(times)}
            row.update(summarize(draws, exact))
            if label.startswith("Neumann"):  # its unbiasedness target: the full-batch K-term series
                row["bias_vs_truncated_series"] = summarize(draws, truncated_full)["relative_bias"]
            rows.append(row)
            print(f"  batch {size:>6} {label:<34} bias {row['relative_bias']:.2e} "
                  f"(s.e. {row['bias_standard_error']:.1e}) spread {row['relative_spread']:.2e} "
                  f"{1e3 * row['seconds']:.1f} ms", flush=True)
    return {
        "problem": {"n": n, "d": d, "seed": seed, "penalty": 1e-3, "hessian_condition_number": float(eig[-1] / eig[0]),
                    "neumann_terms": neumann_terms, "neumann_step": step, "repeats": repeats},
        "full_batch": {
            "cg_seconds": statistics.median(cg_times),
            "neumann_seconds": statistics.median(neumann_full_times),
            "neumann_truncation_error": float((truncated_full - exact).norm()) / norm,
        },
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    pr, full = result["problem"], result["full_batch"]
    lines = [
        f"Logistic regression, n = {pr['n']}, d = {pr['d']}, per-feature penalty {pr['penalty']:g} (Hessian condition "
        f"number {pr['hessian_condition_number']:.0f}); {pr['repeats']} backward calls per row at one inner solution. "
        f"Neumann: {pr['neumann_terms']} terms, step 1/L (full-batch truncation error "
        f"{full['neumann_truncation_error']:.1e}). Full batch: CG {1e3 * full['cg_seconds']:.1f} ms, Neumann "
        f"{1e3 * full['neumann_seconds']:.1f} ms per hypergradient. All errors relative to ||exact hypergradient||.",
        "",
        "| estimator | batch | bias | bias s.e. | spread | RMSE | ms / call |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['estimator']} | {r['batch']} | {r['relative_bias']:.1e} | {r['bias_standard_error']:.1e} | "
                     f"{r['relative_spread']:.1e} | {r['relative_rmse']:.1e} | {1e3 * r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (label, rows), color in zip(_by_estimator(result).items(), ("C0", "C1")):
        b = [r["batch"] for r in rows]
        ax.loglog(b, [r["relative_bias"] for r in rows], "o-", color=color, label=f"{label}: bias")
        ax.loglog(b, [r["relative_spread"] for r in rows], "s--", color=color, label=f"{label}: spread")
    ax.axhline(result["full_batch"]["neumann_truncation_error"], color="k", ls=":",
               label="Neumann truncation error (full batch)")
    ax.set_xlabel("batch size (samples per product)")
    ax.set_ylabel("relative to ||exact hypergradient||")
    ax.set_title(f"minibatch hypergradients, logistic regression n = {result['problem']['n']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _by_estimator(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        out.setdefault(r["estimator"], []).append(r)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--neumann-terms", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        result = run(5000, 8, [64, 1024], 5, 50, args.seed)
    else:
        result = run(args.n, args.d, [32, 128, 512, 2048, 8192, 32768], args.repeats, args.neumann_terms, args.seed)
    result["machine"] = machine_info("cpu")
    stem = "stochastic_hypergradient" + ("_quick" if args.quick else "")
    table = to_markdown(result)
    write_results(args.out, stem, result, table)
    plot(result, args.out / f"{stem}.png")
    print(table)
    return result


if __name__ == "__main__":
    main()
