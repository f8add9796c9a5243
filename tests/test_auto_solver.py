"""The default backward solver: dense factorization for small systems (cached), Krylov for large ones."""

from __future__ import annotations

import pytest
import torch

import implicitdiff as idiff

DT = torch.float64


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    return M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)


def counted(A: torch.Tensor):
    calls = {"n": 0}

    def mv(v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return A @ v

    return mv, calls


def test_small_symmetric_positive_definite_is_solved_by_cholesky_exactly() -> None:
    A, b = spd(20), torch.arange(20, dtype=DT)
    solver = idiff.Auto()
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    assert solver.last_path == "cholesky" and sol.info.converged
    torch.testing.assert_close(sol.value, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["nonsymmetric", "indefinite"])
def test_other_small_systems_are_solved_by_lu(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    if kind == "nonsymmetric":
        A = torch.randn(15, 15, generator=g, dtype=DT) + 5 * torch.eye(15, dtype=DT)
    else:
        A = torch.diag(torch.linspace(-2, 3, 15, dtype=DT)[torch.arange(15) != 6])  # no zero eigenvalue
        A = A[:14, :14]
    b = torch.ones(A.shape[0], dtype=DT)
    solver = idiff.Auto()
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    assert solver.last_path == "lu"
    torch.testing.assert_close(sol.value, torch.linalg.solve(A, b), rtol=1e-11, atol=1e-11)


def test_singular_systems_go_to_the_iterative_solver_and_report_its_status() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    solver = idiff.Auto(symmetric=True, iterative=idiff.MINRES(tol=1e-10))
    sol = idiff.linear_solve(lambda v: A @ v, torch.tensor([1.0, 1.0, 0.0], dtype=DT), solver=solver)
    assert solver.last_path == "MINRES"
    torch.testing.assert_close(sol.value, torch.tensor([1.0, 0.5, 0.0], dtype=DT), rtol=1e-9, atol=1e-9)


def test_size_and_memory_bounds_choose_the_iterative_path() -> None:
    A = spd(40)
    b = torch.ones(40, dtype=DT)
    for solver in (idiff.Auto(max_size=30, symmetric=True), idiff.Auto(max_bytes=1000, symmetric=True),
                   idiff.Auto(max_size=0, symmetric=True)):
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
        assert solver.last_path == "CG" and sol.info.solver == "Auto"
        torch.testing.assert_close(sol.value, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-5)
    assert idiff.Auto().dense(256, DT) and not idiff.Auto().dense(257, DT)
    assert not idiff.Auto(max_bytes=2 * 100 * 100 * 8 - 1).dense(100, DT)


def test_factorization_is_reused_for_the_same_operator_only() -> None:
    A = spd(25)
    mv, calls = counted(A)
    solver = idiff.Auto()
    x1 = idiff.linear_solve(mv, torch.ones(25, dtype=DT), solver=solver).value
    first = calls["n"]
    x2 = idiff.linear_solve(mv, torch.arange(25, dtype=DT), solver=solver).value
    assert solver.last_path == "cached cholesky"
    assert calls["n"] - first <= 3  # fingerprint + the true-residual check (+ the attach), not 25 products
    torch.testing.assert_close(x1, torch.linalg.solve(A, torch.ones(25, dtype=DT)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x2, torch.linalg.solve(A, torch.arange(25, dtype=DT)), rtol=1e-12, atol=1e-12)
    B = A + 1e-6 * torch.eye(25, dtype=DT)  # another operator: refactorized
    x3 = idiff.linear_solve(lambda v: B @ v, torch.ones(25, dtype=DT), solver=solver).value
    assert solver.last_path == "cholesky"
    torch.testing.assert_close(x3, torch.linalg.solve(B, torch.ones(25, dtype=DT)), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ as implicit_diff's default
def logistic(w, log_lam, X, t):
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (log_lam.exp() * w**2).sum()


def newton(w, log_lam, X, t):
    for _ in range(40):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p))[:, None]) / len(X) + torch.diag(log_lam.exp())
        w = w - torch.linalg.solve(H, X.T @ (p - t) / len(X) + log_lam.exp() * w)
    return w


def problem(d: int = 12):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, d, generator=g, dtype=DT)
    t = (torch.rand(200, generator=g, dtype=DT) < torch.sigmoid(X[:, 0])).to(DT)
    return X, t


