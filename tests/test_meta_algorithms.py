"""iMAML / MAML / first-order MAML meta-gradients against independent references.

* iMAML: dense float64 reference ``(I + H/lam)^-1 grad L_test(phi*)`` with the explicit
  Hessian (torch.func.hessian) of the support loss at the inner solution and torch.linalg.solve.
* MAML: autograd through an unrolled gradient-descent loop written here by hand.
* first-order MAML: the query-loss gradient at the adapted parameters.
* Inner solvers: the proximal problem's optimality condition at their output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf

import implicitdiff as idiff
from applications.meta_learning.algorithms import AlgorithmConfig, FunctionalModel, MetaObjective, build_inner_solver
from applications.meta_learning.inner_solvers import GradientDescent, NewtonCG, proximal_objective
from applications.meta_learning.models import OmniglotCNN

torch.set_num_threads(1)


class TinyNet(torch.nn.Module):
    """2 -> 4 -> 3 tanh network: smooth, so its Hessian is well defined everywhere."""

    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 4)
        self.fc2 = torch.nn.Linear(4, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflat(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def _classification_batch(n_tasks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, 6, 2, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (n_tasks, 6), generator=g)
    xq = torch.randn(n_tasks, 9, 2, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (n_tasks, 9), generator=g)
    return xs, ys, xq, yq


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = FunctionalModel(TinyNet().double())
    theta = {k: v.requires_grad_() for k, v in net.initial_params().items()}
    return net, theta


def _dense_imaml_reference(net, theta, lam, phi_star, xs, ys, xq, yq) -> torch.Tensor:
    """(I + H/lam)^-1 grad L_test(phi*) with the explicit Hessian of L_train at phi*."""
    like = {k: v.detach() for k, v in theta.items()}
    train = lambda vec: nnf.cross_entropy(net(_unflat(vec, like), xs), ys)  # noqa: E731
    test = lambda vec: nnf.cross_entropy(net(_unflat(vec, like), xq), yq)  # noqa: E731
    p = _flat(phi_star).detach()
    H = torch.func.hessian(train)(p)
    g = torch.func.grad(test)(p)
    A = torch.eye(p.numel(), dtype=torch.float64) + H / lam
    return torch.linalg.solve(A, g)


@pytest.mark.parametrize("use_vmap", [False, True])
@pytest.mark.parametrize("inner", ["gd", "hf"])
def test_imaml_meta_gradient_matches_dense_float64_reference(use_vmap, inner):
    lam = 2.0
    net, theta = _setup()
    n = sum(v.numel() for v in theta.values())
    if inner == "gd":
        solver = GradientDescent(lr=0.2, steps=400)
    else:
        solver = NewtonCG(steps=30, cg_steps=n, tol=1e-12)
    cfg = AlgorithmConfig("imaml", lam=lam, inner=solver, cg_steps=3 * n, check_optimality=1e-6)
    obj = MetaObjective(net, "classification", cfg, use_vmap=use_vmap)
    xs, ys, xq, yq = _classification_batch(2, seed=1)
    with idiff.record_solves() as log:
        out = obj.batch(theta, xs, ys, xq, yq)
        out.losses.mean().backward()
    got = _flat({k: v.grad for k, v in theta.items()})

    refs = []
    for b in range(2):
        phi = solver.solve(obj.loss_fn, {k: v.detach() for k, v in theta.items()},
                           {k: v.detach() for k, v in theta.items()}, lam, xs[b], ys[b])
        # the reference is only meaningful at a solved inner problem
        grad_g = torch.func.grad(proximal_objective(obj.loss_fn, lam))(phi, theta, xs[b], ys[b])
        assert _flat(grad_g).norm() < 1e-9
        refs.append(_dense_imaml_reference(net, theta, lam, phi, xs[b], ys[b], xq[b], yq[b]))
    expected = torch.stack(refs).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    if not use_vmap:  # the optimality check ran and passed for both tasks
        checks = [i for i in log if i.kind == "optimality"]
        assert len(checks) == 2 and all(i.converged for i in checks)


def test_imaml_meta_gradient_differs_from_first_order():
    """Guard: the implicit correction matters on this problem (so the test above can fail)."""
    lam = 0.5
    net, theta = _setup(3)
    xs, ys, xq, yq = _classification_batch(1, seed=4)
    grads = {}
    for name in ("imaml", "fomaml"):
        for v in theta.values():
            v.grad = None
        cfg = AlgorithmConfig(name, lam=lam, inner=GradientDescent(0.2, 300), cg_steps=60)
        MetaObjective(net, "classification", cfg, use_vmap=False).batch(theta, xs, ys, xq, yq).losses.sum().backward()
        grads[name] = _flat({k: v.grad for k, v in theta.items()}).clone()
    assert (grads["imaml"] - grads["fomaml"]).norm() > 1e-2 * grads["fomaml"].norm()


@pytest.mark.parametrize("use_vmap", [False, True])
def test_maml_matches_hand_unrolled_autograd(use_vmap):
    lr, steps = 0.3, 5
    net, theta = _setup(1)
    xs, ys, xq, yq = _classification_batch(3, seed=2)
    cfg = AlgorithmConfig("maml", inner=GradientDescent(lr, steps))
    MetaObjective(net, "classification", cfg, use_vmap=use_vmap).batch(theta, xs, ys, xq, yq).losses.mean().backward()
    got = _flat({k: v.grad for k, v in theta.items()})

    # Reference: plain torch.autograd through the loop, second-order terms kept by create_graph.
    ref_theta = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    total = 0.0
    for b in range(3):
        phi = dict(ref_theta)
        for _ in range(steps):
            loss = nnf.cross_entropy(net(phi, xs[b]), ys[b])
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
        total = total + nnf.cross_entropy(net(phi, xq[b]), yq[b]) / 3
    expected = _flat(dict(zip(ref_theta, torch.autograd.grad(total, list(ref_theta.values())))))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


# -- through batch norm, with and without vmap ------------------------------------------------
# torch's fused batch norm has wrong second-order derivatives under vmap (an upstream functorch
# limitation): MAML's meta-gradient through the CNN was 0.6-2% off with --vmap. The CNN's batch
# norm computes its statistics by hand under vmap; these tests hold the vmapped meta-gradients
# to the loop's and to finite differences.
def _tiny_cnn(seed: int, *, smooth: bool = False) -> FunctionalModel:
    """The Omniglot CNN at 8x8 pixels with 3 filters (float64); tanh for ReLU when ``smooth``."""
    torch.manual_seed(seed)
    module = OmniglotCNN(3, hidden=3, image_size=8).double()
    if smooth:  # central differences need a function without kinks
        for i, layer in enumerate(module.encoder):
            if isinstance(layer, torch.nn.ReLU):
                module.encoder[i] = torch.nn.Tanh()
    return FunctionalModel(module)


def _image_batch(n_tasks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n_tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64)
    xq = torch.rand(n_tasks, 9, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.arange(3).repeat(2).expand(n_tasks, 6).clone()
    yq = torch.arange(3).repeat(3).expand(n_tasks, 9).clone()
    return xs, ys, xq, yq


_BN_CONFIGS = {
    "maml": dict(name="maml", inner=GradientDescent(0.3, 3)),
    "fomaml": dict(name="fomaml", inner=GradientDescent(0.3, 3)),
    "imaml": dict(name="imaml", lam=2.0, inner=GradientDescent(0.3, 3), cg_steps=4, meta_solver="minres",
                  check_optimality=None),
}


def _meta_gradient(net, theta0, cfg, use_vmap, batch):
    theta = {k: v.clone().requires_grad_() for k, v in theta0.items()}
    out = MetaObjective(net, "classification", cfg, use_vmap=use_vmap).batch(theta, *batch)
    out.losses.mean().backward()
    return out.losses.detach(), _flat({k: v.grad for k, v in theta.items()})


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "imaml"])
def test_meta_gradient_through_batch_norm_is_the_same_with_and_without_vmap(algorithm):
    net = _tiny_cnn(0)
    theta0 = net.initial_params()
    cfg = AlgorithmConfig(**_BN_CONFIGS[algorithm])
    batch = _image_batch(2, seed=1)
    loop_losses, loop = _meta_gradient(net, theta0, cfg, False, batch)
    vmap_losses, vmapped = _meta_gradient(net, theta0, cfg, True, batch)
    torch.testing.assert_close(vmap_losses, loop_losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vmapped, loop, rtol=1e-8, atol=1e-10)


def test_maml_meta_gradient_through_batch_norm_under_vmap_matches_finite_differences():
    net = _tiny_cnn(2, smooth=True)
    theta0 = net.initial_params()
    cfg = AlgorithmConfig(**_BN_CONFIGS["maml"])
    batch = _image_batch(2, seed=3)
    _, vmapped = _meta_gradient(net, theta0, cfg, True, batch)
    _, first_order = _meta_gradient(net, theta0, AlgorithmConfig(**_BN_CONFIGS["fomaml"]), True, batch)
    objective = MetaObjective(net, "classification", cfg, use_vmap=False)

    def meta_loss(theta):
        return float(objective.batch(theta, *batch).losses.mean())

    def central_difference(direction, h):
        plus = meta_loss({k: v + h * direction[k] for k, v in theta0.items()})
        minus = meta_loss({k: v - h * direction[k] for k, v in theta0.items()})
        return (plus - minus) / (2 * h)

    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in theta0.items()}
        # Richardson extrapolation of two central differences (error O(h^4)): batch norm over a
        # few 1x1 feature maps makes this function curved enough that plain O(h^2) is only ~1e-5 good
        h = 2e-6
        central = (4 * central_difference(direction, h / 2) - central_difference(direction, h)) / 3
        got = float(vmapped @ _flat(direction))
        assert got == pytest.approx(central, rel=1e-7, abs=1e-9)
        # guard: the second-order part is large enough here for a 0.6% error to fail the test
        assert abs(float(first_order @ _flat(direction)) - central) > 1e-2 * abs(central)


def test_fomaml_is_query_gradient_at_adapted_parameters():
    lr, steps = 0.3, 4
    net, theta = _setup(2)
    xs, ys, xq, yq = _classification_batch(2, seed=5)
    cfg = AlgorithmConfig("fomaml", inner=GradientDescent(lr, steps))
    MetaObjective(net, "classification", cfg, use_vmap=False).batch(theta, xs, ys, xq, yq).losses.mean().backward()
    got = _flat({k: v.grad for k, v in theta.items()})
    expected = 0
    for b in range(2):
        phi = {k: v.detach() for k, v in theta.items()}
        for _ in range(steps):
            g = torch.func.grad(lambda p: nnf.cross_entropy(net(p, xs[b]), ys[b]))(phi)
            phi = {k: phi[k] - lr * g[k] for k in phi}
        expected = expected + _flat(torch.func.grad(lambda p: nnf.cross_entropy(net(p, xq[b]), yq[b]))(phi)) / 2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_regression_metric_is_query_mse():
    torch.manual_seed(0)
    net = FunctionalModel(torch.nn.Linear(1, 1).double())
    theta = net.initial_params()
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).view(1, 8, 1)
    obj = MetaObjective(net, "regression", AlgorithmConfig("imaml", inner=GradientDescent(0.1, 3), check_optimality=None),
                        use_vmap=False)
    out = obj.batch(theta, x, 3 * x, x, 3 * x)
    torch.testing.assert_close(out.metrics, out.losses.detach())


def test_newton_cg_solves_the_proximal_problem_where_short_gd_does_not():
    lam = 2.0
    net, theta = _setup(4)
    xs, ys, _, _ = _classification_batch(1, seed=6)
    loss = lambda p, x, y: nnf.cross_entropy(net(p, x), y)  # noqa: E731
    th = {k: v.detach() for k, v in theta.items()}
    grad_g = torch.func.grad(proximal_objective(loss, lam))
    start = _flat(grad_g(th, th, xs[0], ys[0])).norm()
    phi_hf = NewtonCG(steps=20, cg_steps=20, tol=1e-10).solve(loss, th, th, lam, xs[0], ys[0])
    phi_gd = GradientDescent(lr=0.01, steps=5).solve(loss, th, th, lam, xs[0], ys[0])
    assert _flat(grad_g(phi_hf, th, xs[0], ys[0])).norm() <= 1e-10 * start
    assert _flat(grad_g(phi_gd, th, xs[0], ys[0])).norm() > 0.5 * start


def test_gradient_descent_to_tolerance_stops_early():
    loss = lambda p, x, y: ((p["w"] - y) ** 2).sum()  # noqa: E731
    zero = {"w": torch.zeros(3, dtype=torch.float64)}
    y = torch.ones(3, dtype=torch.float64)
    gd = GradientDescent(lr=0.1, steps=10_000, tol=1e-6)
    phi = gd.solve(loss, zero, zero, 2.0, None, y)
    # closed form argmin of ||w - 1||^2 + ||w||^2 is 1/2; contraction 0.6 per step
    torch.testing.assert_close(phi["w"], torch.full((3,), 0.5, dtype=torch.float64), atol=1e-6, rtol=0)
    steps_needed = math.ceil(math.log(1e-6) / math.log(0.6))
    phi_fixed = GradientDescent(lr=0.1, steps=steps_needed).solve(loss, zero, zero, 2.0, None, y)
    torch.testing.assert_close(phi["w"], phi_fixed["w"])


def test_optimality_check_counts_unsolved_inner_problems():
    net, theta = _setup(5)
    xs, ys, xq, yq = _classification_batch(3, seed=7)
    cfg = AlgorithmConfig("imaml", lam=2.0, inner=GradientDescent(lr=0.001, steps=2), check_optimality=0.1)
    obj = MetaObjective(net, "classification", cfg, use_vmap=False)
    with idiff.record_solves() as log, pytest.warns(idiff.InnerOptimalityWarning):
        obj.batch(theta, xs, ys, xq, yq).losses.mean().backward()
    checks = [i for i in log if i.kind == "optimality"]
    assert len(checks) == 3
    assert all(i.converged is False and i.relative_residual > 0.9 for i in checks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="reptile"), "unknown algorithm"),
        (dict(name="imaml", lam=0.0), "lam > 0"),
        (dict(name="maml", inner=NewtonCG()), "Newton-CG"),
        (dict(name="maml", inner=GradientDescent(0.1, 5, tol=1e-3)), "fixed number"),
        (dict(name="imaml", cg_steps=0), "cg_steps"),
    ],
)
def test_bad_algorithm_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**kwargs)


def test_bad_inner_solver_names_and_values():
    with pytest.raises(ValueError, match="'gd'"):
        build_inner_solver("adam", lr=0.1, steps=3)
    with pytest.raises(ValueError, match="learning rate"):
        GradientDescent(lr=-1.0)
    with pytest.raises(ValueError, match="steps"):
        NewtonCG(steps=0)
