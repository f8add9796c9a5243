"""How well do 5 Krylov steps solve iMAML's meta-gradient system on the Omniglot CNN?

For one 5-way 1-shot Omniglot task, a randomly initialized 4-block CNN (the paper's
network) and K inner gradient steps on L_train(phi) + lam/2 ||phi - theta||^2, the
meta-gradient solves

    (I + H/lam) u = grad L_test(phi_K),     H = Hessian of L_train at phi_K,

which is indefinite when phi_K is far from a minimum. For K in {1, 5, 10, 25, 50} this
script reports, after a fixed budget of 5 iterations, the relative residual
||b - A u|| / ||b|| of CG, damped CG and MINRES on the *undamped* system, the status CG
reports (negative curvature or not), and the cosine between each 5-step solution and a
tightly solved one (MINRES to 1e-8). Each K runs in a fresh process.

Usage::

    python benchmarks/imaml_backward_systems.py [--ks 1 5 10 25 50] [--lam 2.0] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_single(k: int, lam: float, damping: float, lr: float, seed: int) -> dict:
    import torch
    import torch.nn.functional as nnf

    import implicitdiff as idiff
    from applications.meta_learning.data import build_omniglot_splits
    from applications.meta_learning.models import OmniglotCNN

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    model = OmniglotCNN(ways=5)
    theta = {name: p.detach() for name, p in model.named_parameters()}
    splits = build_omniglot_splits(ways=5, shots=1, queries=15, seed=0)
    episode = splits["train"].sample(1, torch.Generator().manual_seed(seed))
    xs, ys, xq, yq = (t[0] for t in episode)

    def loss(phi, x, y):
        return nnf.cross_entropy(torch.func.functional_call(model, phi, (x,)), y)

    grad_loss = torch.func.grad(loss)
    phi = dict(theta)
    for _ in range(k):
        g = grad_loss(phi, xs, ys)
        phi = {n: phi[n] - lr * (g[n] + lam * (phi[n] - theta[n])) for n in phi}
    condition = idiff.proximal_condition(loss, lam)
    inner_residual = math.sqrt(sum(float((r**2).sum()) for r in condition(phi, theta, xs, ys).values()))
    b = grad_loss(phi, xq, yq)
    _, vjp_fn = torch.func.vjp(lambda p: condition(p, theta, xs, ys), phi)

    def matvec(v):
        return vjp_fn(v)[0]  # (I + H/lam) v, symmetric

    def flat(tree):
        return torch.cat([t.reshape(-1) for t in tree.values()])

    def cosine(u, v):
        # a solver stopped before its first step returns 0: no direction at all
        denom = float(u.norm() * v.norm())
        return float(u @ v) / denom if denom > 0 else 0.0

    def relative_residual(u):
        return float((flat(b) - flat(matvec(u))).norm() / flat(b).norm())

    t0 = time.perf_counter()
    reference = idiff.linear_solve(matvec, b, solver=idiff.MINRES(tol=1e-8, maxiter=2000, on_failure="ignore"))
    ref_time = time.perf_counter() - t0
    ref = flat(reference.value)
    solvers = {
        "CG": idiff.CG(tol=None, maxiter=5, on_failure="ignore"),
        f"CG damped ({damping:g})": idiff.CG(tol=None, maxiter=5, damping=damping, on_failure="ignore"),
        "MINRES": idiff.MINRES(tol=None, maxiter=5, on_failure="ignore"),
    }
    row = {
        "K": k,
        "lam": lam,
        "inner_residual": inner_residual,
        "reference_relative_residual": relative_residual(reference.value),
        "reference_iterations": reference.info.iterations,
        "reference_seconds": ref_time,
        "n_parameters": int(ref.numel()),
        "solvers": {},
    }
    for name, solver in solvers.items():
        sol = idiff.linear_solve(matvec, b, solver=solver)
        u = flat(sol.value)
        row["solvers"][name] = {
            "status": sol.info.status.name,
            "iterations": sol.info.iterations,
            "relative_residual": relative_residual(sol.value),
            "cosine_to_tight": cosine(u, ref),
        }
    row["one_step_cosine_to_tight"] = cosine(flat(b), ref)
    return row


def machine() -> dict:
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def to_markdown(rows: list[dict], info: dict) -> str:
    names = list(rows[0]["solvers"])
    head = "| K | inner ‖F‖ | " + " | ".join(f"{n}: rel. residual / cosine / status" for n in names) + " | FOMAML cosine |"
    sep = "|" + "---|" * (len(names) + 3)
    lines = [head, sep]
    for r in rows:
        cells = [
            f"{s['relative_residual']:.3g} / {s['cosine_to_tight']:.3f} / {s['status'].lower()}"
            for s in r["solvers"].values()
        ]
        lines.append(f"| {r['K']} | {r['inner_residual']:.3g} | " + " | ".join(cells) + f" | {r['one_step_cosine_to_tight']:.3f} |")
    lines.append("")
    ref_res = ", ".join(f"{r['reference_relative_residual']:.1e}" for r in rows)
    lines.append(
        f"λ = {rows[0]['lam']}, {rows[0]['n_parameters']} parameters, 5 iterations each; reference: MINRES to 1e-8 "
        f"(relative residuals {ref_res}). "
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}."
    )
    return "\n".join(lines) + "\n"


def to_rst(rows: list[dict], info: dict) -> str:
    """The same table as an RST list-table, included by the docs."""
    names = list(rows[0]["solvers"])
    out = [".. list-table::", "   :header-rows: 1", "", "   * - K", "     - inner residual ‖F(φ_K)‖"]
    out += [f"     - {n}: residual / cosine" for n in names]
    out += ["     - first-order (b itself): cosine"]
    for r in rows:
        out.append(f"   * - {r['K']}")
        out.append(f"     - {r['inner_residual']:.3g}")
        for s in r["solvers"].values():
            flag = " (negative curvature)" if s["status"] == "NEGATIVE_CURVATURE" else ""
            out.append(f"     - {s['relative_residual']:.3g} / {s['cosine_to_tight']:.3f}{flag}")
        out.append(f"     - {r['one_step_cosine_to_tight']:.3f}")
    ref_res = ", ".join(f"{r['reference_relative_residual']:.1e}" for r in rows)
    out += [
        "",
        f"λ = {rows[0]['lam']:g}, {rows[0]['n_parameters']} parameters, 5 iterations each (fixed budget). Reference: "
        f"MINRES to a relative residual of 1e-8 or 2000 iterations (reached: {ref_res}). "
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}.",
    ]
    return "\n".join(out) + "\n"


def write_outputs(rows: list[dict], info: dict, stem: pathlib.Path) -> str:
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    md = to_markdown(rows, info)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".rst").write_text(to_rst(rows, info))
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--render", type=pathlib.Path, default=None, help="rewrite the tables from a saved JSON")
    args = parser.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(write_outputs(saved["rows"], saved["machine"], args.render.with_suffix("")))
        return
    if args.single is not None:
        print(json.dumps(run_single(args.single, args.lam, args.damping, args.lr, args.seed)))
        return
    rows = []
    for k in args.ks:  # a fresh process per configuration
        cmd = [sys.executable, __file__, "--single", str(k), "--lam", str(args.lam), "--lr", str(args.lr),
               "--damping", str(args.damping), "--seed", str(args.seed)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"K={k:3d} inner|F|={r['inner_residual']:.3g} " + "  ".join(
            f"{n}: res={s['relative_residual']:.3g} cos={s['cosine_to_tight']:.3f} ({s['status']})" for n, s in r["solvers"].items()
        ), flush=True)
    info = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_outputs(rows, info, args.out / f"imaml_backward_systems_lam{args.lam:g}"))


if __name__ == "__main__":
    main()
