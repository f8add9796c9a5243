"""Pytree helpers (private), built on `optree <https://github.com/metaopt/optree>`_.

optree is the pytree library torch itself can use (``torch.utils._cxx_pytree``); it is
well kept, fast (C++), and handles dict / OrderedDict / list / tuple / namedtuple out of
the box, so an ``nn.Module``'s parameter dict works as an argument or a solution.

Iterative solvers work on one flat vector: :class:`Raveler` concatenates the leaves of a
pytree of tensors (a view, no copy, for a single leaf) and splits a vector back into that
structure, casting each leaf back to its own dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optree
import torch

PyTree = Any

# Typed loosely: the pytrees here hold arbitrary user values, which optree's precise generic
# signatures cannot describe.
tree_flatten: Callable[..., Any] = optree.tree_flatten
tree_unflatten: Callable[..., Any] = optree.tree_unflatten
tree_map: Callable[..., Any] = optree.tree_map
tree_structure: Callable[..., Any] = optree.tree_structure


def leaves(tree: PyTree) -> list[Any]:
    return optree.tree_leaves(tree)


def tensor_leaves(tree: PyTree) -> list[torch.Tensor]:
    return [x for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def describe(tree: PyTree) -> str:
    """Short description of a pytree's structure and leaf shapes, for error messages."""
    flat, spec = tree_flatten(tree)
    shapes = ", ".join(
        f"{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else type(x).__name__
        for x in flat
    )
    return f"{spec} with leaves [{shapes}]"


class Raveler:
    """Maps a pytree of floating tensors to one flat vector and back.

    Parameters
    ----------
    example : pytree of tensors
        Fixes the structure, shapes and dtypes.
    """

    def __init__(self, example: PyTree) -> None:
        flat, self.spec = tree_flatten(example)
        self.shapes: list[torch.Size] = [x.shape for x in flat]
        self.dtypes: list[torch.dtype] = [x.dtype for x in flat]
        self.numels: list[int] = [x.numel() for x in flat]
        self.size = sum(self.numels)
        self.dtype = flat[0].dtype if flat else torch.get_default_dtype()
        for x in flat[1:]:
            self.dtype = torch.promote_types(self.dtype, x.dtype)
        self.single = len(flat) == 1

    def ravel(self, tree: PyTree) -> torch.Tensor:
        flat = optree.tree_leaves(tree)
        if self.single:
            return flat[0].reshape(-1).to(self.dtype)
        return torch.cat([x.reshape(-1).to(self.dtype) for x in flat])

    def unravel(self, vec: torch.Tensor) -> PyTree:
        if self.single:
            return tree_unflatten(self.spec, [vec.reshape(self.shapes[0]).to(self.dtypes[0])])
        parts = torch.split(vec, self.numels)
        return tree_unflatten(
            self.spec, [p.reshape(s).to(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]
        )

    def wrap(self, fn: Callable[[PyTree], PyTree]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Turn a pytree-to-pytree function into a vector-to-vector one."""
        return lambda v: self.ravel(fn(self.unravel(v)))


def same_structure(a: PyTree, b: PyTree) -> bool:
    return tree_structure(a) == tree_structure(b)


def split_tensors(flat: Sequence[Any]) -> list[int]:
    """Indices of the tensor entries of a flat list."""
    return [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
