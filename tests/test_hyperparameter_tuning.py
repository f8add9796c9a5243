"""Tests of the hyperparameter-tuning applications (small versions of each, CPU, float64).

Hypergradients are checked against dense float64 references (explicit Hessians / Jacobians from
``torch.func`` and ``torch.linalg.solve``), which are themselves checked against central finite
differences; each application must improve its outer objective by a clear, asserted margin.
"""

from __future__ import annotations

import dataclasses
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


# ----------------------------------------------------------------------------- 1b. guards against overfitting the validation split


def _feature_subset(split, columns: int):
    """The same split with only the first ``columns`` features (a tiny problem for finite differences)."""
    return dataclasses.replace(
        split, x_train=split.x_train[:, :columns], x_val=split.x_val[:, :columns], x_test=split.x_test[:, :columns],
        feature_mean=split.feature_mean[:columns], feature_scale=split.feature_scale[:columns], image_shape=None,
    )


def test_regularization_records_test_loss_per_step():
    split = load_split("digits", max_samples=300, seed=0)
    config = regularization.RegularizationConfig(init_penalty=1e-1, outer_steps=3, outer_lr=0.3, unrolled_steps=10)
    for method in ("implicit", "unrolled"):
        result = regularization.tune_penalties(split, config, method)
        assert len(result.test_losses) == len(result.test_accuracies) == len(result.validation_losses) == 4
        assert result.steps_run == 3 and result.selected_step == 3 and result.stopping_losses == []
        assert all(0.0 <= a <= 1.0 for a in result.test_accuracies)
        # the last entry is the kept (final) model, evaluated on the test split
        assert result.test_losses[-1] == pytest.approx(float(cross_entropy(result.params, split.x_test, split.y_test)), rel=1e-12)
        assert result.validation_losses[-1] == pytest.approx(float(cross_entropy(result.params, split.x_val, split.y_val)), rel=1e-12)
    assert len(set(result.test_losses)) == 4  # the test loss moves with the penalties


def test_early_stopping_keeps_argmin_of_disjoint_stopping_part():
    split = load_split("digits", max_samples=300, seed=0)
    config = regularization.RegularizationConfig(
        init_penalty=1e-1, outer_steps=8, outer_lr=0.5, early_stopping=True, inner_max_iter=300
    )
    result = regularization.tune_penalties(split, config)
    hyper, stop = set(result.hypergradient_index.tolist()), set(result.stopping_index.tolist())
    assert not hyper & stop and hyper | stop == set(split.val_index.tolist())
    assert abs(len(hyper) - len(stop)) <= 1 + split.n_classes  # about half / half (stratified)
    assert len(result.stopping_losses) == len(result.validation_losses) == 9
    assert result.selected_step == int(np.argmin(result.stopping_losses))
    assert 0 < result.selected_step < 8  # the hypergradient part is overfitted within 8 steps
    rows = np.flatnonzero(np.isin(split.val_index, result.stopping_index))
    x_stop, y_stop = split.x_val[torch.as_tensor(rows)], split.y_val[torch.as_tensor(rows)]
    assert float(cross_entropy(result.params, x_stop, y_stop)) == pytest.approx(min(result.stopping_losses), rel=1e-12)
    assert float(cross_entropy(result.params, split.x_test, split.y_test)) == pytest.approx(
        result.test_losses[result.selected_step], rel=1e-12
    )
    # the hypergradient saw only its own part: its loss curve is on those rows
    rows = np.flatnonzero(np.isin(split.val_index, result.hypergradient_index))
    assert result.validation_losses[result.selected_step] == pytest.approx(
        float(cross_entropy(result.params, split.x_val[torch.as_tensor(rows)], split.y_val[torch.as_tensor(rows)])), rel=1e-12
    )
    # the same seed gives the same cut; patience ends the loop once the stopping loss stalls
    patient = regularization.tune_penalties(split, dataclasses.replace(config, patience=1))
    assert patient.stopping_index.tolist() == result.stopping_index.tolist()
    assert patient.steps_run < 8 and patient.steps_run - 1 - int(np.argmin(patient.stopping_losses[:-1])) == 1
    assert patient.stopping_losses[: patient.steps_run] == pytest.approx(result.stopping_losses[: patient.steps_run], rel=1e-9)


