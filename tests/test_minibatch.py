"""Minibatch (stochastic) products in the backward solve: unbiasedness, exactness at full batch, errors."""

from __future__ import annotations

import math

import pytest
import torch

import implicitdiff as idiff

DT = torch.float64
N, D = 3000, 6


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=DT) * torch.linspace(0.5, 1.5, D, dtype=DT)
    t = (torch.rand(N, generator=g, dtype=DT) < torch.sigmoid(X @ torch.ones(D, dtype=DT))).to(DT)
    return X, t


def objective(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (log_lam.exp() * w**2).sum()


def newton(w: torch.Tensor, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    for _ in range(30):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p))[:, None]) / len(X) + torch.diag(log_lam.exp())
        w = w - torch.linalg.solve(H, X.T @ (p - t) / len(X) + log_lam.exp() * w)
    return w


def sampler(size: int):
    def sample(generator: torch.Generator, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor):
        idx = torch.randint(len(X), (size,), generator=generator, device=X.device)
        return log_lam, X[idx], t[idx]

    return sample


def everything(generator: torch.Generator, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor):
    return log_lam, X, t  # the "minibatch" is the whole data set


def hypergradient(fit, log_lam: torch.Tensor, X: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w = fit(torch.zeros(D, dtype=DT), log_lam, X, t)
    return torch.autograd.grad(((w - 0.5) ** 2).sum(), log_lam)[0]


NEUMANN = dict(step_size=1.0, tol=None, maxiter=40)


def test_full_batch_sample_reproduces_the_deterministic_gradient() -> None:
    X, t = data()
    log_lam = torch.full((D,), -2.0, dtype=DT, requires_grad=True)
    for solver in (idiff.Neumann(**NEUMANN), idiff.CG(tol=1e-12)):
        plain = hypergradient(idiff.implicit_diff(objective=objective, solver=solver)(newton), log_lam, X, t)
        fit = idiff.implicit_diff(objective=objective, solver=solver, minibatch=idiff.Minibatch(everything))(newton)
        torch.testing.assert_close(hypergradient(fit, log_lam, X, t), plain, rtol=1e-10, atol=1e-13)
        assert fit.last_backward.stochastic and "minibatch" in fit.last_backward.message


def test_neumann_with_fresh_batches_is_unbiased_for_the_truncated_series() -> None:
    """E[estimate] = the full-batch Neumann hypergradient with the same budget (independent batches)."""
    X, t = data()
    log_lam = torch.full((D,), -2.0, dtype=DT, requires_grad=True)
    reference = hypergradient(
        idiff.implicit_diff(objective=objective, solver=idiff.Neumann(**NEUMANN))(newton), log_lam, X, t
    )
    fit = idiff.implicit_diff(
        objective=objective, solver=idiff.Neumann(**NEUMANN), minibatch=idiff.Minibatch(sampler(64), seed=3)
    )(newton)
    w = fit(torch.zeros(D, dtype=DT), log_lam, X, t)  # one inner solve; every backward draws new batches
    loss = ((w - 0.5) ** 2).sum()
    draws = torch.stack([torch.autograd.grad(loss, log_lam, retain_graph=True)[0] for _ in range(150)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    z = ((mean - reference) / stderr).abs()
    assert float(z.max()) < 4.5, (z, mean, reference)
    assert float(draws.std(0).max()) > 1e-4  # the estimate is random indeed (the test could fail)


def test_one_batch_per_solve_cg_bias_shrinks_with_the_batch() -> None:
    X, t = data()
    log_lam = torch.full((D,), -2.0, dtype=DT, requires_grad=True)
    exact = hypergradient(idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-12))(newton), log_lam, X, t)
    errors = []
    for size in (32, 2048):
        fit = idiff.implicit_diff(
            objective=objective, solver=idiff.CG(tol=1e-10), minibatch=idiff.Minibatch(sampler(size), seed=1)
        )(newton)
        loss = ((fit(torch.zeros(D, dtype=DT), log_lam, X, t) - 0.5) ** 2).sum()
        mean = torch.stack([torch.autograd.grad(loss, log_lam, retain_graph=True)[0] for _ in range(40)]).mean(0)
        errors.append(float((mean - exact).norm() / exact.norm()))
    assert errors[1] < errors[0] / 4, errors


def test_gradient_reaches_the_data_through_the_sampler() -> None:
    X, t = data()
    log_lam = torch.full((D,), -1.0, dtype=DT)
    Xg = X.clone().requires_grad_()
    fit = idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-12), minibatch=idiff.Minibatch(everything))(
        newton
    )
    w = fit(torch.zeros(D, dtype=DT), log_lam, Xg, t)
    (g,) = torch.autograd.grad(w.sum(), Xg)
    Xr = X.clone().requires_grad_()
    plain = idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-12))(newton)
    (ref,) = torch.autograd.grad(plain(torch.zeros(D, dtype=DT), log_lam, Xr, t).sum(), Xr)
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-13)


