"""Stochastic (minibatch) products for the backward solve of an implicit function."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

__all__ = ["Minibatch"]


class Minibatch:
    r"""Evaluate the backward system's products on minibatches of the inner data.

    Pass it as ``implicit_diff(..., minibatch=Minibatch(sample))``. The inner solver still
    runs on all the data; only the backward pass (the hypergradient) uses minibatches, for
    data too large for a full-batch product per iteration. ``sample(generator, *args,
    **kwargs)`` receives the decorated solver's arguments (after ``init``) and returns the
    arguments of the condition on a minibatch: a tuple of positional arguments (the keyword
    arguments are then kept), or a pair ``(args, kwargs)``. It must draw its randomness
    from ``generator`` (a ``torch.Generator`` seeded with ``seed``, so runs are
    reproducible) and select with differentiable indexing (``X[idx]``), because the
    hypergradient w.r.t. the arguments is taken *through* it. The condition on a minibatch
    must be an unbiased estimate of the full one (a mean loss over the batch, or a sum
    rescaled by the data size).

    Two estimators, chosen by ``resample``:

    ``"product"`` (default for :class:`~implicitdiff.Neumann`)
        A fresh minibatch for every product. The Richardson iteration
        :math:`u_{j+1} = u_j + \alpha\,(\bar x - A_{b_j}^\top u_j)` with independent batches
        :math:`b_j` has :math:`\mathbb E[u_K]` equal to the full-batch truncated Neumann sum
        :math:`\alpha\sum_{j<K}(I - \alpha A^\top)^j \bar x`, and the final product
        :math:`B_{b}^\top u_K` on another independent batch keeps the estimate unbiased for
        the hypergradient of that truncated series (Lorraine et al., 2020, stochastic
        version). Only a stationary iteration may see a different operator at every product,
        and only with a fixed budget (``tol=None``): a tolerance test on a noisy residual is
        meaningless.
    ``"solve"`` (default, and the only choice, for Krylov solvers such as CG)
        One minibatch per backward solve: CG solves the minibatch system
        :math:`A_b^\top u = \bar x` exactly as it would the full one (CG needs a fixed
        operator), and :math:`B^\top u` is taken on a fresh batch. This is *biased*
        (:math:`\mathbb E[A_b^{-1}] \ne A^{-1}`); the bias shrinks with the batch size.
        Use a fixed budget or a tolerance, as for a full-batch solve.

    The solve's :class:`~implicitdiff.SolveInfo` has ``stochastic=True``: its residual is
    measured on a minibatch operator, an estimate, not the full system's residual.

    Parameters
    ----------
    sample : callable
        ``sample(generator, *args, **kwargs) -> args`` or ``-> (args, kwargs)``.
    seed : int
        Seed of the generator (one per device, created on first use and advanced by every
        draw, so that successive backward calls see new batches).
    resample : {"product", "solve"}, optional
        See above; default ``"product"`` for solvers that accept a changing operator
        (:class:`~implicitdiff.Neumann`), else ``"solve"``.

    Notes
    -----
    First-order reverse mode (``loss.backward()``, ``torch.autograd.grad``), outside
    ``torch.func`` transforms. Under ``vmap``/``grad``/``jvp``, in forward mode and for
    higher-order derivatives the implicit function raises
    :class:`~implicitdiff.ImplicitDiffError`.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(10_000, 5, generator=g, dtype=torch.float64)
    >>> y = X @ torch.ones(5, dtype=torch.float64) + 0.1 * torch.randn(10_000, generator=g, dtype=torch.float64)
    >>> def objective(w, lam, X, y):
    ...     return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w ** 2).sum()
    >>> def sample(generator, lam, X, y):
    ...     idx = torch.randint(len(X), (500,), generator=generator)
    ...     return lam, X[idx], y[idx]
    >>> neumann = idiff.Neumann(step_size=0.5, tol=None, maxiter=50)
    >>> @idiff.implicit_diff(objective=objective, solver=neumann, minibatch=idiff.Minibatch(sample))
    ... def fit(w, lam, X, y):
    ...     A = X.T @ X / len(X) + lam * torch.eye(5, dtype=X.dtype)
    ...     return torch.linalg.solve(A, X.T @ y / len(X))
    >>> lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    >>> fit(torch.zeros(5, dtype=torch.float64), lam, X, y).sum().backward()
    >>> fit.last_backward.stochastic
    True
    """

    def __init__(
        self,
        sample: Callable[..., Any],
        *,
        seed: int = 0,
        resample: Literal["product", "solve"] | None = None,
    ) -> None:
        if not callable(sample):
            raise TypeError(f"Minibatch: sample must be callable, got {type(sample).__name__}")
        if resample not in (None, "product", "solve"):
            raise ValueError(f"Minibatch: resample must be 'product', 'solve' or None, got {resample!r}")
        self.sample = sample
        self.seed = int(seed)
        self.resample = resample
        self._generators: dict[torch.device, torch.Generator] = {}

    def __repr__(self) -> str:
        return f"Minibatch({getattr(self.sample, '__name__', 'sample')}, seed={self.seed}, resample={self.resample!r})"

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for ``device`` (created with ``seed`` on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def reset(self) -> None:
        """Restart every generator from ``seed`` (the next draws repeat the first ones)."""
        self._generators.clear()

    def draw(
        self, device: torch.device, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The condition's arguments on one minibatch."""
        out = self.sample(self.generator(device), *args, **kwargs)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], tuple) and isinstance(out[1], dict):
            return out[0], out[1]
        if isinstance(out, tuple):
            return out, kwargs
        if isinstance(out, list):
            return tuple(out), kwargs
        # a single argument returned bare
        return (out,), kwargs
