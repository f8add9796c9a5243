"""
iMAML in one page: few-shot sinusoid regression
===============================================

iMAML (Rajeswaran et al., 2019) learns an initialization :math:`\\theta` from which a
network adapts to a new task from a few examples. Each task's adapted parameters solve the
proximal problem

.. math:: \\phi^\\star(\\theta) = \\arg\\min_\\phi \\; L_\\text{support}(\\phi)
   + \\frac{\\lambda}{2}\\|\\phi - \\theta\\|^2,

and the meta-gradient of the query loss :math:`L_\\text{query}(\\phi^\\star(\\theta))`
needs :math:`(I + \\nabla^2 L_\\text{support}/\\lambda)^{-1}`: implicitdiff provides it
through :func:`~implicitdiff.proximal_condition` and a few CG steps, whatever the inner
solver did. The task family is the MAML paper's: :math:`y = A\\sin(x - \\varphi)` with
:math:`A \\sim U[0.1, 5]`, :math:`\\varphi \\sim U[0, \\pi]`, 10 support and 10 query
points drawn from :math:`x \\sim U[-5, 5]`. The tasks of a meta-batch run together under
``torch.func.vmap``.

The full application (Omniglot, MAML and first-order MAML, checkpoints) is described in
:doc:`/meta_learning`. Run time: about 15 s on a 2-core CPU (one torch thread).
"""

import math
import time
import warnings

import matplotlib.pyplot as plt
import torch

import implicitdiff as idiff

torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)


def sample_tasks(n_tasks, n_points=20):
    """Inputs and targets [n_tasks, n_points, 1]; also the amplitudes and phases."""
    amplitude = 0.1 + 4.9 * torch.rand(n_tasks, 1, 1, generator=gen)
    phase = math.pi * torch.rand(n_tasks, 1, 1, generator=gen)
    x = -5 + 10 * torch.rand(n_tasks, n_points, 1, generator=gen)
    return x, amplitude * torch.sin(x - phase), amplitude, phase


# %%
# The network, the losses and the adaptation
# -------------------------------------------
#
# A 1-40-40-1 MLP written as a function of a parameter dict, with the smooth SiLU
# activation (with ReLU the inner problem has kinks and cannot be solved to a small
# gradient). ``adapt`` runs 20 steps of gradient descent on the proximal objective from
# :math:`\theta`, each step halved until it decreases the objective enough (Armijo) and
# lengthened after a success; it is written with ``torch.where`` instead of Python
# ``if`` so that the tasks of a meta-batch adapt together under ``vmap``
# (``vmap_inner="batched"``). The decorator differentiates its result by the implicit
# function theorem, with 5 CG steps as in the paper (``tol=None``: a fixed budget, not a
# failure).

lam = 5.0


def init_params():
    def layer(n_in, n_out):  # torch.nn.Linear's initialization
        bound = 1 / math.sqrt(n_in)
        return (2 * torch.rand(n_out, n_in) - 1) * bound, (
            2 * torch.rand(n_out) - 1
        ) * bound

    (w1, b1), (w2, b2), (w3, b3) = layer(1, 40), layer(40, 40), layer(40, 1)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}


def net(p, x):
    h = torch.nn.functional.silu(x @ p["w1"].T + p["b1"])
    h = torch.nn.functional.silu(h @ p["w2"].T + p["b2"])
    return h @ p["w3"].T + p["b3"]


def mse(p, x, y):
    return ((net(p, x) - y) ** 2).mean()


def proximal_objective(phi, theta, x, y):
    return mse(phi, x, y) + lam / 2 * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)


@idiff.implicit_diff(
    idiff.proximal_condition(mse, lam=lam),
    solver=idiff.CG(maxiter=5, tol=None),
    vmap_inner="batched",
    check_optimality=0.1,
)
def adapt(phi, theta, x, y):
    step = torch.func.grad_and_value(proximal_objective)
    g, value = step(phi, theta, x, y)
    lr = torch.tensor(0.05)
    for _ in range(20):
        candidate = {k: phi[k] - lr * g[k] for k in phi}
        g_new, new_value = step(candidate, theta, x, y)
        ok = new_value <= value - 0.5 * lr * sum((gk**2).sum() for gk in g.values())
        phi = {k: torch.where(ok, candidate[k], phi[k]) for k in phi}
        g = {k: torch.where(ok, g_new[k], g[k]) for k in g}
        value = torch.where(ok, new_value, value)
        lr = torch.where(ok, 1.25 * lr, 0.5 * lr)
    return phi


