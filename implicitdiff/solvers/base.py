"""The abstract linear solver and the flat problem it is handed.

Every solver in implicitdiff solves ``(A + damping * I) x = b`` for a linear operator ``A``
known only through matrix-vector products. Solvers see *flat* 1-D vectors: pytrees are
raveled by :func:`implicitdiff.linear_solve` before and unraveled after, and the right-hand
side is scaled to unit max-norm first so that tiny cotangents (1e-30 in float32) neither
underflow nor stall the tolerance test.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, NamedTuple

import torch

from .._functorch import any_true
from ..diagnostics import FailurePolicy, SolveStatus, check_policy
from ..preconditioners import OperatorPreconditioner

__all__ = ["LinearSolver", "LinearProblem", "RawSolution"]

Vector = torch.Tensor
MatVec = Callable[[Vector], Vector]


@dataclasses.dataclass
class LinearProblem:
    """A linear system in flat form, as a :class:`LinearSolver` receives it.

    Attributes
    ----------
    matvec : callable
        ``v -> (A + damping I) v`` on flat vectors (damping already included).
    b : torch.Tensor
        Right-hand side, flat, scaled to max-norm 1.
    x0 : torch.Tensor
        Initial guess (zeros unless warm-started), flat, in the same scaling.
    abs_tol : float or torch.Tensor
        Stop when the residual 2-norm ``||b - A x||`` is at or below this.
    maxiter : int
        Iteration budget.
    fixed_budget : bool
        True when the user asked for exactly ``maxiter`` iterations (``tol=None``); running
        out is then :attr:`SolveStatus.BUDGET_USED`, a success.
    eager : bool
        Python control flow on tensor values (``if residual < tol``) is allowed. False under
        ``torch.func.vmap``: solvers must then run ``maxiter`` masked iterations.
    differentiable : bool
        The caller will differentiate through the solver's iterations: keep scalars as
        tensors. implicitdiff itself always passes False (derivatives of solves follow the
        adjoint rule, never the iterations); the field stays for solvers used elsewhere.
    preconditioner : callable or None
        ``v -> M v`` with ``M`` approximating ``(A + damping I)^{-1}``.
    matmat : callable or None
        ``V -> V (A + damping I)^T`` for a matrix ``V`` whose rows are vectors: many products in
        one batched call, when the caller can offer it (the plain ``.backward()`` of an implicit
        function). Dense solvers use it to form ``A`` with one call instead of ``n``.
    """

    matvec: MatVec
    b: Vector
    x0: Vector
    abs_tol: float | torch.Tensor
    maxiter: int
    fixed_budget: bool
    eager: bool
    differentiable: bool
    preconditioner: MatVec | None = None
    matmat: MatVec | None = None
    _rmatvec: MatVec | None = None
    _rmatvec_factory: Callable[[], MatVec] | None = None

    @property
    def rmatvec(self) -> MatVec:
        """``v -> (A + damping I)^T v``, derived by a vector-Jacobian product if not given."""
        if self._rmatvec is None:
            if self._rmatvec_factory is None:
                _, vjp_fn = torch.func.vjp(self.matvec, torch.zeros_like(self.b))  # type: ignore[misc]  # typed as a 2- or 3-tuple
                self._rmatvec = lambda u: vjp_fn(u)[0]
            else:
                self._rmatvec = self._rmatvec_factory()
        return self._rmatvec

    def keep_going(self, active: torch.Tensor) -> bool:
        """Whether any problem is still active: the loop test of a masked iterative solver.

        Works under vmap too (it looks through the batching), so a batch of solves stops as
        soon as all of them are done.
        """
        return any_true(active)

    def precondition(self, v: Vector) -> Vector:
        return v if self.preconditioner is None else self.preconditioner(v)


class RawSolution(NamedTuple):
    """What :meth:`LinearSolver.solve` returns.

    ``status`` and ``iterations`` are Python values when the problem is eager, else 0-d tensors.
    ``residual_norm`` may be None, in which case it is computed with one extra product.
    """

    x: Vector
    status: SolveStatus | torch.Tensor
    iterations: int | torch.Tensor
    residual_norm: torch.Tensor | float | None = None


class LinearSolver(abc.ABC):
    """Base class of the matrix-free linear solvers.

    Subclasses implement :meth:`solve` on a :class:`LinearProblem`. The common options are
    handled here.

    Parameters
    ----------
    tol : float or None
        Relative tolerance: stop when ``||b - A x|| <= max(tol * ||b||, atol)``. ``None`` asks
        for a fixed budget of exactly ``maxiter`` iterations (a deliberate choice, as iMAML's
        5 CG steps: reported as ``BUDGET_USED`` and never warned about).
    atol : float
        Absolute tolerance, in the units of the original right-hand side.
    maxiter : int or None
        Iteration budget; default ``min(10 * n, 10_000)`` for a system of size ``n``.
    damping : float
        Solve ``(A + damping I) x = b`` instead: the Levenberg-Marquardt / Tikhonov remedy
        for singular or indefinite operators (e.g. the Hessian of a non-convex inner problem).
    preconditioner : callable, NystromPreconditioner or None
        Maps a pytree shaped like ``b`` to an approximation of ``(A + damping I)^{-1}`` applied
        to it. For CG and MINRES it must be symmetric positive definite. A
        :class:`~implicitdiff.NystromPreconditioner` is built from the operator of each solve
        instead (and reused while the operator does not change).
    on_failure : {"warn", "raise", "ignore"}
        What to do when the solve does not succeed (max iterations reached with ``tol`` set,
        negative curvature, breakdown). Applies in the backward pass too: ``"raise"`` makes
        ``loss.backward()`` raise :class:`~implicitdiff.LinearSolveError`. Non-finite values
        always raise :class:`~implicitdiff.NonFiniteError`.

    Examples
    --------
    A user-defined solver, the preconditioned Richardson iteration ``x <- x + omega M (b - A x)``,
    vmap-safe: one ``active`` flag per problem, masked updates, ``problem.keep_going`` as the loop
    test, tensor status and iteration count (Python values only when ``problem.eager``).

    >>> import torch, implicitdiff as idiff
    >>> class Richardson(idiff.LinearSolver):
    ...     def __init__(self, omega=1.0, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.omega = omega
    ...     def solve(self, problem):
    ...         x = problem.x0
    ...         r = problem.b - problem.matvec(x)
    ...         rnorm = torch.linalg.vector_norm(r)
    ...         active = rnorm > problem.abs_tol  # one flag per problem under vmap
    ...         iterations = torch.zeros((), dtype=torch.int64, device=x.device)
    ...         for _ in range(problem.maxiter):
    ...             if not problem.keep_going(active):  # every problem of the batch is done
    ...                 break
    ...             x = torch.where(active, x + self.omega * problem.precondition(r), x)
    ...             r = torch.where(active, problem.b - problem.matvec(x), r)
    ...             rnorm = torch.linalg.vector_norm(r)
    ...             iterations = iterations + active.long()
    ...             active = active & (rnorm > problem.abs_tol)
    ...         S = idiff.SolveStatus
    ...         failed = S.BUDGET_USED if problem.fixed_budget else S.MAX_ITERATIONS
    ...         status = torch.where(rnorm <= problem.abs_tol, int(S.CONVERGED), int(failed))
    ...         status = torch.where(torch.isfinite(rnorm), status, int(S.NONFINITE))
    ...         if problem.eager:  # outside vmap: Python values
    ...             status, iterations = S(int(status)), int(iterations)
    ...         return idiff.RawSolution(x, status, iterations, rnorm)
    >>> A = torch.tensor([[1.0, 0.2], [0.2, 10.0]], dtype=torch.float64)
    >>> jacobi = Richardson(tol=1e-10, preconditioner=lambda v: v / A.diagonal())
    >>> B = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    >>> with idiff.record_solves() as log:  # three systems at once
    ...     X = torch.func.vmap(lambda b: idiff.linear_solve(lambda v: A @ v, b, solver=jacobi).value)(B)
    >>> log[-1].status.name, log[-1].batch_size, log[-1].num_failed
    ('CONVERGED', 3, 0)
    >>> torch.allclose(X, torch.linalg.solve(A, B.T).T)
    True
    """

    #: Whether the solver assumes a symmetric operator (the backward pass then uses ``A`` for ``A^T``).
    requires_symmetric: bool = False
    #: Whether ``CONVERGED`` is confirmed on the true residual after the solve (not for factorizations).
    checks_true_residual: bool = True
    #: Whether the solver stays sound when every product sees another (random) operator with the
    #: right expectation: true for stationary iterations (Neumann), false for Krylov methods.
    accepts_stochastic_operator: bool = False

    def __init__(
        self,
        *,
        tol: float | None = 1e-6,
        atol: float = 0.0,
        maxiter: int | None = None,
        damping: float = 0.0,
        preconditioner: Callable[[Any], Any] | OperatorPreconditioner | None = None,
        on_failure: FailurePolicy = "warn",
    ) -> None:
        if tol is not None and not tol >= 0:
            raise ValueError(f"tol must be >= 0 or None (a fixed budget), got {tol!r}")
        if tol is None and maxiter is None:
            raise ValueError("tol=None asks for a fixed iteration budget: give maxiter too")
        if not atol >= 0:
            raise ValueError(f"atol must be >= 0, got {atol!r}")
        if maxiter is not None and (not isinstance(maxiter, int) or maxiter < 0):
            raise ValueError(f"maxiter must be a non-negative int or None, got {maxiter!r}")
        if not (isinstance(damping, (int, float)) and damping == damping):
            raise ValueError(f"damping must be a finite float, got {damping!r}")
        if preconditioner is not None and not (
            callable(preconditioner) or isinstance(preconditioner, OperatorPreconditioner)
        ):
            raise TypeError(
                "preconditioner must be callable or an implicitdiff.NystromPreconditioner, "
                f"got {type(preconditioner).__name__}"
            )
        self.tol = tol
        self.atol = float(atol)
        self.maxiter = maxiter
        self.damping = float(damping)
        self.preconditioner = preconditioner
        self.on_failure = check_policy(on_failure)

    @property
    def name(self) -> str:
        """Display name used in diagnostics."""
        return type(self).__name__

    def default_maxiter(self, n: int) -> int:
        """Budget used when ``maxiter`` is None, for a system of size ``n``."""
        return min(10 * max(n, 1), 10_000)

    @abc.abstractmethod
    def solve(self, problem: LinearProblem) -> RawSolution:
        """Solve ``problem`` and report the outcome.

        Implementations must honour ``problem.eager`` (no Python branching on tensor values
        when it is False) and return a :class:`RawSolution`.
        """

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and v is not None)
        return f"{self.name}({opts})"


class NeedsGraph(Exception):
    """Raised by a fast (Python-scalar) solver path that finds the operator requires grad (private)."""


def fast_path_ok(problem: LinearProblem) -> bool:
    """Whether a solver may use Python scalars: eager and nobody differentiates through it."""
    return problem.eager and not problem.differentiable


def check_no_graph(t: torch.Tensor) -> None:
    """Bail out of a fast path when a product carries a graph (the operator depends on tensors requiring grad)."""
    if t.requires_grad:
        raise NeedsGraph


def fast_or_masked(
    problem: LinearProblem,
    fast: Callable[[LinearProblem], RawSolution],
    masked: Callable[[LinearProblem], RawSolution],
) -> RawSolution:
    """Run ``fast`` (Python scalars) when allowed and the operator carries no graph, else ``masked``."""
    if fast_path_ok(problem):
        try:
            return fast(problem)
        except NeedsGraph:
            pass
    return masked(problem)


def dot(a: Vector, b: Vector) -> torch.Tensor:
    """Inner product of flat vectors (vmap-safe)."""
    return torch.dot(a, b)


def finalize_status(
    problem: LinearProblem, status: torch.Tensor, iterations: torch.Tensor
) -> tuple[SolveStatus | torch.Tensor, int | torch.Tensor]:
    """Convert tensor status/iterations to Python values when allowed."""
    if problem.eager:
        return SolveStatus(int(status)), int(iterations)
    return status, iterations


def running_status(problem: LinearProblem, like: torch.Tensor) -> torch.Tensor:
    """Initial status tensor: what is reported if the loop runs out."""
    code = SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.MAX_ITERATIONS
    return torch.full((), int(code), dtype=torch.int64, device=like.device)


def code(s: SolveStatus, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), int(s), dtype=torch.int64, device=like.device)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (keeps masked branches finite)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def solved_to_working_precision(
    rnorm: torch.Tensor | float, anorm: torch.Tensor | float, xnorm: torch.Tensor | float, bnorm: torch.Tensor | float,
    dtype: torch.dtype,
) -> torch.Tensor | bool:
    """Whether ``||b - A x|| <= 100 eps (||A|| ||x|| + ||b||)``: a backward-stable solution (private).

    A solver that detects a singular operator (a zero-curvature or null-space direction, an
    exhausted Krylov space) with a residual at this rounding floor has solved a consistent
    system as well as the dtype allows: that is not an inconsistent system (``LEAST_SQUARES``)
    or a breakdown, but a tolerance below the attainable accuracy (see :func:`floor_status`).
    """
    return rnorm <= 100.0 * torch.finfo(dtype).eps * (anorm * xnorm + bnorm)


def floor_status(problem: LinearProblem) -> SolveStatus:
    """Status of a solve stopped at the rounding floor above the tolerance (private).

    ``BUDGET_USED`` under a fixed budget (``tol=None`` asks only to stop at machine
    precision), else ``STAGNATED``.
    """
    return SolveStatus.BUDGET_USED if problem.fixed_budget else SolveStatus.STAGNATED
