"""Exceptions and warnings raised by implicitdiff.

Every failure mode that can make a hypergradient silently wrong has its own class, so
that users can filter or escalate exactly the one they care about, for example::

    import warnings, implicitdiff as idiff
    warnings.simplefilter("error", idiff.InnerOptimalityWarning)
"""

from __future__ import annotations

__all__ = [
    "ImplicitDiffError",
    "LinearSolveError",
    "NonFiniteError",
    "LinearSolveWarning",
    "InnerOptimalityWarning",
]


class ImplicitDiffError(ValueError):
    """Bad input to implicitdiff: wrong structure, shape, dtype, device or configuration.

    A subclass of :class:`ValueError`, so ``except ValueError`` also catches it.
    """


class LinearSolveError(RuntimeError):
    """A linear solve failed and the solver's failure policy is ``"raise"``.

    Attributes
    ----------
    info : SolveInfo
        The diagnostics of the failed solve (iterations, residual, status).
    """

    def __init__(self, message: str, info: object | None = None) -> None:
        super().__init__(message)
        self.info = info


class NonFiniteError(LinearSolveError):
    """A linear solve met NaN or infinity (in its right-hand side or its operator).

    Raised whatever the failure policy: a non-finite gradient is never useful.
    """


class LinearSolveWarning(RuntimeWarning):
    """A linear solve did not reach its tolerance (failure policy ``"warn"``)."""


class InnerOptimalityWarning(RuntimeWarning):
    """The inner solution does not satisfy its optimality condition to the requested tolerance.

    The implicit function theorem is then applied at a point where it does not hold, and
    the hypergradient can be far from the true one.
    """