def test_draws_are_reproducible_and_leave_the_data_alone() -> None:
    X, t = data()
    X0 = X.clone()
    log_lam = torch.full((D,), -2.0, dtype=DT, requires_grad=True)
    mb = idiff.Minibatch(sampler(50), seed=7)
    fit = idiff.implicit_diff(objective=objective, solver=idiff.Neumann(**NEUMANN), minibatch=mb)(newton)
    first = hypergradient(fit, log_lam, X, t)
    second = hypergradient(fit, log_lam, X, t)
    assert not torch.equal(first, second)  # the generator advances: new batches
    mb.reset()
    torch.testing.assert_close(hypergradient(fit, log_lam, X, t), first, rtol=0, atol=0)
    assert torch.equal(X, X0)


def test_unsound_combinations_are_refused() -> None:
    mb = idiff.Minibatch(sampler(10))
    with pytest.raises(ValueError, match="stationary iteration"):
        idiff.implicit_diff(objective=objective, solver=idiff.CG(), minibatch=idiff.Minibatch(sampler(10), resample="product"))
    with pytest.raises(ValueError, match="fixed budget"):
        idiff.implicit_diff(objective=objective, solver=idiff.Neumann(tol=1e-6), minibatch=mb)
    with pytest.raises(ValueError, match="resample"):
        idiff.Minibatch(sampler(10), resample="epoch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Minibatch"):
        idiff.implicit_diff(objective=objective, minibatch=sampler(10))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        idiff.implicit_diff(objective=objective, minibatch=mb, mode="unrolled")


def test_outside_first_order_reverse_mode_it_raises() -> None:
    X, t = data()
    fit = idiff.implicit_diff(objective=objective, solver=idiff.CG(tol=1e-8), minibatch=idiff.Minibatch(sampler(100)))(
        newton
    )
    log_lam = torch.full((D,), -1.0, dtype=DT, requires_grad=True)
    with pytest.raises(idiff.ImplicitDiffError, match="torch.func"):
        torch.func.vmap(lambda ll: fit(torch.zeros(D, dtype=DT), ll, X, t))(torch.zeros(2, D, dtype=DT))
    w = fit(torch.zeros(D, dtype=DT), log_lam, X, t)
    with pytest.raises(idiff.ImplicitDiffError, match="first derivatives only"):
        torch.autograd.grad(w.sum(), log_lam, create_graph=True)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(log_lam.detach(), torch.ones(D, dtype=DT))
        with pytest.raises(idiff.ImplicitDiffError, match="reverse mode only"):
            fit(torch.zeros(D, dtype=DT), dual, X, t)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_data_device(device: str) -> None:
    X, t = (a.to(device) for a in data())
    log_lam = torch.full((D,), -2.0, dtype=DT, device=device, requires_grad=True)
    fit = idiff.implicit_diff(
        objective=objective, solver=idiff.Neumann(**NEUMANN), minibatch=idiff.Minibatch(sampler(64))
    )(newton)
    g = hypergradient(fit, log_lam, X, t)
    assert g.device.type == device and bool(torch.isfinite(g).all())
