"""NystromPreconditioner: the map against dense linear algebra, in the solvers, in implicit_diff, reuse, vmap."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implicitdiff as idiff
from implicitdiff.preconditioners import OperatorPreconditioner

DT = torch.float64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q


def from_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    q = orthogonal(len(eigenvalues), seed)
    return q @ torch.diag(eigenvalues) @ q.T


def low_rank_plus_shift(n: int, r: int, mu: float, seed: int, top: float = 4.0, bottom: float = -2.0) -> torch.Tensor:
    """``Q diag(lambda_1..lambda_r, 0, ..., 0) Q^T + mu I`` with the r eigenvalues log-spaced from 10^top to 10^bottom."""
    eigenvalues = torch.zeros(n, dtype=DT)
    eigenvalues[:r] = torch.logspace(top, bottom, r, dtype=DT)
    return from_spectrum(eigenvalues + mu, seed)


def dense_map(fn, n: int, device="cpu") -> torch.Tensor:
    """The matrix of a linear map on flat vectors, column by column."""
    return torch.stack([fn(e) for e in torch.eye(n, dtype=DT, device=device)], dim=1)


def bound(pre: idiff.NystromPreconditioner, A: torch.Tensor):
    return pre.bind(lambda v: A @ v, torch.ones(A.shape[0], dtype=A.dtype, device=A.device))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- the map against dense linear algebra


@given(
    n=st.integers(2, 30),
    r=st.integers(1, 30),
    rank=st.integers(1, 40),
    mu=st.sampled_from([0.0, 1e-6, 1e-2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_inverse_map_is_symmetric_positive_definite(n, r, rank, mu, seed):
    r = min(r, n)
    A = low_rank_plus_shift(n, r, mu, seed)
    pre = idiff.NystromPreconditioner(rank, shift=mu, seed=seed)
    M = dense_map(bound(pre, A), n)
    torch.testing.assert_close(M, M.T, atol=1e-12, rtol=0)
    eigenvalues = torch.linalg.eigvalsh(0.5 * (M + M.T))
    assert eigenvalues.min() > 0 and eigenvalues.max() <= 1 + 1e-10  # SPD, ||P^-1|| <= 1 (proved in the docstring)
    assert pre.eigenvalues is not None and pre.eigenvalues.shape == (min(rank, n),)


@pytest.mark.parametrize("mu", [0.0, 1e-3])
def test_rank_n_is_the_exact_inverse_up_to_a_scalar(mu):
    n = 40
    A = from_spectrum(torch.logspace(3, -3, n, dtype=DT) + mu, seed=1)
    pre = idiff.NystromPreconditioner(n + 25, shift=mu)  # clamped to n
    M = dense_map(bound(pre, A), n)
    assert pre.eigenvalues.shape == (n,)
    exact = torch.linalg.eigvalsh(A - mu * torch.eye(n, dtype=DT)).flip(0)
    torch.testing.assert_close(pre.eigenvalues, exact, rtol=1e-8, atol=1e-10)
    scale = float(exact[-1]) + mu  # lambda_min + mu
    torch.testing.assert_close(M @ A, scale * torch.eye(n, dtype=DT), rtol=0, atol=1e-8 * scale)
    b = torch.randn(n, dtype=DT)
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, preconditioner=pre))
    assert sol.info.iterations <= 2 and rel_err(sol.value, torch.linalg.solve(A, b)) < 1e-7


@pytest.mark.parametrize("extra", [0, 5])
def test_rank_covering_the_low_rank_part_clusters_the_spectrum(extra):
    n, r, mu = 80, 12, 1e-3
    A = low_rank_plus_shift(n, r, mu, seed=2)
    pre = idiff.NystromPreconditioner(r + extra, shift=mu)
    M = dense_map(bound(pre, A), n)
    # Nystrom is exact on a rank-r PSD matrix sketched with >= r probes: the top r eigenvalues are exact
    exact = torch.linalg.eigvalsh(A).flip(0)[:r] - mu
    torch.testing.assert_close(pre.eigenvalues[:r], exact, rtol=1e-7, atol=1e-9)
    # ... so P^-1 A is lambda_k + mu on the k sketched directions and mu on the others (lambda_k = 0 when k > r)
    k = r + extra
    expected = torch.tensor([mu] * (n - k) + [float(pre.eigenvalues[-1]) + mu] * k, dtype=DT).sort().values
    torch.testing.assert_close(torch.linalg.eigvals(M @ A).real.sort().values, expected, rtol=1e-6, atol=0)
    sol = idiff.linear_solve(lambda v: A @ v, torch.randn(n, dtype=DT), solver=idiff.CG(tol=1e-8, preconditioner=pre))
    assert sol.info.converged and sol.info.iterations <= (3 if extra == 0 else 2)  # 2 and 1 in exact arithmetic


def test_condition_number_drops_to_the_tail():
    n, k = 120, 30
    eigenvalues = torch.arange(1, n + 1, dtype=DT) ** -3.0 + 1e-6  # fast decay, condition number 6e5
    A = from_spectrum(eigenvalues, seed=3)
    M = dense_map(bound(idiff.NystromPreconditioner(k, oversample=10), A), n)
    L = torch.linalg.cholesky(0.5 * (M + M.T))  # P^-1 = L L^T: L^T A L is similar to P^-1 A
    ev = torch.linalg.eigvalsh(L.T @ A @ L)
    kappa_before = float(eigenvalues[0] / eigenvalues[-1])
    kappa_after = float(ev[-1] / ev[0])
    # the top k eigenvalues are flattened: kappa ~ lambda_{k+1} / lambda_n (within a small factor)
    assert kappa_after < 5 * float(eigenvalues[k] / eigenvalues[-1])
    assert kappa_after < kappa_before / 1000


def test_zero_eigenvalues_are_dropped_not_divided_by():
    """shift=0 on a singular PSD operator of rank r < k: a valid SPD preconditioner, CG solves a consistent system."""
    n, r = 60, 8
    A = low_rank_plus_shift(n, r, 0.0, seed=4, top=2.0, bottom=0.0)
    pre = idiff.NystromPreconditioner(20)
    M = dense_map(bound(pre, A), n)
    assert torch.isfinite(M).all()
    assert pre.eigenvalues[r:].abs().max() < 1e-10 * float(pre.eigenvalues[0])
    eigenvalues = torch.linalg.eigvalsh(0.5 * (M + M.T))
    assert eigenvalues.min() > 0 and eigenvalues.max() <= 1 + 1e-10
    # on the range of A, P^-1 A = lambda_r I; on the null space P^-1 is the identity
    b = A @ torch.randn(n, dtype=DT)  # consistent
    sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-9, preconditioner=pre))
    assert sol.info.converged and sol.info.iterations <= 3
    torch.testing.assert_close(A @ sol.value, b, rtol=0, atol=1e-8 * float(b.norm()))


def test_zero_operator_gives_the_identity():
    pre = idiff.NystromPreconditioner(5)
    apply = bound(pre, torch.zeros(10, 10, dtype=DT))
    v = torch.randn(10, dtype=DT)
    torch.testing.assert_close(apply(v), v)


def test_same_seed_same_preconditioner_and_probe_device_independence():
    A = low_rank_plus_shift(30, 10, 1e-2, seed=5)
    a, b = idiff.NystromPreconditioner(6, seed=7), idiff.NystromPreconditioner(6, seed=7)
    torch.testing.assert_close(dense_map(bound(a, A), 30), dense_map(bound(b, A), 30), rtol=0, atol=0)
    c = idiff.NystromPreconditioner(6, seed=8)
    assert not torch.equal(dense_map(bound(a, A), 30), dense_map(bound(c, A), 30))


def test_batched_products_give_the_same_sketch():
    """The one-call batched products (offered by the backward pass) and single products build the same map."""
    n = 50
    A = low_rank_plus_shift(n, 20, 1e-3, seed=6)
    b = torch.ones(n, dtype=DT)
    single = idiff.NystromPreconditioner(40, rebuild="always")  # 40 probes: two chunks of batched products
    batched = idiff.NystromPreconditioner(40, rebuild="always")
    calls = []

    def matmat(rows):
        calls.append(rows.shape[0])
        return rows @ A.T

    m1 = dense_map(single.bind(lambda v: A @ v, b), n)
    m2 = dense_map(batched.bind(lambda v: A @ v, b, matmat), n)
    torch.testing.assert_close(m1, m2, rtol=0, atol=1e-10)
    assert sum(calls) == 40 and len(calls) == 2 and batched.products == 40


# ---------------------------------------------------------------- in the solvers


def ill_conditioned(n: int = 300, seed: int = 7) -> torch.Tensor:
    """SPD, condition number 1e6, fast-decaying spectrum (a Hessian of a regularized loss)."""
    eigenvalues = 1e2 * torch.arange(1, n + 1, dtype=DT) ** -3.0 + 1e-4
    return from_spectrum(eigenvalues, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_cg_converges_to_the_same_solution_in_fewer_iterations(device):
    A = ill_conditioned().to(device)
    b = torch.randn(A.shape[0], dtype=DT, generator=torch.Generator().manual_seed(0)).to(device)
    exact = torch.linalg.solve(A, b)
    plain = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-8, maxiter=3000))
    pre = idiff.NystromPreconditioner(40)
    pcg = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-8, maxiter=3000, preconditioner=pre))
    assert pcg.info.converged and pcg.value.device.type == torch.device(device).type
    assert pcg.info.iterations * 5 < plain.info.iterations
    assert rel_err(pcg.value, exact) < 1e-5
    assert rel_err(pcg.value, plain.value) < 1e-5
    assert pre.builds == 1 and pre.products == 41


@pytest.mark.parametrize("make", [idiff.MINRES, idiff.GMRES, idiff.BiCGSTAB])
def test_other_solvers_accept_it(make):
    A = ill_conditioned(150)
    b = torch.randn(150, dtype=DT)
    plain = idiff.linear_solve(lambda v: A @ v, b, solver=make(tol=1e-8, maxiter=600, on_failure="ignore"))
    sol = idiff.linear_solve(
        lambda v: A @ v, b, solver=make(tol=1e-8, maxiter=3000, preconditioner=idiff.NystromPreconditioner(30))
    )
    assert sol.info.converged and sol.info.iterations < plain.info.iterations
    assert rel_err(A @ sol.value, b) < 1e-8


def test_damping_and_shift():
    """A singular PSD operator made definite by damping; shift = damping sketches the PSD part only."""
    n = 80
    A = low_rank_plus_shift(n, 10, 0.0, seed=8)
    b = torch.randn(n, dtype=DT)
    delta = 1e-3
    exact = torch.linalg.solve(A + delta * torch.eye(n, dtype=DT), b)
    for shift in (0.0, delta):
        pre = idiff.NystromPreconditioner(12, shift=shift)
        sol = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-8, damping=delta, preconditioner=pre))
        assert sol.info.converged and sol.info.iterations <= 15  # 260 without
        assert rel_err(sol.value, exact) < 1e-6


def test_pytree_right_hand_side_and_float32():
    A = from_spectrum(10 * torch.arange(1, 61, dtype=DT) ** -2.0 + 1e-2, seed=12).float()  # condition number 1e3
    b = {"a": torch.randn(20), "b": torch.randn(4, 10)}

    def matvec(v):
        flat = A @ torch.cat([v["a"], v["b"].reshape(-1)])
        return {"a": flat[:20], "b": flat[20:].reshape(4, 10)}

    pre = idiff.NystromPreconditioner(20)
    sol = idiff.linear_solve(matvec, b, solver=idiff.CG(tol=1e-4, maxiter=500, preconditioner=pre))
    assert sol.info.converged and sol.value["a"].dtype == torch.float32 and sol.info.iterations < 20
    exact = torch.linalg.solve(A.double(), torch.cat([b["a"], b["b"].reshape(-1)]).double())
    assert rel_err(torch.cat([sol.value["a"], sol.value["b"].reshape(-1)]).double(), exact) < 1e-3


def test_callers_tensors_are_not_modified():
    A = ill_conditioned(50)
    b = torch.randn(50, dtype=DT)
    A0, b0 = A.clone(), b.clone()
    pre = idiff.NystromPreconditioner(10)
    for _ in range(2):
        idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, preconditioner=pre))
    assert torch.equal(A, A0) and torch.equal(b, b0)


# ---------------------------------------------------------------- errors and validation


def test_indefinite_operator_raises_a_clear_error():
    A = from_spectrum(torch.cat([torch.tensor([-1e3], dtype=DT), torch.logspace(2, -1, 39, dtype=DT)]), seed=9)
    with pytest.raises(idiff.ImplicitDiffError, match="not symmetric positive semidefinite"):
        idiff.linear_solve(lambda v: A @ v, torch.ones(40, dtype=DT), solver=idiff.CG(preconditioner=idiff.NystromPreconditioner(10)))


def test_shift_above_the_smallest_eigenvalue_raises():
    A = from_spectrum(torch.logspace(2, -1, 30, dtype=DT), seed=10)  # smallest eigenvalue 0.1
    pre = idiff.NystromPreconditioner(30, shift=1.0)  # A - I is indefinite
    with pytest.raises(idiff.ImplicitDiffError, match="shift=1 times the identity"):
        idiff.linear_solve(lambda v: A @ v, torch.ones(30, dtype=DT), solver=idiff.CG(preconditioner=pre))


def test_non_finite_operator_is_reported_by_the_solver():
    """NaN products: no 'not PSD' error, the solve itself reports the non-finite values."""
    A = torch.full((10, 10), float("nan"), dtype=DT)
    pre = idiff.NystromPreconditioner(4)
    with pytest.raises(idiff.NonFiniteError):
        idiff.linear_solve(lambda v: A @ v, torch.ones(10, dtype=DT), solver=idiff.CG(preconditioner=pre))


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"rank": 2.5}, {"rank": True}, {"rank": 3, "shift": -1.0}, {"rank": 3, "shift": math.inf},
     {"rank": 3, "oversample": -1}, {"rank": 3, "rebuild": "sometimes"}, {"rank": 3, "seed": 1.5}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        idiff.NystromPreconditioner(**kwargs)


def test_accepted_by_every_solver_and_shown_in_repr():
    pre = idiff.NystromPreconditioner(8, shift=0.5, rebuild="never")
    assert isinstance(pre, OperatorPreconditioner) and not callable(pre)
    solver = idiff.CG(preconditioner=pre)
    assert "NystromPreconditioner(rank=8, shift=0.5, oversample=0, rebuild='never', seed=0)" in repr(solver)
    with pytest.raises(TypeError, match="NystromPreconditioner"):
        idiff.CG(preconditioner=3)


def test_plain_callable_preconditioners_are_unchanged():
    """The hook only routes OperatorPreconditioner instances; a function still gets pytrees."""
    A = torch.diag(torch.logspace(0, 4, 20, dtype=DT))
    seen = []

    def jacobi(v):
        seen.append(type(v))
        return {"x": v["x"] / A.diagonal()}

    sol = idiff.linear_solve(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(20, dtype=DT)},
                             solver=idiff.CG(tol=1e-12, preconditioner=jacobi))
    assert sol.info.iterations == 1 and seen and all(t is dict for t in seen)


# ---------------------------------------------------------------- reuse


def test_auto_reuses_for_the_same_operator_and_rebuilds_for_another():
    A = ill_conditioned(100)
    b = torch.randn(100, dtype=DT)
    pre = idiff.NystromPreconditioner(20)
    solver = idiff.CG(tol=1e-10, preconditioner=pre)
    first = idiff.linear_solve(lambda v: A @ v, b, solver=solver)
    second = idiff.linear_solve(lambda v: A @ v, 2 * b, solver=solver)  # another rhs, the same operator
    assert (pre.builds, pre.reuses, pre.products) == (1, 1, 22)
    torch.testing.assert_close(second.value, 2 * first.value)
    A2 = A + 1e-6 * torch.eye(100, dtype=DT)  # a slightly different operator
    idiff.linear_solve(lambda v: A2 @ v, b, solver=solver)
    assert (pre.builds, pre.reuses) == (2, 1)
    idiff.linear_solve(lambda v: A2 @ v, torch.ones(50, dtype=DT)[:50].repeat(2), solver=solver)
    assert (pre.builds, pre.reuses) == (2, 2)
    idiff.linear_solve(lambda v: A[:50, :50] @ v, torch.ones(50, dtype=DT), solver=solver)  # another size
    assert pre.builds == 3


def test_never_and_always_and_reset():
    A = ill_conditioned(60)
    b = torch.randn(60, dtype=DT)
    never, always = idiff.NystromPreconditioner(10, rebuild="never"), idiff.NystromPreconditioner(10, rebuild="always")
    for scale in (1.0, 1.0, 2.0):
        for pre in (never, always):
            sol = idiff.linear_solve(lambda v: scale * (A @ v), b, solver=idiff.CG(tol=1e-10, preconditioner=pre))
            assert sol.info.converged  # a stale preconditioner slows down, it never changes the solution
            assert rel_err(sol.value, torch.linalg.solve(scale * A, b)) < 1e-6
    assert (never.builds, never.reuses, never.products) == (1, 2, 10)
    assert (always.builds, always.reuses, always.products) == (3, 0, 30)
    never.reset()
    idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(preconditioner=never))
    assert never.builds == 2


# ---------------------------------------------------------------- implicit_diff


def ridge(w, log_lam, X, y):
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (log_lam.exp() * w**2).sum()


def ridge_data(n=120, d=40, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, -3, d, dtype=DT)  # ill-conditioned features
    y = torch.randn(n, generator=g, dtype=DT)
    return X.to(device), y.to(device)


def ridge_reference(log_lam, X, y):
    """Dense float64 hypergradient of ||w*||^2: -diag(lam) w* * H^-1 (2 w*)."""
    lam = log_lam.detach().exp()
    H = X.T @ X / len(y) + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / len(y))
    return -lam * w * torch.linalg.solve(H, 2 * w)


def make_ridge_fit(solver):
    @idiff.implicit_diff(objective=ridge, solver=solver)
    def fit(w0, log_lam, X, y):
        H = X.T @ X / len(y) + torch.diag(log_lam.exp())
        return torch.linalg.solve(H, X.T @ y / len(y))

    return fit


@pytest.mark.parametrize("device", DEVICES)
def test_ridge_hypergradient_equals_the_dense_reference_and_is_reused(device):
    X, y = ridge_data(device=device)
    X0, y0 = X.clone(), y.clone()
    pre = idiff.NystromPreconditioner(15)
    fit = make_ridge_fit(idiff.CG(tol=1e-12, maxiter=2000, preconditioner=pre))
    plain = make_ridge_fit(idiff.CG(tol=1e-12, maxiter=2000))
    log_lam = torch.full((40,), -9.0, dtype=DT, device=device, requires_grad=True)
    grads = []
    for _ in range(2):  # two backward calls at the same solution and hyperparameters
        w = fit(torch.zeros(40, dtype=DT, device=device), log_lam, X, y)
        grads.append(torch.autograd.grad((w**2).sum(), log_lam)[0])
    assert (pre.builds, pre.reuses) == (1, 1)
    assert pre.products == 15 + 1 + 1  # the sketch (one batched call), its fingerprint, one check
    reference = ridge_reference(log_lam, X, y)
    assert rel_err(grads[0], reference) < 1e-8 and rel_err(grads[1], reference) < 1e-8
    w = plain(torch.zeros(40, dtype=DT, device=device), log_lam, X, y)
    torch.autograd.grad((w**2).sum(), log_lam)
    assert fit.last_backward.iterations * 2 < plain.last_backward.iterations
    # new hyperparameters: another operator, a new sketch ("auto")
    log_lam2 = (log_lam.detach() + 1.0).requires_grad_()
    w = fit(torch.zeros(40, dtype=DT, device=device), log_lam2, X, y)
    grad2 = torch.autograd.grad((w**2).sum(), log_lam2)[0]
    assert (pre.builds, pre.reuses) == (2, 1)
    assert rel_err(grad2, ridge_reference(log_lam2, X, y)) < 1e-8
    assert torch.equal(X, X0) and torch.equal(y, y0)


def test_ridge_never_keeps_the_first_sketch_across_hyperparameters():
    X, y = ridge_data()
    pre = idiff.NystromPreconditioner(15, rebuild="never")
    fit = make_ridge_fit(idiff.CG(tol=1e-12, maxiter=2000, preconditioner=pre))
    for step in range(3):
        log_lam = torch.full((40,), -9.0 + 0.1 * step, dtype=DT, requires_grad=True)
        w = fit(torch.zeros(40, dtype=DT), log_lam, X, y)
        grad = torch.autograd.grad((w**2).sum(), log_lam)[0]
        assert rel_err(grad, ridge_reference(log_lam, X, y)) < 1e-8
    assert (pre.builds, pre.reuses, pre.products) == (1, 2, 15)


def logistic(w, log_lam, X, y):
    """Binary logistic regression with one L2 penalty per feature (and an unpenalized intercept)."""
    logits = X @ w[:-1] + w[-1]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 0.5 * (log_lam.exp() * w[:-1] ** 2).sum()


def test_logistic_hypergradient_equals_the_dense_reference():
    g = torch.Generator().manual_seed(1)
    n, d = 200, 30
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, -2, d, dtype=DT)
    y = (X[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    Xv = torch.randn(80, d, generator=g, dtype=DT)
    yv = (Xv[:, 0] > 0).to(DT)

    def newton(w0, log_lam, X, y):  # the inner solver: Newton's method to machine precision
        w = w0.detach()
        for _ in range(50):
            grad = torch.func.grad(logistic)(w, log_lam.detach(), X, y)
            H = torch.func.hessian(logistic)(w, log_lam.detach(), X, y)
            w = w - torch.linalg.solve(H, grad)
            if grad.abs().max() < 1e-13:
                break
        return w

    def val_loss(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(Xv @ w[:-1] + w[-1], yv)

    pre = idiff.NystromPreconditioner(10, oversample=5)
    fit = idiff.implicit_diff(objective=logistic, solver=idiff.CG(tol=1e-11, maxiter=1000, preconditioner=pre))(newton)
    log_lam = torch.linspace(-6, 0, d, dtype=DT).requires_grad_()
    w0 = torch.zeros(d + 1, dtype=DT)
    w = fit(w0, log_lam, X, y)
    grad = torch.autograd.grad(val_loss(w), log_lam)[0]
    # dense reference: -(d_theta grad_w f)^T H^-1 grad val
    ws = w.detach()
    H = torch.func.hessian(logistic)(ws, log_lam.detach(), X, y)
    cross = torch.func.jacrev(torch.func.grad(logistic), argnums=1)(ws, log_lam.detach(), X, y)
    reference = -cross.T @ torch.linalg.solve(H, torch.func.grad(val_loss)(ws))
    assert rel_err(grad, reference) < 1e-8
    assert pre.builds == 1 and fit.last_backward.converged


def test_second_order_derivatives_through_a_preconditioned_backward():
    """torch.func.grad of a hypergradient: the backward solve runs under a grad transform (the differentiable
    path); the preconditioner's factors are plain values and the derivatives match the unpreconditioned ones."""
    X, y = ridge_data(n=60, d=10)
    pre = idiff.NystromPreconditioner(5)
    fits = [make_ridge_fit(idiff.CG(tol=1e-12, maxiter=500, preconditioner=p)) for p in (pre, None)]

    def hypergrad(log_lam, fit):
        return torch.func.grad(lambda ll: (fit(torch.zeros(10, dtype=DT), ll, X, y) ** 2).sum())(log_lam)

    log_lam = torch.full((10,), -3.0, dtype=DT)
    second = [torch.func.jacrev(hypergrad)(log_lam, f) for f in fits]
    torch.testing.assert_close(second[0], second[1], rtol=1e-7, atol=1e-12)
    assert pre.builds >= 1


