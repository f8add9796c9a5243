"""linear_solve reports the truth: true residuals, user code that writes into its arguments, bad shapes.

The kind of fault: a status decided on a recursively updated (drifting) residual, a solver that
hands user code (a matvec, a preconditioner) a tensor it still needs, and a size mismatch that
surfaces as a raw torch error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implicitdiff as idiff
from implicitdiff import SolveStatus

DT = torch.float64
ALL_ITERATIVE = [
    lambda **kw: idiff.CG(**kw),
    lambda **kw: idiff.MINRES(**kw),
    lambda **kw: idiff.GMRES(**kw),
    lambda **kw: idiff.BiCGSTAB(**kw),
    lambda **kw: idiff.NormalCG(**kw),
]


def spd(n: int, cond: float, seed: int, dtype=DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return (q @ torch.diag(eig) @ q.T).to(dtype)


def true_residual(A, x, b) -> float:
    return float(torch.linalg.vector_norm(b.double() - A.double() @ x.double()))


# ---------------------------------------------------------------- status checked against the true residual


def test_float32_cg_below_attainable_accuracy_is_not_called_converged():
    # the reported case: 50x50, condition 1e4, float32, tol 1e-10 (CG's recursive residual says 8.8e-11)
    A = spd(50, 1e4, 0, torch.float32)
    b = torch.randn(50, generator=torch.Generator().manual_seed(1))
    with pytest.warns(idiff.LinearSolveWarning, match="below what torch.float32 can reach"):
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, maxiter=500))
    assert sol.info.status in (SolveStatus.STAGNATED, SolveStatus.MAX_ITERATIONS)
    rel = true_residual(A, sol.value, b) / float(b.norm())
    # the reported residual is the true one (computed in float32, like the solve)
    assert sol.info.relative_residual == pytest.approx(rel, rel=0.5)
    assert "float32" in sol.info.message


@pytest.mark.parametrize("make", ALL_ITERATIVE)
def test_tolerance_below_float32_precision_is_said_for_every_solver(make):
    A = spd(30, 1e3, 2, torch.float32)
    b = torch.randn(30, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=make(tol=1e-12, maxiter=3000))
    assert sol.info.status != SolveStatus.CONVERGED
    assert not sol.info.converged


@given(n=st.integers(1, 12), seed=st.integers(0, 2**16), log_scale=st.sampled_from([-6, 0, 6]), use_atol=st.booleans())
@pytest.mark.parametrize("make", ALL_ITERATIVE)
def test_converged_implies_the_true_residual_meets_the_rule(make, n, seed, log_scale, use_atol):
    A = spd(n, 100.0, seed) + (0.3 * torch.triu(torch.ones(n, n, dtype=DT), 1) if make is ALL_ITERATIVE[2] else 0)
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1)) * 10.0**log_scale
    tol, atol = (1e-8, 0.0) if not use_atol else (0.0, 1e-7 * float(b.norm()))
    if make in (ALL_ITERATIVE[0], ALL_ITERATIVE[1]):
        A = 0.5 * (A + A.T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=make(tol=tol, atol=atol, maxiter=2000))
    if sol.info.converged:
        assert true_residual(A, sol.value, b) <= max(tol * float(b.norm()), atol) * (1 + 1e-9)


def test_reported_residual_is_the_true_residual():
    A = spd(20, 1e3, 5)
    b = torch.randn(20, dtype=DT)
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-9))
    assert sol.info.residual_norm == pytest.approx(true_residual(A, sol.value, b), rel=1e-6)


# ---------------------------------------------------------------- user code may write into its arguments


def test_jacobi_preconditioner_dividing_in_place():
    # the reported case: CG with v.div_(diag) reported CONVERGED at x = [0.394, 0.039, 0.004]
    A = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=DT)) + 0.5
    b = torch.ones(3, dtype=DT)
    d = torch.diagonal(A).clone()
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, preconditioner=lambda v: v.div_(d)))
    assert sol.info.converged
    assert torch.allclose(sol.value, torch.linalg.solve(A, b), atol=1e-9)
    assert torch.allclose(sol.value, torch.tensor([0.643, 0.064, 0.006], dtype=DT), atol=1e-3)


@pytest.mark.parametrize("make", [lambda M: idiff.BiCGSTAB(tol=1e-10, preconditioner=M), lambda M: idiff.GMRES(tol=1e-10, preconditioner=M), lambda M: idiff.NormalCG(tol=1e-10, preconditioner=M)])
def test_preconditioner_reusing_one_output_buffer(make):
    A = torch.tensor([[4.0, 1.0, 0.0], [0.5, 3.0, 0.2], [0.0, -0.4, 2.0]], dtype=DT)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    buffer = torch.empty(3, dtype=DT)
    inv_diag = 1 / torch.diagonal(A)
    if isinstance(make(None), idiff.NormalCG):
        inv_diag = 1 / torch.diagonal(A.T @ A)

    def precondition(v):  # writes every result into the same buffer
        torch.mul(v, inv_diag, out=buffer)
        return buffer

    sol = idiff.linear_solve(lambda v: A @ v, b, solver=make(precondition))
    assert sol.info.converged, sol.info.describe()
    assert torch.allclose(sol.value, torch.linalg.solve(A, b), atol=1e-8)


@pytest.mark.parametrize("make", ALL_ITERATIVE)
def test_matvec_that_modifies_its_input(make):
    A = spd(6, 10.0, 7)
    b = torch.randn(6, dtype=DT)

    def matvec(v):
        out = A @ v
        v.zero_()  # user code that scribbles on its argument
        return out

    sol = idiff.linear_solve(matvec, b, solver=make(tol=1e-10, maxiter=500))
    assert sol.info.converged, sol.info.describe()
    assert torch.allclose(sol.value, torch.linalg.solve(A, b), atol=1e-7)


def test_callers_rhs_and_guess_are_not_changed():
    A = spd(5, 10.0, 8)
    b, x0 = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    b_copy, x0_copy = b.clone(), x0.clone()
    idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, preconditioner=lambda v: v.mul_(0.5)), x0=x0)
    assert torch.equal(b, b_copy) and torch.equal(x0, x0_copy)


# ---------------------------------------------------------------- x0, shapes, sizes


@pytest.mark.parametrize("make", ALL_ITERATIVE + [lambda **kw: idiff.Neumann(step_size=0.05, **kw)])
def test_exact_initial_guess_takes_no_iterations(make):
    A = spd(6, 10.0, 9)
    b = torch.randn(6, dtype=DT)
    x = torch.linalg.solve(A, b)
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=make(tol=1e-8), x0=x)
    assert sol.info.converged and sol.info.iterations == 0
    assert torch.allclose(sol.value, x)


def test_non_square_operator_is_a_clear_error():
    A = torch.randn(4, 3, dtype=DT)
    with pytest.raises(idiff.ImplicitDiffError, match="square operator"):
        idiff.linear_solve(lambda v: A @ v, torch.ones(3, dtype=DT), solver=idiff.CG())
    with pytest.raises(idiff.ImplicitDiffError, match="square operator"):
        idiff.linear_solve(lambda v: {"a": v["a"]}, {"a": torch.ones(2), "b": torch.ones(1)})


def test_x0_with_the_wrong_shape_is_a_clear_error():
    with pytest.raises(idiff.ImplicitDiffError, match="x0 must have the structure"):
        idiff.linear_solve(lambda v: v, torch.ones(3), x0=torch.ones(4))


@pytest.mark.parametrize("make", ALL_ITERATIVE + [lambda **kw: idiff.Direct()])
def test_empty_right_hand_side(make):
    b = torch.zeros(0, dtype=DT, requires_grad=True)
    sol = idiff.linear_solve(lambda v: 2 * v, b, solver=make(tol=1e-8))
    assert sol.value.shape == (0,) and sol.info.converged
    sol.value.sum().backward()
    assert b.grad.shape == (0,)


def test_tolerance_below_precision_under_vmap_is_reported_per_batch():
    As = torch.stack([spd(30, 1e4, s, torch.float32) for s in range(3)])
    bs = torch.randn(3, 30)
    with idiff.record_solves() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.func.vmap(lambda A, b: idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, maxiter=300)).value)(As, bs)
    assert log[0].status != SolveStatus.CONVERGED and log[0].batch_failures >= 1


# ---------------------------------------------------------------- the reported hypergradients, end to end


def test_diverging_neumann_hypergradient_is_named_not_returned():
    # Hessian 11 I with step 0.186: the series' ratio is |1 - 0.186 * 11| = 1.05 (it returned 1.1e18, exact -0.033)
    obj = lambda w, t: 0.5 * 11 * (w**2).sum() - (t * w).sum()  # noqa: E731  (w* = t / 11)

    def make(policy):
        return idiff.implicit_diff(objective=obj, solver=idiff.Neumann(step_size=0.186, tol=1e-10, on_failure=policy))(
            lambda w, t: t / 11
        )

    t = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    with pytest.raises(idiff.LinearSolveError, match=r"DIVERGED.*step_size must be below 2 / lambda_max"):
        make("raise")(torch.zeros(3, dtype=DT), t).sum().backward()
    with pytest.warns(idiff.LinearSolveWarning, match="DIVERGED"):
        make("warn")(torch.zeros(3, dtype=DT), t).sum().backward()
    assert torch.isfinite(t.grad).all() and float(t.grad.abs().max()) <= 1.0  # never worse than the zero guess
    # a step below 2 / 11 converges to the exact hypergradient 1/11
    t.grad = None
    good = idiff.implicit_diff(objective=obj, solver=idiff.Neumann(step_size=0.15, tol=1e-12))(lambda w, t: t / 11)
    good(torch.zeros(3, dtype=DT), t).sum().backward()
    assert torch.allclose(t.grad, torch.full((3,), 1 / 11, dtype=DT), atol=1e-10)


def test_minres_on_a_rank_one_hessian_reports_least_squares_not_1e15():
    a = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    obj = lambda w, t: (a @ w - t) ** 2  # noqa: E731  Hessian 2 a a^T: singular
    fit = idiff.implicit_diff(objective=obj, solver=idiff.MINRES(tol=1e-10), check_optimality=None)(
        lambda w, t: a * t / (a @ a)
    )
    t = torch.tensor(0.7, dtype=DT, requires_grad=True)
    with idiff.record_solves() as log, pytest.warns(idiff.LinearSolveWarning, match="LEAST_SQUARES"):
        (fit(torch.zeros(3, dtype=DT), t) * torch.tensor([1.0, 0.0, 0.0], dtype=DT)).sum().backward()
    assert log[-1].status == SolveStatus.LEAST_SQUARES
    assert torch.isfinite(t.grad) and abs(float(t.grad)) < 10


def test_cg_on_an_inconsistent_singular_system_blames_no_finite_input():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=DT))
    with pytest.warns(idiff.LinearSolveWarning, match="NEGATIVE_CURVATURE"):
        sol = idiff.linear_solve(lambda v: A @ v, torch.ones(4, dtype=DT), solver=idiff.CG(tol=1e-10))
    assert torch.isfinite(sol.value).all()
    assert true_residual(A, sol.value, torch.ones(4, dtype=DT)) <= 2.0  # never worse than x = 0


def test_direct_backward_forms_the_operator_in_one_batched_product():
    # pytree solution, plain .backward(): Direct materializes A^T with one vmapped backward (is_grads_batched)
    A = spd(5, 10.0, 12)
    obj = lambda p, t: 0.5 * torch.cat([p["a"], p["b"]]) @ A @ torch.cat([p["a"], p["b"]]) - t @ torch.cat([p["a"], p["b"]])  # noqa: E731
    solve = lambda t: torch.linalg.solve(A, t)  # noqa: E731
    fit = idiff.implicit_diff(objective=obj, solver=idiff.Direct())(lambda p, t: {"a": solve(t)[:2], "b": solve(t)[2:]})
    t = torch.randn(5, dtype=DT, requires_grad=True)
    c = torch.randn(5, dtype=DT)
    out = fit({"a": torch.zeros(2, dtype=DT), "b": torch.zeros(3, dtype=DT)}, t)
    original = torch.autograd.grad
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        (torch.cat([out["a"], out["b"]]) @ c).backward()
    finally:
        torch.autograd.grad = original
    assert torch.allclose(t.grad, torch.linalg.solve(A, c), atol=1e-12)
    assert calls.count(True) == 1
