"""torch.compile of an outer step that calls a decorated solver (tensor and dict-pytree solutions).

The kind of fault: dynamo tracing into the library's pytree handling and autograd Functions
(``TypeError: unhashable type: 'list'`` with a dict solution). The call is excluded from
compilation (one graph break); what surrounds it compiles, and the gradient is unchanged.
"""

from __future__ import annotations

import pytest
import torch

import implicitdiff as idiff

torch.manual_seed(0)
X, Y = torch.randn(40, 4), torch.randn(40)


def dict_objective(p, lam):
    return ((X @ p["w"] + p["b"] - Y) ** 2).mean() + lam.exp() * (p["w"] ** 2).sum()


@idiff.implicit_diff(objective=dict_objective)
def fit_dict(p, lam):
    for _ in range(300):
        g = torch.func.grad(dict_objective)(p, lam)
        p = {k: p[k] - 0.1 * g[k] for k in p}
    return p


def tensor_objective(w, lam):
    return ((X @ w - Y) ** 2).mean() + lam.exp() * (w**2).sum()


@idiff.implicit_diff(objective=tensor_objective)
def fit_tensor(w, lam):
    for _ in range(300):
        w = w - 0.1 * torch.func.grad(tensor_objective)(w, lam)
    return w


def dict_step(lam):
    p = fit_dict({"w": torch.zeros(4), "b": torch.zeros(())}, lam)
    return ((X @ p["w"] + p["b"] - Y) ** 2).mean() * 2.0


def tensor_step(lam):
    return ((X @ fit_tensor(torch.zeros(4), lam) - Y) ** 2).mean() * 2.0


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("step", [dict_step, tensor_step], ids=["dict", "tensor"])
def test_compiled_outer_step_matches_eager(step, backend):
    torch._dynamo.reset()
    lam = torch.tensor(-1.0, requires_grad=True)
    want = torch.autograd.grad(step(lam), lam)[0]
    compiled = torch.compile(step, backend=backend)
    got = torch.autograd.grad(compiled(lam), lam)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
