"""
Diagnostics and failure policies
================================

A backward solve that fails silently gives a wrong gradient with no sign of it. Every
solve in implicitdiff therefore ends with a :class:`~implicitdiff.SolveStatus`, a
:class:`~implicitdiff.SolveInfo` record that :func:`~implicitdiff.record_solves` collects,
and the solver's ``on_failure`` policy (``"warn"``, ``"raise"`` or ``"ignore"``). This
page provokes every status on small systems, shows the three policies, a failure inside
``loss.backward()``, a batch of solves under ``vmap``, and the inner-optimality check.
See :doc:`/diagnostics` for the reference.

Run time: under a second on a 2-core CPU (one torch thread).
"""

import warnings

import torch

import implicitdiff as idiff

torch.set_default_dtype(torch.float64)

# %%
# One system per status
# ---------------------
#
# Each case is a :func:`~implicitdiff.linear_solve` with ``on_failure="ignore"`` (the
# record is still logged). ``NONFINITE`` is the exception: it always raises
# :class:`~implicitdiff.NonFiniteError`.

spd = torch.diag(torch.linspace(1.0, 10.0, 20))  # symmetric positive definite
b20 = torch.ones(20)
cases = [
    ("a symmetric positive definite system", idiff.CG(tol=1e-10), spd, b20),
    (
        "a fixed budget of 3 iterations (tol=None)",
        idiff.CG(maxiter=3, tol=None),
        spd,
        b20,
    ),
    (
        "3 iterations are not enough for tol=1e-10",
        idiff.CG(maxiter=3, tol=1e-10),
        spd,
        b20,
    ),
    (
        "CG on an indefinite matrix",
        idiff.CG(),
        torch.diag(torch.tensor([1.0, -1.0])),
        torch.ones(2),
    ),
    (
        "Neumann series with step_size above 2 / lambda_max",
        idiff.Neumann(step_size=1.0),
        torch.diag(torch.tensor([0.5, 3.0])),
        torch.ones(2),
    ),
    (
        "MINRES on a singular system, b not in the range",
        idiff.MINRES(),
        torch.diag(torch.tensor([1.0, 0.0])),
        torch.ones(2),
    ),
    (
        "float32 with tol=1e-10, below its precision",
        idiff.CG(tol=1e-10),
        torch.diag(torch.logspace(0, 3, 20)).float(),
        b20.float(),
    ),
]
rows = []
for description, solver, A, b in cases:
    solver.on_failure = "ignore"
    with idiff.record_solves() as log:
        idiff.linear_solve(lambda v, A=A: A @ v, b, solver=solver)
    info = log[-1]
    rows.append(
        (
            description,
            info.solver,
            info.status.name,
            info.iterations,
            info.relative_residual,
        )
    )

try:
    with idiff.record_solves() as log:
        idiff.linear_solve(lambda v: v * float("nan"), torch.ones(2), solver=idiff.CG())
except idiff.NonFiniteError as error:
    info = error.info
    rows.append(
        (
            "a NaN in the operator",
            info.solver,
            info.status.name,
            info.iterations,
            info.relative_residual,
        )
    )

print(f"{'case':<52}{'solver':<8}{'status':<20}{'iter.':>6}{'rel. residual':>15}")
for description, solver, status, iterations, rel in rows:
    print(f"{description:<52}{solver:<8}{status:<20}{iterations:>6}{rel:>15.1e}")

# %%
# ``CONVERGED`` and ``BUDGET_USED`` are successes (``info.converged`` is true); the
# others are failures. A failed solve never returns an iterate worse than its initial
# guess: CG at negative curvature returns its best iterate, the diverging Neumann series
# its best partial sum. ``STAGNATED`` names a tolerance the dtype cannot reach: in
# float32 the true residual stops near :math:`10^{-7}` relative.
#
# The three failure policies
# --------------------------

