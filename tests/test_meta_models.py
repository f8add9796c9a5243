"""Tests of applications.meta_learning.models: shapes, batch-statistics batch norm, vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import applications.meta_learning.models as models
from applications.meta_learning.models import BatchStatNorm2d, OmniglotCNN, SinusoidMLP, batch_norm_by_hand, build_model


pytestmark = pytest.mark.usefixtures("single_thread")  # fixture in conftest.py


def _model(ways: int = 5, hidden: int = 16) -> OmniglotCNN:
    torch.manual_seed(0)
    return OmniglotCNN(ways, hidden=hidden)


def test_omniglot_cnn_shapes_and_architecture():
    model = _model(ways=5, hidden=64)
    x = torch.rand(10, 1, 28, 28)
    assert model(x).shape == (10, 5)
    assert model.features(x).shape == (10, 256) and model.feature_dim == 256
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 4
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) and c.out_channels == 64 for c in convs)
    assert len(norms) == 4 and all(not n.track_running_stats for n in norms)
    assert list(model.buffers()) == []  # nothing outside the parameters: functional_call needs only params
    # 14 -> 7 -> 4 -> 2 spatial.
    sizes, h = [], x
    for layer in model.encoder:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            sizes.append(h.shape[-1])
    assert sizes == [14, 7, 4, 2]


def test_omniglot_cnn_uses_batch_statistics_in_eval_mode():
    model = _model()
    x = torch.rand(12, 1, 28, 28)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert torch.allclose(train_out, eval_out)
    # The output of one example depends on the rest of the batch (batch statistics).
    assert not torch.allclose(model(x)[:6], model(x[:6]))


def test_omniglot_cnn_rejects_wrong_input_shape():
    model = _model()
    with pytest.raises(ValueError, match=r"expects input \[batch, 1, 28, 28\]"):
        model(torch.rand(4, 1, 32, 32))
    with pytest.raises(ValueError, match="ways must be a positive integer"):
        OmniglotCNN(0)


def test_vmap_over_tasks_with_functional_call_equals_loop():
    model = _model(ways=5)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tasks, per_task = 3, 10
    x = torch.rand(tasks, per_task, 1, 28, 28)
    # Per-task parameters, as after task-specific adaptation.
    generator = torch.Generator().manual_seed(1)
    task_params = {k: v + 0.05 * torch.randn((tasks, *v.shape), generator=generator) for k, v in params.items()}

    def logits(p, xs):
        return functional_call(model, p, (xs,))

    batched = vmap(logits)(task_params, x)
    looped = torch.stack([logits({k: v[t] for k, v in task_params.items()}, x[t]) for t in range(tasks)])
    assert torch.allclose(batched, looped, atol=1e-5)
    shared = vmap(logits, in_dims=(None, 0))(params, x)
    assert torch.allclose(shared, torch.stack([logits(params, x[t]) for t in range(tasks)]), atol=1e-5)

    # Gradients of a per-task loss (the inner-loop quantity of MAML/iMAML) also match.
    y = torch.randint(0, 5, (tasks, per_task), generator=generator)

    def loss(p, xs, ys):
        return F.cross_entropy(logits(p, xs), ys)

    batched_grads = vmap(grad(loss))(task_params, x, y)
    for t in range(tasks):
        single = grad(loss)({k: v[t] for k, v in task_params.items()}, x[t], y[t])
        for k in params:
            assert torch.allclose(batched_grads[k][t], single[k], atol=1e-5), k


def test_batch_stat_norm_computes_statistics_by_hand_only_under_vmap(monkeypatch):
    """Fused kernel outside vmap, plain tensor ops under it (the fused one's second-order
    derivatives are wrong under vmap); both are the same function, with the same parameters."""
    torch.manual_seed(0)
    norm = BatchStatNorm2d(3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(4, 6, 3, 5, 5, dtype=torch.float64)
    calls = []
    by_hand = models.batch_norm_by_hand
    monkeypatch.setattr(models, "batch_norm_by_hand", lambda *a: calls.append(1) or by_hand(*a))

    looped = torch.stack([norm(t) for t in x])
    assert calls == []
    fused = F.batch_norm(x[0], None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    torch.testing.assert_close(by_hand(x[0], norm.weight, norm.bias, norm.eps), fused, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(looped[0], fused, rtol=0, atol=0)

    params = dict(norm.named_parameters())
    batched = vmap(lambda xs: functional_call(norm, params, (xs,)))(x)
    assert len(calls) == 1
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    # per-task parameters (as after adaptation) are batched too, and take the same path
    task_params = {k: v.expand(4, *v.shape) for k, v in params.items()}
    vmap(lambda p, xs: functional_call(norm, p, (xs,)), in_dims=(0, None))(task_params, x[0])
    assert len(calls) == 2
    # inside grad (no vmap) the fused kernel stays
    grad(lambda p: functional_call(norm, p, (x[0],)).pow(2).sum())(params)
    assert len(calls) == 2


def test_batch_stat_norm_is_a_batch_norm_with_the_same_state_dict():
    """Checkpoints written with the plain BatchNorm2d(track_running_stats=False) load unchanged."""
    plain = torch.nn.BatchNorm2d(4, track_running_stats=False)
    ours = BatchStatNorm2d(4)
    assert isinstance(ours, torch.nn.BatchNorm2d) and not ours.track_running_stats
    assert ours.state_dict().keys() == plain.state_dict().keys() == {"weight", "bias"}
    ours.load_state_dict(plain.state_dict())
    assert list(ours.buffers()) == []
    with pytest.raises(ValueError, match=r"expects input \[batch, channels, height, width\]"):
        ours(torch.randn(3, 4))


def test_sinusoid_mlp_shapes_and_vmap():
    torch.manual_seed(0)
    model = SinusoidMLP()
    assert model(torch.rand(7, 1)).shape == (7, 1)
    assert sum(p.numel() for p in model.parameters()) == (40 + 40) + (1600 + 40) + (40 + 1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.rand(4, 6, 1)
    batched = vmap(lambda xs: functional_call(model, params, (xs,)))(x)
    assert torch.allclose(batched, torch.stack([model(x[t]) for t in range(4)]), atol=1e-6)
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 1\]"):
        model(torch.rand(3, 2))


def test_build_model():
    assert isinstance(build_model("omniglot", 20), OmniglotCNN) and build_model("omniglot", 20).ways == 20
    assert isinstance(build_model("sinusoid", None), SinusoidMLP)
    with pytest.raises(ValueError, match="needs the number of ways"):
        build_model("omniglot", None)
    with pytest.raises(ValueError, match="Unknown task 'mnist'"):
        build_model("mnist", 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_omniglot_cnn_on_cuda_matches_cpu():
    model = _model()
    x = torch.rand(8, 1, 28, 28)
    expected = model(x)
    assert torch.allclose(model.cuda()(x.cuda()).cpu(), expected, atol=1e-4)
