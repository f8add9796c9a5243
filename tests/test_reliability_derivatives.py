"""Every order and composition of derivatives against finite differences and closed forms.

The kind of fault: a derivative rule that is right for one transform order and silently wrong
(often exactly 0) for another, or a shortcut on a value (an early exit at b = 0, a solve that
converges in 0 iterations) that drops the derivative.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import implicitdiff as idiff

DT = torch.float64
J = torch.func

ORDERS = {
    "rev-rev": lambda f: J.jacrev(J.jacrev(f)),
    "fwd-fwd": lambda f: J.jacfwd(J.jacfwd(f)),
    "rev-fwd": lambda f: J.jacrev(J.jacfwd(f)),
    "fwd-rev": lambda f: J.jacfwd(J.jacrev(f)),
    "hessian": J.hessian,
}


def central_second(f, s: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """d^2 f / ds^2 of a scalar function of a scalar by central differences (float64)."""
    return (f(s + h) - 2 * f(s) + f(s - h)) / h**2


def cubic_root(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x**3 + x - s


@idiff.implicit_diff(optimality_fn=cubic_root, solver=idiff.GMRES(tol=1e-13))
def bisection(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A solver no autograd can see through: bisection with Python control flow."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(cubic_root(torch.tensor(mid, dtype=DT), s)) > 0:
            hi = mid
        else:
            lo = mid
    return torch.full_like(x, (lo + hi) / 2)


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_bisection_root_every_order(order):
    # x^3 + x = s at s = 2 has x = 1; x' = 1/(3x^2+1) = 1/4, x'' = -6x x'^3 = -0.09375
    s = torch.tensor(2.0, dtype=DT)
    value = ORDERS[order](lambda t: bisection(torch.zeros((), dtype=DT), t))(s)
    assert abs(float(value) + 0.09375) < 1e-9, (order, float(value))


def logsumexp_objective(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Strongly convex, non-quadratic: sum(exp(w)) - theta.w + 0.5 |w|^2 (third derivative non-zero)."""
    return torch.exp(w).sum() - theta @ w + 0.5 * (w**2).sum()


