"""Inner solvers of the meta-learning problem: adapt parameters to one task's support set.

The inner problem of iMAML is the proximal one

    min_phi  G(phi) = L_train(phi) + lam / 2 * ||phi - theta||^2,

and MAML's is the same with ``lam = 0`` started at ``theta`` with a fixed step budget.
Parameters are dicts ``{name: tensor}`` (as produced by ``dict(model.named_parameters())``)
and the loss is used functionally, ``loss_fn(params, x, y) -> scalar``.

Two solvers:

* :class:`GradientDescent` -- K steps of gradient descent (iMAML-GD, MAML), or, with ``tol``,
  gradient descent until the gradient norm has dropped by ``tol`` relative to its start.
* :class:`NewtonCG` -- a Hessian-free Newton method (iMAML-HF): each step solves
  ``(H + lam I) d = -grad G`` with a few CG iterations on Hessian-vector products
  (:func:`implicitdiff.linear_solve` with :class:`implicitdiff.CG`) and takes a backtracking
  (Armijo) line search along ``d``.

Both are plain solvers: they know nothing about meta-gradients. The meta-gradient comes
from wrapping them with :func:`implicitdiff.implicit_diff` (see :mod:`.algorithms`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import implicitdiff as idiff

__all__ = ["Params", "LossFn", "GradientDescent", "NewtonCG", "InnerSolver", "proximal_objective"]

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]


def _sq_dist(a: Params, b: Params) -> torch.Tensor:
    return sum(((a[k] - b[k]) ** 2).sum() for k in a)


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _norm(a: Params) -> torch.Tensor:
    return torch.sqrt(_dot(a, a))


def proximal_objective(
    loss_fn: LossFn, lam: float
) -> Callable[[Params, Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``G(phi, theta, x, y) = loss_fn(phi, x, y) + lam / 2 * ||phi - theta||^2``.

    Examples
    --------
    >>> import torch
    >>> G = proximal_objective(lambda p, x, y: ((p["w"] * x - y) ** 2).mean(), lam=2.0)
    >>> float(G({"w": torch.tensor(1.0)}, {"w": torch.tensor(0.0)}, torch.ones(3), torch.ones(3)))
    1.0
    """

    def objective(phi: Params, theta: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = loss_fn(phi, x, y)
        if lam:
            value = value + 0.5 * lam * _sq_dist(phi, theta)
        return value

    return objective


@dataclasses.dataclass(frozen=True)
class GradientDescent:
    """Gradient descent on the proximal inner objective.

    Parameters
    ----------
    lr : float
        Step size.
    steps : int
        Number of steps; with ``tol`` set, the maximum number of steps.
    tol : float or None
        If set, stop as soon as ``||grad G(phi)|| <= tol * ||grad G(init)||`` ("GD to a
        tolerance"). This needs the values, so it cannot run under ``torch.func.vmap``.

    Examples
    --------
    >>> import torch
    >>> loss = lambda p, x, y: ((p["w"] - y) ** 2).sum()
    >>> gd = GradientDescent(lr=0.1, steps=200)
    >>> phi = gd.solve(loss, {"w": torch.zeros(())}, {"w": torch.zeros(())}, 2.0, torch.zeros(()), torch.ones(()))
    >>> round(float(phi["w"]), 4)  # argmin of (w-1)^2 + (w-0)^2
    0.5
    """

    lr: float = 0.1
    steps: int = 16
    tol: float | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"inner learning rate must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"inner steps must be >= 1, got {self.steps}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"inner tolerance must be > 0, got {self.tol}")

    @property
    def vmappable(self) -> bool:
        """Whether the solver is written in plain tensor ops without value-dependent control flow."""
        return self.tol is None

    def solve(
        self, loss_fn: LossFn, init: Params, theta: Params, lam: float, x: torch.Tensor, y: torch.Tensor
    ) -> Params:
        """Run gradient descent from ``init``; differentiable as written (autograd can unroll it)."""
        grad_fn = torch.func.grad(proximal_objective(loss_fn, lam))
        phi = dict(init)
        start_norm = None
        for _ in range(self.steps):
            g = grad_fn(phi, theta, x, y)
            if self.tol is not None:
                g_norm = float(_norm(g))
                if start_norm is None:
                    start_norm = g_norm
                if g_norm <= self.tol * start_norm:
                    break
            phi = {k: phi[k] - self.lr * g[k] for k in phi}
        return phi


