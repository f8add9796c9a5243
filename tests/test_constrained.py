"""Hypergradients of constrained and non-smooth inner problems against closed forms on the active set.

Each problem is solved inside ``implicit_diff`` with each condition that applies
(projected gradient, proximal gradient, KKT) and differentiated in reverse mode, forward
mode and under ``vmap`` (a batch of problems); the reference is the closed form of the
solution on its active set (a dense solve), differentiated by autograd.
"""

from __future__ import annotations

import pathlib
import re
import warnings
from typing import Callable

import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitdiff as idiff
from implicitdiff import projections, prox

DT = torch.float64
TOL = 1e-8
EXACT = idiff.GMRES(tol=1e-13, maxiter=500)
few_examples = settings(max_examples=5)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


def check_modes(solution: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor], thetas, batch) -> None:
    """``solution(*thetas)`` against ``reference(*thetas)``: reverse mode, forward mode, and vmap over ``batch``.

    ``reference`` is a closed form on the active set at its arguments, differentiated by autograd.
    """
    g = torch.Generator().manual_seed(1)
    x_ref = reference(*thetas)
    cotangent = torch.randn(x_ref.shape, generator=g, dtype=DT)
    x = solution(*thetas)
    assert close(x, x_ref, 1e-9)

    def outer(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda *th: (fn(*th) * cotangent).sum()

    argnums = tuple(range(len(thetas)))
    # reverse mode, by .backward-style autograd
    leaves = [th.detach().clone().requires_grad_() for th in thetas]
    got = torch.autograd.grad(outer(solution)(*leaves), leaves)
    want = torch.func.grad(outer(reference), argnums=argnums)(*thetas)
    for a, b in zip(got, want):
        assert close(a, b), (a, b)
    # forward mode
    tangents = tuple(torch.randn(th.shape, generator=g, dtype=DT) for th in thetas)
    _, got_t = torch.func.jvp(solution, tuple(thetas), tangents)
    _, want_t = torch.func.jvp(reference, tuple(thetas), tangents)
    assert close(got_t, want_t), (got_t, want_t)
    # vmap over a batch of problems (each with its own active set)
    batched = torch.func.vmap(torch.func.grad(outer(solution), argnums=argnums))(*batch)
    for i in range(batch[0].shape[0]):
        want_i = torch.func.grad(outer(reference), argnums=argnums)(*[b[i] for b in batch])
        for a, b in zip(batched, want_i):
            assert close(a[i], b), (i, a[i], b)


def perturbed(theta: torch.Tensor, seed: int, size: int = 3, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return theta + scale * torch.randn((size, *theta.shape), generator=g, dtype=DT)


# ---------------------------------------------------------------- the lasso (proximal gradient)
def lasso_objective(w, X, y):
    return 0.5 * ((X @ w - y) ** 2).sum() / X.shape[0]


def lasso_reference(support: torch.Tensor, signs: torch.Tensor) -> Callable[..., torch.Tensor]:
    """w_S = (X_S'X_S/n)^{-1}(X_S'y/n - lam sign(w_S)), 0 elsewhere."""

    def solve(lam, X, y):
        n = X.shape[0]
        XS = X[:, support]
        wS = torch.linalg.solve(XS.T @ XS / n, XS.T @ y / n - lam * signs)
        return torch.zeros(X.shape[1], dtype=DT).index_put((support.nonzero()[:, 0],), wS)

    return solve


@few_examples
@given(seed=st.integers(0, 10_000), n=st.integers(20, 40), d=st.integers(2, 8), scale=st.floats(0.05, 0.5))
def test_lasso_hypergradient_matches_active_set_closed_form(seed, n, d, scale):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    lam = torch.tensor(scale * float((X.T @ y).abs().max()) / n, dtype=DT)  # a fraction of lam_max: a mixed support

    @idiff.implicit_diff(idiff.proximal_gradient_condition(lasso_objective, prox.l1), solver=EXACT)
    def lasso(w0, lam, X, y):
        return idiff.fista(lasso_objective, prox.l1, w0, lam, X, y, tol=1e-14, maxiter=5000).x

    def solution(lam, X, y):
        return lasso(torch.zeros(d, dtype=DT), lam, X, y)

    w = solution(lam, X, y)
    support = w != 0
    if not support.any():
        return
    check_modes(solution, lasso_reference(support, torch.sign(w[support])), (lam, X, y),
                (perturbed(lam, 1, scale=1e-9), X.expand(3, n, d), perturbed(y, 2, scale=1e-9)))
    # the closed form, dw_S/dlam = -(X_S'X_S/n)^{-1} sign(w_S)
    leaf = lam.clone().requires_grad_()
    (dw,) = torch.autograd.grad(solution(leaf, X, y) @ support.to(DT), leaf)
    XS = X[:, support]
    assert close(dw, -torch.linalg.solve(XS.T @ XS / n, torch.sign(w[support])).sum())


# ---------------------------------------------------------------- non-negative least squares
def nnls_objective(x, A, b):
    return 0.5 * ((A @ x - b) ** 2).sum()


def nnls_negative(x, A, b):
    return -x


def nnls_reference(free: torch.Tensor) -> Callable[..., torch.Tensor]:
    def solve(A, b):
        AF = A[:, free]
        return torch.zeros(A.shape[1], dtype=DT).index_put((free.nonzero()[:, 0],), torch.linalg.solve(AF.T @ AF, AF.T @ b))

    return solve


def scipy_nnls(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(scipy.optimize.nnls(A.numpy(), b.numpy())[0])


def nnls_solution(kind: str, d: int) -> Callable[..., torch.Tensor]:
    if kind == "projected":
        @idiff.implicit_diff(idiff.projected_gradient_condition(nnls_objective, projections.nonnegative), solver=EXACT)
        def solve(x0, params, A, b):
            return idiff.projected_gradient(nnls_objective, projections.nonnegative, x0, params, A, b, tol=1e-14,
                                            maxiter=20_000).x

        return lambda A, b: solve(torch.zeros(d, dtype=DT), None, A, b)
    if kind == "proximal":  # the non-negative lasso with lam = 0 is the projection onto the orthant
        @idiff.implicit_diff(idiff.proximal_gradient_condition(nnls_objective, prox.nonnegative_l1), solver=EXACT)
        def solve_prox(x0, lam, A, b):
            return scipy_nnls(A, b)  # an external active-set solver

        return lambda A, b: solve_prox(torch.zeros(d, dtype=DT), 0.0, A, b)

    @idiff.implicit_diff(idiff.kkt_condition(nnls_objective, ineq=nnls_negative), solver=EXACT)
    def solve_kkt(init, A, b):
        x = scipy_nnls(A, b)
        gradient = A.T @ (A @ x - b)
        return x, None, torch.where(x > 0, 0.0, gradient)  # stationarity: gradient - mu = 0

    init = (torch.zeros(d, dtype=DT), None, torch.zeros(d, dtype=DT))
    return lambda A, b: solve_kkt(init, A, b)[0]


@pytest.mark.parametrize("kind", ["projected", "proximal", "kkt"])
@few_examples
@given(seed=st.integers(0, 10_000), m=st.integers(8, 15), d=st.integers(2, 6))
def test_nnls_hypergradient_matches_active_set_closed_form(kind, seed, m, d):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g, dtype=DT)
    b = torch.randn(m, generator=g, dtype=DT)
    solution = nnls_solution(kind, d)
    free = scipy_nnls(A, b) > 0
    check_modes(solution, nnls_reference(free), (A, b), (A + 1e-10 * perturbed(A, 3), perturbed(b, 4, scale=1e-10)))


# ---------------------------------------------------------------- box-constrained QP: derivatives w.r.t. the bounds
def qp_objective(x, Q, c):
    return 0.5 * x @ Q @ x + c @ x


def random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    M = torch.randn(d, d, generator=g, dtype=DT)
    return M @ M.T / d + 0.5 * torch.eye(d, dtype=DT)


@few_examples
@given(seed=st.integers(0, 10_000), d=st.integers(2, 7))
def test_box_qp_hypergradient_wrt_bounds(seed, d):
    g = torch.Generator().manual_seed(seed)
    Q, c = random_spd(d, g), 2 * torch.randn(d, generator=g, dtype=DT)
    lower = -0.5 - torch.rand(d, generator=g, dtype=DT)
    upper = 0.5 + torch.rand(d, generator=g, dtype=DT)

    def box(x, bounds):
        return projections.box(x, bounds)

    @idiff.implicit_diff(idiff.projected_gradient_condition(qp_objective, box), solver=EXACT)
    def solve(x0, bounds, Q, c):
        return idiff.projected_gradient(qp_objective, box, x0, bounds, Q, c, tol=1e-14, maxiter=20_000).x

    def solution(lower, upper, c):
        return solve(torch.zeros(d, dtype=DT), (lower, upper), Q, c)

    x = solution(lower, upper, c)
    at_lower, at_upper = x == lower, x == upper
    free = ~(at_lower | at_upper)

    def reference(lower, upper, c):  # Q_FF x_F = -c_F - Q_FC x_C, x_C at its bounds
        fixed = torch.where(at_lower, lower, torch.where(at_upper, upper, 0.0))
        xF = torch.linalg.solve(Q[free][:, free], -c[free] - Q[free] @ fixed)
        return fixed.index_put((free.nonzero()[:, 0],), xF)

    check_modes(solution, reference, (lower, upper, c),
                (perturbed(lower, 5, scale=1e-9), perturbed(upper, 6, scale=1e-9), perturbed(c, 7, scale=1e-9)))


# ---------------------------------------------------------------- simplex-constrained QP
def simplex_sum(x, scale, Q, c):
    return x.sum().reshape(1) - scale


def simplex_negative(x, scale, Q, c):
    return -x


def simplex_objective(x, scale, Q, c):
    return qp_objective(x, Q, c)


def simplex_projection_as_prox(y, scale, scaling=1.0):
    return projections.simplex(y, scale)


def simplex_reference(free: torch.Tensor, Q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """[[Q_FF, 1], [1', 0]] [x_F; nu] = [-c_F; s]."""

    def solve(scale, c):
        k = int(free.sum())
        K = torch.zeros(k + 1, k + 1, dtype=DT)
        K[:k, :k] = Q[free][:, free]
        K[:k, k] = K[k, :k] = 1.0
        rhs = torch.cat([-c[free], scale.reshape(1)])
        return torch.zeros(Q.shape[0], dtype=DT).index_put((free.nonzero()[:, 0],), torch.linalg.solve(K, rhs)[:k])

    return solve


def simplex_solution(kind: str, Q: torch.Tensor) -> Callable[..., torch.Tensor]:
    d = Q.shape[0]
    objective = qp_objective

    def pgd(scale, c):
        return idiff.projected_gradient(objective, projections.simplex, torch.full((d,), 1.0 / d, dtype=DT), scale, Q, c,
                                        tol=1e-14, maxiter=20_000).x

    if kind == "projected":
        @idiff.implicit_diff(idiff.projected_gradient_condition(objective, projections.simplex), solver=EXACT)
        def solve(x0, scale, Q, c):
            return pgd(scale, c)

        return lambda scale, c: solve(torch.zeros(d, dtype=DT), scale, Q, c)
    if kind == "proximal":
        @idiff.implicit_diff(idiff.proximal_gradient_condition(objective, simplex_projection_as_prox), solver=EXACT)
        def solve_prox(x0, scale, Q, c):
            return idiff.fista(objective, simplex_projection_as_prox, x0, scale, Q, c, tol=1e-14, maxiter=20_000).x

        return lambda scale, c: solve_prox(torch.full((d,), 1.0 / d, dtype=DT), scale, Q, c)

    @idiff.implicit_diff(idiff.kkt_condition(simplex_objective, eq=simplex_sum, ineq=simplex_negative), solver=EXACT)
    def solve_kkt(init, scale, Q, c):
        x = pgd(scale, c)  # finds the active set; the multipliers come from the stationarity condition
        free = x > 0
        x = simplex_reference(free, Q)(scale, c)  # polished on the active set, as an active-set QP solver would
        gradient = Q @ x + c
        nu = -gradient[free].mean()
        mu = torch.where(free, 0.0, gradient + nu)  # gradient + nu - mu = 0
        return x, nu.reshape(1), mu

    init = (torch.zeros(d, dtype=DT), torch.zeros(1, dtype=DT), torch.zeros(d, dtype=DT))
    return lambda scale, c: solve_kkt(init, scale, Q, c)[0]


@pytest.mark.parametrize("kind", ["projected", "proximal", "kkt"])
@few_examples
@given(seed=st.integers(0, 10_000), d=st.integers(2, 7), scale=st.floats(0.5, 2.0))
def test_simplex_qp_hypergradient_matches_kkt_solve(kind, seed, d, scale):
    g = torch.Generator().manual_seed(seed)
    Q, c = random_spd(d, g), torch.randn(d, generator=g, dtype=DT)
    s = torch.tensor(scale, dtype=DT)
    solution = simplex_solution(kind, Q)
    free = solution(s, c) > 0
    check_modes(solution, simplex_reference(free, Q), (s, c), (perturbed(s, 8, scale=1e-9), perturbed(c, 9, scale=1e-9)))


# ---------------------------------------------------------------- equality-constrained QP
def eq_kkt_objective(x, Q, c, A, b):
    return qp_objective(x, Q, c)


def eq_constraint(x, Q, c, A, b):
    return A @ x - b


def eq_reference(Q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The dense KKT solve [[Q, A'], [A, 0]] [x; nu] = [-c; b]."""

    def solve(c, A, b):
        m, d = A.shape
        K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(m, m, dtype=DT)], 1)])
        return torch.linalg.solve(K, torch.cat([-c, b]))[:d]

    return solve


def affine_projection_as_prox(y, Ab, scaling=1.0):
    return projections.affine_set(y, Ab)


def eq_solution(kind: str, Q: torch.Tensor) -> Callable[..., torch.Tensor]:
    d = Q.shape[0]
    if kind == "projected":
        @idiff.implicit_diff(idiff.projected_gradient_condition(qp_objective, projections.affine_set), solver=EXACT)
        def solve(x0, Ab, Q, c):
            return idiff.projected_gradient(qp_objective, projections.affine_set, x0, Ab, Q, c, tol=1e-14,
                                            maxiter=20_000).x

        return lambda c, A, b: solve(torch.zeros(d, dtype=DT), (A, b), Q, c)
    if kind == "proximal":
        @idiff.implicit_diff(idiff.proximal_gradient_condition(qp_objective, affine_projection_as_prox), solver=EXACT)
        def solve_prox(x0, Ab, Q, c):
            return eq_reference(Q)(c, *Ab)  # a closed-form inner solver

        return lambda c, A, b: solve_prox(torch.zeros(d, dtype=DT), (A, b), Q, c)

    @idiff.implicit_diff(idiff.kkt_condition(eq_kkt_objective, eq=eq_constraint), solver=EXACT)
    def solve_kkt(init, Q, c, A, b):
        m = A.shape[0]
        K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(m, m, dtype=DT)], 1)])
        z = torch.linalg.solve(K, torch.cat([-c, b]))
        return z[:d], z[d:], None

    return lambda c, A, b: solve_kkt((torch.zeros(d, dtype=DT), torch.zeros(A.shape[0], dtype=DT), None), Q, c, A, b)[0]


