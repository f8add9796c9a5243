"""Small, private probes of torch.func's transform stack.

torch exposes no public way to ask "am I running under vmap?"; these helpers wrap the
private functorch interpreter stack (and the forward-AD level that ``linear_solve`` reads)
in one place so that a change in torch touches one file. Every private name used is probed
when implicitdiff is imported: a torch without one of them fails there, with an
:class:`ImportError` naming the torch found and the supported range, rather than with an
``AttributeError`` in the middle of a solve.
"""

from __future__ import annotations

import torch

#: The torch versions this release is tested with (keep in step with ``dependencies`` in
#: ``pyproject.toml``; a test checks that they agree).
SUPPORTED_TORCH = ">=2.13"


def _unsupported_torch(missing: str, err: BaseException) -> ImportError:
    return ImportError(
        f"implicitdiff supports torch{SUPPORTED_TORCH} but found torch {torch.__version__}, which lacks {missing} "
        f"({type(err).__name__}: {err}). implicitdiff reads private torch.func internals to detect vmap/grad/jvp "
        f"transforms; install a supported version, e.g. pip install 'torch{SUPPORTED_TORCH}'."
    )


try:
    from torch._C._functorch import TransformType, get_unwrapped, is_functorch_wrapped_tensor
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError as _err:
    raise _unsupported_torch("the functorch interpreter stack (torch._C._functorch, torch._functorch.pyfunctorch)",
                             _err) from _err

try:
    _VMAP, _GRAD, _JVP = TransformType.Vmap, TransformType.Grad, TransformType.Jvp
    _probes = (torch._C._is_fwd_grad_enabled, torch.autograd.forward_ad._current_level)
except AttributeError as _err:
    raise _unsupported_torch("a private name implicitdiff reads (TransformType.Vmap/Grad/Jvp, "
                             "torch._C._is_fwd_grad_enabled, torch.autograd.forward_ad._current_level)", _err) from _err
del _probes


def under_vmap() -> bool:
    """True when the caller runs inside ``torch.func.vmap`` (so Python control flow on values is impossible)."""
    return any(i.key() == _VMAP for i in retrieve_all_functorch_interpreters())


def under_functorch() -> bool:
    """True when any torch.func transform (grad, vjp, jvp, vmap, ...) is active."""
    return len(retrieve_all_functorch_interpreters()) > 0


def ad_levels() -> tuple[int, int]:
    """``(reverse, forward)``: how many torch.func grad/vjp and jvp transforms are active."""
    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    return sum(k == _GRAD for k in keys), sum(k == _JVP for k in keys)


def is_wrapped(t: torch.Tensor) -> bool:
    """True for a tensor wrapped by a torch.func transform (batched, grad-tracking or dual)."""
    return bool(is_functorch_wrapped_tensor(t))


def any_true(t: torch.Tensor) -> bool:
    """``bool(t.any())`` over every batch element, also under vmap.

    Under vmap Python cannot branch on a value; this unwraps the transform layers to
    look at the physical tensor, so that a batched iterative solver can stop as soon as
    *all* of its problems have converged instead of running its whole budget.
    """
    return bool(physical(t).any())


def physical(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under every transform layer (batch dimensions included), for reading values."""
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t
