"""Hypergradient of the lasso with respect to its penalty: accuracy and speed, d up to 10 000.

Inner problem (training set, ``n`` samples, ``d`` features, float64)::

    w*(lam) = argmin_w  0.5 * ||X w - y||^2 / n + lam * ||w||_1,      lam = exp(log_lam)

Outer loss: validation mean squared error of ``w*``. The hypergradient
``d outer / d log_lam`` on the active set ``S = supp(w*)`` (signs ``s``) is

    -lam * s_S^T (X_S^T X_S / n)^{-1} g_S,      g = grad of the validation loss at w*.

The problem is *constructed* with a known exact solution (no inner solve is timed or needed):
a support of ``k = 10`` features and weights ``w*_S`` are drawn, and the training target is
``y = X w* + r`` with the residual ``r = lam n X_S (X_S^T X_S)^{-1} s_S + (I - P_S) e``, which
makes ``X_S^T r / n = lam s_S`` (the optimality condition on the support) while the
correlations off the support stay below ``lam`` (checked, with a margin: strict
complementarity). ``n = max(200, d / 4)``: more features than samples from d = 1000 on.

Methods, all given the exact ``w*``:

* ``implicitdiff``: the inner solver returns ``w*``, decorated with
  :func:`implicitdiff.proximal_gradient_condition` (soft thresholding, step ``1/L`` with ``L``
  estimated once by power iteration) and the default GMRES (tol 1e-10), followed by the
  outer loss and ``backward()``; matrix-free, every product is a VJP through ``X``.
* ``hand-written``: detect the support, compute ``g`` by autograd, form ``X_S^T X_S / n``
  (k x k), Cholesky-solve for ``u``, return ``-lam * s_S * u``: what one would write for the
  lasso specifically.
* reference: the same formula with ``torch.linalg.solve`` on the support (the closed form).

Usage::

    python benchmarks/lasso_hypergradient.py [--quick] [--sizes 100 1000 10000] [--out benchmarks/results]

Writes ``lasso_hypergradient.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import implicitdiff as idiff  # noqa: E402
from benchmarks._timing import machine_info, time_call  # noqa: E402
from implicitdiff import prox  # noqa: E402

DTYPE = torch.float64
SUPPORT = 10
LAM = 0.05


def least_squares(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``0.5 ||X w - y||^2 / n``: the smooth part of the lasso."""
    return 0.5 * ((X @ w - y) ** 2).mean()


def lasso_prox(x: torch.Tensor, log_lam: torch.Tensor, scaling: Any = 1.0) -> torch.Tensor:
    return prox.l1(x, log_lam.exp(), scaling)


