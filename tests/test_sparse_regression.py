"""Lasso / elastic-net penalty tuning by hypergradient (applications/hyperparameter_tuning/sparse_regression.py)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sklearn")

from applications.hyperparameter_tuning import sparse_regression as sr

DTYPE = torch.float64


@pytest.fixture(scope="module")
def diabetes():
    split = sr.load_regression_split("diabetes", seed=0)
    G, c, step = sr.gram(split.x_train, split.y_train)
    return split, G, c, step


def _loss_at(fit, split, G, c, log_params):
    with torch.no_grad():
        w = fit(torch.zeros(split.n_features, dtype=DTYPE), log_params, G, c)
    return float(sr.validation_mse(w, split.x_val, split.y_val)), w


@pytest.mark.parametrize("per_feature", [False, True], ids=["scalar", "per_feature"])
def test_lasso_hypergradient_matches_closed_form_and_finite_differences(diabetes, per_feature):
    split, G, c, step = diabetes
    fit = sr.make_fit("lasso", step, sr.SparseConfig(inner_tol=1e-14))
    d = split.n_features
    log_lam = torch.full((d,), math.log(0.03), dtype=DTYPE) if per_feature else torch.tensor(math.log(0.03), dtype=DTYPE)
    log_lam.requires_grad_(True)
    w = fit(torch.zeros(d, dtype=DTYPE), log_lam, G, c)
    support = int((w != 0).sum())
    assert 0 < support < d  # a genuinely sparse solution: the active-set formula is not trivial
    (grad,) = torch.autograd.grad(sr.validation_mse(w, split.x_val, split.y_val), log_lam)
    closed = sr.lasso_closed_form_hypergradient(w.detach(), log_lam.detach(), G, split.x_val, split.y_val)
    torch.testing.assert_close(grad, closed, rtol=0, atol=1e-6)
    assert float(closed.abs().max()) > 1e-3  # the comparison is not between two zeros

    h = 1e-4
    base = log_lam.detach()
    directions = [None] if not per_feature else list(range(d))
    fd = []
    for j in directions:
        e = torch.ones_like(base) if j is None else torch.nn.functional.one_hot(torch.tensor(j), d).to(DTYPE)
        plus, _ = _loss_at(fit, split, G, c, base + h * e)
        minus, _ = _loss_at(fit, split, G, c, base - h * e)
        fd.append((plus - minus) / (2 * h))
    fd = torch.tensor(fd, dtype=DTYPE).reshape(grad.shape)
    torch.testing.assert_close(grad, fd, rtol=0, atol=1e-6)


def test_elastic_net_hypergradient_matches_closed_form(diabetes):
    split, G, c, step = diabetes
    fit = sr.make_fit("elastic_net", step, sr.SparseConfig(inner_tol=1e-14))
    gamma = 0.2
    log_params = torch.tensor([math.log(0.03), math.log(gamma)], dtype=DTYPE, requires_grad=True)
    w = fit(torch.zeros(split.n_features, dtype=DTYPE), log_params, G, c)
    (grad,) = torch.autograd.grad(sr.validation_mse(w, split.x_val, split.y_val), log_params)
    closed_lam = sr.lasso_closed_form_hypergradient(
        w.detach(), log_params[0].detach(), G, split.x_val, split.y_val, gamma=gamma
    )
    # d w_S / d log gamma = -(G_SS + gamma I)^{-1} gamma w_S
    support = w.detach() != 0
    g = torch.func.grad(sr.validation_mse)(w.detach(), split.x_val, split.y_val)[support]
    A = G[support][:, support] + gamma * torch.eye(int(support.sum()), dtype=DTYPE)
    closed_gamma = -gamma * torch.linalg.solve(A, w.detach()[support]) @ g
    torch.testing.assert_close(grad, torch.stack([closed_lam, closed_gamma]), rtol=0, atol=1e-6)


def test_quick_tuning_lowers_validation_loss(diabetes):
    split = diabetes[0]
    config = sr.SparseConfig(outer_steps=10, outer_lr=0.2, init_lam=0.3)
    for kind, per_feature in (("lasso", False), ("elastic_net", False), ("lasso", True)):
        result = sr.tune(split, kind, per_feature, config)
        assert len(result.validation_losses) == config.outer_steps + 1
        assert result.validation_losses[-1] < result.validation_losses[0] - 1e-3, (kind, per_feature)
        assert result.inner_fits == config.outer_steps + 1


def test_comparison_table_has_expected_rows(capsys):
    config = sr.SparseConfig(outer_steps=3, n_alphas=20, l1_ratios=(0.5, 1.0))
    rows = sr.compare("diabetes", config)
    methods = [row["method"] for row in rows]
    assert methods == [
        "start: lasso, lam = 0.01",
        "sklearn LassoCV (validation holdout)",
        "sklearn ElasticNetCV (validation holdout)",
        "hypergradient lasso, scalar",
        "hypergradient elastic net, scalar",
        "hypergradient lasso, one lam per feature",
    ]
    assert [row["hyperparameters"] for row in rows] == [0, 1, 2, 1, 2, 10]
    assert [row["inner fits"] for row in rows[1:]] == [21, 41, 4, 4, 4]
    for row in rows:
        assert set(row) == set(sr.TABLE_COLUMNS)
        assert 0 < row["validation MSE"] < 1 and 0 < row["test MSE"] < 1  # better than the training mean
    table = sr.markdown_table(rows, sr.TABLE_COLUMNS)
    assert table.count("\n") == len(rows) + 1


def test_main_prints_table(capsys, tmp_path):
    rows = sr.main(["--datasets", "diabetes", "--outer-steps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| dataset | method |" in out and "sklearn LassoCV" in out
    assert len(rows) == 6
    assert (tmp_path / "sparse_regression.json").exists() and (tmp_path / "sparse_regression.md").exists()


def test_split_is_seeded_and_standardized():
    a, b = sr.load_regression_split("digits", seed=3), sr.load_regression_split("digits", seed=3)
    torch.testing.assert_close(a.x_val, b.x_val)
    assert a.x_train.shape[1] == 64
    assert abs(float(a.y_train.mean())) < 1e-12 and abs(float(a.y_train.std(unbiased=False)) - 1) < 1e-12
    with pytest.raises(ValueError):
        sr.load_regression_split("california_housing")


def test_lasso_benchmark_problem_and_methods_agree_with_the_closed_form():
    bench = pytest.importorskip("benchmarks.lasso_hypergradient")
    p = bench.make_problem(300)
    assert int((p["w"] != 0).sum()) == bench.SUPPORT and p["off_support_ratio"] < 0.95
    # the constructed w* really is the lasso solution: the proximal gradient fixed point holds
    residual = bench.idiff.proximal_gradient_condition(bench.least_squares, bench.lasso_prox, stepsize=p["step"])(
        p["w"], torch.tensor(math.log(bench.LAM), dtype=DTYPE), p["X"], p["y"]
    )
    assert float(residual.abs().max()) < 1e-12
    reference = bench.reference_hypergradient(p)
    for factory in (bench.make_implicit, bench.make_hand_written):
        value = factory(p)()
        assert abs(float(value - reference)) <= 1e-8 * abs(float(reference))
