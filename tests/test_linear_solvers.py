"""Linear solvers against dense float64 solves, and their diagnostics."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implicitdiff as idiff
from implicitdiff import SolveStatus

DT = torch.float64


def spd(n: int, cond: float, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return (q @ torch.diag(eig) @ q.T).to(device)


def nonsymmetric(n: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT) / n**0.5
    return (torch.eye(n, dtype=DT) * 2.0 + m).to(device)  # eigenvalues clustered around 2: well conditioned


def symmetric_indefinite(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.linspace(1.0, 3.0, n, dtype=DT) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT)
    return q @ torch.diag(eig) @ q.T


def contraction(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(n, n, generator=g, dtype=DT)
    return 0.6 * j / torch.linalg.matrix_norm(j, 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


sizes = st.integers(min_value=1, max_value=24)
seeds = st.integers(min_value=0, max_value=2**16)


@given(n=sizes, seed=seeds, log_cond=st.floats(min_value=0.0, max_value=4.0))
@pytest.mark.parametrize("solver", [idiff.CG(tol=1e-12), idiff.MINRES(tol=1e-12), idiff.Direct(), idiff.GMRES(tol=1e-12)])
def test_spd_systems_match_dense_solve(solver, n, seed, log_cond):
    A = spd(n, 10.0**log_cond, seed)
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    assert sol.info.converged
    assert rel_err(sol.value, torch.linalg.solve(A, b)) < 1e-8 * 10.0**log_cond


@given(n=sizes, seed=seeds)
@pytest.mark.parametrize(
    "solver", [idiff.GMRES(tol=1e-12), idiff.BiCGSTAB(tol=1e-12), idiff.NormalCG(tol=1e-13), idiff.Direct()]
)
def test_nonsymmetric_systems_match_dense_solve(solver, n, seed):
    A = nonsymmetric(n, seed)
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    assert sol.info.converged, sol.info.describe()
    assert rel_err(sol.value, torch.linalg.solve(A, b)) < 1e-8


@given(n=sizes, seed=seeds)
@pytest.mark.parametrize("solver", [idiff.MINRES(tol=1e-12), idiff.GMRES(tol=1e-12)])
def test_symmetric_indefinite_systems(solver, n, seed):
    A = symmetric_indefinite(n, seed)
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    assert sol.info.converged
    assert rel_err(sol.value, torch.linalg.solve(A, b)) < 1e-8


@given(n=sizes, seed=seeds)
def test_neumann_on_contractive_fixed_point_systems(n, seed):
    J = contraction(n, seed)
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    sol = idiff.linear_solve(lambda v: v - J @ v, b, solver=idiff.Neumann(tol=1e-12))
    assert sol.info.converged
    assert rel_err(sol.value, torch.linalg.solve(torch.eye(n, dtype=DT) - J, b)) < 1e-10


def test_neumann_step_size_for_spd():
    A = spd(10, 10.0, 0)
    b = torch.ones(10, dtype=DT)
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.Neumann(step_size=1.0 / 10.0, tol=1e-10, maxiter=5000))
    assert sol.info.converged
    assert rel_err(sol.value, torch.linalg.solve(A, b)) < 1e-8


@pytest.mark.parametrize(
    "solver_cls, matrix",
    [
        (idiff.CG, lambda: spd(30, 1e4, 1)),
        (idiff.MINRES, lambda: spd(30, 1e4, 1)),
        (idiff.GMRES, lambda: nonsymmetric(30, 1) + 3 * torch.diag(torch.logspace(0, 3, 30, dtype=DT))),
        (idiff.BiCGSTAB, lambda: nonsymmetric(30, 1) + 3 * torch.diag(torch.logspace(0, 3, 30, dtype=DT))),
        (idiff.NormalCG, lambda: nonsymmetric(30, 1) + 3 * torch.diag(torch.logspace(0, 3, 30, dtype=DT))),
        (idiff.Neumann, lambda: torch.eye(30, dtype=DT) - contraction(30, 1) * 1.6),
    ],
)
def test_too_few_iterations_reported_truthfully(solver_cls, matrix):
    A = matrix()
    b = torch.randn(30, dtype=DT)
    kwargs = {"restart": 2} if solver_cls is idiff.GMRES else {}
    with pytest.warns(idiff.LinearSolveWarning, match="MAX_ITERATIONS"):
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver_cls(tol=1e-12, maxiter=2, **kwargs))
    assert sol.info.status == SolveStatus.MAX_ITERATIONS
    assert not sol.info.converged
    true_rel = float((b - A @ sol.value).norm() / b.norm())
    assert true_rel > 1e-12
    assert sol.info.relative_residual == pytest.approx(true_rel, rel=1e-6, abs=1e-12)
    with pytest.raises(idiff.LinearSolveError, match="MAX_ITERATIONS") as err:
        idiff.linear_solve(lambda v: A @ v, b, solver=solver_cls(tol=1e-12, maxiter=2, on_failure="raise", **kwargs))
    assert err.value.info.status == SolveStatus.MAX_ITERATIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idiff.linear_solve(lambda v: A @ v, b, solver=solver_cls(tol=1e-12, maxiter=2, on_failure="ignore", **kwargs))


@pytest.mark.parametrize("solver_cls", [idiff.CG, idiff.MINRES, idiff.GMRES, idiff.BiCGSTAB, idiff.Neumann])
def test_fixed_budget_is_not_a_failure(solver_cls):
    A = spd(20, 100.0, 3)
    b = torch.randn(20, dtype=DT)
    extra = {"step_size": 0.01} if solver_cls is idiff.Neumann else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver_cls(tol=None, maxiter=5, **extra))
    assert sol.info.status == SolveStatus.BUDGET_USED
    assert sol.info.converged
    assert sol.info.iterations == 5


def test_fixed_budget_needs_maxiter():
    with pytest.raises(ValueError, match="maxiter"):
        idiff.CG(tol=None)


def test_cg_negative_curvature_status_and_best_iterate():
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5], dtype=DT))
    b = torch.ones(4, dtype=DT)
    with pytest.warns(idiff.LinearSolveWarning, match="NEGATIVE_CURVATURE"):
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10))
    assert sol.info.status == SolveStatus.NEGATIVE_CURVATURE
    assert torch.isfinite(sol.value).all()
    # the returned iterate is the best met in CG's sense: it lowered the quadratic model below
    # its value at the zero initial guess, and it is where CG stood (the first step was taken)
    x = sol.value
    assert float(0.5 * x @ A @ x - b @ x) < 0.0
    assert sol.info.iterations >= 1
    assert sol.info.relative_residual == pytest.approx(float((b - A @ x).norm() / b.norm()), rel=1e-9)
    with pytest.raises(idiff.LinearSolveError, match="MINRES"):
        idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, on_failure="raise"))
    # negative curvature on the very first direction: CG stays at its initial guess
    B = torch.diag(torch.tensor([2.0, 1.0, -1.0, -3.0], dtype=DT))
    with pytest.warns(idiff.LinearSolveWarning):
        first = idiff.linear_solve(lambda v: B @ v, b, solver=idiff.CG(tol=1e-10))
    assert first.info.iterations == 0 and torch.equal(first.value, torch.zeros(4, dtype=DT))


def test_cg_negative_curvature_under_masked_path():
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0, -3.0], dtype=DT))
    b = torch.ones(4, dtype=DT, requires_grad=True)
    with torch.enable_grad(), pytest.warns(idiff.LinearSolveWarning):
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10))  # differentiable: masked path
    assert sol.info.status == SolveStatus.NEGATIVE_CURVATURE
    assert torch.isfinite(sol.value).all()


def test_damping_makes_indefinite_system_solvable():
    A = symmetric_indefinite(12, 4)
    b = torch.randn(12, dtype=DT)
    damping = 3.5  # the most negative eigenvalue is >= -3
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-12, damping=damping))
    assert sol.info.converged
    ref = torch.linalg.solve(A + damping * torch.eye(12, dtype=DT), b)
    assert rel_err(sol.value, ref) < 1e-9
    direct = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.Direct(damping=damping))
    assert rel_err(direct.value, ref) < 1e-12


def test_minres_breakdown_with_indefinite_preconditioner():
    A = spd(6, 10.0, 2)
    M = torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=DT))
    with pytest.warns(idiff.LinearSolveWarning, match="BREAKDOWN"):
        sol = idiff.linear_solve(lambda v: A @ v, torch.ones(6, dtype=DT), solver=idiff.MINRES(preconditioner=lambda v: M @ v))
    assert sol.info.status == SolveStatus.BREAKDOWN


@pytest.mark.parametrize("solver", [idiff.CG(), idiff.GMRES(), idiff.MINRES(), idiff.BiCGSTAB(), idiff.Neumann()])
def test_nonfinite_operator_raises_naming_the_solver(solver):
    def matvec(v):
        return v * float("nan")

    with pytest.raises(idiff.NonFiniteError, match=solver.name):
        idiff.linear_solve(matvec, torch.ones(3, dtype=DT), solver=solver)


def test_nonfinite_rhs_raises():
    with pytest.raises(idiff.NonFiniteError, match="right-hand side"):
        idiff.linear_solve(lambda v: v, torch.tensor([1.0, float("inf")]), solver=idiff.CG())


def test_zero_rhs_returns_zero_without_iterating():
    sol = idiff.linear_solve(lambda v: 2 * v, torch.zeros(3), solver=idiff.CG())
    assert sol.info.iterations == 0 and torch.equal(sol.value, torch.zeros(3))


@pytest.mark.parametrize("solver", [idiff.CG(), idiff.GMRES(), idiff.MINRES(), idiff.BiCGSTAB(), idiff.Direct()])
def test_tiny_right_hand_side_float32(solver):
    A = spd(5, 10.0, 0).float()
    b = torch.randn(5) * 1e-30
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    ref = torch.linalg.solve(A.double(), b.double())
    assert torch.isfinite(sol.value).all()
    assert rel_err(sol.value.double(), ref) < 1e-4


def test_pytree_right_hand_side_and_preconditioner():
    scales = {"a": torch.logspace(0, 4, 10, dtype=DT), "b": torch.tensor(7.0, dtype=DT)}

    def matvec(v):
        return {"a": scales["a"] * v["a"], "b": scales["b"] * v["b"]}

    b = {"a": torch.ones(10, dtype=DT), "b": torch.tensor(1.0, dtype=DT)}
    plain = idiff.linear_solve(matvec, b, solver=idiff.CG(tol=1e-12))
    jacobi = idiff.linear_solve(
        matvec, b, solver=idiff.CG(tol=1e-12, preconditioner=lambda v: {"a": v["a"] / scales["a"], "b": v["b"] / scales["b"]})
    )
    for sol in (plain, jacobi):
        assert torch.allclose(sol.value["a"], 1 / scales["a"], rtol=1e-8)
        assert torch.allclose(sol.value["b"], 1 / scales["b"])
    assert jacobi.info.iterations < plain.info.iterations


@pytest.mark.parametrize(
    "solver",
    [idiff.CG(tol=1e-12), idiff.MINRES(tol=1e-12), idiff.GMRES(tol=1e-12), idiff.BiCGSTAB(tol=1e-12),
     idiff.NormalCG(tol=1e-13), idiff.Neumann(step_size=0.1, tol=1e-12, maxiter=3000), idiff.Direct()],
)
def test_vmap_over_right_hand_sides_equals_loop(solver):
    A = spd(8, 5.0, 7)
    B = torch.randn(4, 8, dtype=DT)
    batched = torch.func.vmap(lambda b: idiff.linear_solve(lambda v: A @ v, b, solver=solver).value)(B)
    looped = torch.stack([idiff.linear_solve(lambda v: A @ v, b, solver=solver).value for b in B])
    assert torch.allclose(batched, looped, atol=1e-9)
    assert torch.allclose(batched, torch.linalg.solve(A, B.T).T, atol=1e-8)


def test_linear_solve_is_differentiable():
    A = spd(5, 10.0, 0).requires_grad_()
    b = torch.randn(5, dtype=DT, requires_grad=True)
    ra, rb = torch.autograd.grad(torch.linalg.solve(A, b).sum(), (A, b))
    for solver in (idiff.Direct(), idiff.CG(tol=1e-14), idiff.MINRES(tol=1e-14)):
        f = lambda A, b: idiff.linear_solve(lambda v: A @ v, b, solver=solver).value.sum()  # noqa: E731
        ga, gb = torch.autograd.grad(f(A, b), (A, b))
        assert torch.allclose(gb, rb, atol=1e-8)
        if solver.requires_symmetric:  # CG/MINRES see only symmetric perturbations of A
            ga, ra_ = (ga + ga.T) / 2, (ra + ra.T) / 2
        else:
            ra_ = ra
        assert torch.allclose(ga, ra_, atol=1e-7)


def test_record_solves_logs_each_solve():
    with idiff.record_solves() as outer:
        idiff.linear_solve(lambda v: 2 * v, torch.ones(2), solver=idiff.CG())
        with idiff.record_solves() as inner:
            idiff.linear_solve(lambda v: 3 * v, torch.ones(2), solver=idiff.GMRES())
    assert [i.solver for i in outer] == ["CG", "GMRES"]
    assert [i.solver for i in inner] == ["GMRES"]
    assert outer[0].kind == "linear_solve" and outer[0].residual_norm is not None


def test_bad_solver_arguments():
    with pytest.raises(TypeError, match="instance.*CG\\(\\)"):
        idiff.linear_solve(lambda v: v, torch.ones(2), solver=idiff.CG)
    with pytest.raises(TypeError, match="LinearSolver"):
        idiff.linear_solve(lambda v: v, torch.ones(2), solver="cg")
    with pytest.raises(ValueError, match="on_failure"):
        idiff.CG(on_failure="explode")
    with pytest.raises(ValueError, match="tol"):
        idiff.CG(tol=-1.0)
    with pytest.raises(ValueError, match="restart"):
        idiff.GMRES(restart=0)
    with pytest.raises(ValueError, match="step_size"):
        idiff.Neumann(step_size=0.0)
    with pytest.raises(idiff.ImplicitDiffError, match="floating"):
        idiff.linear_solve(lambda v: v, torch.ones(2, dtype=torch.int64))


def test_direct_singular_operator():
    with pytest.raises(idiff.LinearSolveError, match="BREAKDOWN"):
        idiff.linear_solve(lambda v: torch.zeros_like(v) + 0 * v, torch.ones(3, dtype=DT), solver=idiff.Direct(on_failure="raise"))
    # rank deficient: the minimum-norm least-squares solution, reported as a breakdown
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DT)
    with pytest.warns(idiff.LinearSolveWarning, match="BREAKDOWN"):
        sol = idiff.linear_solve(lambda v: A @ v, torch.tensor([1.0, 3.0], dtype=DT), solver=idiff.Direct())
    assert torch.allclose(sol.value, torch.tensor([1.0, 1.0], dtype=DT))


def test_solvers_on_device(device):
    A = spd(16, 10.0, 0, device=device)
    b = torch.randn(16, dtype=DT, device=device)
    for solver in (idiff.CG(tol=1e-12), idiff.GMRES(tol=1e-12), idiff.MINRES(tol=1e-12), idiff.Direct()):
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
        assert sol.value.device.type == device.type
        assert rel_err(sol.value, torch.linalg.solve(A, b)) < 1e-8


@pytest.mark.parametrize(
    "solver",
    [idiff.CG(tol=1e-10), idiff.GMRES(tol=1e-10, restart=5), idiff.Neumann(step_size=0.05, tol=1e-8, maxiter=3000),
     idiff.CG(tol=None, maxiter=4), idiff.GMRES(tol=None, maxiter=7, restart=3)],
)
def test_fast_and_differentiable_paths_agree(solver):
    # grad mode off: Python-scalar fast path; b requiring grad: the masked, differentiable path
    A = spd(12, 20.0, 3)
    b = torch.randn(12, dtype=DT)
    with torch.no_grad():
        fast = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    slow = idiff.linear_solve(lambda v: A @ v, b.clone().requires_grad_(), solver=solver)
    assert slow.value.requires_grad and not fast.value.requires_grad
    assert fast.info.status == slow.info.status
    assert abs(fast.info.iterations - slow.info.iterations) <= 1
    assert torch.allclose(fast.value, slow.value.detach(), atol=1e-8, rtol=1e-6)


def test_operator_requiring_grad_is_differentiated_exactly():
    # b does not require grad but A does: the fast path must notice and step aside
    A = spd(6, 10.0, 4).requires_grad_()
    b = torch.randn(6, dtype=DT)
    for solver in (idiff.CG(tol=1e-14), idiff.GMRES(tol=1e-14), idiff.Neumann(step_size=0.1, tol=1e-13, maxiter=5000)):
        (ga,) = torch.autograd.grad(idiff.linear_solve(lambda v: A @ v, b, solver=solver).value.sum(), A)
        (ra,) = torch.autograd.grad(torch.linalg.solve(A, b).sum(), A)
        assert torch.allclose((ga + ga.T) / 2, (ra + ra.T) / 2, atol=1e-7), solver


def test_vmapped_solves_report_their_worst_status():
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5], dtype=DT))
    B = torch.stack([torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT), torch.ones(4, dtype=DT), 2 * torch.ones(4, dtype=DT)])
    solve = lambda b, s: idiff.linear_solve(lambda v: A @ v, b, solver=s).value  # noqa: E731
    with idiff.record_solves() as log, pytest.warns(idiff.LinearSolveWarning, match="batch of 3 solves, 2 not"):
        torch.func.vmap(lambda b: solve(b, idiff.CG(tol=1e-10)))(B)
    (info,) = log
    assert info.status == SolveStatus.NEGATIVE_CURVATURE and info.batch_size == 3 and info.num_failed == 2
    with pytest.raises(idiff.LinearSolveError, match="NEGATIVE_CURVATURE"):
        torch.func.vmap(lambda b: solve(b, idiff.CG(tol=1e-10, on_failure="raise")))(B)
    with idiff.record_solves() as log:
        torch.func.vmap(lambda b: solve(b, idiff.MINRES(tol=1e-10)))(B)
    assert log[0].status == SolveStatus.CONVERGED and log[0].num_failed == 0 and log[0].relative_residual < 1e-9
