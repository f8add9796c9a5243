"""Memory and time of one meta-iteration vs the number of inner steps K: iMAML against MAML.

On the paper's Omniglot CNN (64 filters, 5-way 1-shot, 15 queries per class), one
meta-iteration = adapt every task of a meta-batch with K inner gradient steps, score the
query sets, and backpropagate the meta-gradient. iMAML (``implicit_diff`` with the
proximal condition, 5 Krylov steps) keeps no graph of the inner loop, so its memory should
not depend on K; MAML backpropagates through the K unrolled steps, so its memory grows with
K. Each configuration runs in a fresh process, so that peak memory is its own:

* CPU: peak resident memory during the meta-iteration (sampled every millisecond) minus
  the resident memory just before it (data, model and imports excluded), with glibc told
  to serve blocks of 64 KiB and more by mmap so that freed tensors leave the process;
* CUDA: ``torch.cuda.max_memory_allocated`` during the meta-iteration;
* both: the *tensor peak*, the largest total of tensor bytes allocated and not yet freed
  during one more meta-iteration, counted exactly from the allocation and free events of
  ``torch.profiler`` (``profile_memory=True``). Unlike resident memory it is deterministic
  (no sampling, no allocator caching) and counts tensors only.

The same meta-gradient can also be computed by two peers, looping over the tasks (neither
runs under ``torch.func.vmap``), with the same inner steps and 5 CG steps (``--algorithms
torchopt handwritten``, with ``--meta-solver cg`` for implicitdiff to match):

* ``torchopt``: TorchOpt's ``custom_root`` on the same proximal condition, ``solve_cg(maxiter=5)``;
  like implicitdiff it adds the meta-gradient to autograd, so the query losses of all the tasks
  are backpropagated together;
* ``handwritten``: plain autograd, one task at a time: adapt, the query gradient, 5 CG steps
  on ``v -> v + H v / lam`` (Hessian-vector products on a retained graph of the support
  gradient), the result added to ``theta.grad``. It never holds more than one task's graphs.

Also measured: time per meta-iteration (median of the timed iterations after one warm-up)
and tasks per second with and without ``torch.func.vmap`` over the tasks.

Every timed meta-iteration is kept (``seconds_all``), so the figure shows the spread.

Usage::

    python benchmarks/imaml_memory.py [--ks 1 5 10 25 50 100] [--meta-batch 4] [--device cpu] [--out benchmarks/results]
    # a repeated timing run at small K (one thread; about 2 minutes on a 2-core CPU)
    OMP_NUM_THREADS=1 python benchmarks/imaml_memory.py --ks 1 5 10 25 --vmap-ks --repeats 5 --tag _timing_repeats
    # against TorchOpt and a hand-written iMAML (implicitdiff with and without vmap, CG)
    python benchmarks/imaml_memory.py --algorithms imaml torchopt handwritten --meta-solver cg \
        --vmap-ks 1 5 10 25 50 100 --tag _peers
    # tables and figure from saved runs (memory from the first, time from the second)
    python benchmarks/imaml_memory.py --render benchmarks/results/imaml_memory_cpu.json \
        --timing benchmarks/results/imaml_memory_cpu_timing_repeats.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RssSampler:
    """Peak resident memory of this process while a block runs, sampled every millisecond.

    The kernel's own high-water mark (VmHWM) is only refreshed on some events, so it misses
    short peaks inside a running process; sampling /proc/self/statm from a thread does not
    (torch releases the GIL inside its kernels).
    """

    PAGE = __import__("os").sysconf("SC_PAGE_SIZE")

    def __init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.001)

    def __enter__(self) -> "RssSampler":
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def tensor_peak(fn) -> int | None:
    """Largest total of CPU tensor bytes allocated and not yet freed while ``fn()`` runs (above the start).

    From the allocation and free events of ``torch.profiler`` (``profile_memory=True``): exact
    and deterministic. ``None`` if this torch does not expose the events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # private API of torch.profiler: absent in another torch version
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()  # negative for a free
        peak = max(peak, current)
    return peak