def test_default_is_auto_and_matches_a_tight_cg_in_every_mode() -> None:
    X, t = problem()
    default = idiff.implicit_diff(objective=logistic)(newton)
    tight = idiff.implicit_diff(objective=logistic, solver=idiff.CG(tol=1e-13))(newton)
    assert isinstance(default.solver, idiff.Auto) and isinstance(default.solver.iterative, idiff.CG)

    def f(fit, log_lam):
        return fit(torch.zeros(12, dtype=DT), log_lam, X, t)

    lam = torch.linspace(-3, 0, 12, dtype=DT)
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(lambda ll: f(default, ll))(lam), transform(lambda ll: f(tight, ll))(lam),
                                   rtol=1e-8, atol=1e-10)
    batch = torch.stack([lam, lam + 1])
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(lambda ll: f(default, ll)))(batch),
                               torch.func.vmap(torch.func.jacrev(lambda ll: f(tight, ll)))(batch), rtol=1e-8, atol=1e-10)
    lam_r, lam_t = lam.clone().requires_grad_(), lam.clone().requires_grad_()
    f(default, lam_r).sum().backward()
    f(tight, lam_t).sum().backward()
    torch.testing.assert_close(lam_r.grad, lam_t.grad, rtol=1e-8, atol=1e-10)
    assert default.last_backward.status == idiff.SolveStatus.CONVERGED


def test_second_backward_at_the_same_solution_reuses_the_factorization() -> None:
    X, t = problem()
    fit = idiff.implicit_diff(objective=logistic)(newton)
    lam = torch.full((12,), -1.0, dtype=DT, requires_grad=True)
    w = fit(torch.zeros(12, dtype=DT), lam, X, t)
    g1 = torch.autograd.grad(w[0], lam, retain_graph=True)[0]
    assert fit.solver.last_path == "cholesky"
    g2 = torch.autograd.grad(w[1], lam)[0]
    assert fit.solver.last_path == "cached cholesky"
    J = torch.func.jacrev(lambda ll: fit(torch.zeros(12, dtype=DT), ll, X, t))(lam.detach())
    torch.testing.assert_close(torch.stack([g1, g2]), J[:2], rtol=1e-10, atol=1e-12)


def test_large_solutions_use_the_krylov_solver() -> None:
    X, t = problem(12)
    fit = idiff.implicit_diff(objective=logistic, solver=idiff.Auto(max_size=8))(newton)
    lam = torch.full((12,), -1.0, dtype=DT, requires_grad=True)
    fit(torch.zeros(12, dtype=DT), lam, X, t).sum().backward()
    assert fit.solver.last_path == "CG" and fit.last_backward.iterations > 1


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_size"):
        idiff.Auto(max_size=-1)
    with pytest.raises(TypeError, match="iterative"):
        idiff.Auto(iterative=idiff.CG)  # type: ignore[arg-type]


def test_a_given_iterative_solver_keeps_its_own_options() -> None:
    """Its tolerance, budget and policy are the ones used, not Auto's defaults (silently 1e-6 before)."""
    A = spd(40, seed=3) + torch.diag(torch.logspace(0, 3, 40, dtype=DT))
    b = torch.ones(40, dtype=DT)
    tight = idiff.Auto(max_size=0, iterative=idiff.CG(tol=1e-12))
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=tight)
    assert sol.info.relative_residual <= 1e-12
    budget = idiff.Auto(max_size=0, iterative=idiff.CG(tol=None, maxiter=3))
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=budget)
    assert sol.info.status == idiff.SolveStatus.BUDGET_USED and sol.info.iterations == 3
    strict = idiff.Auto(max_size=0, iterative=idiff.CG(tol=1e-12, maxiter=2, on_failure="raise"))
    with pytest.raises(idiff.LinearSolveError):
        idiff.linear_solve(lambda v: A @ v, b, solver=strict)