@idiff.implicit_diff(objective=logsumexp_objective, solver=idiff.CG(tol=1e-13))
def newton(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    for _ in range(60):  # Newton on the separable problem exp(w) + w = theta
        w = w - (torch.exp(w) + w - theta) / (torch.exp(w) + 1)
    return w


def lambert_reference(theta: torch.Tensor) -> torch.Tensor:
    """The same solution by another route: w = theta - W(exp(theta)), W by Halley's method."""
    z = torch.exp(theta)
    w = torch.log1p(z)
    for _ in range(100):
        ew = torch.exp(w)
        f = w * ew - z
        w = w - f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
    return theta - w


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_non_quadratic_objective_every_order(order):
    theta = torch.tensor([0.3, -0.7, 1.2], dtype=DT)
    outer = lambda t: (newton(torch.zeros(3, dtype=DT), t) ** 3).sum()  # noqa: E731
    ref_outer = lambda t: (lambert_reference(t) ** 3).sum()  # noqa: E731
    got = ORDERS[order](outer)(theta)
    want = J.hessian(ref_outer)(theta)
    assert torch.allclose(got, want, atol=1e-8, rtol=1e-7), (order, got, want)
    # and against central finite differences of the gradient
    g = J.grad(outer)
    h = 1e-5
    fd = torch.stack([(g(theta + h * e) - g(theta - h * e)) / (2 * h) for e in torch.eye(3, dtype=DT)])
    assert torch.allclose(got, fd, atol=1e-6), (order, got, fd)


def test_third_order_forward_and_reverse():
    s = torch.tensor(2.0, dtype=DT)
    f = lambda t: bisection(torch.zeros((), dtype=DT), t)  # noqa: E731
    # x''' for x^3 + x = s: differentiate x'' = -6 x x'^3 once more
    xp, x = 0.25, 1.0
    xpp = -6 * x * xp**3
    xppp = -6 * (xp * xp**3 + x * 3 * xp**2 * xpp)
    for t in (J.jacrev(J.jacrev(J.jacrev(f))), J.jacfwd(J.jacfwd(J.jacfwd(f))), J.jacfwd(J.jacrev(J.jacfwd(f)))):
        assert abs(float(t(s)) - xppp) < 1e-8


@pytest.mark.parametrize("solver", [idiff.CG(tol=1e-12), idiff.GMRES(tol=1e-12), idiff.MINRES(tol=1e-12), idiff.Direct()])
def test_double_backward_where_outer_loss_is_stationary(solver):
    # x*(t) = t/2 minimizes (x - t)^2 + x^2; L(t) = 0.5 (x*(t) - x*(1))^2 has L''(1) = 1/4 although
    # the cotangent of the backward solve is exactly 0 at t = 1 (an early exit must keep its derivative)
    fit = idiff.implicit_diff(objective=lambda x, t: (x - t) ** 2 + x**2, solver=solver)(lambda x, t: t / 2)
    t = torch.tensor(1.0, dtype=DT, requires_grad=True)
    loss = 0.5 * (fit(torch.zeros((), dtype=DT), t) - 0.5) ** 2
    (g,) = torch.autograd.grad(loss, t, create_graph=True)
    assert float(g) == 0.0
    (h,) = torch.autograd.grad(g, t)
    assert abs(float(h) - 0.25) < 1e-12


def test_double_backward_at_a_zero_cotangent_for_a_vector_problem():
    # another member: a ridge solution, outer loss stationary at the evaluation point
    X = torch.randn(20, 4, dtype=DT, generator=torch.Generator().manual_seed(3))
    y = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(4))
    obj = lambda w, lam: ((X @ w - y) ** 2).sum() + lam * (w**2).sum()  # noqa: E731
    closed = lambda lam: torch.linalg.solve(X.T @ X + lam * torch.eye(4, dtype=DT), X.T @ y)  # noqa: E731
    fit = idiff.implicit_diff(objective=obj, solver=idiff.CG(tol=1e-13))(lambda w, lam: closed(lam))
    target = closed(torch.tensor(0.7, dtype=DT))
    lam = torch.tensor(0.7, dtype=DT, requires_grad=True)
    loss = 0.5 * ((fit(torch.zeros(4, dtype=DT), lam) - target) ** 2).sum()
    (g,) = torch.autograd.grad(loss, lam, create_graph=True)
    (h,) = torch.autograd.grad(g, lam)
    ref = J.hessian(lambda l: 0.5 * ((closed(l) - target) ** 2).sum())(torch.tensor(0.7, dtype=DT))
    assert abs(float(h) - float(ref)) < 1e-9 * max(1.0, abs(float(ref)))


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6))
def test_linear_solve_gradient_at_zero_rhs(seed, n):
    A = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(seed)) + 3 * torch.eye(n, dtype=DT)
    for solver in (idiff.GMRES(tol=1e-12), idiff.BiCGSTAB(tol=1e-12), idiff.Direct()):
        g = J.grad(lambda b: idiff.linear_solve(lambda v: A @ v, b, solver=solver).value.sum())(torch.zeros(n, dtype=DT))
        assert torch.allclose(g, torch.linalg.solve(A.T, torch.ones(n, dtype=DT)), atol=1e-9)


@pytest.mark.parametrize(
    "solver", [idiff.CG(tol=1e-12), idiff.MINRES(tol=1e-12), idiff.GMRES(tol=1e-12), idiff.Neumann(step_size=0.3, tol=1e-12), idiff.Direct()]
)
def test_linear_solve_scalar_zero_rhs(solver):
    g = J.grad(lambda b: idiff.linear_solve(lambda v: 2 * v, b, solver=solver).value.sum())(torch.zeros(1, dtype=DT))
    assert float(g) == pytest.approx(0.5, abs=1e-12)


def _spd(n: int, seed: int) -> torch.Tensor:
    m = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return m @ m.T + n * torch.eye(n, dtype=DT)


@pytest.mark.parametrize("solver", [idiff.CG(tol=1e-13), idiff.MINRES(tol=1e-13), idiff.GMRES(tol=1e-13), idiff.Direct()])
def test_linear_solve_gradient_wrt_symmetric_operator_is_exact(solver):
    # d(c^T A^{-1} b)/dA = -A^{-T} c b^T A^{-T}: not symmetric, although A is (the reported fault kept only
    # the symmetric part when differentiating through CG)
    A0, b, c = _spd(5, 0), torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    A = A0.clone().requires_grad_()
    (c @ idiff.linear_solve(lambda v: A @ v, b, solver=solver).value).backward()
    want = -torch.outer(torch.linalg.solve(A0.T, c), torch.linalg.solve(A0, b))
    assert torch.allclose(A.grad, want, atol=1e-10)