#: The peers loop over the tasks (TorchOpt's custom_root does not run under torch.func.vmap).
LOOP_ONLY = ("torchopt", "handwritten")


def _peer_step(algorithm: str, model, loss_fn, inner, lam: float, cg_steps: int, theta: dict):
    """One meta-iteration of iMAML by TorchOpt or by hand (see the module docstring): ``step(episode)``."""
    import torch

    keys = list(theta)
    if algorithm == "torchopt":
        import torchopt

        def optimality(phi, th, x, y):  # the proximal condition, on tuples (TorchOpt's argnums need them)
            p = dict(zip(keys, phi))
            g = torch.func.grad(loss_fn)(p, x, y)
            return tuple(g[k] / lam + (p[k] - t) for k, t in zip(keys, th))

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps))
        def adapt(phi, th, x, y):
            start = {k: v.detach() for k, v in zip(keys, phi)}
            out = inner.solve(loss_fn, start, {k: v.detach() for k, v in zip(keys, th)}, lam, x, y)
            return tuple(out[k].detach() for k in keys)

        def step(ep):
            losses = []
            for xs, ys, xq, yq in zip(*ep):
                phi = adapt(tuple(theta[k].detach() for k in keys), tuple(theta[k] for k in keys), xs, ys)
                losses.append(loss_fn(dict(zip(keys, phi)), xq, yq))
            torch.stack(losses).mean().backward()

        return step

    def dot(a, b):
        return sum((ai * bi).sum() for ai, bi in zip(a, b))

    def meta_gradient(xs, ys, xq, yq, scale):
        start = {k: v.detach() for k, v in theta.items()}
        phi = {k: v.detach().requires_grad_() for k, v in inner.solve(loss_fn, start, start, lam, xs, ys).items()}
        ps = [phi[k] for k in keys]
        b = torch.autograd.grad(loss_fn(phi, xq, yq) * scale, ps)
        support_grad = torch.autograd.grad(loss_fn(phi, xs, ys), ps, create_graph=True)

        def matvec(v):  # (I + H / lam) v
            hv = torch.autograd.grad(support_grad, ps, v, retain_graph=True)
            return [vi + hi / lam for vi, hi in zip(v, hv)]

        u = [torch.zeros_like(t) for t in b]  # plain CG from 0, cg_steps iterations
        r, d = list(b), list(b)
        rr = dot(r, r)
        for _ in range(cg_steps):
            ad = matvec(d)
            alpha = rr / dot(d, ad)
            u = [ui + alpha * di for ui, di in zip(u, d)]
            r = [ri - alpha * ai for ri, ai in zip(r, ad)]
            rr_new = dot(r, r)
            d = [ri + (rr_new / rr) * di for ri, di in zip(r, d)]
            rr = rr_new
        return u  # dF/dtheta = -I: the meta-gradient is u itself

    def step(ep):
        n = ep[0].shape[0]
        for xs, ys, xq, yq in zip(*ep):
            for k, ui in zip(keys, meta_gradient(xs, ys, xq, yq, 1.0 / n)):
                theta[k].grad = ui if theta[k].grad is None else theta[k].grad + ui

    return step