A, b = spd, b20
for policy in ("warn", "raise", "ignore"):
    solver = idiff.CG(maxiter=3, tol=1e-10, on_failure=policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", idiff.LinearSolveWarning)
        try:
            idiff.linear_solve(lambda v: A @ v, b, solver=solver)
            outcome = "returned"
        except idiff.LinearSolveError as error:
            status = error.info.status.name
            outcome = f"raised LinearSolveError (error.info.status = {status})"
    print(f"on_failure={policy!r:<9} {outcome}; {len(caught)} LinearSolveWarning")

# %%
# Failures in the backward pass
# -----------------------------
#
# The policy applies to the backward solve of a decorated function too, so ``"raise"``
# makes ``loss.backward()`` raise. Here the inner problem is a least-squares fit whose
# Hessian is ill-conditioned and the backward CG gets 2 iterations.

torch.manual_seed(0)
X, y = torch.randn(30, 10) @ torch.diag(torch.logspace(0, 2, 10)), torch.randn(30)


def objective(w, log_lam, X, y):
    return ((X @ w - y) ** 2).mean() + (log_lam.exp() * w**2).sum()


def closed_form(w0, log_lam, X, y):
    return torch.linalg.solve(
        X.T @ X / len(y) + torch.diag(log_lam.exp()), X.T @ y / len(y)
    )


strict = idiff.implicit_diff(
    objective=objective, solver=idiff.CG(maxiter=2, tol=1e-8, on_failure="raise")
)(closed_form)
log_lam = torch.zeros(10, requires_grad=True)
try:
    strict(torch.zeros(10), log_lam, X, y).sum().backward()
except idiff.LinearSolveError as error:
    print("loss.backward() raised LinearSolveError:", str(error).split(";")[0])
    print("error.info.kind:", error.info.kind)

# %%
# Under vmap
# ----------
#
# A batch of solves runs masked iterations and is logged as one record: the worst
# status, ``batch_size`` and ``batch_failures``. The systems
# :math:`\operatorname{diag}(1, \dots, s)` need more CG iterations as :math:`s` grows;
# with a budget of 8, the two with :math:`s \ge 10` do not converge.

solver = idiff.CG(maxiter=8, tol=1e-10, on_failure="ignore")


def solve_scaled(scale):
    A = torch.diag(1 + (scale - 1) * torch.linspace(0, 1, 20))
    return idiff.linear_solve(lambda v: A @ v, b20, solver=solver).value


with idiff.record_solves() as log:
    torch.func.vmap(solve_scaled)(torch.tensor([1.0, 1.05, 10.0, 100.0]))
info = log[-1]
print(info.describe())
print(f"batch_size={info.batch_size}, batch_failures={info.batch_failures}")

# %%
# The inner-optimality check
# --------------------------
#
# The implicit function theorem holds at a solution of the inner problem only. After
# every inner solve, implicitdiff compares :math:`\|F(x^\star)\|` with
# :math:`\|F(\text{init})\|` and warns with
# :class:`~implicitdiff.InnerOptimalityWarning` above ``check_optimality`` (default
# ``1e-3``); the comparison is logged as a ``kind="optimality"`` record. An inner solver
# stopped after 5 gradient steps:


@idiff.implicit_diff(objective=objective)
def five_steps(w, log_lam, X, y):
    for _ in range(5):
        w = w - 0.01 * torch.func.grad(objective)(w, log_lam, X, y)
    return w


X0 = torch.randn(30, 10)
with warnings.catch_warnings(record=True) as caught, idiff.record_solves() as log:
    warnings.simplefilter("always", idiff.InnerOptimalityWarning)
    five_steps(torch.zeros(10), log_lam, X0, y)
for w in caught:
    if issubclass(w.category, idiff.InnerOptimalityWarning):
        print("InnerOptimalityWarning:", str(w.message).split(". ")[0])
check = next(info for info in log if info.kind == "optimality")
print(
    f"logged: kind={check.kind!r}, converged={check.converged}, message={check.message!r}"
)

# %%
# To turn any of these warnings into errors for a whole program:
# ``warnings.simplefilter("error", idiff.LinearSolveWarning)`` (or
# ``idiff.InnerOptimalityWarning``).
