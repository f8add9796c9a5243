"""Diagnostics of linear solves and of inner solutions: status codes, info records, logging.

Silent wrong gradients are the first complaint of users of every implicit-differentiation
library (a backward CG that fails and returns its zero initial guess; a hypergradient taken
at an inner point that had not converged). Every solve in implicitdiff therefore produces a
:class:`SolveInfo`, applies the user's failure policy to it, and appends it to the active
:func:`record_solves` logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
import warnings
from typing import Iterator, Literal

from .errors import LinearSolveError, LinearSolveWarning, NonFiniteError

__all__ = ["SolveStatus", "SolveInfo", "record_solves", "FailurePolicy"]

FailurePolicy = Literal["warn", "raise", "ignore"]
_POLICIES = ("warn", "raise", "ignore")


class SolveStatus(enum.IntEnum):
    """Outcome of an iterative linear solve.

    ``CONVERGED`` and ``BUDGET_USED`` are successes (``BUDGET_USED``: the solver was asked
    for a fixed number of iterations with ``tol=None``, as iMAML's 5 CG steps, and ran them).
    The others are failures, handled by the solver's ``on_failure`` policy, except
    ``NONFINITE`` which always raises :class:`~implicitdiff.NonFiniteError`.
    """

    CONVERGED = 0
    BUDGET_USED = 1
    MAX_ITERATIONS = 2
    NEGATIVE_CURVATURE = 3
    BREAKDOWN = 4
    NONFINITE = 5
    DIVERGED = 6
    LEAST_SQUARES = 7
    STAGNATED = 8

    @property
    def ok(self) -> bool:
        """Whether this status is a success."""
        return self in (SolveStatus.CONVERGED, SolveStatus.BUDGET_USED)


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of one solve.

    Attributes
    ----------
    solver : str
        Name of the solver (``"CG"``, ``"GMRES"``, ...), or ``"optimality"`` for an inner-solution check.
    kind : str
        ``"linear_solve"`` (a direct call of :func:`~implicitdiff.linear_solve`), ``"backward"``
        (reverse-mode hypergradient), ``"forward"`` (forward-mode tangent) or ``"optimality"``.
    status : SolveStatus or None
        Outcome. For a batch of solves run under ``torch.func.vmap``, the worst status of
        the batch. None only for records made without a status.
    iterations : int or None
        Iterations (matrix-vector products with the operator, roughly) performed.
    residual_norm : float or None
        Final ``||b - A x||`` in the units of the original right-hand side.
    relative_residual : float or None
        ``residual_norm / ||b||`` (0 for a zero right-hand side).
    function : str
        Name of the decorated inner solver for implicit solves, else ``""``.
    message : str
        Human-readable detail.
    batch_size : int
        Number of solves this record summarizes (more than 1 under ``torch.func.vmap``).
    batch_failures : int or None
        How many of them were not successful; None for a single solve (see :attr:`num_failed`).
    stochastic : bool
        The products were taken on minibatches (:class:`~implicitdiff.Minibatch`): the residual
        is that of a minibatch operator, an estimate, not the full system's.
    """

    solver: str
    kind: str
    status: SolveStatus | None
    iterations: int | None
    residual_norm: float | None
    relative_residual: float | None
    function: str = ""
    message: str = ""
    batch_size: int = 1
    batch_failures: int | None = None
    stochastic: bool = False

    @property
    def num_failed(self) -> int:
        """Number of unsuccessful solves summarized by this record (0 or 1 for a single solve)."""
        if self.batch_failures is not None:
            return self.batch_failures
        return 0 if self.status is None or self.status.ok else 1

    @property
    def converged(self) -> bool | None:
        """True when the status is a success; None when unknown (under vmap)."""
        return None if self.status is None else self.status.ok

    def describe(self) -> str:
        """One line summarizing the solve, used in warnings and errors."""
        where = f" in the {self.kind} solve of {self.function!r}" if self.function else f" ({self.kind})"
        if self.status is None:
            return f"{self.solver}{where}: no status recorded"
        rel = "n/a" if self.relative_residual is None else f"{self.relative_residual:.3e}"
        steps = "" if self.iterations is None else f" after {self.iterations} iterations"
        msg = f"{self.solver}{where}: status {self.status.name}{steps}, relative residual {rel}"
        return msg + (f" ({self.message})" if self.message else "")


_local = threading.local()


def _active_logs() -> list[list[SolveInfo]]:
    if not hasattr(_local, "logs"):
        _local.logs = []
    return _local.logs


@contextlib.contextmanager
def record_solves() -> Iterator[list[SolveInfo]]:
    """Collect the :class:`SolveInfo` of every solve run inside the block.

    Covers direct :func:`~implicitdiff.linear_solve` calls, the backward (and forward-mode)
    solves of :func:`~implicitdiff.implicit_diff` functions and their optional inner-optimality
    checks. Blocks nest; each sees the solves run inside it (on this thread).

    Yields
    ------
    list of SolveInfo
        Filled as solves run.

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    >>> with idiff.record_solves() as log:
    ...     _ = idiff.linear_solve(lambda v: A @ v, torch.ones(2), solver=idiff.CG(tol=1e-8))
    >>> log[0].solver, log[0].converged
    ('CG', True)
    """
    log: list[SolveInfo] = []
    logs = _active_logs()
    logs.append(log)
    try:
        yield log
    finally:
        logs.remove(log)


def report(info: SolveInfo, policy: FailurePolicy) -> None:
    """Log ``info`` and apply the failure policy (private)."""
    for log in _active_logs():
        log.append(info)
    if info.status is None:
        return
    if info.status == SolveStatus.NONFINITE:
        raise NonFiniteError(
            info.describe()
            + ". Non-finite values entered the solve: check the right-hand side (the outer loss's gradient) "
            "and the operator (the optimality condition evaluated at the inner solution).",
            info,
        )
    if info.status.ok or policy == "ignore":
        return
    hint = {
        SolveStatus.MAX_ITERATIONS: "raise maxiter, loosen tol, add damping or a preconditioner; "
        "pass tol=None if a fixed iteration budget is intended",
        SolveStatus.NEGATIVE_CURVATURE: "the operator is not positive definite (indefinite, or singular along "
        "the search direction): use MINRES or GMRES, or add damping (Levenberg-Marquardt style)",
        SolveStatus.BREAKDOWN: "the Krylov method broke down: try GMRES, damping, or Direct for small problems",
        SolveStatus.DIVERGED: "the iteration diverges (its residual grew); for Neumann the series diverges: "
        "step_size must be below 2 / lambda_max of the operator (for an objective, the largest Hessian "
        "eigenvalue), or use CG / GMRES; raising maxiter makes it worse",
        SolveStatus.LEAST_SQUARES: "the operator is singular and the right-hand side is not in its range, so no "
        "solution exists; the result is a least-squares solution. Add damping for a regularized solution, or "
        "check that the inner problem has an isolated (strict) solution",
        SolveStatus.STAGNATED: "the residual stopped decreasing before meeting the tolerance: if the solver's own "
        "estimate met it, the tolerance is below the accuracy attainable in this dtype for this operator (loosen "
        "tol or work in float64); for restarted GMRES raise restart",
    }.get(info.status, "")
    text = info.describe() + (f"; {hint}" if hint else "")
    if policy == "raise":
        raise LinearSolveError(text, info)
    warnings.warn(text, LinearSolveWarning, stacklevel=3)


def check_policy(policy: str) -> FailurePolicy:
    """Validate a failure-policy string (private)."""
    if policy not in _POLICIES:
        raise ValueError(f"on_failure must be one of {_POLICIES}, got {policy!r}")
    return policy  # type: ignore[return-value]
