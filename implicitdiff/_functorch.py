"""Small, private probes of torch.func's transform stack.

torch exposes no public way to ask "am I running under vmap?"; these helpers wrap the
(stable since torch 2.0) private functorch interpreter stack in one place so that a
change in torch touches one file.
"""

from __future__ import annotations

import torch

try:  # torch >= 2.1
    from torch._C._functorch import TransformType, get_unwrapped, is_functorch_wrapped_tensor
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    def under_vmap() -> bool:
        """True when the caller runs inside ``torch.func.vmap`` (so Python control flow on values is impossible)."""
        return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())

    def under_functorch() -> bool:
        """True when any torch.func transform (grad, vjp, jvp, vmap, ...) is active."""
        return len(retrieve_all_functorch_interpreters()) > 0

    def ad_levels() -> tuple[int, int]:
        """``(reverse, forward)``: how many torch.func grad/vjp and jvp transforms are active."""
        keys = [i.key() for i in retrieve_all_functorch_interpreters()]
        return sum(k == TransformType.Grad for k in keys), sum(k == TransformType.Jvp for k in keys)

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

except ImportError:  # pragma: no cover - very old torch

    def under_vmap() -> bool:
        return False

    def under_functorch() -> bool:
        return False

    def ad_levels() -> tuple[int, int]:
        return 0, 0

    def is_wrapped(t: torch.Tensor) -> bool:
        return False

    def any_true(t: torch.Tensor) -> bool:
        return bool(t.any())

    def physical(t: torch.Tensor) -> torch.Tensor:
        return t