def run_single(algorithm: str, k: int, meta_batch: int, use_vmap: bool, device: str, repeats: int, seed: int,
               meta_solver: str = "minres") -> dict:
    import torch

    from applications.meta_learning.algorithms import AlgorithmConfig, FunctionalModel, MetaObjective
    from applications.meta_learning.data import build_omniglot_splits
    from applications.meta_learning.inner_solvers import GradientDescent
    from applications.meta_learning.models import OmniglotCNN

    torch.manual_seed(seed)
    dev = torch.device(device)
    splits = build_omniglot_splits(ways=5, shots=1, queries=15, seed=0)
    model = FunctionalModel(OmniglotCNN(ways=5).to(dev))
    inner = GradientDescent(lr=0.1, steps=k)
    theta = {n: p.requires_grad_() for n, p in model.initial_params().items()}
    generator = torch.Generator().manual_seed(seed)
    episodes = [[t.to(dev) for t in splits["train"].sample(meta_batch, generator)] for _ in range(repeats + 2)]
    if algorithm in LOOP_ONLY:
        if use_vmap:
            raise ValueError(f"{algorithm} loops over the tasks; it does not run under vmap")
        objective = MetaObjective(model, "classification", AlgorithmConfig("imaml", inner=inner), use_vmap=False)
        meta_step = _peer_step(algorithm, model, objective.loss_fn, inner, 2.0, 5, theta)
    else:
        config = AlgorithmConfig(
            algorithm, lam=2.0, inner=inner, cg_steps=5, check_optimality=None, meta_solver=meta_solver,
        )
        objective = MetaObjective(model, "classification", config, use_vmap=use_vmap)

        def meta_step(ep):
            objective.batch(theta, *ep).losses.mean().backward()

    def step(ep):
        for p in theta.values():
            p.grad = None
        meta_step(ep)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(episodes[0])  # warm-up (allocator, kernels)
    times, peaks = [], []
    for ep in episodes[1:-1]:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            step(ep)
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            with RssSampler() as rss:
                t0 = time.perf_counter()
                step(ep)
                times.append(time.perf_counter() - t0)
            peaks.append(rss.peak - rss.base)
    times.sort()
    median = times[len(times) // 2]
    # one more meta-iteration, untimed, under the profiler (on CUDA the peak above is already exact)
    tensors = max(peaks) if dev.type == "cuda" else tensor_peak(lambda: step(episodes[-1]))
    return {
        "algorithm": algorithm,
        "K": k,
        "vmap": use_vmap,
        "meta_batch": meta_batch,
        "device": device,
        "meta_solver": meta_solver if algorithm in ("imaml", "fomaml") else ("cg" if algorithm in LOOP_ONLY else None),
        "seconds_per_meta_iteration": median,
        "seconds_all": times,
        "tasks_per_second": meta_batch / median,
        "peak_memory_bytes": max(peaks),
        "tensor_peak_bytes": tensors,
    }


def _child_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    # blocks of 64 KiB and more come straight from mmap and go back to the OS when freed, so
    # resident memory follows the live tensors instead of glibc's cached arenas
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    return env


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _label(r: dict) -> str:
    """The row's method: the algorithm, marked ``(loop)`` where it loops over the tasks without vmap."""
    return r["algorithm"] if r["vmap"] else f"{r['algorithm']} (loop)"


_COLUMNS = ("algorithm", "K", "vmap", "peak memory (MiB)", "tensor peak (MiB)", "s / meta-iteration", "tasks / s")


def _cells(r: dict) -> list[str]:
    return [
        str(r["algorithm"]), str(r["K"]), "yes" if r["vmap"] else "no", _mib(r["peak_memory_bytes"]),
        _mib(r.get("tensor_peak_bytes")), f"{r['seconds_per_meta_iteration']:.3f}", f"{r['tasks_per_second']:.2f}",
    ]


def _machine(info: dict) -> str:
    return f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, device {info['device']}."


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", summary(rows), "", _machine(info)]
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by method (algorithm, with or without vmap), sorted by K; methods measured at one K left out."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(_label(r), []).append(r)
    return {k: sorted(v, key=lambda r: r["K"]) for k, v in out.items() if len({r["K"] for r in v}) > 1}


def summary(rows: list[dict]) -> str:
    out = []
    for name, sel in _series(rows).items():
        lo, hi = sel[0], sel[-1]
        line = f"{name}: peak memory at K={hi['K']} is {hi['peak_memory_bytes'] / lo['peak_memory_bytes']:.2f}x"
        if hi.get("tensor_peak_bytes") and lo.get("tensor_peak_bytes"):
            line += f" (tensor peak {hi['tensor_peak_bytes'] / lo['tensor_peak_bytes']:.2f}x)"
        out.append(line + f" that at K={lo['K']}.")
    return " ".join(out)


def to_rst(rows: list[dict], info: dict) -> str:
    out = [".. list-table::", "   :header-rows: 1", ""]
    out += [("   * - " if i == 0 else "     - ") + c for i, c in enumerate(_COLUMNS)]
    for r in rows:
        out += [("   * - " if i == 0 else "     - ") + c for i, c in enumerate(_cells(r))]
    out += ["", summary(rows) + " " + _machine(info)]
    return "\n".join(out) + "\n"


STYLES = {
    "imaml": dict(color="tab:blue", marker="o", ls="-"),
    "maml": dict(color="tab:orange", marker="s", ls="--"),
    "torchopt": dict(color="tab:green", marker="^", ls="-."),
    "handwritten": dict(color="tab:red", marker="v", ls=(0, (1, 1))),
}


def _style(name: str) -> dict:
    """Colour and marker by algorithm; the loop (no vmap) series of an algorithm that also has a vmap one hollow."""
    base = dict(STYLES.get(name.split(" ")[0], dict(color="tab:gray", marker="x", ls="-")))
    if name.endswith("(loop)") and name.split(" ")[0] not in LOOP_ONLY:
        base.update(ls=":", mfc="none")
    return base


def _run_label(info: dict | None, rows: list[dict]) -> str:
    if not info:
        return ""
    threads = info.get("torch_threads", "?")
    repeats = max((len(r.get("seconds_all", [])) for r in rows), default=0)
    reps = f"{repeats} timed repeats" if repeats else "repeats not stored"
    return f"{threads} thread{'s' if threads != 1 else ''}, {reps}"


def plot(rows: list[dict], path: pathlib.Path, info: dict | None = None,
         timing: list[dict] | None = None, timing_info: dict | None = None) -> None:
    """Peak memory and time per meta-iteration against K, one line style per algorithm.

    The time panel shows the median and the range (min-max) of the timed meta-iterations of
    each configuration, and each repeat as a dot, when the rows store them (``seconds_all``);
    ``timing`` (rows of another run, e.g. a repeated run at small K) replaces the rows' own
    timings there, which are then drawn as hollow markers for comparison.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 10, "legend.fontsize": 9}):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 4.2))
        for alg, sel in _series(rows).items():
            ax1.plot([r["K"] for r in sel], [r["peak_memory_bytes"] / 2**20 for r in sel], label=alg, **_style(alg))
        timed = timing if timing is not None else rows
        for alg, sel in _series(timed).items():
            style = _style(alg)
            ks = [r["K"] for r in sel]
            med = [r["seconds_per_meta_iteration"] for r in sel]
            spread = [r.get("seconds_all") or [r["seconds_per_meta_iteration"]] for r in sel]
            lo = [m - min(a) for m, a in zip(med, spread)]
            hi = [max(a) - m for m, a in zip(med, spread)]
            label = f"{alg} (median, min-max)" if any(len(a) > 1 for a in spread) else alg
            ax2.errorbar(ks, med, yerr=[lo, hi], capsize=3, label=label, **style)
            for k, a in zip(ks, spread):
                if len(a) > 1:
                    ax2.plot([k] * len(a), a, ".", color=style["color"], alpha=0.4, ms=4)
            if timing is not None:
                first = _series(rows).get(alg, [])
                ax2.plot([r["K"] for r in first], [r["seconds_per_meta_iteration"] for r in first],
                         marker=style["marker"], ls=":", color=style["color"], mfc="none", alpha=0.7,
                         label=f"{alg}, the table's run")
        ax1.set_ylabel("peak memory of a meta-iteration (MiB)")
        ax1.set_title("memory (the table's run)")
        ax2.set_ylabel("seconds per meta-iteration")
        title = f"time: {_run_label(timing_info or info, timed)}" if (timing_info or info) else "time"
        if timing is not None:
            title += f"\n(hollow: the table's run, {(info or {}).get('torch_threads', '?')} thread(s))"
        ax2.set_title(title)
        for ax in (ax1, ax2):  # linear axes: linear growth in K shows as a straight line
            ax.set_xlabel("inner gradient steps K")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left", ncol=2 if ax is ax1 and len(_series(rows)) > 2 else 1)
        # room above the highest line for the legend (the peers' run has flat lines at several heights)
        ax1.set_ylim(0, 1.4 * max((r["peak_memory_bytes"] / 2**20 for sel in _series(rows).values() for r in sel),
                                  default=1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_outputs(rows: list[dict], info: dict, stem: pathlib.Path, timing: dict | None = None) -> str:
    """JSON, markdown, reST and PNG; ``timing``: a saved run whose timings the figure shows."""
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    md = to_markdown(rows, info)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".rst").write_text(to_rst(rows, info))
    plot(rows, stem.with_suffix(".png"), info, timing and timing["rows"], timing and timing["machine"])
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 25, 50, 100])
    parser.add_argument("--vmap-ks", type=int, nargs="*", default=[5], help="K values also measured without vmap")
    parser.add_argument("--algorithms", nargs="+", default=["imaml", "maml"],
                        choices=["imaml", "maml", "torchopt", "handwritten"],
                        help="torchopt and handwritten: iMAML by TorchOpt / by hand, looping over the tasks")
    parser.add_argument("--meta-solver", default="minres", choices=["cg", "minres"],
                        help="implicitdiff's Krylov method for iMAML (the peers use CG)")
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--single", nargs=3, metavar=("ALG", "K", "VMAP"), help=argparse.SUPPRESS)
    parser.add_argument("--render", type=pathlib.Path, default=None, help="rewrite tables and plot from a saved JSON")
    parser.add_argument("--tag", default="", help="suffix of the output files (imaml_memory_<device><tag>.*)")
    parser.add_argument("--timing", type=pathlib.Path, default=None,
                        help="with --render: draw the time panel from this saved run (e.g. repeated, small K)")
    args = parser.parse_args()
    if args.single:
        alg, k, vm = args.single
        row = run_single(alg, int(k), args.meta_batch, vm == "1", args.device, args.repeats, args.seed, args.meta_solver)
        print(json.dumps(row))
        return
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        timing = json.loads(args.timing.read_text()) if args.timing else None
        print(write_outputs(saved["rows"], saved["machine"], args.render.with_suffix(""), timing))
        return
    if args.meta_batch < 1 or args.repeats < 1 or any(k < 1 for k in args.ks):
        parser.error("--meta-batch, --repeats and every K must be positive")
    if "torchopt" in args.algorithms:
        try:
            import torchopt  # noqa: F401
        except ImportError:
            print("torchopt is not installed (pip install torchopt): its rows are skipped", file=sys.stderr)
            args.algorithms = [a for a in args.algorithms if a != "torchopt"]
    # the peers loop over the tasks: measured without vmap at every K
    configs = [(a, k, a not in LOOP_ONLY) for a in args.algorithms for k in args.ks]
    configs += [(a, k, False) for a in args.algorithms if a not in LOOP_ONLY for k in args.vmap_ks]
    rows = []
    for alg, k, vm in configs:  # each in a fresh process: its peak memory is its own
        cmd = [sys.executable, __file__, "--single", alg, str(k), "1" if vm else "0", "--meta-batch",
               str(args.meta_batch), "--repeats", str(args.repeats), "--device", args.device, "--seed", str(args.seed),
               "--meta-solver", args.meta_solver]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_child_env()).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{alg:11s} K={k:3d} vmap={vm!s:5s} peak={_mib(r['peak_memory_bytes'])} MiB "
              f"tensors={_mib(r['tensor_peak_bytes'])} MiB "
              f"{r['seconds_per_meta_iteration']:.3f} s/it {r['tasks_per_second']:.2f} tasks/s", flush=True)
    from benchmarks._timing import machine_info

    raw = machine_info(args.device)
    info = {"cpu": raw["cpu_model"], "cores": raw["usable_cores"], "torch": raw["torch_version"], **raw}
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_outputs(rows, info, args.out / f"imaml_memory_{args.device.split(':')[0]}{args.tag}"))


if __name__ == "__main__":
    main()