@pytest.mark.parametrize("kind", ["projected", "proximal", "kkt"])
@few_examples
@given(seed=st.integers(0, 10_000), d=st.integers(2, 7), m=st.integers(1, 3))
def test_equality_constrained_qp_hypergradient_matches_dense_kkt_solve(kind, seed, d, m):
    m = min(m, d - 1)
    g = torch.Generator().manual_seed(seed)
    Q = random_spd(d, g)
    c, A, b = (torch.randn(*shape, generator=g, dtype=DT) for shape in ((d,), (m, d), (m,)))
    check_modes(eq_solution(kind, Q), eq_reference(Q), (c, A, b), (perturbed(c, 10), perturbed(A, 11), perturbed(b, 12)))


# ---------------------------------------------------------------- step size, defaults, reliability checks
def test_step_size_does_not_move_the_hypergradient():
    g = torch.Generator().manual_seed(3)
    d = 6
    Q, c = random_spd(d, g), torch.randn(d, generator=g, dtype=DT)
    L = float(torch.linalg.eigvalsh(Q).max())
    s = torch.tensor(1.0, dtype=DT)
    free = simplex_solution("projected", Q)(s, c) > 0
    want = torch.func.grad(lambda c: simplex_reference(free, Q)(s, c) @ torch.arange(d, dtype=DT))(c)
    for stepsize, solver in [(None, EXACT), (0.05 / L, EXACT), (1.0 / L, EXACT), (3.0 / L, EXACT),
                             (1.0 / L, idiff.Neumann(tol=1e-13, maxiter=10_000))]:
        @idiff.implicit_diff(idiff.projected_gradient_condition(qp_objective, projections.simplex, stepsize=stepsize),
                             solver=solver)
        def solve(x0, scale, Q, c):
            return idiff.projected_gradient(qp_objective, projections.simplex, x0, scale, Q, c, tol=1e-14).x

        got = torch.func.grad(lambda c: solve(torch.full((d,), 1.0 / d, dtype=DT), s, Q, c) @ torch.arange(d, dtype=DT))(c)
        assert close(got, want), (stepsize, got, want)


