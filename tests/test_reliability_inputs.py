"""The caller's tensors are never changed, bad inner solutions are caught, bad input gets a clear error.

Each test is a member of a reported kind of fault: a library that hands user code a tensor it
still needs (or the caller's own), a check that runs only on the first call, a raw torch stack
trace where the library should name the problem and the fix.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import implicitdiff as idiff

DT = torch.float64


def proximal_objective(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return ((w - a) ** 2).sum() + (w**2).sum()  # argmin w = a / 2


@idiff.implicit_diff(objective=proximal_objective)
def sgd_fit(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """An inner solver that updates init in place, as every torch.optim loop does."""
    w.requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        proximal_objective(w, a).backward()
        opt.step()
    return w.detach()


# ---------------------------------------------------------------- 2. caller's tensors are never changed


def test_inplace_inner_solver_leaves_the_callers_init_alone():
    theta = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    w = sgd_fit(theta.detach(), theta)  # the user guide's iMAML call pattern: init aliases theta
    assert torch.allclose(w, torch.tensor([0.5, 1.0], dtype=DT), atol=1e-8)
    assert torch.equal(theta.detach(), torch.tensor([1.0, 2.0], dtype=DT))
    w.sum().backward()
    assert torch.allclose(theta.grad, torch.full((2,), 0.5, dtype=DT), atol=1e-8)


def test_clamp_in_place_on_a_pytree_init_leaves_it_alone():
    init = {"w": torch.tensor([5.0, -5.0], dtype=DT)}

    @idiff.implicit_diff(objective=lambda p, a: ((p["w"] - a) ** 2).sum())
    def fit(p, a):
        p["w"].clamp_(-1, 1)  # in place on the solver's copy
        p["w"].copy_(a)
        return p

    out = fit(init, torch.tensor([0.3, 0.4], dtype=DT))
    assert torch.equal(init["w"], torch.tensor([5.0, -5.0], dtype=DT))
    assert torch.allclose(out["w"], torch.tensor([0.3, 0.4], dtype=DT))


def test_inner_solver_that_modifies_an_argument_is_an_error_naming_it():
    @idiff.implicit_diff(objective=proximal_objective)
    def bad(w, a):
        a.mul_(0.5)
        return a

    a = torch.tensor([1.0, 2.0], dtype=DT)
    with pytest.raises(idiff.ImplicitDiffError, match=r"modified its argument\(s\) 'a' in place"):
        bad(torch.zeros(2, dtype=DT), a)


def test_modified_keyword_argument_is_named():
    @idiff.implicit_diff(optimality_fn=lambda x, data: x - data["y"])
    def bad(x, data):
        data["y"].add_(1)
        return data["y"].clone()

    with pytest.raises(idiff.ImplicitDiffError, match=r"'data'\['y'\]"):
        bad(torch.zeros(2), data={"y": torch.ones(2)})


def test_unrolled_mode_copies_init_too():
    theta = torch.tensor([1.0, 2.0], dtype=DT)

    @idiff.implicit_diff(objective=proximal_objective, mode="unrolled")
    def fit(w, a):
        w.mul_(0)  # on the copy
        return w + a / 2

    fit(theta, theta)
    assert torch.equal(theta, torch.tensor([1.0, 2.0], dtype=DT))


# ---------------------------------------------------------------- 4. bad inner solutions caught where they happen


def test_non_finite_inner_solution_names_the_inner_solver():
    @idiff.implicit_diff(objective=proximal_objective)
    def diverging(w, a):
        for _ in range(2000):
            w = w - 10.0 * torch.func.grad(proximal_objective)(w, a)
        return w

    with pytest.raises(idiff.NonFiniteError, match="diverging: the inner solver returned a solution with non-finite"):
        diverging(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))


def test_unsolved_inner_problem_warns_by_default():
    @idiff.implicit_diff(objective=proximal_objective)
    def five_steps(w, a):
        for _ in range(2):
            w = w - 0.05 * torch.func.grad(proximal_objective)(w, a)
        return w

    with pytest.warns(idiff.InnerOptimalityWarning, match="five_steps"):
        five_steps(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))


def test_well_solved_problems_are_quiet_by_default():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = sgd_fit(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
        assert torch.allclose(w, torch.full((2,), 0.5, dtype=DT))


def test_optimality_check_can_be_turned_off():
    @idiff.implicit_diff(objective=proximal_objective, check_optimality=None)
    def nothing(w, a):
        return w

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nothing(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))


def test_optimality_is_logged_per_task_in_a_batched_vmap():
    @idiff.implicit_diff(objective=proximal_objective, vmap_inner="batched")
    def fit(w, a):
        return a / 2 + (a[0] > 1.5) * 0.3  # task 1 is off by 0.3

    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)
    with idiff.record_solves() as log, pytest.warns(idiff.InnerOptimalityWarning, match="task 1 of a batched solve"):
        torch.func.vmap(fit)(torch.zeros(2, 2, dtype=DT), a)
    checks = [i for i in log if i.kind == "optimality"]
    assert [c.converged for c in checks] == [True, False]


def test_closure_check_holds_on_every_call():
    scale = torch.tensor(2.0, dtype=DT)

    @idiff.implicit_diff(optimality_fn=lambda x, a: x - scale * a)
    def fit(x, a):
        return scale * a

    fit(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))  # fine: nothing requires grad
    scale.requires_grad_(True)  # a global that starts requiring grad after the first call
    with pytest.raises(idiff.ImplicitDiffError, match="requires grad but is not an argument"):
        fit(torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT))


def test_closure_over_a_module_parameter_on_a_later_call():
    lin = nn.Linear(2, 2).double()
    lin.requires_grad_(False)

    @idiff.implicit_diff(optimality_fn=lambda x, a: x - lin(a))
    def fit(x, a):
        return lin(a)

    fit(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    lin.requires_grad_(True)
    with pytest.raises(idiff.ImplicitDiffError, match="requires grad"):
        fit(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))


# ---------------------------------------------------------------- 5. clear errors instead of stack traces


def _batchnorm_problem(track: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=track), nn.Linear(4, 1)).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)

    def loss(p, lam):
        out = torch.func.functional_call(net, p, (X,))
        return ((out - y) ** 2).mean() + lam * sum((v**2).sum() for v in p.values())

    @idiff.implicit_diff(objective=loss, check_optimality=None)
    def fit(p, lam):
        for _ in range(5):
            g = torch.func.grad(loss)(p, lam)
            p = {k: p[k] - 0.1 * g[k] for k in p}
        return p

    return net, fit


def test_batchnorm_in_train_mode_is_named_with_its_fixes():
    net, fit = _batchnorm_problem(track=True)
    params = {k: v.detach() for k, v in net.named_parameters()}
    with pytest.raises(idiff.ImplicitDiffError, match=r"BatchNorm in train mode.*module.eval\(\).*track_running_stats=False"):
        fit(params, torch.tensor(0.1, dtype=DT, requires_grad=True))


@pytest.mark.filterwarnings("ignore::implicitdiff.LinearSolveWarning")  # 5 GD steps on a net: CG meets negative curvature
@pytest.mark.parametrize("fix", ["eval", "no_running_stats"])
def test_batchnorm_fixes_work(fix):
    net, fit = _batchnorm_problem(track=fix != "no_running_stats")
    if fix == "eval":
        net.eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    lam = torch.tensor(0.1, dtype=DT, requires_grad=True)
    sum(v.sum() for v in fit(params, lam).values()).backward()
    assert lam.grad is not None and torch.isfinite(lam.grad)


def test_inference_mode_runs_an_autograd_inner_solver():
    @idiff.implicit_diff(objective=proximal_objective)
    def lbfgs(w, a):
        w = w.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([w], line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = proximal_objective(w, a)
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    with torch.inference_mode():
        w = lbfgs(torch.zeros(2, dtype=DT), torch.tensor([1.0, 2.0], dtype=DT))
    assert torch.allclose(w, torch.tensor([0.5, 1.0], dtype=DT), atol=1e-6)
    with torch.no_grad():  # the other no-grad context, too
        assert torch.allclose(lbfgs(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT)), torch.full((2,), 0.5, dtype=DT))


def test_complex_solution_is_refused_with_the_right_advice():
    @idiff.implicit_diff(optimality_fn=lambda x, a: x - a)
    def fit(x, a):
        return a + 0j

    with pytest.raises(idiff.ImplicitDiffError, match="complex.*view_as_real"):
        fit(torch.zeros(2), torch.ones(2))


def test_integer_leaf_points_to_has_aux():
    @idiff.implicit_diff(optimality_fn=lambda x, a: {"x": x["x"] - a, "n": x["n"]})
    def fit(x, a):
        return {"x": a.clone(), "n": torch.tensor(3)}

    with pytest.raises(idiff.ImplicitDiffError, match="has_aux=True"):
        fit({"x": torch.zeros(2), "n": torch.tensor(0)}, torch.ones(2))


def test_zero_size_solution_has_zero_gradients():
    @idiff.implicit_diff(objective=lambda x, a: ((x - a) ** 2).sum())
    def fit(x, a):
        return a.clone()

    a = torch.zeros(0, dtype=DT, requires_grad=True)
    fit(torch.zeros(0, dtype=DT), a).sum().backward()
    assert a.grad.shape == (0,)
    # an empty leaf next to a non-empty one
    b = torch.ones(2, dtype=DT, requires_grad=True)
    fit2 = idiff.implicit_diff(objective=lambda x, a, b: ((x["e"] - a) ** 2).sum() + ((x["f"] - b) ** 2).sum())(
        lambda x, a, b: {"e": a.clone(), "f": b.clone()}
    )
    out = fit2({"e": torch.zeros(0, dtype=DT), "f": torch.zeros(2, dtype=DT)}, a, b)
    (out["f"] ** 2).sum().backward()
    assert torch.allclose(b.grad, 2 * b.detach())


def test_init_by_keyword_under_the_users_own_name():
    @idiff.implicit_diff(objective=proximal_objective)
    def fit(w, a):
        return a / 2

    a = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    fit(w=torch.zeros(2, dtype=DT), a=a).sum().backward()
    assert torch.allclose(a.grad, torch.full((2,), 0.5, dtype=DT))
    with pytest.raises(TypeError, match="initial guess.*w="):
        fit(a=a)


def test_dtype_mismatch_is_the_librarys_own_error():
    @idiff.implicit_diff(objective=lambda w, X: ((X @ w) ** 2).sum() + (w**2).sum())
    def fit(w, X):
        return w * 0

    with pytest.raises(idiff.ImplicitDiffError, match="dtype mismatch.*float32.*float64"):
        fit(torch.zeros(3), torch.randn(3, 3, dtype=DT))


def test_module_level_decorated_function_pickles():
    restored = pickle.loads(pickle.dumps(sgd_fit))
    assert restored is sgd_fit
    local = idiff.implicit_diff(objective=proximal_objective)(lambda w, a: a / 2)
    with pytest.raises(pickle.PicklingError, match="module level"):
        pickle.dumps(local)