# ---------------------------------------------------------------- vmap


def test_vmap_over_right_hand_sides_builds_per_batch_and_keeps_nothing():
    A = ill_conditioned(80)
    B = torch.randn(5, 80, dtype=DT)
    pre = idiff.NystromPreconditioner(20)
    solver = idiff.CG(tol=1e-10, maxiter=1000, preconditioner=pre)
    X = torch.func.vmap(lambda b: idiff.linear_solve(lambda v: A @ v, b, solver=solver).value)(B)
    torch.testing.assert_close(X, torch.linalg.solve(A, B.T).T, rtol=1e-5, atol=0)
    assert (pre.builds, pre.products) == (1, 20) and pre._factors is None and pre.eigenvalues is None
    # factors kept from a call outside vmap are reused by a batch whose operators all match them
    idiff.linear_solve(lambda v: A @ v, B[0], solver=solver)
    assert pre.builds == 2
    with idiff.record_solves() as log:
        X2 = torch.func.vmap(lambda b: idiff.linear_solve(lambda v: A @ v, b, solver=solver).value)(B)
    assert (pre.builds, pre.reuses) == (2, 1)
    torch.testing.assert_close(X2, X, rtol=1e-6, atol=0)
    assert log[-1].num_failed == 0


def test_vmap_over_operators_sketches_each():
    A = ill_conditioned(80)
    b = torch.randn(80, dtype=DT)
    scales = torch.tensor([1.0, 10.0, 0.1], dtype=DT)
    pre = idiff.NystromPreconditioner(25)
    solver = idiff.CG(tol=1e-10, maxiter=2000, preconditioner=pre)
    idiff.linear_solve(lambda v: A @ v, b, solver=solver)  # kept factors for scale 1 only: the batch differs
    with idiff.record_solves() as log:
        X = torch.func.vmap(lambda s: idiff.linear_solve(lambda v: s * (A @ v), b, solver=solver).value)(scales)
    torch.testing.assert_close(X, torch.linalg.solve(A, b)[None] / scales[:, None], rtol=1e-5, atol=0)
    assert pre.builds == 2 and log[-1].num_failed == 0
    plain = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-10, maxiter=2000))
    assert log[-1].iterations * 3 < plain.info.iterations  # every system of the batch is preconditioned


