"""implicit_diff(..., compile_backward=True): the same hypergradient as the eager path, in every mode."""

from __future__ import annotations

import pytest
import torch

import implicitdiff as idiff

DT = torch.float64
D = 8


def logistic(w, log_lam, X, t):
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, t) + 0.5 * (log_lam.exp() * w**2).sum()


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, D, generator=g, dtype=DT)
    t = (torch.rand(120, generator=g, dtype=DT) < torch.sigmoid(X[:, 0] - X[:, 1])).to(DT)
    return X, t


def newton(w, log_lam, X, t):
    for _ in range(40):
        p = torch.sigmoid(X @ w)
        H = X.T @ (X * (p * (1 - p))[:, None]) / len(X) + torch.diag(log_lam.exp())
        w = w - torch.linalg.solve(H, X.T @ (p - t) / len(X) + log_lam.exp() * w)
    return w


def hypergradient(fit, lam):
    X, t = data()
    lam = lam.clone().requires_grad_()
    w = fit(torch.zeros(D, dtype=DT), lam, X, t)
    return torch.autograd.grad((w**2).sum() + w[0], lam)[0]


LAM = torch.linspace(-3, 0, D, dtype=DT)
REFERENCE = idiff.implicit_diff(objective=logistic, solver=idiff.CG(tol=1e-13))(newton)


@pytest.mark.parametrize("path", ["dense", "cg"])
def test_compiled_hypergradient_equals_a_tight_eager_cg(path: str) -> None:
    solver = idiff.Auto() if path == "dense" else idiff.Auto(max_size=0, tol=1e-12)
    fit = idiff.implicit_diff(objective=logistic, solver=solver, compile_backward=True)(newton)
    for scale in (1.0, 0.5):  # a second call reuses the compiled function (new values, same structure)
        h = hypergradient(fit, LAM * scale)
        torch.testing.assert_close(h, hypergradient(REFERENCE, LAM * scale), rtol=1e-8, atol=1e-10)
    assert fit.last_backward.solver == ("compiled dense LU" if path == "dense" else "compiled CG")
    assert fit.last_backward.status == idiff.SolveStatus.CONVERGED
    assert len(fit._compiled_backwards) == 1


def test_transforms_and_forward_mode_use_the_eager_path_and_agree() -> None:
    fit = idiff.implicit_diff(objective=logistic, compile_backward=True)(newton)
    X, t = data()

    def f(ll, which):
        return which(torch.zeros(D, dtype=DT), ll, X, t)

    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(lambda ll: f(ll, fit))(LAM), transform(lambda ll: f(ll, REFERENCE))(LAM),
                                   rtol=1e-8, atol=1e-10)
    batch = torch.stack([LAM, LAM - 1])
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(lambda ll: f(ll, fit)))(batch),
                               torch.func.vmap(torch.func.jacrev(lambda ll: f(ll, REFERENCE)))(batch),
                               rtol=1e-8, atol=1e-10)
    assert fit._compiled_backwards == {}  # nothing compiled: every call above went through transforms


def test_a_singular_system_falls_back_to_the_eager_solver() -> None:
    def flat(x, a):  # Hessian diag(1, 0): singular, consistent only when the cotangent has no 2nd entry
        return 0.5 * x[0] ** 2 - a * x[0]

    fit = idiff.implicit_diff(objective=flat, solver=idiff.Auto(iterative=idiff.MINRES(tol=1e-10)),
                              compile_backward=True, check_optimality=None)(lambda x, a: torch.stack([a, x[1]]))
    a = torch.tensor(2.0, dtype=DT, requires_grad=True)
    x = fit(torch.zeros(2, dtype=DT), a)
    (g,) = torch.autograd.grad(x[0], a)
    assert float(g) == pytest.approx(1.0)
    assert fit.last_backward.solver == "Auto"  # the eager solver took over


def test_dict_solutions_compile_too() -> None:
    def objective(p, c):
        return 0.5 * ((p["w"] - c) ** 2).sum() + 0.5 * (p["b"] - c.sum()) ** 2

    fit = idiff.implicit_diff(objective=objective, compile_backward=True)(
        lambda p, c: {"w": c.clone(), "b": c.sum()}
    )
    c = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    out = fit({"w": torch.zeros(2, dtype=DT), "b": torch.zeros((), dtype=DT)}, c)
    (g,) = torch.autograd.grad(out["w"].sum() + 3 * out["b"], c)
    torch.testing.assert_close(g, torch.tensor([4.0, 4.0], dtype=DT))
    assert fit.last_backward.solver == "compiled dense LU"


def test_refused_with_minibatch_or_distributed() -> None:
    with pytest.raises(ValueError, match="compile_backward"):
        idiff.implicit_diff(objective=logistic, compile_backward=True, distributed=idiff.DataParallel())


def test_a_compiler_failure_falls_back_to_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("simulated compiler failure")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fit = idiff.implicit_diff(objective=logistic, compile_backward=True)(newton)
    with pytest.warns(RuntimeWarning, match="simulated compiler failure"):
        h = hypergradient(fit, LAM)
    torch.testing.assert_close(h, hypergradient(REFERENCE, LAM), rtol=1e-8, atol=1e-10)
    assert fit.last_backward.solver == "Auto"
    h2 = hypergradient(fit, LAM)  # the failing structure is remembered: no second attempt, no warning
    torch.testing.assert_close(h2, h)
