"""mode="truncated": the derivative of k differentiable inner steps from the solution (Shaban et al., 2019)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import grad, jacfwd, jacrev, vmap

import implicitdiff as idiff

DT = torch.float64
D = 5


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, D, generator=g, dtype=DT)
    return X, X @ torch.randn(D, generator=g, dtype=DT) + 0.1 * torch.randn(40, generator=g, dtype=DT)


def objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (log_lam.exp() * w**2).sum()


def exact(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    A = X.T @ X / len(X) + torch.diag(log_lam.exp())
    return torch.linalg.solve(A, X.T @ y / len(X))


LR = 0.5


def gd_step(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return w - LR * grad(objective)(w, log_lam, X, y)


def truncated(k: int):
    return idiff.implicit_diff(objective=objective, mode="truncated", truncated_steps=k, step=gd_step)(exact)


def outer(fit, log_lam: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = fit(torch.zeros(D, dtype=DT), log_lam, X, y)
    return ((w - 1.0) ** 2).sum()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_equals_hand_unrolled_autograd(k: int) -> None:
    X, y = data()
    log_lam = torch.linspace(-2, 0, D, dtype=DT, requires_grad=True)
    g = torch.autograd.grad(outer(truncated(k), log_lam, X, y), log_lam)[0]
    w = exact(None, log_lam.detach(), X, y)  # type: ignore[arg-type]
    for _ in range(k):  # hand-written: k gradient steps from the detached solution, plain autograd
        w = w - LR * torch.autograd.grad(objective(w.requires_grad_() if not w.requires_grad else w, log_lam, X, y),
                                         w, create_graph=True)[0]
    ref = torch.autograd.grad(((w - 1.0) ** 2).sum(), log_lam)[0]
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_value_is_the_solvers_solution_exactly() -> None:
    X, y = data()
    log_lam = torch.zeros(D, dtype=DT, requires_grad=True)
    w = truncated(4)(torch.zeros(D, dtype=DT), log_lam, X, y)
    assert torch.equal(w.detach(), exact(None, log_lam.detach(), X, y))  # type: ignore[arg-type]


def test_error_decays_geometrically_to_the_implicit_gradient() -> None:
    X, y = data(1)
    log_lam = torch.full((D,), -1.0, dtype=DT, requires_grad=True)
    implicit = idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-13))(exact)
    ref = torch.autograd.grad(outer(implicit, log_lam, X, y), log_lam)[0]
    errors = [float((torch.autograd.grad(outer(truncated(k), log_lam, X, y), log_lam)[0] - ref).norm() / ref.norm())
              for k in (1, 4, 16, 64)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-9, errors
    # the rate is the contraction factor of the gradient step: 1 - LR * smallest Hessian eigenvalue
    H = X.T @ X / len(X) + torch.diag(log_lam.detach().exp())
    rho = float(1 - LR * torch.linalg.eigvalsh(H)[0])
    assert errors[2] / errors[1] < 2 * rho**12


def test_one_step_of_a_fixed_point_equals_mode_one_step() -> None:
    def T(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(x) + a

    def solve(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        for _ in range(200):
            x = T(x, a)
        return x

    a = torch.tensor([0.3, -0.2, 0.7], dtype=DT, requires_grad=True)
    trunc = idiff.implicit_diff(fixed_point=T, mode="truncated", truncated_steps=1)(solve)  # default step: T
    one = idiff.implicit_diff(fixed_point=T, mode="one_step")(solve)
    g1 = torch.autograd.grad(trunc(torch.zeros(3, dtype=DT), a).sum(), a)[0]
    g2 = torch.autograd.grad(one(torch.zeros(3, dtype=DT), a).sum(), a)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    # and many steps reach the implicit derivative
    many = idiff.implicit_diff(fixed_point=T, mode="truncated", truncated_steps=80)(solve)
    implicit = idiff.implicit_diff(fixed_point=T, solver=idiff.GMRES(tol=1e-13))(solve)
    torch.testing.assert_close(torch.autograd.grad(many(torch.zeros(3, dtype=DT), a).sum(), a)[0],
                               torch.autograd.grad(implicit(torch.zeros(3, dtype=DT), a).sum(), a)[0], rtol=1e-10, atol=1e-12)


def test_projected_gradient_condition_brings_its_own_step() -> None:
    def obj(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x - c) ** 2).sum()

    cond = idiff.projected_gradient_condition(obj, idiff.projections.nonnegative, stepsize=0.5)

    @idiff.implicit_diff(cond, mode="truncated", truncated_steps=30)
    def nnls(x: torch.Tensor, params: None, c: torch.Tensor) -> torch.Tensor:
        return c.clamp_min(0)

    c = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    g = torch.autograd.grad(nnls(torch.zeros(3, dtype=DT), None, c).sum(), c)[0]
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 1.0], dtype=DT), rtol=1e-8, atol=1e-8)  # 1 - 0.5**30 on the free set


def test_composes_with_vmap_jacrev_and_jacfwd() -> None:
    X, y = data(2)
    fit = truncated(6)

    def f(log_lam: torch.Tensor) -> torch.Tensor:
        return fit(torch.zeros(D, dtype=DT), log_lam, X, y)

    def unrolled(log_lam: torch.Tensor) -> torch.Tensor:
        w = exact(None, log_lam, X, y).detach()  # type: ignore[arg-type]
        for _ in range(6):
            w = gd_step(w, log_lam, X, y)
        return w

    log_lam = torch.zeros(D, dtype=DT)
    torch.testing.assert_close(jacrev(f)(log_lam), jacrev(unrolled)(log_lam), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacfwd(f)(log_lam), jacrev(unrolled)(log_lam), rtol=1e-10, atol=1e-12)
    batch = torch.stack([log_lam, log_lam - 1])
    torch.testing.assert_close(vmap(jacrev(f))(batch), vmap(jacrev(unrolled))(batch), rtol=1e-10, atol=1e-12)


def test_bad_options_name_the_problem() -> None:
    with pytest.raises(ValueError, match="truncated_steps"):
        idiff.implicit_diff(objective=objective, mode="truncated", step=gd_step)
    with pytest.raises(ValueError, match="truncated_steps"):
        idiff.implicit_diff(objective=objective, truncated_steps=3)
    with pytest.raises(ValueError, match="pass step="):
        idiff.implicit_diff(objective=objective, mode="truncated", truncated_steps=3)
    with pytest.raises(ValueError, match="truncated_steps"):
        idiff.implicit_diff(objective=objective, mode="truncated", truncated_steps=0, step=gd_step)
    fit = idiff.implicit_diff(objective=objective, mode="truncated", truncated_steps=2,
                              step=lambda w, *a: w[:2])(exact)
    with pytest.raises(idiff.ImplicitDiffError, match="shaped like the solution"):
        fit(torch.zeros(D, dtype=DT), torch.zeros(D, dtype=DT, requires_grad=True), *data())