@pytest.mark.parametrize("kind", ["projected", "proximal", "kkt"])
def test_second_order_hypergradient(kind):
    # hessian (reverse over reverse) and forward over forward of an outer loss, against the closed form
    g = torch.Generator().manual_seed(8)
    Q, c = random_spd(5, g), torch.randn(5, generator=g, dtype=DT)
    s = torch.tensor(1.0, dtype=DT)
    solution = simplex_solution(kind, Q)
    reference = simplex_reference(solution(s, c) > 0, Q)
    want = torch.func.hessian(lambda c: (reference(s, c) ** 3).sum())(c)
    outer = lambda c: (solution(s, c) ** 3).sum()  # noqa: E731
    assert close(torch.func.hessian(outer)(c), want)
    assert close(torch.func.jacfwd(torch.func.jacfwd(outer))(c), want)


def test_default_step_is_the_inverse_hessian_norm():
    from implicitdiff._lipschitz import inverse_lipschitz

    g = torch.Generator().manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=DT))
    Q = U @ torch.diag(torch.tensor([7.0, 2.0, 1.0, 0.5, 0.1], dtype=DT)) @ U.T
    eta = inverse_lipschitz(qp_objective, torch.zeros(5, dtype=DT), (Q, torch.zeros(5, dtype=DT)), {})
    assert 1 / 7.0 <= float(eta) <= 1 / 7.0 * 1.01  # power iterations approach ||H|| from below
    # a linear objective has no curvature: the step is 1
    assert float(inverse_lipschitz(lambda x, c: c @ x, torch.zeros(3, dtype=DT), (torch.ones(3, dtype=DT),), {})) == 1.0


