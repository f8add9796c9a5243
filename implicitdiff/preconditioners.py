r"""Preconditioners built from the operator of each solve: :class:`NystromPreconditioner`.

A plain ``preconditioner=`` is a fixed function of the right-hand side. The preconditioners of
this module need the operator itself: :func:`~implicitdiff.linear_solve` and the backward
solves of :func:`~implicitdiff.implicit_diff` hand each one the flat operator the solver is
about to use (:meth:`OperatorPreconditioner.bind`), and the solver receives the returned map.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, Literal

import torch

from ._functorch import any_true, physical, under_vmap
from .errors import ImplicitDiffError

__all__ = ["OperatorPreconditioner", "NystromPreconditioner"]

Vector = torch.Tensor
MatVec = Callable[[Vector], Vector]

#: Probes per batched call when the sketch is taken by batched products: bounds the memory of a
#: vmapped product (one copy of the product's intermediates per probe)
_CHUNK = 32


class OperatorPreconditioner(abc.ABC):
    """A preconditioner built from the operator of each solve (the base of :class:`NystromPreconditioner`).

    Pass an instance as ``preconditioner=`` of a :class:`~implicitdiff.LinearSolver`. Before each
    solve, :meth:`bind` is called with the flat operator the solver will use and returns the
    flat map ``v -> M v`` that the solver applies.
    """

    @abc.abstractmethod
    def bind(self, matvec: MatVec, b: Vector, matmat: MatVec | None = None) -> MatVec:
        """The preconditioner of one solve, as a map on flat vectors.

        Parameters
        ----------
        matvec : callable
            ``v -> (A + damping I) v`` on flat 1-D vectors: the operator the solver will use,
            damping included, in the units of the solve (the right-hand side is scaled, the
            operator is not).
        b : torch.Tensor
            The flat (scaled) right-hand side: its size, dtype and device (batched under vmap).
        matmat : callable, optional
            ``V -> V (A + damping I)^T`` for a matrix ``V`` whose rows are vectors: many
            products in one call, when the caller can offer it (see
            :class:`~implicitdiff.LinearProblem`).

        Returns
        -------
        callable
            ``v -> M v`` on flat vectors, ``M`` approximating ``(A + damping I)^{-1}``.
        """


@dataclasses.dataclass
class _Factors:
    """What a build keeps: ``P^{-1} v = v + U (c * (U^T v))``, and how to recognize its operator."""

    U: torch.Tensor  # n x k, orthonormal columns
    c: torch.Tensor  # k weights minus one: (lambda_min + mu) / (lambda + mu) - 1, or 0 for a dropped direction
    key: tuple[int, torch.dtype, torch.device]  # size, dtype and device of the solve
    fingerprint: torch.Tensor | None  # A omega_1 at the build ("auto" only)


class NystromPreconditioner(OperatorPreconditioner):
    r"""Randomized Nyström preconditioner for symmetric positive (semi)definite operators.

    Builds a rank-``k`` approximation :math:`\hat A = U \hat\Lambda U^\top` of the operator
    from ``k`` products with random probes (Frangella, Tropp & Udell, *Randomized Nyström
    preconditioning*, SIAM J. Matrix Anal. Appl. 2023, Algorithm 2.1) and preconditions with

    .. math::

        P^{-1} = U \operatorname{diag}\!\Big(\frac{\hat\lambda_{\min} + \mu}{\hat\lambda_i + \mu}\Big) U^\top
                 + (I - U U^\top),

    their eq. (5.3), where :math:`\mu` is ``shift`` and :math:`\hat\lambda_{\min}` the
    smallest kept eigenvalue. The top of the spectrum is flattened onto
    :math:`\hat\lambda_{\min}+\mu`: the condition number goes from about
    :math:`(\lambda_1+\mu)/(\lambda_n+\mu)` to about :math:`(\lambda_{k+1}+\mu)/(\lambda_n+\mu)`,
    a large gain when a few large eigenvalues stand above a floor (a fast-decaying data term
    plus a ridge or an identity; Hataya & Yamada, *Nyström method for accurate and scalable
    implicit differentiation*, AISTATS 2023), little when the ill-conditioning comes from many
    small eigenvalues spread over decades (per-feature penalties: see the measurements in the
    guide to the solvers). Pass it as ``preconditioner=`` of :class:`~implicitdiff.CG` or
    :class:`~implicitdiff.MINRES` (also usable by the other solvers).

    Parameters
    ----------
    rank : int
        ``k``, the rank of the approximation: ``k`` products with the operator per build and
        ``k`` vectors kept. A rank at or above the system's size ``n`` is clamped to ``n``: the
        preconditioner is then the exact inverse up to a scalar (and rounding): CG converges
        in an iteration or two.
    shift : float
        :math:`\mu \ge 0`, the part of the operator known to be :math:`\mu I`: the sketch is
        taken of :math:`A_{\text{op}} - \mu I`, which must be positive semidefinite. For
        iMAML's :math:`I + H/\lambda` this is 1, for a ridge penalty :math:`\alpha\|w\|^2/2`
        it is :math:`\alpha`; with the solver's ``damping=δ`` on a positive semidefinite
        operator, add δ. Default 0: the whole operator is sketched.
    oversample : int
        Extra probes: the sketch uses ``rank + oversample`` of them (each one product) and the
        top ``rank`` eigenpairs are kept, which makes them more accurate (Tropp et al. 2017).
    rebuild : {"auto", "always", "never"}
        When to sketch again. ``"auto"``: at each solve the operator is applied to the first
        probe (one product) and the factors are reused when that product matches the one of the
        build to a relative ``1e-10`` (``64 eps`` in lower precision): the same operator, e.g.
        several backward calls at the same inner solution and hyperparameters; otherwise a new
        sketch is taken. ``"always"``: a sketch per solve. ``"never"``: one sketch, kept until
        :meth:`reset` (or a system of another size, dtype or device), for an operator that
        changes slowly across outer steps. A stale preconditioner only slows the solver down,
        it never changes the solution.
    seed : int
        Seed of the Gaussian probes (drawn on the CPU in float64 by NumPy, so the same on
        every device and inside ``vmap``).

    Attributes
    ----------
    builds : int
        Sketches taken so far.
    reuses : int
        Solves that reused the kept factors.
    products : int
        Products with the operator spent by the preconditioner: ``rank + oversample`` per
        sketch, and with ``rebuild="auto"`` one more per solve (the fingerprint ``A omega_1``).
    eigenvalues : torch.Tensor or None
        :math:`\hat\Lambda`, the ``rank`` eigenvalues of the last sketch outside ``vmap``
        (descending, in the solve's units, ``shift`` excluded).

    Raises
    ------
    ImplicitDiffError
        At a solve, when the sketched operator :math:`A_{\text{op}} - \mu I` is not symmetric
        positive semidefinite (the Cholesky factorization of :math:`\Omega^\top (A - \mu I)
        \Omega + \nu I` fails): an indefinite Hessian (a saddle point, an inexact inner
        solve), or a ``shift`` larger than the operator's smallest eigenvalue.

    Notes
    -----
    **Build** (Algorithm 2.1): :math:`\Omega \in \mathbb R^{n\times\ell}` Gaussian,
    orthonormalized by a thin QR; :math:`Y = (A - \mu I)\Omega`; the stability shift
    :math:`\nu = \sqrt n\,\varepsilon\,\|Y\|_F` (the paper's, with the Frobenius norm, an upper
    bound of its spectral norm); :math:`Y_\nu = Y + \nu\Omega`;
    :math:`C = \operatorname{chol}(\Omega^\top Y_\nu)`; :math:`B = Y_\nu C^{-\top}`;
    :math:`U\Sigma V^\top = \operatorname{svd}(B)`;
    :math:`\hat\Lambda = \max(\Sigma^2 - \nu, 0)`. So :math:`\hat A = Y_\nu (\Omega^\top
    Y_\nu)^{-1} Y_\nu^\top - \nu UU^\top`, and :math:`0 \preceq \hat A \preceq A - \mu I`.

    **Zero eigenvalues.** With ``shift=0`` an eigenvalue :math:`\hat\lambda_i \le \nu`
    (numerically zero: a singular operator whose rank is below ``k``) is dropped: its direction
    is treated like the unsketched complement (:math:`P^{-1}` is the identity there) and
    :math:`\hat\lambda_{\min}` is the smallest eigenvalue kept. A singular positive
    semidefinite operator thus gets a valid preconditioner (the system must still be
    consistent for CG); no error is raised. With ``shift > 0`` every direction is kept.

    **Positive definite.** With :math:`U_\perp` completing :math:`U` to an orthonormal basis,
    :math:`P^{-1} = [U\,U_\perp]\operatorname{diag}(d_1, \dots, d_k, 1, \dots, 1)[U\,U_\perp]^\top`
    with :math:`0 < d_i = (\hat\lambda_{\min}+\mu)/(\hat\lambda_i+\mu) \le 1` (and
    :math:`d_i = 1` for a dropped direction): symmetric with eigenvalues in :math:`(0, 1]`, so
    symmetric positive definite, as CG and MINRES require, whatever the operator (only the
    sketch's Cholesky factorization needs the operator positive semidefinite).

    **Cost.** A build costs ``rank + oversample`` products (one batched call when the caller
    offers batched products, as the ``.backward()`` of an :func:`~implicitdiff.implicit_diff`
    function does), a QR, a Cholesky factorization and an SVD: :math:`O(n\ell^2)`, and
    :math:`n\ell` numbers kept. Each application costs :math:`4nk` flops, against one product
    with the operator per CG iteration.

    **vmap.** Under ``torch.func.vmap`` (a batch of systems, e.g. one per task or
    hyperparameter) a sketch is taken for each system of the batch, with vmappable operations;
    it is not kept (its factors belong to the batch). Factors kept from a call outside vmap are
    reused for the whole batch when every system's operator matches the fingerprint
    (``"auto"``), or whatever the operators (``"never"``).

    Examples
    --------
    A ridge-regularized system whose data part has rank 30 and eigenvalues from 1e4 down to 1e-2
    (condition number 1e7): 40 probes capture the data part, and ``shift`` is the ridge.

    >>> import torch, implicitdiff as idiff
    >>> g = torch.Generator().manual_seed(0)
    >>> G = torch.randn(200, 30, generator=g, dtype=torch.float64)
    >>> Q, _ = torch.linalg.qr(G)
    >>> data = Q @ torch.diag(torch.logspace(4, -2, 30, dtype=torch.float64)) @ Q.T
    >>> A = data + 1e-3 * torch.eye(200, dtype=torch.float64)
    >>> b = torch.randn(200, generator=g, dtype=torch.float64)
    >>> plain = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-8))
    >>> nystrom = idiff.NystromPreconditioner(rank=40, shift=1e-3)
    >>> pcg = idiff.linear_solve(lambda v: A @ v, b, solver=idiff.CG(tol=1e-8, preconditioner=nystrom))
    >>> plain.info.iterations > 100, pcg.info.iterations  # 148 iterations without
    (True, 2)
    >>> torch.allclose(pcg.value, torch.linalg.solve(A, b), rtol=1e-6, atol=0)
    True

    A second solve with the same operator reuses the sketch (one product to recognize it):

    >>> _ = idiff.linear_solve(lambda v: A @ v, 2 * b, solver=idiff.CG(tol=1e-8, preconditioner=nystrom))
    >>> nystrom.builds, nystrom.reuses, nystrom.products
    (1, 1, 42)
    """

    def __init__(
        self,
        rank: int,
        *,
        shift: float = 0.0,
        oversample: int = 0,
        rebuild: Literal["auto", "always", "never"] = "auto",
        seed: int = 0,
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 0):
            raise ValueError(f"shift must be a finite float >= 0, got {shift!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample must be a non-negative int, got {oversample!r}")
        if rebuild not in ("auto", "always", "never"):
            raise ValueError(f"rebuild must be 'auto', 'always' or 'never', got {rebuild!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.rank = rank
        self.shift = float(shift)
        self.oversample = oversample
        self.rebuild: Literal["auto", "always", "never"] = rebuild
        self.seed = seed
        self.builds = 0
        self.reuses = 0
        self.products = 0
        self.eigenvalues: torch.Tensor | None = None
        self._factors: _Factors | None = None
        self._probes: tuple[tuple[int, int, torch.dtype, torch.device], torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (
            f"NystromPreconditioner(rank={self.rank}, shift={self.shift!r}, oversample={self.oversample}, "
            f"rebuild={self.rebuild!r}, seed={self.seed})"
        )

    def reset(self) -> None:
        """Forget the kept factors: the next solve takes a new sketch (the counters are kept)."""
        self._factors = None

    # ------------------------------------------------------------------ binding

    def bind(self, matvec: MatVec, b: Vector, matmat: MatVec | None = None) -> MatVec:
        """The preconditioner ``v -> P^{-1} v`` for the operator ``matvec`` (see :class:`OperatorPreconditioner`)."""
        n = b.shape[-1]
        work = _working_dtype(b.dtype)
        key = (n, b.dtype, b.device)
        batched = under_vmap()
        with torch.no_grad():
            kept = self._factors if self._factors is not None and self._factors.key == key else None
            first: torch.Tensor | None = None
            if kept is not None and self.rebuild == "never":
                self.reuses += 1
                return _apply(kept.U, kept.c)
            if kept is not None and self.rebuild == "auto" and kept.fingerprint is not None:
                omega = self._omega(n, work, b.device)
                first = matvec(omega[:, 0].to(b.dtype, copy=True)).to(work)
                self.products += 1
                if _same(first, kept.fingerprint):
                    self.reuses += 1
                    return _apply(kept.U, kept.c)
            U, c, fingerprint = self._build(matvec, matmat, b, work, batched, first)
            if not batched:  # a batch's factors are wrapped tensors of this vmap call: not kept
                self._factors = _Factors(U, c, key, fingerprint)
        return _apply(U, c)

    # ------------------------------------------------------------------ building

    def _omega(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The orthonormalized Gaussian probes ``n x l`` (drawn once per size, dtype and device)."""
        ell = min(n, self.rank + self.oversample)
        probe_key = (n, ell, dtype, device)
        if self._probes is not None and self._probes[0] == probe_key:
            return self._probes[1]
        # NumPy, not torch: random operations raise inside torch.func.vmap, and the CPU stream makes
        # the probes identical on every device
        import numpy as np

        draws = np.random.default_rng(self.seed).standard_normal((n, ell))
        gaussian = torch.from_numpy(draws).to(device=device, dtype=dtype)
        omega, _ = torch.linalg.qr(gaussian)
        self._probes = (probe_key, omega)
        return omega

    def _build(
        self,
        matvec: MatVec,
        matmat: MatVec | None,
        b: Vector,
        work: torch.dtype,
        batched: bool,
        first: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n = b.shape[-1]
        omega = self._omega(n, work, b.device)
        ell = omega.shape[1]
        keep = min(self.rank, n)
        fingerprint = None
        if self.rebuild == "auto" and not batched:  # recognize this operator at the next solve by A omega_1
            if first is None:
                first = matvec(omega[:, 0].to(b.dtype, copy=True)).to(work)
                self.products += 1
            fingerprint = _plain(first)
        Y, spent = self._sketch(matvec, matmat, omega.to(b.dtype, copy=True), batched, first)
        Y = Y.to(work)
        self.products += spent
        if self.shift != 0.0:
            Y = Y - self.shift * omega
        # a non-finite product: no preconditioning (a zero sketch gives the identity), the solver reports it
        finite = torch.isfinite(Y).all()
        Y = torch.where(finite, Y, torch.zeros_like(Y))
        eps = torch.finfo(work).eps
        nu = math.sqrt(n) * eps * torch.linalg.matrix_norm(Y)
        nu = torch.clamp(nu, min=torch.finfo(work).tiny)
        Y_nu = Y + nu * omega
        core = omega.mT @ Y_nu
        core = 0.5 * (core + core.mT)
        L, info = torch.linalg.cholesky_ex(core)
        if any_true(info != 0) or not bool(torch.isfinite(physical(L)).all()):
            raise ImplicitDiffError(
                "NystromPreconditioner: the operator"
                + (f" minus shift={self.shift:g} times the identity" if self.shift else "")
                + " is not symmetric positive semidefinite (the Cholesky factorization of its "
                f"{ell}x{ell} sketch Omega^T A Omega failed): a negative eigenvalue, e.g. the Hessian at a saddle "
                "point or at an inexact inner solution"
                + (", or a shift larger than the smallest eigenvalue" if self.shift else "")
                + ". Make it positive definite with damping= on the solver (not added to shift), or use "
                "MINRES/GMRES without this preconditioner."
            )
        B = torch.linalg.solve_triangular(L, Y_nu.mT, upper=False).mT  # Y_nu L^{-T}
        U, S, _ = torch.linalg.svd(B, full_matrices=False)
        U, S = U[:, :keep], S[:keep]
        lam = torch.clamp(S * S - nu, min=0.0)
        mu = self.shift
        kept = lam > nu if mu == 0.0 else torch.ones_like(lam, dtype=torch.bool)
        lam_min = torch.where(kept, lam, torch.full_like(lam, math.inf)).amin()
        lam_min = torch.where(torch.isfinite(lam_min), lam_min, torch.zeros_like(lam_min))  # nothing kept
        weights = (lam_min + mu) / torch.where(kept, lam + mu, torch.ones_like(lam))
        c = torch.where(kept, weights - 1.0, torch.zeros_like(lam))
        self.builds += 1
        if not batched:
            U, c = _plain(U), _plain(c)
            self.eigenvalues = _plain(lam)
            if not bool(physical(finite)):
                fingerprint = None  # not recognized as the same operator next time: a new sketch
        return U, c, fingerprint

    def _sketch(
        self, matvec: MatVec, matmat: MatVec | None, omega: torch.Tensor, batched: bool, first: torch.Tensor | None
    ) -> tuple[torch.Tensor, int]:
        """``(A Omega, products spent)``: batched calls when offered, else ``torch.func.vmap`` over the probes,
        else a loop (which reuses ``first = A omega_1`` when it is known)."""
        ell = omega.shape[1]
        chunks = range(0, ell, _CHUNK)
        if matmat is not None and not batched:  # rows Omega^T A^T = (A Omega)^T for a symmetric A
            return torch.cat([matmat(omega[:, i : i + _CHUNK].mT.contiguous()).mT for i in chunks], dim=-1), ell
        try:
            return torch.func.vmap(matvec, in_dims=1, out_dims=1, chunk_size=_CHUNK)(omega), ell
        except RuntimeError:  # a product that does not vmap (autograd.grad inside, .item(), ...)
            pass
        columns = [first.to(omega.dtype)] if first is not None else []
        done = len(columns)
        columns += [matvec(omega[:, j].clone()) for j in range(done, ell)]
        return torch.stack(columns, dim=-1), ell - done


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factorizations need float32 at least (none exist in half precision on the CPU)."""
    return torch.promote_types(dtype, torch.float32)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` without torch.func wrappers or graph (outside vmap: the tensor of this problem)."""
    return physical(t).detach()


def _same(product: torch.Tensor, fingerprint: torch.Tensor) -> bool:
    """Whether ``A omega_1`` matches the build's, for every system of a batch (the same operator)."""
    tol = max(1e-10, 64 * torch.finfo(fingerprint.dtype).eps)
    diff = torch.linalg.vector_norm(product - fingerprint)
    return not any_true(~(diff <= tol * torch.linalg.vector_norm(fingerprint)))  # NaN: not the same


def _apply(U: torch.Tensor, c: torch.Tensor) -> MatVec:
    """``v -> v + U (c * (U^T v))``: the identity on the complement of ``U``, the weights ``1 + c`` on ``U``."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        w = v.to(U.dtype)
        return (w + U @ (c * (U.mT @ w))).to(v.dtype)

    return apply