@pytest.mark.parametrize("solver", [idiff.GMRES(tol=1e-13), idiff.BiCGSTAB(tol=1e-13), idiff.NormalCG(tol=1e-13), idiff.Direct()])
def test_linear_solve_reverse_and_forward_wrt_operator_and_rhs(solver):
    A0 = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(1)) + 4 * torch.eye(4, dtype=DT)
    b0, c = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT)
    f = lambda A, b: c @ idiff.linear_solve(lambda v: A @ v, b, solver=solver).value  # noqa: E731
    ref = lambda A, b: c @ torch.linalg.solve(A, b)  # noqa: E731
    for tr in (lambda g: J.grad(g, argnums=(0, 1)), lambda g: J.jacfwd(g, argnums=(0, 1))):
        for got, want in zip(tr(f)(A0, b0), tr(ref)(A0, b0)):
            assert torch.allclose(got, want, atol=1e-10)
    # torch.autograd.gradcheck (reverse and forward mode) on the rhs
    bb = b0.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda b: f(A0, b), (bb,), check_forward_ad=True)


def test_linear_solve_vmap_over_operator_and_rhs_with_gradients():
    As = torch.stack([_spd(4, s) for s in range(3)])
    bs = torch.randn(3, 4, dtype=DT)
    solve = lambda A, b: idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-12)).value  # noqa: E731
    got = J.vmap(solve)(As, bs)
    assert torch.allclose(got, torch.linalg.solve(As, bs), atol=1e-10)
    # operator alone batched
    got = J.vmap(solve, in_dims=(0, None))(As, bs[0])
    assert torch.allclose(got, torch.linalg.solve(As, bs[0].expand(3, 4)), atol=1e-10)
    # gradient w.r.t. the operator through a vmapped solve
    loss = lambda A: J.vmap(solve)(A, bs).sum()  # noqa: E731
    ref = lambda A: torch.linalg.solve(A, bs).sum()  # noqa: E731
    assert torch.allclose(J.grad(loss)(As), J.grad(ref)(As), atol=1e-9)
    # and per-example gradients: vmap of grad
    per = J.vmap(J.grad(lambda A, b: solve(A, b).sum()))(As, bs)
    assert torch.allclose(per, J.vmap(J.grad(lambda A, b: torch.linalg.solve(A, b).sum()))(As, bs), atol=1e-9)


def test_linear_solve_hessian_wrt_rhs_is_exact():
    A = _spd(4, 7)
    f = lambda b: (idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-13)).value ** 2).sum()  # noqa: E731
    Ai = torch.linalg.inv(A)
    for t in (J.hessian, lambda g: J.jacrev(J.jacrev(g)), lambda g: J.jacfwd(J.jacfwd(g))):
        assert torch.allclose(t(f)(torch.randn(4, dtype=DT)), 2 * Ai.T @ Ai, atol=1e-10)


def test_linear_solve_higher_order_wrt_closure_operator_is_refused():
    A = _spd(3, 2).requires_grad_()
    out = idiff.linear_solve(lambda v: A @ v, torch.ones(3, dtype=DT), solver=idiff.CG(tol=1e-12)).value.sum()
    (g,) = torch.autograd.grad(out, A, create_graph=True)
    with pytest.raises(idiff.ImplicitDiffError, match="higher-order derivative"):
        torch.autograd.grad(g.sum(), A)