def test_conditions_are_not_symmetric_and_default_to_gmres():
    for condition in (idiff.projected_gradient_condition(qp_objective, projections.box),
                      idiff.proximal_gradient_condition(qp_objective, prox.l1),
                      idiff.kkt_condition(qp_objective, ineq=lambda x, Q, c: -x)):
        assert isinstance(condition, idiff.Condition) and not condition.symmetric
        solver = idiff.implicit_diff(condition)(lambda x0, *a: x0).solver
        assert isinstance(solver, idiff.Auto) and isinstance(solver.iterative, idiff.GMRES)
    with pytest.raises(ValueError, match="stepsize"):
        idiff.projected_gradient_condition(qp_objective, projections.box, stepsize=0.0)


def test_unconverged_inner_solve_warns_and_converged_one_does_not():
    g = torch.Generator().manual_seed(5)
    Q, c = random_spd(6, g), torch.randn(6, generator=g, dtype=DT)
    condition = idiff.projected_gradient_condition(qp_objective, projections.nonnegative)
    for maxiter, warns in [(2, True), (5000, False)]:
        @idiff.implicit_diff(condition)
        def solve(x0, params, Q, c):
            return idiff.projected_gradient(qp_objective, projections.nonnegative, x0, params, Q, c, maxiter=maxiter,
                                            acceleration=False).x

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            solve(torch.zeros(6, dtype=DT), None, Q, c.requires_grad_()).sum().backward()
        flagged = any(issubclass(w.category, idiff.InnerOptimalityWarning) for w in caught)
        assert flagged == warns, [str(w.message) for w in caught]


