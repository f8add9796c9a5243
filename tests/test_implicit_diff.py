"""implicit_diff against closed forms, dense solves, finite differences and gradcheck."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given
from hypothesis import strategies as st

import implicitdiff as idiff

DT = torch.float64


# ---------------------------------------------------------------- problems with closed forms
def ridge_objective(w, log_lam, X, y):
    return ((X @ w - y) ** 2).mean() + (log_lam.exp() * w**2).sum()


def ridge_closed_form(log_lam, X, y):
    n = X.shape[0]
    A = 2 * X.T @ X / n + 2 * torch.diag(log_lam.exp())
    return torch.linalg.solve(A, 2 * X.T @ y / n)


def gd(steps):
    """A plain gradient-descent inner solver with step 1/L (L the largest Hessian eigenvalue)."""

    def ridge_gd(w, log_lam, X, y):
        n = X.shape[0]
        L = float(torch.linalg.eigvalsh(2 * X.T @ X / n + 2 * torch.diag(log_lam.detach().exp())).max())
        for _ in range(steps):
            w = w - (1.0 / L) * torch.func.grad(ridge_objective)(w, log_lam, X, y)
        return w

    return ridge_gd


ridge_gd = gd(3000)


def ridge_data(n, d, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.1 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = Xv @ torch.randn(d, generator=g, dtype=DT)
    return [t.to(device) for t in (X, y, Xv, yv)]


def val_loss(w, Xv, yv):
    return ((Xv @ w - yv) ** 2).mean()


def exact_hypergrad(log_lam, X, y, Xv, yv):
    ll = log_lam.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(val_loss(ridge_closed_form(ll, X, y), Xv, yv), ll)
    return g


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@given(
    n=st.integers(5, 40),
    d=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    scale=st.floats(-3.0, 2.0),
)
@pytest.mark.parametrize("solver", [idiff.Direct(), idiff.CG(tol=1e-13, maxiter=500)])
def test_ridge_hypergradient_matches_closed_form(solver, n, d, seed, scale):
    X, y, Xv, yv = ridge_data(n, d, seed)
    log_lam = (scale + torch.randn(d, dtype=DT, generator=torch.Generator().manual_seed(seed))).requires_grad_()
    fit = idiff.implicit_diff(objective=ridge_objective, solver=solver)(
        lambda w0, log_lam, X, y: ridge_closed_form(log_lam, X, y)
    )
    val_loss(fit(torch.zeros(d, dtype=DT), log_lam, X, y), Xv, yv).backward()
    assert rel(log_lam.grad, exact_hypergrad(log_lam, X, y, Xv, yv)) <= 1e-8


@given(d=st.integers(1, 10), p=st.integers(1, 6), seed=st.integers(0, 10_000), log_cond=st.floats(0.0, 3.0))
@pytest.mark.parametrize("solver", [idiff.Direct(), idiff.CG(tol=1e-14, maxiter=1000)])
def test_quadratic_jacobian_matches_closed_form(solver, d, p, seed, log_cond):
    # x* = argmin 1/2 x'Qx - x'P theta  =>  dx*/dtheta = Q^{-1} P
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    Q = q @ torch.diag(torch.logspace(0, log_cond, d, dtype=DT)) @ q.T
    P = torch.randn(d, p, generator=g, dtype=DT)
    theta = torch.randn(p, generator=g, dtype=DT)

    @idiff.implicit_diff(objective=lambda x, th: 0.5 * x @ Q @ x - x @ (P @ th), solver=solver)
    def argmin(x0, th):
        return torch.linalg.solve(Q, P @ th)

    J = torch.func.jacrev(lambda th: argmin(torch.zeros(d, dtype=DT), th))(theta)
    assert rel(J, torch.linalg.solve(Q, P)) <= 1e-8


def test_gradcheck_on_wrapped_solver():
    X, y, _, _ = ridge_data(12, 3, 0)
    # the inner solver is a closed form here so that gradcheck's many evaluations stay cheap;
    # what is checked is the implicit derivative against finite differences
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-14))(
        lambda w, ll, X, y: ridge_closed_form(ll, X, y)
    )
    inputs = (torch.randn(3, dtype=DT).requires_grad_(), X.requires_grad_(), y.requires_grad_())
    assert torch.autograd.gradcheck(lambda ll, X, y: fit(torch.zeros(3, dtype=DT), ll, X, y), inputs)
    assert torch.autograd.gradcheck(
        lambda ll: fit(torch.zeros(3, dtype=DT), ll, X.detach(), y.detach()),
        (inputs[0],),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
    )


@given(seed=st.integers(0, 10_000), d=st.integers(1, 6))
def test_forward_and_reverse_mode_agree(seed, d):
    X, y, _, _ = ridge_data(20, d, seed)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-13))(
        lambda w0, ll, X, y: ridge_closed_form(ll, X, y)
    )
    g = torch.Generator().manual_seed(seed)
    ll, u, v = (torch.randn(d, generator=g, dtype=DT) for _ in range(3))
    f = lambda ll: fit(torch.zeros(d, dtype=DT), ll, X, y)  # noqa: E731
    _, jv = torch.func.jvp(f, (ll,), (v,))
    _, vjp_fn = torch.func.vjp(f, ll)
    (uj,) = vjp_fn(u)
    assert abs(float(u @ jv) - float(uj @ v)) <= 1e-10 * max(1.0, float(u.norm() * v.norm()))
    # and torch.autograd.forward_ad gives the same tangent
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = f(fwAD.make_dual(ll, v))
        tangent = fwAD.unpack_dual(out).tangent
    assert torch.allclose(tangent, jv, atol=1e-12)


def test_vmap_over_problems_equals_loop():
    X, y, Xv, yv = ridge_data(30, 4, 1)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-13))(gd(500))
    LL = torch.randn(3, 4, dtype=DT)
    init = torch.zeros(4, dtype=DT)
    batched = torch.func.vmap(lambda ll: fit(init, ll, X, y))(LL)
    assert torch.allclose(batched, torch.stack([fit(init, ll, X, y) for ll in LL]))
    outer = lambda ll: val_loss(fit(init, ll, X, y), Xv, yv)  # noqa: E731
    per_problem = torch.func.vmap(torch.func.grad(outer))(LL)
    looped = torch.stack([torch.func.grad(outer)(ll) for ll in LL])
    assert torch.allclose(per_problem, looped, atol=1e-10)
    exact = torch.stack([exact_hypergrad(ll, X, y, Xv, yv) for ll in LL])
    assert rel(per_problem, exact) < 1e-8
    # vmap of the backward of a batched call (grad outside vmap)
    total = torch.func.grad(lambda LL: torch.func.vmap(outer)(LL).sum())(LL)
    assert torch.allclose(total, looped, atol=1e-10)


def test_vmap_batched_inner_solver():
    X, y, Xv, yv = ridge_data(30, 4, 2)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-13), vmap_inner="batched")(
        lambda w, ll, X, y: _gd_fixed_step(w, ll, X, y)
    )
    LL = torch.randn(3, 4, dtype=DT)
    init = torch.zeros(4, dtype=DT)
    outer = lambda ll: val_loss(fit(init, ll, X, y), Xv, yv)  # noqa: E731
    per_problem = torch.func.vmap(torch.func.grad(outer))(LL)
    exact = torch.stack([exact_hypergrad(ll, X, y, Xv, yv) for ll in LL])
    assert rel(per_problem, exact) < 1e-8


def _gd_fixed_step(w, ll, X, y):
    # no data-dependent Python control flow: runs under vmap
    for _ in range(3000):
        w = w - 0.05 * torch.func.grad(ridge_objective)(w, ll, X, y)
    return w


# ---------------------------------------------------------------- inner solvers of several kinds
@pytest.fixture
def ridge_problem():
    X, y, Xv, yv = ridge_data(40, 5, 3)
    log_lam = torch.randn(5, dtype=DT)
    return X, y, Xv, yv, log_lam, exact_hypergrad(log_lam, X, y, Xv, yv)


def _hypergrad(fit, X, y, Xv, yv, log_lam):
    ll = log_lam.clone().requires_grad_()
    val_loss(fit(torch.zeros(X.shape[1], dtype=DT), ll, X, y), Xv, yv).backward()
    return ll.grad


def test_inner_gd_loop(ridge_problem):
    X, y, Xv, yv, ll, exact = ridge_problem
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-12))(ridge_gd)
    assert rel(_hypergrad(fit, X, y, Xv, yv, ll), exact) < 1e-8


def test_inner_torch_optim_lbfgs(ridge_problem):
    X, y, Xv, yv, ll, exact = ridge_problem

    @idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-12))
    def fit(w0, log_lam, X, y):
        w = w0.clone().requires_grad_()
        opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = ridge_objective(w, log_lam, X, y)
            loss.backward()
            return loss

        opt.step(closure)
        return w

    assert rel(_hypergrad(fit, X, y, Xv, yv, ll), exact) < 1e-7


def test_inner_scipy_on_numpy(ridge_problem):
    X, y, Xv, yv, ll, exact = ridge_problem

    @idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-12))
    def fit(w0, log_lam, X, y):
        def f(w):
            wt = torch.from_numpy(w)
            return float(ridge_objective(wt, log_lam, X, y)), torch.func.grad(ridge_objective)(wt, log_lam, X, y).numpy()

        res = scipy.optimize.minimize(f, w0.numpy(), jac=True, method="L-BFGS-B", options={"gtol": 1e-13, "ftol": 1e-15})
        return torch.from_numpy(np.asarray(res.x))

    assert rel(_hypergrad(fit, X, y, Xv, yv, ll), exact) < 1e-6
    # also under torch.func.grad: the solver still sees plain tensors it can turn into numpy
    g = torch.func.grad(lambda l: val_loss(fit(torch.zeros(5, dtype=DT), l, X, y), Xv, yv))(ll)
    assert rel(g, exact) < 1e-6


# ---------------------------------------------------------------- fixed points, roots, pytrees
@pytest.mark.parametrize("solver", [idiff.Neumann(tol=1e-12), idiff.GMRES(tol=1e-12), idiff.BiCGSTAB(tol=1e-12), None])
def test_nonsymmetric_fixed_point_against_dense_solve(solver):
    d = 6
    g = torch.Generator().manual_seed(5)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W = 0.7 * W / torch.linalg.matrix_norm(W, 2)

    def T(z, theta, W):
        return torch.tanh(W @ z + theta)

    @idiff.implicit_diff(fixed_point=T, solver=solver)
    def equilibrium(z, theta, W):
        for _ in range(300):
            z = T(z, theta, W)
        return z

    theta = torch.randn(d, dtype=DT, generator=g).requires_grad_()
    Wp = W.clone().requires_grad_()
    cot = torch.randn(d, dtype=DT, generator=g)
    z = equilibrium(torch.zeros(d, dtype=DT), theta, Wp)
    (z @ cot).backward()
    # dense reference: z = tanh(Wz + theta) => (I - D W) dz = D (dtheta + dW z)
    D = torch.diag(1 - z.detach() ** 2)
    u = torch.linalg.solve((torch.eye(d, dtype=DT) - D @ W).T, cot)
    tol = 1e-5 if solver is None else 1e-9  # the default GMRES stops at a relative residual of 1e-6
    assert rel(theta.grad, D @ u) < tol
    assert rel(Wp.grad, torch.outer(D @ u, z.detach())) < tol


def test_root_form_condition():
    # x^3 + x = theta  => dx/dtheta = 1 / (3x^2 + 1)
    @idiff.implicit_diff(lambda x, th: x**3 + x - th)
    def cubic_root(x, th):
        for _ in range(60):
            x = x - (x**3 + x - th) / (3 * x**2 + 1)
        return x

    th = torch.tensor(3.0, dtype=DT, requires_grad=True)  # scalar (0-d) solution
    x = cubic_root(torch.tensor(1.0, dtype=DT), th)
    x.backward()
    assert x.dim() == 0
    assert torch.allclose(th.grad, 1 / (3 * x.detach() ** 2 + 1))


Params = collections.namedtuple("Params", ["w", "b"])


def test_pytree_solution_and_arguments():
    # logistic-free quadratic on a namedtuple of parameters, hyperparameters in a dict kwarg
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)

    def objective(p, X, y, hyper):
        return ((X @ p.w + p.b - y) ** 2).mean() + hyper["l2"] * (p.w**2).sum() + hyper["lb"] * p.b**2

    @idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-13))
    def fit(p, X, y, hyper):
        for _ in range(4000):
            gr = torch.func.grad(objective)(p, X, y, hyper)
            p = Params(p.w - 0.1 * gr.w, p.b - 0.1 * gr.b)
        return p

    hyper = {"l2": torch.tensor(0.3, dtype=DT, requires_grad=True), "lb": torch.tensor(0.2, dtype=DT, requires_grad=True)}
    p = fit(Params(torch.zeros(3, dtype=DT), torch.tensor(0.0, dtype=DT)), X, y, hyper=hyper)
    assert isinstance(p, Params)
    (p.w.sum() + p.b).backward()

    def closed(l2, lb):
        Xa = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
        A = 2 * Xa.T @ Xa / 30 + 2 * torch.diag(torch.cat([l2.expand(3), lb.reshape(1)]))
        return torch.linalg.solve(A, 2 * Xa.T @ y / 30).sum()

    gl2, glb = torch.func.grad(closed, argnums=(0, 1))(hyper["l2"].detach(), hyper["lb"].detach())
    assert torch.allclose(hyper["l2"].grad, gl2, atol=1e-9)
    assert torch.allclose(hyper["lb"].grad, glb, atol=1e-9)


def test_has_aux_and_init_not_differentiated():
    @idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum(), has_aux=True)
    def solve(x0, a):
        return a.clone(), {"iterations": 0, "trace": torch.ones(2)}

    a = torch.ones(2, requires_grad=True)
    x0 = torch.zeros(2, requires_grad=True)
    x, aux = solve(x0, a)
    assert aux["iterations"] == 0 and torch.equal(aux["trace"], torch.ones(2)) and not aux["trace"].requires_grad
    x.sum().backward()
    assert torch.allclose(a.grad, torch.ones(2)) and x0.grad is None


# ---------------------------------------------------------------- modes, warm start, memory
def test_unrolled_and_one_step_modes():
    X, y, Xv, yv = ridge_data(30, 3, 4)
    ll = torch.randn(3, dtype=DT)
    exact = exact_hypergrad(ll, X, y, Xv, yv)

    unrolled = idiff.implicit_diff(objective=ridge_objective, mode="unrolled")(gd(300))
    g_unrolled = _hypergrad(unrolled, X, y, Xv, yv, ll)
    assert rel(g_unrolled, exact) < 1e-6  # converged unrolled GD differentiates to the same point

    one_step = idiff.implicit_diff(objective=ridge_objective, mode="one_step")(ridge_gd)
    w = ridge_closed_form(ll, X, y)
    (gw,) = torch.autograd.grad(val_loss(w.requires_grad_(), Xv, yv), w)
    # Jacobian-free: d log_lam = -dF/dlog_lam^T g with dF/dlog_lam = diag(2 exp(log_lam) w)
    expected = -(2 * ll.exp() * w.detach()) * gw
    assert torch.allclose(_hypergrad(one_step, X, y, Xv, yv, ll), expected, atol=1e-10)
    with pytest.raises(ValueError, match="mode"):
        idiff.implicit_diff(objective=ridge_objective, mode="magic")


def test_proximal_condition_one_step_is_first_order_maml():
    cond = idiff.proximal_condition(lambda p, t: ((p - t) ** 2).sum(), lam=2.0)
    fomaml = idiff.implicit_diff(cond, mode="one_step")(lambda p, theta, target: (target + theta) / 2)
    theta = torch.randn(3, requires_grad=True)
    target = torch.randn(3)
    phi = fomaml(theta.detach(), theta, target)
    (phi**2).sum().backward()
    assert torch.allclose(theta.grad, 2 * phi.detach())  # identity Jacobian: grad of test loss at phi


def test_proximal_condition_imaml_gradient_closed_form():
    # L(phi) = 1/2 phi'H phi - c'phi  =>  phi* = (H + lam I)^{-1}(c + lam theta),
    # meta-gradient (I + H/lam)^{-1} grad L_test(phi*)
    g = torch.Generator().manual_seed(1)
    d, lam = 5, 2.0
    M = torch.randn(d, d, generator=g, dtype=DT)
    H = M @ M.T + 0.1 * torch.eye(d, dtype=DT)
    c = torch.randn(d, generator=g, dtype=DT)
    loss = lambda p: 0.5 * p @ H @ p - c @ p  # noqa: E731
    cond = idiff.proximal_condition(loss, lam)

    @idiff.implicit_diff(cond, solver=idiff.CG(tol=1e-13))
    def adapt(phi, theta):
        for _ in range(2000):
            phi = phi - 0.02 * (torch.func.grad(loss)(phi) + lam * (phi - theta))
        return phi

    theta = torch.randn(d, generator=g, dtype=DT).requires_grad_()
    phi = adapt(theta.detach(), theta)
    test_grad = 2 * phi.detach()
    (phi**2).sum().backward()
    expected = torch.linalg.solve(torch.eye(d, dtype=DT) + H / lam, test_grad)
    assert rel(theta.grad, expected) < 1e-9


def test_warm_start_reduces_backward_iterations():
    X, y, Xv, yv = ridge_data(60, 20, 5)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-10), warm_start=True)(
        lambda w, ll, X, y: ridge_closed_form(ll, X, y)
    )
    ll = torch.full((20,), -3.0, dtype=DT)
    iters = []
    for _ in range(2):
        _hypergrad(fit, X, y, Xv, yv, ll)
        iters.append(fit.last_backward.iterations)
    assert iters[1] < iters[0]
    assert rel(_hypergrad(fit, X, y, Xv, yv, ll), exact_hypergrad(ll, X, y, Xv, yv)) < 1e-8


def test_backward_keeps_no_inner_graph():
    X, y, _, _ = ridge_data(20, 3, 6)

    @idiff.implicit_diff(objective=ridge_objective)
    def fit(w, ll, X, y):
        w = w.clone().requires_grad_()  # a solver that builds a graph of its own
        for _ in range(200):
            (gw,) = torch.autograd.grad(ridge_objective(w, ll, X, y), w, create_graph=True)
            w = w - 0.05 * gw
        return w

    ll = torch.zeros(3, dtype=DT, requires_grad=True)
    w = fit(torch.zeros(3, dtype=DT), ll, X, y)
    seen, stack = set(), [w.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert names <= {"_ImplicitAttachBackward", "AccumulateGrad"}, names


def test_higher_order_derivatives_with_direct():
    X, y, Xv, yv = ridge_data(15, 3, 7)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.Direct())(
        lambda w, ll, X, y: ridge_closed_form(ll, X, y)
    )
    ll = torch.randn(3, dtype=DT)
    H = torch.func.hessian(lambda l: val_loss(fit(torch.zeros(3, dtype=DT), l, X, y), Xv, yv))(ll)
    H_ref = torch.func.hessian(lambda l: val_loss(ridge_closed_form(l, X, y), Xv, yv))(ll)
    assert rel(H, H_ref) < 1e-9
    # double backward with .backward(create_graph=True) and an iterative solver
    fit_cg = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-14))(
        lambda w, ll, X, y: ridge_closed_form(ll, X, y)
    )
    l = ll.clone().requires_grad_()
    (g,) = torch.autograd.grad(val_loss(fit_cg(torch.zeros(3, dtype=DT), l, X, y), Xv, yv), l, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), l)
    assert rel(hv, H_ref.sum(0)) < 1e-7


# ---------------------------------------------------------------- diagnostics and failure policies
def test_backward_failure_policy_raise_inside_backward():
    X, y, Xv, yv = ridge_data(50, 20, 8)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-12, maxiter=2, on_failure="raise"))(
        lambda w, ll, X, y: ridge_closed_form(ll, X, y)
    )
    ll = torch.full((20,), -4.0, dtype=DT, requires_grad=True)
    with pytest.raises(idiff.LinearSolveError, match="backward solve of '<lambda>'.*MAX_ITERATIONS"):
        val_loss(fit(torch.zeros(20, dtype=DT), ll, X, y), Xv, yv).backward()


def test_backward_failure_warns_by_default_and_is_recorded():
    X, y, Xv, yv = ridge_data(50, 20, 8)

    def fit_fn(w, ll, X, y):
        return ridge_closed_form(ll, X, y)

    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-12, maxiter=2))(fit_fn)
    ll = torch.full((20,), -4.0, dtype=DT, requires_grad=True)
    with idiff.record_solves() as log, pytest.warns(idiff.LinearSolveWarning, match="fit_fn"):
        val_loss(fit(torch.zeros(20, dtype=DT), ll, X, y), Xv, yv).backward()
    (info,) = [i for i in log if i.kind == "backward"]
    assert info.status == idiff.SolveStatus.MAX_ITERATIONS and info.iterations == 2 and info.relative_residual > 1e-12
    assert fit.last_backward == info
    # a fixed budget is a choice, not a failure: silent
    budget = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=None, maxiter=2))(fit_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        val_loss(budget(torch.zeros(20, dtype=DT), ll, X, y), Xv, yv).backward()
    assert budget.last_backward.status == idiff.SolveStatus.BUDGET_USED


def test_nonfinite_cotangent_raises_naming_the_function():
    fit = idiff.implicit_diff(objective=ridge_objective)(lambda w, ll, X, y: ridge_closed_form(ll, X, y))
    X, y, _, _ = ridge_data(10, 2, 0)
    ll = torch.zeros(2, dtype=DT, requires_grad=True)
    w = fit(torch.zeros(2, dtype=DT), ll, X, y)
    with pytest.raises(idiff.NonFiniteError, match="backward solve of '<lambda>'"):
        (w * float("nan")).sum().backward()


def test_tiny_cotangent_in_float32_gives_finite_correct_gradient():
    X, y, Xv, yv = (t.float() for t in ridge_data(30, 4, 9))
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-6))(
        lambda w, ll, X, y: ridge_closed_form(ll, X, y)
    )
    ll = torch.zeros(4, requires_grad=True)
    (1e-30 * val_loss(fit(torch.zeros(4), ll, X, y), Xv, yv)).backward()
    exact = 1e-30 * exact_hypergrad(ll.double(), X.double(), y.double(), Xv.double(), yv.double())
    assert torch.isfinite(ll.grad).all() and bool((ll.grad != 0).any())
    assert rel(ll.grad.double(), exact) < 1e-3


def test_optimality_check_warns_for_unconverged_inner_solution():
    X, y, _, _ = ridge_data(30, 4, 10)
    ll = torch.zeros(4, dtype=DT, requires_grad=True)
    short = idiff.implicit_diff(objective=ridge_objective, check_optimality=1e-6)(gd(2))
    with idiff.record_solves() as log, pytest.warns(idiff.InnerOptimalityWarning, match="non-stationary"):
        short(torch.zeros(4, dtype=DT), ll, X, y)
    assert log[0].kind == "optimality" and log[0].relative_residual > 1e-6
    long = idiff.implicit_diff(objective=ridge_objective, check_optimality=1e-6)(gd(3000))
    with idiff.record_solves() as log, warnings.catch_warnings():
        warnings.simplefilter("error")
        long(torch.zeros(4, dtype=DT), ll, X, y)
    assert log[0].converged and log[0].relative_residual < 1e-6


# ---------------------------------------------------------------- bad input
def test_closure_over_tensor_requiring_grad_is_an_error():
    lam = torch.tensor(0.5, requires_grad=True)

    @idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum() + lam * (x**2).sum())
    def solve(x0, a):
        return a / (1 + lam.detach())

    with pytest.raises(idiff.ImplicitDiffError, match="not an argument.*silently zero"):
        solve(torch.zeros(2), torch.ones(2, requires_grad=True))

    # the same closure under torch.func.grad is caught too
    def outer(lam):
        f = idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum() + lam * (x**2).sum())(
            lambda x0, a: a / (1 + lam)
        )
        return f(torch.zeros(2), torch.ones(2)).sum()

    with pytest.raises(idiff.ImplicitDiffError, match="not an argument"):
        torch.func.grad(outer)(torch.tensor(0.5))


def test_condition_arguments_are_validated():
    with pytest.raises(ValueError, match="exactly one.*none"):
        idiff.implicit_diff()
    with pytest.raises(ValueError, match="exactly one.*fixed_point.*objective"):
        idiff.implicit_diff(objective=lambda x: x.sum(), fixed_point=lambda x: x)
    with pytest.raises(TypeError, match="callable"):
        idiff.implicit_diff(objective=3)
    with pytest.raises(TypeError, match="LinearSolver"):
        idiff.implicit_diff(objective=lambda x: x.sum(), solver="cg")
    with pytest.raises(TypeError, match="instance"):
        idiff.implicit_diff(objective=lambda x: x.sum(), solver=idiff.GMRES)


def test_residual_must_match_solution():
    a = torch.ones(3, requires_grad=True)
    bad_shape = idiff.implicit_diff(lambda x, a: (x - a)[:2])(lambda x, a: a.clone())
    with pytest.raises(idiff.ImplicitDiffError, match="structure and shapes"):
        bad_shape(torch.zeros(3), a)
    bad_structure = idiff.implicit_diff(lambda x, a: {"r": x - a})(lambda x, a: a.clone())
    with pytest.raises(idiff.ImplicitDiffError, match="structure"):
        bad_structure(torch.zeros(3), a)
    bad_dtype = idiff.implicit_diff(lambda x, a: (x - a).double())(lambda x, a: a.clone())
    with pytest.raises(idiff.ImplicitDiffError, match="dtype"):
        bad_dtype(torch.zeros(3), a)
    not_scalar = idiff.implicit_diff(objective=lambda x, a: (x - a) ** 2)(lambda x, a: a.clone())
    with pytest.raises(ValueError, match="scalar"):
        not_scalar(torch.zeros(3), a)


def test_solution_must_be_floating_tensors():
    a = torch.ones(3, requires_grad=True)
    integer = idiff.implicit_diff(lambda x, a: x - a)(lambda x, a: torch.ones(3, dtype=torch.int64))
    with pytest.raises(idiff.ImplicitDiffError, match="floating point"):
        integer(torch.zeros(3), a)
    numpy_out = idiff.implicit_diff(lambda x, a: x - a)(lambda x, a: np.ones(3))
    with pytest.raises(idiff.ImplicitDiffError, match="ndarray"):
        numpy_out(torch.zeros(3), a)
    aux_missing = idiff.implicit_diff(lambda x, a: x - a, has_aux=True)(lambda x, a: a.clone())
    with pytest.raises(idiff.ImplicitDiffError, match=r"\(solution, aux\)"):
        aux_missing(torch.zeros(3), a)


def test_device_mismatch_is_reported():
    a = torch.ones(3, requires_grad=True)
    elsewhere = idiff.implicit_diff(lambda x, a: x - a)(lambda x, a: torch.ones(3, device="meta"))
    with pytest.raises(idiff.ImplicitDiffError, match="device mismatch"):
        elsewhere(torch.zeros(3), a)


def test_hypergradient_on_device(device):
    X, y, Xv, yv = ridge_data(30, 4, 11, device=device)
    fit = idiff.implicit_diff(objective=ridge_objective, solver=idiff.CG(tol=1e-12))(ridge_gd)
    ll = torch.zeros(4, dtype=DT, device=device, requires_grad=True)
    val_loss(fit(torch.zeros(4, dtype=DT, device=device), ll, X, y), Xv, yv).backward()
    assert ll.grad.device.type == device.type
    assert rel(ll.grad.cpu(), exact_hypergrad(ll.cpu(), X.cpu(), y.cpu(), Xv.cpu(), yv.cpu())) < 1e-8


def test_closure_detected_on_later_calls_too():
    lam = torch.tensor(0.5)

    @idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum() + lam * (x**2).sum())
    def solve(x0, a):
        return a / (1 + lam.detach())

    a = torch.ones(2, requires_grad=True)
    solve(torch.zeros(2), a).sum().backward()  # constant closure: fine
    lam.requires_grad_()
    with pytest.raises(idiff.ImplicitDiffError, match="not an argument"):
        solve(torch.zeros(2), a)