def validation_mse(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((X @ w - y) ** 2).mean()


def make_problem(d: int, seed: int = 0) -> dict[str, Any]:
    """A lasso problem whose exact solution is known (see the module docstring)."""
    n = max(200, d // 4)
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=DTYPE)
    X_val = torch.randn(n, d, generator=generator, dtype=DTYPE)
    support = torch.randperm(d, generator=generator)[:SUPPORT].sort().values
    signs = torch.where(torch.rand(SUPPORT, generator=generator) < 0.5, -1.0, 1.0).to(DTYPE)
    w = torch.zeros(d, dtype=DTYPE)
    w[support] = signs * (1.0 + torch.rand(SUPPORT, generator=generator, dtype=DTYPE))
    XS = X[:, support]
    Q, _ = torch.linalg.qr(XS)
    e = 0.02 * torch.randn(n, generator=generator, dtype=DTYPE)
    r = LAM * n * XS @ torch.linalg.solve(XS.T @ XS, signs) + (e - Q @ (Q.T @ e))
    y = X @ w + r
    correlation = X.T @ r / n  # = lam * s on the support, |.| < lam off it
    off = torch.ones(d, dtype=torch.bool)
    off[support] = False
    margin = float(correlation[off].abs().max() / LAM)
    if not margin < 0.95:
        raise RuntimeError(f"constructed problem is not strictly complementary (max off-support ratio {margin:.3f})")
    torch.testing.assert_close(correlation[support], LAM * signs)
    y_val = X_val @ w + 0.5 * torch.randn(n, generator=generator, dtype=DTYPE)
    # L = lambda_max(X^T X / n) by power iteration (it only scales the backward system)
    v = torch.randn(d, generator=generator, dtype=DTYPE)
    for _ in range(50):
        v = X.T @ (X @ v) / n
        L = float(v.norm())
        v = v / L
    return {"n": n, "d": d, "X": X, "y": y, "X_val": X_val, "y_val": y_val, "w": w, "support": support,
            "signs": signs, "off_support_ratio": margin, "step": 1.0 / L}


def reference_hypergradient(p: dict[str, Any]) -> torch.Tensor:
    S = p["support"]
    XS = p["X"][:, S]
    g = 2.0 / p["n"] * p["X_val"][:, S].T @ (p["X_val"] @ p["w"] - p["y_val"])
    return -LAM * p["signs"] @ torch.linalg.solve(XS.T @ XS / p["n"], g)


def make_implicit(p: dict[str, Any]):
    condition = idiff.proximal_gradient_condition(least_squares, lasso_prox, stepsize=p["step"])
    w_exact = p["w"]

    @idiff.implicit_diff(condition, solver=idiff.GMRES(tol=1e-10))
    def lasso(w0: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return w_exact  # the exact inner solution, given

    def hypergradient() -> torch.Tensor:
        log_lam = torch.tensor(math.log(LAM), dtype=DTYPE, requires_grad=True)
        w = lasso(torch.zeros_like(w_exact), log_lam, p["X"], p["y"])
        validation_mse(w, p["X_val"], p["y_val"]).backward()
        return log_lam.grad

    return hypergradient


def make_hand_written(p: dict[str, Any]):
    def hypergradient() -> torch.Tensor:
        w = p["w"].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(validation_mse(w, p["X_val"], p["y_val"]), w)
        support = torch.nonzero(p["w"]).squeeze(1)
        XS = p["X"][:, support]
        u = torch.cholesky_solve(g[support, None], torch.linalg.cholesky(XS.T @ XS / p["n"])).squeeze(1)
        return -LAM * torch.sign(p["w"][support]) @ u

    return hypergradient


def run(sizes: list[int], repeats: dict[int, int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    rows = []
    for d in sizes:
        p = make_problem(d)
        reference = reference_hypergradient(p)
        row: dict[str, Any] = {"d": d, "n": p["n"], "support": SUPPORT,
                               "off-support max |corr|/lam": round(p["off_support_ratio"], 3)}
        with idiff.record_solves() as log:
            make_implicit(p)()
        backward = [info for info in log if info.kind == "backward"]
        row["GMRES iterations"] = int(backward[-1].iterations) if backward else "-"
        for name, factory in (("implicitdiff", make_implicit), ("hand-written", make_hand_written)):
            fn = factory(p)
            value = fn()
            timing = time_call(lambda _, fn=fn: fn(), repeats=repeats[d], warmup=1)
            row[f"{name} rel. error"] = float(abs(value - reference) / abs(reference))
            row[f"{name} ms"] = 1e3 * timing.median
        row["ratio"] = row["implicitdiff ms"] / row["hand-written ms"]
        row["repeats"] = repeats[d]
        rows.append(row)
        print(row, flush=True)
    return {"benchmark": "lasso_hypergradient", "machine": machine_info("cpu"), "lam": LAM, "rows": rows,
            "time": "median wall time from the exact w* to the hypergradient (library call + outer loss + backward)"}


def to_markdown(result: dict[str, Any]) -> str:
    columns = ["d", "n", "GMRES iterations", "implicitdiff rel. error", "hand-written rel. error", "implicitdiff ms",
               "hand-written ms", "ratio", "repeats"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        cells = []
        for c in columns:
            v = row[c]
            cells.append(f"{v:.1e}" if "error" in c else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    lines.append("")
    lines.append(f"{m['cpu_model']}, {m['torch_threads']} torch thread(s), torch {m['torch_version']}; "
                 f"{result['time']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--quick", action="store_true", help="d in {100, 1000}, 3 repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    sizes = [100, 1000] if args.quick else args.sizes
    repeats = {d: 3 if args.quick else (20 if d <= 1000 else 3) for d in sizes}
    warnings.simplefilter("error", idiff.LinearSolveWarning)
    result = run(sizes, repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lasso_hypergradient.json").write_text(json.dumps(result, indent=2) + "\n")
    table = to_markdown(result)
    (args.out / "lasso_hypergradient.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
