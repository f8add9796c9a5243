"""One iMAML meta-iteration on the sinusoid task: implicitdiff (tasks batched by vmap) against JAXopt (jit).

The MAML paper's task family (amplitude in [0.1, 5], phase in [0, pi], inputs in [-5, 5]),
meta-batch 10, 10 support and 10 query points per task, a 1-40-40-1 MLP (SiLU, so that the
inner problem is smooth), iMAML's proximal inner problem
``phi* = argmin L_support(phi) + lam/2 ||phi - theta||^2`` solved by 20 gradient steps of size
0.01 (lam = 10: at this meta-parameter every task's backward operator is then positive
definite, so that CG does the same arithmetic in both libraries), and the implicit meta-gradient with 5 CG steps on ``(I + H/lam) u = grad L_query``.
One meta-iteration = the 10 inner solves + the 10 meta-gradients + their mean, from the same
seeded NumPy data for every method, float32 (the meta-learning default), one thread. Methods:

* ``implicitdiff, vmap``: ``implicit_diff`` with ``proximal_condition``, the 10 tasks batched by
  ``torch.func.vmap`` (``vmap_inner="batched"``: one batched run of the inner loop);
* ``implicitdiff, loop``: the same, one task after the other;
* ``JAXopt, jit``: ``custom_root`` with ``solve_cg`` (5 iterations), ``jax.vmap`` over tasks, the
  whole meta-gradient under ``jax.jit`` (compile time reported separately).

Methods are interleaved across rounds so that machine noise hits all alike. Run::

    python -m benchmarks.sinusoid_meta_iteration [--rounds 7] [--repeats 10]

Writes ``sinusoid_meta_iteration.json`` / ``.md`` / ``.rst`` into ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import implicitdiff as idiff  # noqa: E402

from ._tables import write_results  # noqa: E402
from ._timing import machine_info  # noqa: E402

try:
    import jax
    import jax.numpy as jnp
    import jaxopt
except ImportError:  # optional: the benchmark runs without it and says so
    jax = jaxopt = None

META_BATCH, SHOTS, QUERIES, HIDDEN = 10, 10, 10, 40
INNER_STEPS, INNER_LR, LAM, CG_STEPS = 20, 0.01, 10.0, 5


def tasks(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.1, 5.0, (META_BATCH, 1, 1))
    phase = rng.uniform(0.0, np.pi, (META_BATCH, 1, 1))
    xs = rng.uniform(-5, 5, (META_BATCH, SHOTS, 1))
    xq = rng.uniform(-5, 5, (META_BATCH, QUERIES, 1))
    f32 = np.float32
    return {"xs": xs.astype(f32), "ys": (amp * np.sin(xs + phase)).astype(f32),
            "xq": xq.astype(f32), "yq": (amp * np.sin(xq + phase)).astype(f32)}


def init_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    sizes = [(1, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)]
    out = {}
    for i, (a, b) in enumerate(sizes):
        out[f"w{i}"] = (rng.standard_normal((a, b)) * np.sqrt(1.0 / a)).astype(np.float32)
        out[f"b{i}"] = np.zeros(b, dtype=np.float32)
    return out


# ---------------------------------------------------------------------------- implicitdiff
def torch_method(data: dict[str, np.ndarray], params: dict[str, np.ndarray], batched: bool) -> Callable[[], Any]:
    T = {k: torch.as_tensor(v) for k, v in data.items()}
    theta = {k: torch.as_tensor(v) for k, v in params.items()}

    def net(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(x @ p["w0"] + p["b0"])
        h = torch.nn.functional.silu(h @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((net(p, x) - y) ** 2).mean()

    grad_loss = torch.func.grad(loss)

    @idiff.implicit_diff(
        idiff.proximal_condition(loss, LAM), solver=idiff.CG(tol=None, maxiter=CG_STEPS),
        vmap_inner="batched" if batched else "loop", check_optimality=None,
    )
    def adapt(phi: dict[str, torch.Tensor], th: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        for _ in range(INNER_STEPS):
            g = grad_loss(phi, x, y)
            phi = {k: phi[k] - INNER_LR * (g[k] + LAM * (phi[k] - th[k])) for k in phi}
        return phi

    def task_loss(th: dict[str, torch.Tensor], xs, ys, xq, yq) -> torch.Tensor:
        return loss(adapt(th, th, xs, ys), xq, yq)

    def run() -> Any:
        th = {k: v.clone().requires_grad_() for k, v in theta.items()}
        if batched:
            losses = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(th, T["xs"], T["ys"], T["xq"], T["yq"])
        else:
            losses = torch.stack([task_loss(th, T["xs"][i], T["ys"][i], T["xq"][i], T["yq"][i])
                                  for i in range(META_BATCH)])
        grads = torch.autograd.grad(losses.mean(), list(th.values()))
        return np.concatenate([g.detach().numpy().ravel() for g in grads])

    return run


# ---------------------------------------------------------------------------- JAXopt
def jaxopt_method(data: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> Callable[[], Any]:
    J = {k: jnp.asarray(v) for k, v in data.items()}
    theta = {k: jnp.asarray(v) for k, v in params.items()}

    def net(p, x):
        h = jax.nn.silu(x @ p["w0"] + p["b0"])
        h = jax.nn.silu(h @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    def loss(p, x, y):
        return jnp.mean((net(p, x) - y) ** 2)

    def inner_objective(phi, th, x, y):
        sq = sum(jnp.sum((phi[k] - th[k]) ** 2) for k in phi)
        return loss(phi, x, y) + 0.5 * LAM * sq

    def solve(matvec, b):
        return jaxopt.linear_solve.solve_cg(matvec, b, tol=0.0, maxiter=CG_STEPS)

    @jaxopt.implicit_diff.custom_root(jax.grad(inner_objective), solve=solve)
    def adapt(phi, th, x, y):
        def step(_, p):
            g = jax.grad(inner_objective)(p, th, x, y)
            return jax.tree_util.tree_map(lambda a, b: a - INNER_LR * b, p, g)

        return jax.lax.fori_loop(0, INNER_STEPS, step, phi)

    def task_loss(th, xs, ys, xq, yq):
        return loss(adapt(th, th, xs, ys), xq, yq)

    def meta_loss(th):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(th, J["xs"], J["ys"], J["xq"], J["yq"]))

    meta_grad = jax.jit(jax.grad(meta_loss))

    def run() -> Any:
        g = meta_grad(theta)
        g = jax.block_until_ready(g)
        return np.concatenate([np.asarray(g[k]).ravel() for k in theta])

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rounds, repeats = (2, 2) if args.quick else (args.rounds, args.repeats)
    data, params = tasks(args.seed), init_params(args.seed)
    methods: dict[str, Callable[[], Any]] = {
        "implicitdiff, tasks batched by vmap": torch_method(data, params, batched=True),
        "implicitdiff, tasks in a loop": torch_method(data, params, batched=False),
    }
    if jax is not None and jaxopt is not None:
        methods["JAXopt custom_root + CG, vmap, jit"] = jaxopt_method(data, params)
    first: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, run in methods.items():  # first call: compilation for JAX, warm-up for torch
        start = time.perf_counter()
        results[name] = run()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name].append((time.perf_counter() - start) / repeats)
    reference = results["implicitdiff, tasks in a loop"]
    jax_name = next((n for n in methods if n.startswith("JAXopt")), None)
    rows = []
    for name in methods:
        med = statistics.median(times[name])
        rel = float(np.linalg.norm(results[name] - reference) / np.linalg.norm(reference))
        rows.append({"method": name, "median_ms": 1e3 * med, "min_ms": 1e3 * min(times[name]),
                     "max_ms": 1e3 * max(times[name]), "first_call_s": first[name],
                     "difference_from_loop": rel})
    if jax_name is not None:
        ref_ms = next(r["median_ms"] for r in rows if r["method"] == jax_name)
        for r in rows:
            r["ratio_to_jaxopt"] = r["median_ms"] / ref_ms
    out = {"settings": {"meta_batch": META_BATCH, "shots": SHOTS, "queries": QUERIES, "hidden": HIDDEN,
                        "inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "lam": LAM, "cg_steps": CG_STEPS,
                        "dtype": "float32", "rounds": rounds, "repeats": repeats},
           "rows": rows, "machine": machine_info("cpu")}
    lines = [
        f"iMAML meta-iteration on the sinusoid task: meta-batch {META_BATCH}, {SHOTS} support / {QUERIES} query "
        f"points, 1-{HIDDEN}-{HIDDEN}-1 SiLU MLP, {INNER_STEPS} inner GD steps of {INNER_LR}, lambda {LAM:g}, "
        f"{CG_STEPS} CG steps; float32, one thread; medians over {rounds} interleaved rounds of {repeats}. "
        "Difference: relative distance of the meta-gradient from the loop's (same math, other round-off).",
        "",
        "| method | median (ms) | min-max (ms) | ratio to JAXopt | first call (s) | difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio_to_jaxopt']:.1f}" if "ratio_to_jaxopt" in r else "--"
        lines.append(f"| {r['method']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}-{r['max_ms']:.2f} | {ratio} | "
                     f"{r['first_call_s']:.2f} | {r['difference_from_loop']:.1e} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.quick:
        write_results(args.out, "sinusoid_meta_iteration", out, table)
    return out


if __name__ == "__main__":
    main()