def test_feature_groups_of_digits_and_breast_cancer():
    blocks = regularization.feature_groups("blocks:2", 64, (8, 8))
    assert torch.bincount(blocks).tolist() == [4] * 16
    assert blocks.reshape(8, 8)[:2, :2].unique().tolist() == [0] and int(blocks.reshape(8, 8)[7, 7]) == 15
    rings = regularization.feature_groups("rings", 64, (8, 8)).reshape(8, 8)
    assert int(rings.max()) == 4 and int(rings[3, 3]) == 0 and int(rings[0, 0]) == 4
    assert torch.equal(rings, rings.flip(0)) and torch.equal(rings, rings.T)  # symmetric around the centre
    assert regularization.feature_groups("modulo:10", 30)[[3, 13, 23]].tolist() == [3, 3, 3]
    assert regularization.feature_groups(None, 5).tolist() == list(range(5))
    assert regularization.feature_groups([1, 0, 1], 3).tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    "spec, shape, match",
    [
        ("pixels", (8, 8), "unknown group spec"),
        ("blocks:3", (8, 8), "does not divide"),
        ("blocks:two", (8, 8), "needs an integer"),
        ("blocks:0", (8, 8), "must be positive"),
        ("rings:2", (8, 8), "takes no argument"),
        ("blocks:2", None, "needs image data"),
        ("modulo:100", None, "exceeds"),
        ([0, 1], (8, 8), "64 features"),
        ([0.0] * 64, (8, 8), "integers"),
        ([0] * 32 + [2] * 32, (8, 8), "every index"),
        ([-1] * 64, (8, 8), "non-negative"),
    ],
)
def test_feature_groups_rejects_bad_specs(spec, shape, match):
    with pytest.raises(ValueError, match=match):
        regularization.feature_groups(spec, 64, shape)


def test_regularization_config_rejects_bad_guards():
    with pytest.raises(ValueError, match="unknown group spec"):
        regularization.RegularizationConfig(groups="pixels")
    with pytest.raises(ValueError, match="stopping_fraction"):
        regularization.RegularizationConfig(early_stopping=True, stopping_fraction=1.0)
    with pytest.raises(ValueError, match="patience"):
        regularization.RegularizationConfig(early_stopping=True, patience=0)
    split = load_split("breast_cancer", max_samples=100)
    with pytest.raises(ValueError, match="needs image data"):
        regularization.tune_penalties(split, regularization.RegularizationConfig(dataset="breast_cancer", groups="rings"))


def test_grouped_hypergradient_is_sum_of_per_feature_hypergradients():
    split = load_split("digits", max_samples=300, seed=2)
    config = regularization.RegularizationConfig(cg_tol=1e-11, cg_maxiter=3000, cg_on_failure="raise")
    groups = regularization.feature_groups("blocks:2", 64, (8, 8))
    group_penalty = -3.0 + torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=DT)
    init = init_params(64, 10)
    fit = regularization.make_implicit_fit(config)
    loss, grouped, _ = regularization.hypergradient(fit, group_penalty, init, split, groups=groups)
    per_loss, per_feature, _ = regularization.hypergradient(fit, group_penalty[groups], init, split)
    assert float(loss) == pytest.approx(float(per_loss), rel=1e-12)
    assert grouped.shape == (16,)
    assert _rel(grouped, torch.zeros(16, dtype=DT).index_add_(0, groups, per_feature)) < 1e-9


