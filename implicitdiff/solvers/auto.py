"""The default solver: a dense factorization for small systems, a Krylov method for the others."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..diagnostics import SolveStatus
from .base import LinearProblem, LinearSolver, RawSolution
from .cg import CG
from .direct import Direct, materialize
from .gmres import GMRES

__all__ = ["Auto"]

#: Default size bound of the dense path (see :class:`Auto`).
DENSE_MAX_SIZE = 256
#: Default memory bound of the dense path: the matrix and its factor, in bytes.
DENSE_MAX_BYTES = 64 * 2**20


@dataclasses.dataclass
class _Factorization:
    """A factorized operator and the fingerprint that tells whether a new operator is the same one."""

    probe: torch.Tensor
    probe_image: torch.Tensor
    kind: str  # "cholesky" or "lu"
    factor: torch.Tensor
    pivots: torch.Tensor | None

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        if self.kind == "cholesky":
            return torch.cholesky_solve(b.unsqueeze(-1), self.factor).squeeze(-1)
        assert self.pivots is not None
        return torch.linalg.lu_solve(self.factor, self.pivots, b.unsqueeze(-1)).squeeze(-1)


class Auto(LinearSolver):
    r"""Dense factorization when the system is small, an iterative solver otherwise (the default).

    For a system of size :math:`n \le` ``max_size`` whose matrix takes at most ``max_bytes``
    (:math:`2 n^2` times the element size: the matrix and its factor), the operator is
    materialized with one batched product (``torch.func.vmap`` over the unit vectors, or one
    batched backward pass of the implicit function's graph) and factorized: by Cholesky when
    it is symmetric to rounding (:math:`\|A - A^\top\|_{\max} \le 10^3\,\varepsilon\,\|A\|_{\max}`)
    and positive definite, else by LU with partial pivoting. The answer is exact to
    :math:`\kappa(A)\,\varepsilon`, whatever the conditioning that would slow a Krylov
    method down, and for small :math:`n` the batched materialization costs about as much as a
    few separate products (logistic regression with :math:`n = 30` features: see the
    benchmarks page). When the factorization reports trouble (a pivot below
    :math:`n\varepsilon` times the largest: singular to working precision, or non-finite
    entries), the system goes to the iterative solver instead, whose status is then
    reported.

    **Reuse.** The factorization is kept with a fingerprint of the operator (its product
    with one fixed random vector). The next solve computes that one product; if it matches to
    rounding (the same operator: the same solution and hyperparameters, as with several
    backward calls through one solution, e.g. a Jacobian by reverse mode row by row) the
    factorization is reused and the solve costs two triangular solves.

    Larger systems go to ``iterative``: by default :class:`~implicitdiff.CG` when the
    operator is known to be symmetric (``implicit_diff`` tells it so for an objective, a
    Hessian), else :class:`~implicitdiff.GMRES`. Under ``torch.func.vmap`` the dense path
    factorizes by LU (no data-dependent choice is possible there) and does not cache.

    Parameters
    ----------
    max_size : int
        Largest :math:`n` for the dense path (default 256). ``0`` always iterates.
    max_bytes : int
        Largest memory for the matrix and its factor (default 64 MiB).
    iterative : LinearSolver, optional
        The solver for larger systems and for factorization failures. When given, its
        ``tol``, ``atol``, ``maxiter``, ``damping``, ``preconditioner`` and ``on_failure``
        are the ones used (the options of the same names passed to ``Auto`` are ignored).
    symmetric : bool, optional
        Whether the operator is symmetric, for the choice of the default ``iterative``
        solver (``implicit_diff`` fills it in from the condition when left as None).
    tol, atol, maxiter, on_failure
        Options of the default ``iterative`` solver (see :class:`~implicitdiff.LinearSolver`).
    cache : bool
        Keep the last factorization for reuse (see above).

    Examples
    --------
    >>> import torch, implicitdiff as idiff
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> solver = idiff.Auto()
    >>> sol = idiff.linear_solve(lambda v: A @ v, torch.ones(2, dtype=torch.float64), solver=solver)
    >>> sol.value, solver.last_path
    (tensor([0.1818, 0.2727], dtype=torch.float64), 'cholesky')
    """

    checks_true_residual = True  # the dense answer is checked like any other (never trusted blindly)

    def __init__(
        self,
        *,
        max_size: int = DENSE_MAX_SIZE,
        max_bytes: int = DENSE_MAX_BYTES,
        iterative: LinearSolver | None = None,
        symmetric: bool | None = None,
        tol: float | None = 1e-6,
        atol: float = 0.0,
        maxiter: int | None = None,
        damping: float = 0.0,
        on_failure: Any = "warn",
        cache: bool = True,
    ) -> None:
        super().__init__(tol=tol, atol=atol, maxiter=maxiter, damping=damping, on_failure=on_failure)
        if not isinstance(max_size, int) or max_size < 0:
            raise ValueError(f"max_size must be a non-negative int, got {max_size!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        if iterative is not None and not isinstance(iterative, LinearSolver):
            raise TypeError(f"iterative must be a LinearSolver instance, got {type(iterative).__name__}")
        if iterative is not None:
            # the caller's solve reads these from the solver it is given (Auto): take the iterative
            # solver's own, or its tolerance, budget, damping, preconditioner and policy would be ignored
            self.tol, self.atol, self.maxiter = iterative.tol, iterative.atol, iterative.maxiter
            self.damping, self.preconditioner = iterative.damping, iterative.preconditioner
            self.on_failure = iterative.on_failure
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.symmetric = symmetric
        self.cache = cache
        self._iterative = iterative
        self._factorization: _Factorization | None = None
        #: The last solve's path: "cholesky", "lu", "cached cholesky", "cached lu" or the iterative solver's name.
        self.last_path: str = ""

    @property
    def iterative(self) -> LinearSolver:
        """The solver used for large systems (built from the options when not given)."""
        if self._iterative is None:
            kind = CG if self.symmetric else GMRES
            self._iterative = kind(tol=self.tol, atol=self.atol, maxiter=self.maxiter, on_failure=self.on_failure)
        return self._iterative

    def with_symmetry(self, symmetric: bool) -> Auto:
        """This solver, told whether the operator is symmetric (a copy when it changes the choice)."""
        if self.symmetric is not None or self._iterative is not None:
            return self
        other = Auto(max_size=self.max_size, max_bytes=self.max_bytes, symmetric=symmetric, tol=self.tol,
                     atol=self.atol, maxiter=self.maxiter, damping=self.damping, on_failure=self.on_failure,
                     cache=self.cache)
        return other

    def dense(self, n: int, dtype: torch.dtype) -> bool:
        """Whether a system of size ``n`` takes the dense path."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 0 < n <= self.max_size and 2 * n * n * itemsize <= self.max_bytes

    def default_maxiter(self, n: int) -> int:
        return self.iterative.default_maxiter(n)

    def solve(self, problem: LinearProblem) -> RawSolution:
        b = problem.b
        n = b.shape[-1]
        if not self.dense(n, b.dtype):
            return self._iterate(problem)
        if not problem.eager:  # under vmap: LU, no data-dependent choice, no cache
            self.last_path = "lu"
            return Direct().solve(problem)
        cached = self._cached(problem)
        if cached is not None:
            self.last_path = f"cached {cached.kind}"
            return RawSolution(cached.solve(b), SolveStatus.CONVERGED, 1, None)
        matrix = materialize(problem)
        factorization = self._factorize(matrix)
        if factorization is None:  # singular to working precision or not finite: let a Krylov method try
            return self._iterate(problem)
        if self.cache:
            probe = torch.randn(n, generator=torch.Generator(device="cpu").manual_seed(n), dtype=b.dtype).to(b.device)
            factorization.probe, factorization.probe_image = probe, matrix @ probe
            self._factorization = factorization
        self.last_path = factorization.kind
        return RawSolution(factorization.solve(b), SolveStatus.CONVERGED, 1, None)

    def _iterate(self, problem: LinearProblem) -> RawSolution:
        solver = self.iterative
        self.last_path = solver.name
        return solver.solve(problem)

    def _cached(self, problem: LinearProblem) -> _Factorization | None:
        f = self._factorization
        if not self.cache or f is None:
            return None
        b = problem.b
        if f.probe.shape != b.shape or f.probe.dtype != b.dtype or f.probe.device != b.device:
            return None
        image = problem.matvec(f.probe)
        eps = torch.finfo(b.dtype).eps
        if bool((image - f.probe_image).abs().max() <= 10 * eps * f.probe_image.abs().max()):
            return f
        return None

    def _factorize(self, matrix: torch.Tensor) -> _Factorization | None:
        if not bool(torch.isfinite(matrix).all()):
            return None
        n = matrix.shape[-1]
        eps = torch.finfo(matrix.dtype).eps
        scale = matrix.abs().max()
        empty = torch.empty(0)
        if bool((matrix - matrix.T).abs().max() <= 1e3 * eps * scale):
            factor, info = torch.linalg.cholesky_ex((matrix + matrix.T) / 2)
            diag = factor.diagonal()
            # a pivot tiny against the largest: positive definite in name only (kappa ~ 1/eps)
            if int(info) == 0 and bool(diag.min() ** 2 > n * eps * diag.max() ** 2):
                return _Factorization(empty, empty, "cholesky", factor, None)
        lu, pivots, info = torch.linalg.lu_factor_ex(matrix)
        pivot_sizes = lu.diagonal().abs()
        if int(info) != 0 or bool(pivot_sizes.min() <= n * eps * pivot_sizes.max()):
            return None
        return _Factorization(empty, empty, "lu", lu, pivots)

    def reset(self) -> None:
        """Forget the cached factorization."""
        self._factorization = None

    def __repr__(self) -> str:
        return (f"Auto(max_size={self.max_size}, max_bytes={self.max_bytes}, "
                f"iterative={self._iterative or ('CG' if self.symmetric else 'GMRES')!r})")