@dataclasses.dataclass(frozen=True)
class NewtonCG:
    """Hessian-free Newton-CG with a backtracking line search (the paper's iMAML-HF inner solver).

    Each step solves ``(H + lam I) d = -grad G`` approximately with ``cg_steps`` CG iterations
    on Hessian-vector products (reverse-over-reverse), then backtracks ``t <- t * shrink`` from
    ``t = 1`` until the Armijo condition ``G(phi + t d) <= G(phi) + c t <grad G, d>`` holds.
    The network's Hessian can be indefinite: where CG meets negative curvature the system is
    damped Levenberg-Marquardt style, ``(H + (lam + mu) I) d = -grad G`` with ``mu`` raised
    (and lowered again after full Newton steps); a direction that is still not a descent
    direction is replaced by the negative gradient.

    Parameters
    ----------
    steps : int
        Maximum number of Newton steps.
    cg_steps : int
        CG iterations per Newton step (a fixed budget).
    tol : float or None
        Stop when ``||grad G(phi)|| <= tol * ||grad G(init)||``.
    shrink, armijo : float
        Line-search shrink factor and sufficient-decrease constant.
    max_backtracks : int
        Line-search budget; the smallest step is taken when it is exhausted.
    max_damping_increases : int
        How many times per Newton step the damping may be raised after negative curvature.

    Examples
    --------
    >>> import torch
    >>> loss = lambda p, x, y: ((p["w"] - y) ** 2).sum()
    >>> hf = NewtonCG(steps=3, cg_steps=2)
    >>> phi = hf.solve(loss, {"w": torch.zeros(2)}, {"w": torch.zeros(2)}, 2.0, None, torch.ones(2))
    >>> [round(v, 4) for v in phi["w"].tolist()]  # one Newton step solves a quadratic
    [0.5, 0.5]
    """

    steps: int = 10
    cg_steps: int = 5
    tol: float | None = 1e-3
    shrink: float = 0.5
    armijo: float = 1e-4
    max_backtracks: int = 20
    max_damping_increases: int = 3

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Newton steps must be >= 1, got {self.steps}")
        if self.cg_steps < 1:
            raise ValueError(f"CG steps per Newton step must be >= 1, got {self.cg_steps}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"inner tolerance must be > 0, got {self.tol}")
        if not 0 < self.shrink < 1:
            raise ValueError(f"line-search shrink factor must lie in (0, 1), got {self.shrink}")

    @property
    def vmappable(self) -> bool:
        """Newton-CG's line search branches on values: never run under vmap."""
        return False

    def solve(
        self, loss_fn: LossFn, init: Params, theta: Params, lam: float, x: torch.Tensor, y: torch.Tensor
    ) -> Params:
        """Run Newton-CG from ``init`` (meant to run without autograd; differentiate it implicitly)."""
        objective = proximal_objective(loss_fn, lam)
        grad_fn = torch.func.grad(objective)
        phi = {k: v.detach() for k, v in init.items()}
        start_norm = None
        mu = 0.0  # Levenberg-Marquardt damping, raised where the curvature is negative
        for _ in range(self.steps):
            g = grad_fn(phi, theta, x, y)
            g_norm = float(_norm(g))
            if start_norm is None:
                start_norm = g_norm
            if g_norm == 0.0 or (self.tol is not None and g_norm <= self.tol * start_norm):
                break

            # (H + lam I) v as a vector-Jacobian product of the proximal gradient (the Hessian is
            # symmetric); reverse-over-reverse, linearized once per Newton step.
            _, vjp_fn = torch.func.vjp(lambda p: grad_fn(p, theta, x, y), phi)

            def hvp(v: Params, vjp_fn=vjp_fn) -> Params:
                return vjp_fn(v)[0]

            neg_g = {k: -v for k, v in g.items()}
            for _ in range(self.max_damping_increases + 1):
                # Negative curvature is handled here (more damping), so the CG never warns.
                cg = idiff.CG(maxiter=self.cg_steps, tol=None, damping=mu, on_failure="ignore")
                sol = idiff.linear_solve(hvp, neg_g, solver=cg)
                if sol.info.status != idiff.SolveStatus.NEGATIVE_CURVATURE:
                    break
                mu = max(4.0 * mu, lam, 1e-3 * g_norm)
            direction = sol.value
            slope = float(_dot(g, direction))
            if not slope < 0:  # still not a descent direction: fall back to the gradient
                direction, slope = neg_g, -(g_norm**2)
            value = float(objective(phi, theta, x, y))
            t = 1.0
            for _ in range(self.max_backtracks):
                trial = {k: phi[k] + t * direction[k] for k in phi}
                if float(objective(trial, theta, x, y)) <= value + self.armijo * t * slope:
                    break
                t *= self.shrink
            phi = trial
            # Trust the quadratic model more after a full step, less after a backtracked one.
            mu = mu / 4.0 if t == 1.0 else max(2.0 * mu, lam)
        return phi


InnerSolver = GradientDescent | NewtonCG