def query_loss(theta, x_s, y_s, x_q, y_q):
    phi = adapt({k: v.detach() for k, v in theta.items()}, theta, x_s, y_s)
    return mse(phi, x_q, y_q)


batched_query_loss = torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))

# %%
# Meta-training
# -------------
#
# 150 meta-iterations of 10 tasks with Adam. An inner problem left above the optimality
# check's tolerance would warn (:class:`~implicitdiff.InnerOptimalityWarning`); here the
# warnings are counted instead, as the application does.

theta = {k: v.requires_grad_() for k, v in init_params().items()}
theta_start = {k: v.detach().clone() for k, v in theta.items()}
optimizer = torch.optim.Adam(theta.values(), lr=3e-3)
meta_losses = []
start = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", idiff.InnerOptimalityWarning)
    for _ in range(150):
        x, y, _, _ = sample_tasks(10)
        optimizer.zero_grad()
        losses = batched_query_loss(theta, x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
        loss = losses.mean()
        loss.backward()
        optimizer.step()
        meta_losses.append(loss.item())
unsolved = sum(issubclass(w.category, idiff.InnerOptimalityWarning) for w in caught)
print(f"150 meta-iterations in {time.perf_counter() - start:.1f} s")
print(f"inner problems above the optimality check's tolerance: {unsolved} of 1500")

# %%
# Held-out tasks
# --------------
#
# Post-adaptation MSE on 200 new tasks, from the meta-learned initialization and from
# the random one it started from (the same adaptation: 20 steps on 10 points).

x, y, amplitude, phase = sample_tasks(200)
for name, start_params in (("random initialization", theta_start), ("iMAML", theta)):
    start_params = {k: v.detach() for k, v in start_params.items()}
    with torch.no_grad(), idiff.record_solves() as log, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", idiff.InnerOptimalityWarning
        )  # counted below instead
        losses = batched_query_loss(
            start_params, x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]
        )
    half_width = 1.96 * losses.std() / math.sqrt(len(losses))
    residuals = torch.tensor(
        [info.relative_residual for info in log if info.kind == "optimality"]
    )
    print(f"{name}: query MSE after adaptation {losses.mean():.3f} +- {half_width:.3f}")
    median, worst = residuals.median(), residuals.max()
    print(f"    inner relative residual: median {median:.1e}, max {worst:.1e}")

# %%
# The optimality check (``check_optimality=0.1``, the application's default) logs
# :math:`\|F(\phi)\| / \|F(\theta)\|` for every task: gradient descent solves these
# inner problems only approximately (a median of about :math:`5\cdot 10^{-3}`), which
# bounds how exact the implicit meta-gradient can be. Newton-CG inner solvers reach
# :math:`10^{-5}` on this task (see :doc:`/meta_learning`); for this page, 20 steps are
# the budget.

# %%
# One held-out task: the meta-learned initialization is a smooth curve that 20 gradient
# steps on 10 points bend into the task's sinusoid.

grid = torch.linspace(-5, 5, 200).unsqueeze(1)
theta_now = {k: v.detach() for k, v in theta.items()}
x_s, y_s = x[0, :10], y[0, :10]
phi = adapt(theta_now, theta_now, x_s, y_s)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
ax1.plot(meta_losses, lw=0.6, alpha=0.5, label="per meta-iteration")
window = 20
smooth = torch.tensor(meta_losses).unfold(0, window, 1).mean(1)
ax1.plot(range(window - 1, len(meta_losses)), smooth, lw=2, label="moving average (20)")
ax1.set_yscale("log")
ax1.set_xlabel("meta-iteration (10 tasks each)")
ax1.set_ylabel("query MSE after adaptation")
ax1.legend()
ax2.plot(grid, amplitude[0] * torch.sin(grid - phase[0]), "k-", label="task")
ax2.plot(x_s, y_s, "ko", label="10 support points")
ax2.plot(grid, net(theta_now, grid), "--", label=r"meta-learned $\theta$")
ax2.plot(grid, net(phi, grid), "-", color="tab:red", label=r"adapted $\phi^\star$")
ax2.set_xlabel("x")
ax2.set_ylabel("y")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()
