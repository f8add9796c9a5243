"""Kernel SVM dual: C and the RBF width by hypergradient (applications/hyperparameter_tuning/svm_dual.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from applications.hyperparameter_tuning import svm_dual as sd

DTYPE = torch.float64
# (C, gamma): scikit-learn's defaults on standardized data, and a wider kernel with a larger C
POINTS = [(1.0, 1.0 / 30), (10.0, 0.01)]


@pytest.fixture(scope="module")
def small():
    """60 training points of breast_cancer (120 samples split 50 / 25 / 25 %)."""
    torch.set_num_threads(1)
    problem = sd.load_problem(seed=0, max_samples=120)
    assert problem.n_train == 60
    return problem


@pytest.mark.parametrize("C, gamma", POINTS)
def test_hypergradient_matches_finite_differences_and_dense_kkt(small, C, gamma):
    config = sd.SVMConfig()
    log_C, log_gamma = math.log(C), math.log(gamma)
    loss, grad, solution = sd.hypergradient(small, log_C, log_gamma, config=config)
    alpha = solution.alpha.detach()
    free, at_c = int(((alpha > 0) & (alpha < C)).sum()), int((alpha >= C).sum())
    assert free > 0 and at_c > 0  # both kinds of support vectors: C and gamma both move the solution
    assert solution.info.polished and solution.info.residual < 1e-13 * max(1.0, float(alpha.norm()))
    assert float(grad.abs().min()) > 1e-4  # the comparison is not between zeros

    fd = sd.finite_difference_hypergradient(small, log_C, log_gamma, alpha, config)
    assert float((grad - fd).norm() / fd.norm()) <= 1e-5

    dense = sd.dense_kkt_hypergradient(small, log_C, log_gamma, alpha)
    assert float((grad - dense).norm() / dense.norm()) <= 1e-8

    # the bias is the multiplier of y^T alpha = 0 in the dense KKT solve
    K = sd.rbf_kernel(small.sq_train, torch.tensor(log_gamma, dtype=DTYPE))
    Q = small.y_train[:, None] * small.y_train[None, :] * K
    reference, nu = sd.active_set_solution(Q, small.y_train, C, (alpha > 0) & (alpha < C), alpha >= C)
    torch.testing.assert_close(reference, alpha, rtol=0, atol=1e-12)
    assert abs(float(nu) - float(solution.b.detach())) < 1e-12


def test_gradient_check_report(small):
    check = sd.gradient_check(small, sd.SVMConfig())
    assert check["relative_error_finite_differences"] < 1e-6
    assert check["relative_error_dense_kkt"] < 1e-10
    assert check["inner_polished"] and check["optimality_check_residual"] < 1e-12
    assert check["gmres_relative_residual"] < 1e-11
    rows = sd._gradient_rows(check)
    assert [set(r) for r in rows] == [set(sd.GRADIENT_COLUMNS)] * 3


@pytest.mark.parametrize("C, gamma", POINTS)
def test_inner_solution_matches_sklearn_svc(small, C, gamma):
    from sklearn.svm import SVC

    alpha, b, info = sd.fit_dual(small.x_train, small.y_train, C, gamma)
    assert info.polished and info.converged
    model = SVC(C=C, kernel="rbf", gamma=gamma, tol=1e-10).fit(small.x_train.numpy(), small.y_train.numpy())
    assert list(model.classes_) == [-1.0, 1.0]  # dual_coef_ = y_i alpha_i, decision > 0 is class +1
    np.testing.assert_array_equal(np.sort(model.support_), np.nonzero(alpha.numpy() > 0)[0])
    ours = (small.y_train * alpha).numpy()[model.support_]
    # libsvm caches the kernel in single precision: agreement to about 1e-7 C here, not to rounding
    np.testing.assert_allclose(model.dual_coef_[0], ours, rtol=0, atol=1e-6 * C)
    assert abs(float(model.intercept_[0]) - float(b)) < 1e-6
    f = sd.decision_values(alpha, b, sd.rbf_kernel(small.sq_val, torch.tensor(math.log(gamma), dtype=DTYPE)),
                           small.y_train)
    np.testing.assert_allclose(model.decision_function(small.x_val.numpy()), f.numpy(), rtol=0, atol=1e-5)


def test_projected_gradient_alone_reaches_the_polished_solution(small):
    C, gamma = POINTS[0]
    polished, _, info = sd.fit_dual(small.x_train, small.y_train, C, gamma)
    alone, _, plain = sd.fit_dual(small.x_train, small.y_train, C, gamma, sd.SVMConfig(polish=False))
    assert info.polished and not plain.polished and plain.converged
    assert plain.residual < 1e-9
    torch.testing.assert_close(alone, polished, rtol=0, atol=1e-7)


def test_intercept_without_free_support_vectors_is_libsvm_midpoint():
    from sklearn.svm import SVC

    # 2 positives, 2 negatives, tiny C: every alpha sits at C, b is only bracketed
    x = torch.tensor([[0.0, 0.0], [0.3, 0.1], [1.5, 0.4], [2.0, 2.0]], dtype=DTYPE)
    y = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=DTYPE)
    C, gamma = 0.01, 0.5
    alpha, b, _ = sd.fit_dual(x, y, C, gamma)
    model = SVC(C=C, kernel="rbf", gamma=gamma, tol=1e-10).fit(x.numpy(), y.numpy())
    full = np.zeros(4)
    full[model.support_] = np.abs(model.dual_coef_[0])
    np.testing.assert_allclose(alpha.numpy(), full, atol=1e-9)
    assert bool((alpha == C).all())
    assert abs(float(b)) > 1e-3 and abs(float(b) - float(model.intercept_[0])) < 1e-9


def test_quick_cli_writes_outputs_and_lowers_the_validation_loss(tmp_path, capsys):
    from applications.hyperparameter_tuning.__main__ import main

    assert main(["svm-dual", "--quick", "--out", str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| method | C | gamma |" in out and "SVC grid search" in out and "finite differences" in out
    for name in ("svm_dual.json", "svm_dual.md", "svm_dual.png"):
        assert (tmp_path / name).stat().st_size > 0
    content = json.loads((tmp_path / "svm_dual.json").read_text())
    losses = content["trajectory"]["validation_losses"]
    assert len(losses) == content["config"]["outer_steps"] + 1
    assert losses[-1] < losses[0] - 1e-3
    rows = content["rows"]
    assert [row["SVM fits"] for row in rows] == [1, 25, 25, content["config"]["outer_steps"] + 1]
    assert all(set(row) == set(sd.TABLE_COLUMNS) for row in rows)
    assert content["gradient_check"]["relative_error_finite_differences"] < 1e-6
    assert all(content["trajectory"]["polished"])
    assert max(content["trajectory"]["optimality_residuals"]) < 1e-11


def test_bad_inputs_give_clear_errors(small):
    x, y = small.x_train, small.y_train
    with pytest.raises(ValueError, match=r"-1 or \+1"):
        sd.fit_dual(x, (y > 0).to(DTYPE), 1.0, 0.1)  # labels 0 / 1
    with pytest.raises(ValueError, match="both classes"):
        sd.fit_dual(x, torch.ones_like(y), 1.0, 0.1)
    for C in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="C must be a positive"):
            sd.fit_dual(x, y, C, 0.1)
    with pytest.raises(ValueError, match="gamma must be a positive"):
        sd.fit_dual(x, y, 1.0, 0.0)
    with pytest.raises(ValueError, match="as many rows"):
        sd.fit_dual(x[:-1], y, 1.0, 0.1)
    with pytest.raises(ValueError, match="init_C"):
        sd.SVMConfig(init_C=-1.0)
    with pytest.raises(ValueError, match="y_val"):
        sd.SVMProblem.from_arrays(x, y, small.x_val, small.y_val * 2, small.x_test, small.y_test)
