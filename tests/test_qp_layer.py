"""The sparsemax QP layer (applications/hyperparameter_tuning/qp_layer.py)."""

from __future__ import annotations

import pytest
import torch

from applications.hyperparameter_tuning import qp_layer as q

DTYPE = torch.float64


@pytest.mark.parametrize("method", ["projected_gradient", "kkt"])
def test_layer_is_the_simplex_projection(method):
    s = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1)) * 2
    z = q.make_sparsemax(method)(s)
    torch.testing.assert_close(z, torch.stack([q.projections.simplex(row) for row in s]), rtol=0, atol=1e-10)
    assert (z == 0).any() and torch.allclose(z.sum(-1), torch.ones(8, dtype=DTYPE))


@pytest.mark.parametrize("method", ["projected_gradient", "kkt"])
def test_layer_jacobian_matches_dense_kkt(method):
    s = (torch.randn(5, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_(True)
    cotangent = torch.randn(5, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    (implicit,) = torch.autograd.grad((q.make_sparsemax(method)(s) * cotangent).sum(), s)
    (dense,) = torch.autograd.grad((q.dense_kkt_sparsemax(s) * cotangent).sum(), s)
    torch.testing.assert_close(implicit, dense, rtol=0, atol=1e-8)
    # and the closed form of sparsemax's Jacobian: on the support S, v_S - mean(v_S)
    support = q.dense_kkt_sparsemax(s.detach()) > 0
    mean = (cotangent * support).sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
    torch.testing.assert_close(implicit, torch.where(support, cotangent - mean, 0.0), rtol=0, atol=1e-8)


def test_network_gradients_match_dense_kkt():
    check = q.gradient_check(seed=0, batch=16)
    assert check["max |gradient|"] > 0.1
    assert check["projected_gradient"] < 1e-8
    assert check["kkt"] < 1e-8


def test_training_lowers_the_loss():
    task = q.make_task(n_train=256, n_test=128)
    assert 1.5 < float((task.z_train > 0).double().sum(-1).mean()) < 5  # sparse targets
    result = q.train(task, steps=60, batch=32, lr=2e-2)
    assert result["train loss end"] < 0.5 * result["train loss start"]
    assert result["test loss end"] < 0.7 * result["test loss start"]
    small = q.train(task, steps=8, batch=16, lr=2e-2, method="kkt")
    assert small["train loss end"] < small["train loss start"]


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        q.make_sparsemax("interior_point")
