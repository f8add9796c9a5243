"""Tests of the hyperparameter-tuning applications (small versions of each, CPU, float64).

Hypergradients are checked against dense float64 references (explicit Hessians / Jacobians from
``torch.func`` and ``torch.linalg.solve``), which are themselves checked against central finite
differences; each application must improve its outer objective by a clear, asserted margin.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import implicitdiff as idiff
from applications.hyperparameter_tuning import distillation, equilibrium, regularization
from applications.hyperparameter_tuning.__main__ import main as cli_main
from applications.hyperparameter_tuning.datasets import load_split
from applications.hyperparameter_tuning.dense_reference import fixed_point_gradient, minimizer_hypergradient
from applications.hyperparameter_tuning.fixed_point_solvers import anderson_acceleration, fixed_point_iteration
from applications.hyperparameter_tuning.lbfgs import minimize_lbfgs
from applications.hyperparameter_tuning.logistic_model import cross_entropy, init_params, penalized_cross_entropy

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: intra-op threads only add contention on a shared 2-core runner."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- data and building blocks


def test_split_is_seeded_disjoint_stratified_and_standardized():
    a, b = load_split("digits", seed=3), load_split("digits", seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_split("digits", seed=4)
    assert not torch.equal(a.x_train, c.x_train)
    indices = [set(a.train_index), set(a.val_index), set(a.test_index)]
    assert sum(map(len, indices)) == 1797 and len(set.union(*indices)) == 1797
    assert torch.allclose(a.x_train.mean(0), torch.zeros(64, dtype=DT), atol=1e-12)
    counts = torch.bincount(a.y_val, minlength=10).double() / len(a.y_val)
    assert float((counts - 0.1).abs().max()) < 0.02  # stratified: every class near 10%
    raw = torch.as_tensor(__import__("sklearn.datasets").datasets.load_digits().data[a.test_index], dtype=DT)
    assert torch.allclose(a.unstandardize(a.x_test), raw, atol=1e-10)


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("mnist")
    with pytest.raises(ValueError, match="fractions"):
        load_split("digits", fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="max_samples"):
        load_split("digits", max_samples=5)


def test_binary_model_is_logistic_regression():
    """The binary parametrization (one logit, pinned class-0 intercept) is the sigmoid model."""
    torch.manual_seed(0)
    params = {"weight": torch.randn(3, 1, dtype=DT), "bias": torch.randn(1, dtype=DT)}
    x, y = torch.randn(20, 3, dtype=DT), torch.randint(0, 2, (20,))
    score = (x @ params["weight"]).squeeze(1) + params["bias"]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(score, y.double())
    assert torch.allclose(cross_entropy(params, x, y), expected, atol=1e-12)
    with pytest.raises(ValueError, match="features"):
        penalized_cross_entropy(params, torch.ones(4, dtype=DT), x, y)


def test_lbfgs_reaches_requested_gradient_tolerance():
    split = load_split("breast_cancer", max_samples=200)
    penalty = torch.full((30,), 1e-2, dtype=DT)
    result = minimize_lbfgs(lambda p: penalized_cross_entropy(p, penalty, split.x_train, split.y_train), init_params(30, 2), grad_tol=1e-9)
    assert result.gradient_norm <= 1e-9 and result.iterations > 5
    g = torch.func.grad(penalized_cross_entropy)(result.solution, penalty, split.x_train, split.y_train)
    assert max(float(v.abs().max()) for v in g.values()) == pytest.approx(result.gradient_norm)


def test_fixed_point_solvers_match_linear_solve_and_anderson_is_faster():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT))
    a = q @ torch.diag(torch.linspace(0.5, 0.97, 6, dtype=DT)) @ q.T  # slow contraction
    c = torch.randn(3, 6, dtype=DT)
    exact = torch.linalg.solve(torch.eye(6, dtype=DT) - a, c.T).T
    plain = fixed_point_iteration(lambda z: z @ a.T + c, torch.zeros(3, 6, dtype=DT), tol=1e-12, max_iter=5000)
    accelerated = anderson_acceleration(lambda z: z @ a.T + c, torch.zeros(3, 6, dtype=DT), tol=1e-12, memory=6)
    for result in (plain, accelerated):
        assert result.converged
        assert torch.allclose(result.solution, exact, atol=1e-9)
    assert accelerated.iterations * 5 < plain.iterations
    with pytest.raises(ValueError, match="batch"):
        anderson_acceleration(lambda z: z, torch.zeros(3, dtype=DT))


# ----------------------------------------------------------------------------- dense references


def test_minimizer_reference_matches_finite_differences():
    split = load_split("breast_cancer", max_samples=90, seed=1)
    x, y = split.x_train[:, :4], split.y_train
    xv, yv = split.x_val[:, :4], split.y_val
    log_penalty = torch.tensor([-1.0, -2.0, 0.0, -3.0], dtype=DT)

    def solve(lp: torch.Tensor):
        return minimize_lbfgs(lambda p: regularization.inner_objective(p, lp, x, y), init_params(4, 2), grad_tol=1e-13).solution

    reference = minimizer_hypergradient(
        regularization.inner_objective, lambda w, h, a, b: cross_entropy(w, a, b), solve(log_penalty), log_penalty, (x, y), (xv, yv)
    )
    eps = 1e-5
    fd = torch.stack(
        [
            (cross_entropy(solve(log_penalty + eps * e), xv, yv) - cross_entropy(solve(log_penalty - eps * e), xv, yv)) / (2 * eps)
            for e in torch.eye(4, dtype=DT)
        ]
    )
    assert _rel(reference, fd) < 1e-5


def test_fixed_point_reference_matches_finite_differences():
    torch.manual_seed(0)
    step = equilibrium.make_equilibrium_step(0.9)
    params = equilibrium.init_model(3, 4, 2, seed=1)
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])

    def loss_at(p):
        z = fixed_point_iteration(lambda z: step(z, p, x), torch.zeros(5, 4, dtype=DT), tol=1e-15, max_iter=10_000).solution
        return equilibrium.classification_loss(z, p, y), z

    _, z_star = loss_at(params)
    reference = fixed_point_gradient(step, equilibrium.classification_loss, z_star, params, x, y)
    eps = 1e-6
    for key in ("W", "U", "b", "V"):
        flat = params[key].reshape(-1)
        for i in range(0, flat.numel(), 3):
            up = {k: v.clone() for k, v in params.items()}
            down = {k: v.clone() for k, v in params.items()}
            up[key].view(-1)[i] += eps
            down[key].view(-1)[i] -= eps
            fd = (loss_at(up)[0] - loss_at(down)[0]) / (2 * eps)
            assert abs(float(fd) - float(reference[key].reshape(-1)[i])) < 1e-7


# ----------------------------------------------------------------------------- 1. per-feature regularization


@pytest.mark.parametrize("dataset", ["digits", "breast_cancer"])
def test_regularization_hypergradient_matches_dense_reference(dataset):
    split = load_split(dataset, max_samples=300, seed=2)
    config = regularization.RegularizationConfig(dataset=dataset, cg_tol=1e-10, cg_maxiter=3000, cg_on_failure="raise")
    generator = torch.Generator().manual_seed(0)
    log_penalty = -3.0 + torch.randn(split.n_features, generator=generator, dtype=DT)  # distinct penalties
    init = init_params(split.n_features, split.n_classes)
    with idiff.record_solves() as log:
        loss, grad, solution = regularization.hypergradient(regularization.make_implicit_fit(config), log_penalty, init, split)
    assert [info.solver for info in log if info.kind == "backward"] == ["CG"]
    reference = minimizer_hypergradient(
        regularization.inner_objective,
        lambda w, h, x, y: regularization.validation_loss(w, x, y),
        solution,
        log_penalty,
        (split.x_train, split.y_train),
        (split.x_val, split.y_val),
    )
    assert _rel(grad, reference) < 1e-6
    assert float(loss) == pytest.approx(float(regularization.validation_loss(solution, split.x_val, split.y_val)))


def test_regularization_improves_validation_loss():
    split = load_split("digits", max_samples=400, seed=0)
    config = regularization.RegularizationConfig(init_penalty=1e-1, outer_steps=6, outer_lr=0.3, unrolled_steps=15)
    implicit = regularization.tune_penalties(split, config, "implicit")
    assert len(implicit.validation_losses) == 7
    assert implicit.validation_losses[-1] < 0.7 * implicit.validation_losses[0]
    unrolled = regularization.tune_penalties(split, config, "unrolled")
    assert unrolled.validation_losses[0] == pytest.approx(implicit.validation_losses[0], rel=1e-6)  # same start
    assert unrolled.validation_losses[-1] < 0.85 * unrolled.validation_losses[0]
    with pytest.raises(ValueError, match="method"):
        regularization.tune_penalties(split, config, "adjoint")


def test_regularization_comparison_runs_and_writes_table(tmp_path):
    config = regularization.RegularizationConfig(
        dataset="breast_cancer", max_samples=240, init_penalty=1e-1, outer_steps=4, outer_lr=0.3, unrolled_steps=10,
        sklearn_cs=[1e-2, 1e-1, 1.0, 10.0], cg_tol=1e-10,
    )
    results = regularization.run(config, tmp_path)
    methods = [row["method"] for row in results["table"]]
    assert len(methods) == 4 and any("LogisticRegressionCV" in m for m in methods)
    for row in results["table"]:
        assert 0.0 < row["test_loss"] < 1.0 and 0.8 < row["test_accuracy"] <= 1.0
    assert results["sklearn"]["best_C"] in config.sklearn_cs
    assert results["start_hypergradient_relative_error"]["implicit"] < 1e-6
    assert len(results["backward_cg_iterations"]) == 4 and max(results["backward_cg_relative_residuals"]) <= 1e-10
    table = (tmp_path / "breast_cancer_table.md").read_text()
    assert "LogisticRegressionCV" in table and table.count("\n") >= 5
    assert json.loads((tmp_path / "breast_cancer_results.json").read_text())["table"] == results["table"]
    for name in ("breast_cancer_validation_loss.png", "breast_cancer_penalties.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_regularization_config_rejects_bad_values():
    with pytest.raises(ValueError, match="init_penalty"):
        regularization.RegularizationConfig(init_penalty=0.0)


# ----------------------------------------------------------------------------- 2. dataset distillation


def test_distillation_hypergradient_matches_dense_reference():
    split = load_split("digits", max_samples=200, seed=0)
    config = distillation.DistillationConfig()
    images = torch.randn(10, 64, generator=torch.Generator().manual_seed(1), dtype=DT).requires_grad_(True)
    labels = torch.arange(10)
    trained = distillation.make_implicit_fit(config)(init_params(64, 10), images, labels)
    loss = distillation.distillation_loss(trained, split.x_train, split.y_train)
    (grad,) = torch.autograd.grad(loss, images)
    reference = minimizer_hypergradient(
        lambda w, s: distillation.make_inner_objective(config.inner_penalty)(w, s, labels),
        lambda w, s: distillation.distillation_loss(w, split.x_train, split.y_train),
        {k: v.detach() for k, v in trained.items()},
        images.detach(),
    )
    assert _rel(grad, reference) < 1e-6


def test_distillation_improves_outer_loss_and_accuracy():
    split = load_split("digits", max_samples=400, seed=0)
    config = distillation.DistillationConfig(outer_steps=6, outer_lr=0.15, inner_penalty=3e-2)
    result = distillation.distill(split, config)
    assert result.losses[-1] < 0.6 * result.losses[0]
    assert result.test_accuracies[0] < 0.3  # noise images: near chance
    assert result.test_accuracies[-1] > result.test_accuracies[0] + 0.35
    labels = torch.arange(10)
    retrained = distillation.train_on(result.images, labels, config.inner_penalty, 10, config)
    assert float(distillation.distillation_loss(retrained, split.x_train, split.y_train)) == pytest.approx(result.losses[-1], rel=1e-6)


def test_distillation_run_writes_table_and_images(tmp_path):
    config = distillation.DistillationConfig(max_samples=200, outer_steps=2, random_baseline_seeds=2)
    results = distillation.run(config, tmp_path)
    assert [row["images"] for row in results["table"]] == [10, 10, 10, results["split_sizes"]["train"]]
    assert len(results["random_real_test_accuracies"]) == 2
    assert results["full_training_set_test_accuracy"] > 0.8
    assert "distilled" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "distilled_images.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- 3. equilibrium layer


@pytest.mark.parametrize("backward", ["gmres", "neumann"])
def test_equilibrium_gradient_matches_dense_solve(backward):
    split = load_split("digits", max_samples=150, seed=0)
    config = equilibrium.EquilibriumConfig(hidden=12, forward_tol=1e-13)
    rows = equilibrium.gradient_accuracy(
        equilibrium.init_model(64, 12, 10, seed=3), split.x_train, split.y_train, config, [(backward, 1e-11, 2000), (backward, 1e-3, 2000)], repeats=1
    )
    tight, loose = rows
    assert tight["gradient rel. error vs dense"] < 1e-8
    assert tight["relative residual"] <= 1e-11 and tight["iterations"] > loose["iterations"]
    assert 1e-9 < loose["gradient rel. error vs dense"] < 1e-2  # a loose solve is visibly, but boundedly, off


def test_equilibrium_training_reduces_loss_and_logs_solves():
    split = load_split("digits", max_samples=300, seed=0)
    config = equilibrium.EquilibriumConfig(hidden=16, train_steps=12, lr=3e-2)
    result = equilibrium.train(split, config, "neumann")
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.test_accuracy > 0.5
    assert len(result.backward_iterations) == 12 and min(result.backward_iterations) > 0
    assert max(result.backward_relative_residuals) <= config.backward_tol
    assert all(0 < it < config.forward_max_iter for it in result.forward_iterations)


def test_equilibrium_run_writes_tables(tmp_path):
    config = equilibrium.EquilibriumConfig(max_samples=150, hidden=8, train_steps=3)
    results = equilibrium.run(config, tmp_path)
    assert [row["backward solver"] for row in results["training"]] == ["GMRES", "Neumann"]
    for row in results["gradient_accuracy"]:
        tol = row["tol"]
        if tol != "fixed budget":
            assert row["relative residual"] <= tol and row["gradient rel. error vs dense"] < 100 * tol
    for name in ("training_table.md", "gradient_table.md", "forward_table.md", "training.png", "results.json"):
        assert (tmp_path / name).exists()


def test_equilibrium_config_rejects_non_contractive_scale():
    with pytest.raises(ValueError, match="contraction"):
        equilibrium.EquilibriumConfig(contraction=1.0)
    with pytest.raises(ValueError, match="backward solver"):
        equilibrium.make_backward_solver("lu", 1e-6, 10)


# ----------------------------------------------------------------------------- command line


def test_cli_rejects_unknown_application(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bilevel"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_regularization_hypergradient_on_cuda():
    split = load_split("breast_cancer", max_samples=150, device="cuda")
    config = regularization.RegularizationConfig(dataset="breast_cancer", device="cuda")
    log_penalty = torch.full((30,), math.log(1e-2), dtype=DT, device="cuda")
    _, grad, solution = regularization.hypergradient(regularization.make_implicit_fit(config), log_penalty, init_params(30, 2, device="cuda"), split)
    reference = minimizer_hypergradient(
        regularization.inner_objective,
        lambda w, h, x, y: regularization.validation_loss(w, x, y),
        solution,
        log_penalty,
        (split.x_train, split.y_train),
        (split.x_val, split.y_val),
    )
    assert grad.device.type == "cuda" and _rel(grad, reference) < 1e-6
    assert np.isfinite(grad.cpu().numpy()).all()