def test_vmap_detects_an_indefinite_member():
    A = from_spectrum(torch.logspace(2, -1, 30, dtype=DT), seed=11)
    pre = idiff.NystromPreconditioner(30)

    def solve(s):
        return idiff.linear_solve(lambda v: A @ v - s * v, torch.ones(30, dtype=DT), solver=idiff.CG(preconditioner=pre)).value

    with pytest.raises(idiff.ImplicitDiffError, match="not symmetric positive semidefinite"):
        torch.func.vmap(solve)(torch.tensor([0.0, 50.0], dtype=DT))


def test_vmapped_hypergradients_through_implicit_diff():
    X, y = ridge_data(n=80, d=20)
    pre = idiff.NystromPreconditioner(10)
    fit = make_ridge_fit(idiff.CG(tol=1e-12, maxiter=1000, preconditioner=pre))
    log_lams = torch.stack([torch.full((20,), v, dtype=DT) for v in (-8.0, -5.0, -2.0)])

    def hypergrad(log_lam):
        return torch.func.grad(lambda ll: (fit(torch.zeros(20, dtype=DT), ll, X, y) ** 2).sum())(log_lam)

    grads = torch.func.vmap(hypergrad)(log_lams)
    for grad, log_lam in zip(grads, log_lams):
        assert rel_err(grad, ridge_reference(log_lam, X, y)) < 1e-8