# ---------------------------------------------------------------- degenerate points: what the docs promise
def hadamard4() -> torch.Tensor:
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=DT)
    return torch.kron(H2, H2)


@pytest.mark.parametrize("stepsize", [None, 1.0])
def test_lasso_coordinate_exactly_at_the_threshold(stepsize):
    # X'X/n = I and y = X c with dyadic c: the prox input of coordinate 2 equals the threshold exactly
    X = hadamard4()
    c = torch.tensor([1.5, -0.75, 0.5, 0.25], dtype=DT)
    y = X @ c
    lam = torch.tensor(0.5, dtype=DT)

    @idiff.implicit_diff(idiff.proximal_gradient_condition(lasso_objective, prox.l1, stepsize=stepsize), solver=EXACT)
    def lasso(w0, lam, X, y):
        return prox.l1(X.T @ y / X.shape[0], lam)  # the exact solution for an orthogonal design

    w = lasso(torch.zeros(4, dtype=DT), lam, X, y)
    assert torch.equal(w, torch.tensor([1.0, -0.25, 0.0, 0.0], dtype=DT))  # coordinate 2: w = 0 and |grad| = lam
    dw = torch.func.jacrev(lambda lam: lasso(torch.zeros(4, dtype=DT), lam, X, y))(lam)
    # the documented derivative: coordinate 2 held at zero, i.e. the reduced problem on S = {0, 1}
    support = torch.tensor([True, True, False, False])
    reduced = torch.func.jacrev(lasso_reference(support, torch.sign(w[support])))(lam, X, y)
    assert close(dw, reduced, 1e-12) and dw[2] == 0
    # ... which is the one-sided derivative for increasing lam (the coordinate stays out of the support)
    h = 1e-6
    right = (prox.l1(c, lam + h) - prox.l1(c, lam)) / h
    left = (prox.l1(c, lam) - prox.l1(c, lam - h)) / h
    assert close(dw, right, 1e-9) and not close(dw, left, 1e-3)