def test_grouped_hypergradient_matches_finite_differences():
    split = _feature_subset(load_split("breast_cancer", max_samples=90, seed=1), 6)
    config = regularization.RegularizationConfig(
        dataset="breast_cancer", inner_grad_tol=1e-12, cg_tol=1e-12, cg_maxiter=500, cg_on_failure="raise"
    )
    groups = regularization.feature_groups([0, 0, 1, 2, 1, 2], 6)
    group_penalty = torch.tensor([-1.0, -2.5, 0.5], dtype=DT)
    _, grad, _ = regularization.hypergradient(regularization.make_implicit_fit(config), group_penalty, init_params(6, 2), split, groups=groups)

    def outer(gp: torch.Tensor) -> float:
        lp = regularization.expand_penalty(gp, groups)
        solution = minimize_lbfgs(
            lambda p: regularization.inner_objective(p, lp, split.x_train, split.y_train), init_params(6, 2), grad_tol=1e-12
        ).solution
        # L-BFGS's line search stalls near a 1e-9 gradient; Newton steps make the solve exact for the differences
        flat = torch.cat([solution["weight"].reshape(-1), solution["bias"]])

        def objective(v: torch.Tensor) -> torch.Tensor:
            params = {"weight": v[:6].reshape(6, 1), "bias": v[6:]}
            return regularization.inner_objective(params, lp, split.x_train, split.y_train)

        for _ in range(3):
            flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), torch.func.grad(objective)(flat))
        params = {"weight": flat[:6].reshape(6, 1), "bias": flat[6:]}
        return float(regularization.validation_loss(params, split.x_val, split.y_val))

    eps = 1e-5
    fd = torch.tensor([(outer(group_penalty + eps * e) - outer(group_penalty - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=DT)], dtype=DT)
    assert _rel(grad, fd) < 1e-6


def test_grouped_early_stopped_tuning_and_start_error():
    split = load_split("digits", max_samples=300, seed=0)
    config = regularization.RegularizationConfig(
        init_penalty=1e-1, outer_steps=4, outer_lr=0.3, groups="rings", early_stopping=True, cg_tol=1e-10, unrolled_steps=10
    )
    result = regularization.tune_penalties(split, config)
    assert result.group_log_penalty.shape == (5,)
    assert torch.equal(result.log_penalty, result.group_log_penalty[torch.as_tensor(result.groups)])
    assert result.validation_losses[-1] < result.validation_losses[0]
    errors = regularization._start_hypergradient_errors(split, config)
    assert errors["implicit"] < 1e-8 and errors["unrolled"] > 1e-3


def test_regularization_run_with_guards_writes_guard_table(tmp_path):
    config = regularization.RegularizationConfig(
        dataset="breast_cancer", max_samples=240, init_penalty=1e-1, outer_steps=3, outer_lr=0.3, unrolled_steps=10,
        sklearn_cs=[1e-2, 1e-1, 1.0, 10.0],
    )
    variants = [regularization.GuardVariant(None, True), regularization.GuardVariant("modulo:10", True)]
    results = regularization.run(config, tmp_path, guards=variants)
    assert len(results["test_losses"]["implicit"]) == 4 and len(results["test_losses"]["unrolled"]) == 4
    rows = results["guards"]["table"]
    assert [row["penalties"] for row in rows] == [1, 30, 30, 10] and rows[1]["method"].endswith("no guard")
    assert rows[2]["method"] == "per-feature (30 penalties) + early stopping" and rows[3]["method"].startswith("by measurement")
    for row in rows[1:]:
        assert 0.0 < row["test_loss"] < 1.0 and 0 <= row["kept step"] <= 3
    runs = results["guards"]["runs"]
    assert len(runs["by measurement (10 penalties) + early stopping"]["learned_group_log10_penalty"]) == 10
    assert "kept step" in (tmp_path / "breast_cancer_guards_table.md").read_text()
    for name in ("breast_cancer_guards.png", "breast_cancer_guards_penalties.png", "breast_cancer_validation_loss.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_cli_passes_regularization_guards(tmp_path):
    argv = [
        "regularization", "--datasets", "breast_cancer", "--max-samples", "150", "--outer-steps", "2", "--quick",
        "--early-stopping", "--groups", "consecutive:10", "--patience", "5", "--out", str(tmp_path), "--no-progress",
    ]
    assert cli_main(argv) == 0
    saved = json.loads((tmp_path / "breast_cancer_results.json").read_text())
    assert saved["config"]["groups"] == "consecutive:10" and saved["config"]["early_stopping"] is True
    assert saved["config"]["outer_steps"] == 2 and saved["config"]["patience"] == 5
    assert len(saved["learned_log10_penalty"]["implicit"]) == 30 and len(set(saved["learned_log10_penalty"]["implicit"])) <= 3
    assert "kept step" in (tmp_path / "breast_cancer_table.md").read_text()


def test_noise_features_are_seeded_and_appended_to_every_split():
    split = load_split("digits", max_samples=200, seed=0)
    noisy = regularization.add_noise_features(split, 5, seed=0)
    assert noisy.name == "digits_noise5" and noisy.image_shape is None and noisy.n_features == 69
    for a, b in ((split.x_train, noisy.x_train), (split.x_val, noisy.x_val), (split.x_test, noisy.x_test)):
        assert torch.equal(b[:, :64], a) and b.shape == (a.shape[0], 69)
    assert torch.equal(regularization.add_noise_features(split, 5, seed=0).x_test, noisy.x_test)
    assert not torch.equal(regularization.add_noise_features(split, 5, seed=1).x_test, noisy.x_test)
    assert regularization.add_noise_features(split, 0, seed=0) is split
    with pytest.raises(ValueError, match="needs image data"):
        regularization.feature_groups("blocks:2", noisy.n_features, noisy.image_shape)
    with pytest.raises(ValueError, match="noise_features"):
        regularization.RegularizationConfig(noise_features=-1)