@pytest.mark.parametrize("solver", [idiff.GMRES(tol=1e-13), idiff.BiCGSTAB(tol=1e-13)])
def test_forward_and_reverse_agree_on_a_non_symmetric_condition(solver):
    M = 0.25 * torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(11))

    def T(x, theta):  # a contraction, non-symmetric Jacobian
        return torch.tanh(M @ x + theta)

    @idiff.implicit_diff(fixed_point=T, solver=solver)
    def iterate(x, theta):
        for _ in range(200):
            x = T(x, theta)
        return x

    theta = torch.tensor([0.1, -0.4, 0.3], dtype=DT)
    f = lambda t: iterate(torch.zeros(3, dtype=DT), t)  # noqa: E731
    with idiff.record_solves() as log:
        jr, jf = J.jacrev(f)(theta), J.jacfwd(f)(theta)
    assert all(i.converged for i in log), [i.describe() for i in log]
    assert torch.allclose(jr, jf, atol=1e-10)
    h = 1e-6
    fd = torch.stack([(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in torch.eye(3, dtype=DT)], dim=1)
    assert torch.allclose(jr, fd, atol=1e-8)
    assert torch.autograd.gradcheck(f, (theta.clone().requires_grad_(),), check_forward_ad=True)


@pytest.mark.parametrize("name", ["CG", "GMRES", "BiCGSTAB", "NormalCG", "MINRES"])
def test_gradients_through_preconditioned_solves(name):
    A0 = _spd(5, 4) + (0 if name in ("CG", "MINRES") else 0.4 * torch.triu(torch.ones(5, 5, dtype=DT), 1))
    d = torch.diagonal(A0.T @ A0 if name == "NormalCG" else A0).clone()
    solver = getattr(idiff, name)(tol=1e-13, preconditioner=lambda v: v / d)
    b0, c = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    f = lambda A, b: c @ idiff.linear_solve(lambda v: A @ v, b, solver=solver).value  # noqa: E731
    ref = lambda A, b: c @ torch.linalg.solve(A, b)  # noqa: E731
    for got, want in zip(J.grad(f, argnums=(0, 1))(A0, b0), J.grad(ref, argnums=(0, 1))(A0, b0)):
        assert torch.allclose(got, want, atol=1e-9)
    # and through an implicit function whose backward solve is preconditioned
    fit = idiff.implicit_diff(optimality_fn=lambda x, A, b: A @ x - b, solver=solver)(lambda x, A, b: torch.linalg.solve(A, b))
    A = A0.clone().requires_grad_()
    (c @ fit(torch.zeros(5, dtype=DT), A, b0)).backward()
    assert torch.allclose(A.grad, J.grad(ref)(A0, b0), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Nested vmap: an operator batched by an outer vmap, right-hand sides by an inner one. torch
# 2.13's lu_solve is wrong there (a silently wrong Jacobian for the second problem of the batch
# with Direct, NaN in nested forward mode); every dense path must agree with a loop.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", [idiff.Direct(), idiff.Auto()], ids=["Direct", "Auto"])
def test_dense_solves_under_nested_vmap_match_a_loop(solver):
    A0 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    scales = torch.tensor([1.0, 3.0], dtype=torch.float64)

    def inverse_rows(s):
        A = A0 * s
        eye = torch.eye(2, dtype=torch.float64)
        return torch.func.vmap(lambda b: idiff.linear_solve(lambda v: A @ v, b, solver=solver).value)(eye)

    batched = torch.func.vmap(inverse_rows)(scales)
    torch.testing.assert_close(batched, torch.stack([torch.linalg.inv(A0 * s).T for s in scales]))


def _quartic(x, a):
    return 0.25 * (x**4).sum() + 0.5 * (x**2).sum() - (a * x).sum() + 0.1 * (a**2 * x).sum()


def _quartic_newton(x, a):
    for _ in range(50):
        x = x - (x**3 + x - a + 0.1 * a**2) / (3 * x**2 + 1)
    return x


@pytest.mark.parametrize("order", ["jacrev", "jacfwd_jacfwd"])
@pytest.mark.parametrize("solver", [idiff.Direct(), idiff.Auto(), idiff.CG(tol=1e-13)], ids=["Direct", "Auto", "CG"])
def test_batched_derivatives_of_a_batch_of_problems_match_a_loop(order, solver):
    fit = idiff.implicit_diff(objective=_quartic, solver=solver)(_quartic_newton)

    def f(a):
        return fit(torch.zeros(3, dtype=torch.float64), a)

    d = torch.func.jacrev(f) if order == "jacrev" else torch.func.jacfwd(torch.func.jacfwd(f))
    A = torch.tensor([[0.3, -0.5, 1.2], [2.0, 0.7, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(d)(A), torch.stack([d(a) for a in A]), rtol=1e-9, atol=1e-11)