def test_projected_condition_holds_a_degenerate_bound():
    # min 1/2 ||x - c||^2 s.t. x <= u with c_2 = u_2: x_2 on its bound with a zero multiplier
    c = torch.tensor([0.5, 2.0, 1.0], dtype=DT)
    u = torch.ones(3, dtype=DT)

    def objective(x, c):
        return 0.5 * ((x - c) ** 2).sum()

    def below(x, bound):
        return projections.box(x, (-torch.inf, bound))

    @idiff.implicit_diff(idiff.projected_gradient_condition(objective, below), solver=EXACT)
    def solve(x0, bound, c):
        return torch.minimum(c, bound)

    J = torch.func.jacrev(lambda c: solve(torch.zeros(3, dtype=DT), u, c))(c)
    # coordinate 2 is held at its bound: the one-sided derivative for increasing c_2
    assert torch.equal(J, torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=DT)))


def test_kkt_degenerate_constraint_has_no_derivative_and_says_so():
    c = torch.tensor([0.5, 2.0, 1.0], dtype=DT)
    u = torch.ones(3, dtype=DT)

    def objective(x, c):
        return 0.5 * ((x - c) ** 2).sum()

    def upper(x, c):
        return x - u

    def solver_with(linear_solver):
        @idiff.implicit_diff(idiff.kkt_condition(objective, ineq=upper), solver=linear_solver)
        def solve(init, c):
            x = torch.minimum(c, u)
            return x, None, c - x  # x - c + mu = 0; mu_2 = 0 while g_2 = 0: not strictly complementary

        return lambda c: solve((torch.zeros(3, dtype=DT), None, torch.zeros(3, dtype=DT)), c)[0]

    leaf = c.clone().requires_grad_()
    with pytest.warns(idiff.LinearSolveWarning):
        solver_with(idiff.GMRES(tol=1e-10, maxiter=50))(leaf).sum().backward()
    with pytest.raises(idiff.LinearSolveError):
        solver_with(idiff.GMRES(tol=1e-10, maxiter=50, on_failure="raise"))(c.clone().requires_grad_()).sum().backward()
    # strictly complementary (c_2 > u_2 moves mu_2 off zero): well posed again
    leaf = torch.tensor([0.5, 2.0, 1.5], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", idiff.LinearSolveWarning)
        solver_with(EXACT)(leaf).sum().backward()
    assert close(leaf.grad, torch.tensor([1.0, 0.0, 0.0], dtype=DT))


def test_kkt_condition_checks_the_slots():
    F = idiff.kkt_condition(qp_objective, eq=lambda x, Q, c: x.sum().reshape(1) - 1)
    x = torch.zeros(2, dtype=DT)
    Q, c = torch.eye(2, dtype=DT), torch.ones(2, dtype=DT)
    with pytest.raises(ValueError, match="nu must not be None"):
        F((x, None, None), Q, c)
    with pytest.raises(ValueError, match="ineq is None"):
        F((x, torch.zeros(1, dtype=DT), torch.zeros(2, dtype=DT)), Q, c)
    with pytest.raises(ValueError, match="triple"):
        F(x, Q, c)
    stationarity, primal, complementarity = F([x, torch.ones(1, dtype=DT), None], Q, c)  # a list stays a list
    assert torch.equal(stationarity, torch.full((2,), 2.0, dtype=DT)) and complementarity is None


# ---------------------------------------------------------------- the inner solvers
def test_inner_solvers_report_and_validate():
    g = torch.Generator().manual_seed(6)
    Q, c = random_spd(5, g), torch.randn(5, generator=g, dtype=DT)
    result = idiff.projected_gradient(qp_objective, projections.simplex, torch.zeros(5, dtype=DT), 1.0, Q, c)
    assert isinstance(result, idiff.OptimizeResult) and result.converged and result.residual < 1e-9
    F = idiff.projected_gradient_condition(qp_objective, projections.simplex, stepsize=result.stepsize)
    assert abs(float(F(result.x, 1.0, Q, c).norm()) - result.residual) < 1e-15
    plain = idiff.projected_gradient(qp_objective, projections.simplex, torch.zeros(5, dtype=DT), 1.0, Q, c,
                                     acceleration=False, stepsize=0.5 / float(torch.linalg.eigvalsh(Q).max()),
                                     maxiter=10_000)
    assert plain.converged and close(plain.x, result.x, 1e-8)
    short = idiff.fista(qp_objective, prox.l1, torch.zeros(5, dtype=DT), 0.1, Q, c, maxiter=2)
    assert short.iterations == 2 and not short.converged
    for bad in ({"stepsize": -1.0}, {"maxiter": 0}, {"tol": -1.0}):
        with pytest.raises(ValueError):
            idiff.fista(qp_objective, prox.l1, torch.zeros(5, dtype=DT), 0.1, Q, c, **bad)
    with pytest.raises(TypeError, match="floating-point"):
        idiff.fista(qp_objective, prox.l1, torch.zeros(5, dtype=torch.long), 0.1, Q, c)


def test_unrolled_mode_differentiates_the_iterations():
    g = torch.Generator().manual_seed(7)
    Q, c = random_spd(5, g), torch.randn(5, generator=g, dtype=DT)
    grads = []
    for mode in ("implicit", "unrolled"):
        @idiff.implicit_diff(idiff.proximal_gradient_condition(qp_objective, prox.l1), mode=mode, solver=EXACT)
        def solve(x0, lam, Q, c):
            return idiff.fista(qp_objective, prox.l1, x0, lam, Q, c, maxiter=3000).x

        lam = torch.tensor(0.3, dtype=DT, requires_grad=True)
        grads.append(torch.autograd.grad(solve(torch.zeros(5, dtype=DT), lam, Q, c).sum(), lam)[0])
    assert close(grads[0], grads[1], 1e-6)


# ---------------------------------------------------------------- the documentation's examples run as written
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "constrained.rst"


def _code_blocks() -> list[str]:
    text = DOCS.read_text()
    blocks = []
    for match in re.finditer(r"\.\. testcode::\n\n((?:(?:   .*)?\n)+)", text):
        lines = [line[3:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines))
    return blocks


@pytest.mark.parametrize("index", range(len(_code_blocks())))
def test_docs_code_block_runs(index):
    code = _code_blocks()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error", idiff.InnerOptimalityWarning)
        warnings.simplefilter("error", idiff.LinearSolveWarning)
        exec(compile(code, f"{DOCS.name} (block {index})", "exec"), {"__name__": "docs_example"})


def test_docs_page_has_code_blocks():
    assert len(_code_blocks()) >= 4
