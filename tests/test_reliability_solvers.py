"""Reliability of the iterative solvers at the solver level (``solver.solve(LinearProblem)``).

Each reported fault has its reported case and at least one more member of its kind, checked
against dense float64 references (``torch.linalg.solve`` / ``lstsq`` / ``pinv``), on the eager
fast path, the masked (vmap-safe) path and the masked path under ``torch.func.vmap``:

* CG at non-positive curvature returns the best iterate met (never worse than ``x0``) and does
  not blow up on a singular positive semi-definite system;
* MINRES behaves as MINRES on singular systems (``LEAST_SQUARES``, monotone residuals);
* Neumann detects divergence and returns its best iterate;
* NormalCG (CGLS) decides convergence on the true residual ``||b - A x||``;
* BiCGSTAB reports breakdowns and returns its best iterate;
* restarted GMRES detects stagnation;
* properties for every solver: ``CONVERGED`` implies ``||b - A x|| <= abs_tol``; singular
  inconsistent systems never report ``CONVERGED`` and never produce NaN/inf.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitdiff as idiff
from implicitdiff import SolveStatus
from implicitdiff.solvers.base import LinearProblem

DT = torch.float64
EPS = torch.finfo(DT).eps


# ---------------------------------------------------------------------------------------------
# helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_problem(A, b, *, abs_tol, maxiter=None, eager=True, M=None, x0=None, fixed=False, rmatvec=True):
    return LinearProblem(
        matvec=lambda v: A @ v,
        b=b,
        x0=torch.zeros_like(b) if x0 is None else x0,
        abs_tol=abs_tol,
        maxiter=10 * b.shape[-1] if maxiter is None else maxiter,
        fixed_budget=fixed,
        eager=eager,
        differentiable=False,
        preconditioner=None if M is None else (lambda v: M @ v),
        _rmatvec=(lambda v: A.T @ v) if rmatvec else None,
    )


def solve_paths(solver, A, b, *, rel_tol=None, abs_tol=None, vmap=True, others=(), **kw):
    """``{path: (x, status, iterations)}`` for the eager, masked and vmapped (masked) paths.

    Under vmap ``b`` is batched with ``others`` (problems that stop at other iterations), and the
    result for ``b`` is reported. The tolerance is ``abs_tol``, or ``rel_tol * ||b||``.
    """

    def tol_for(bb, eager):
        if abs_tol is not None:
            return abs_tol
        t = rel_tol * torch.linalg.vector_norm(bb)
        return float(t) if eager else t

    out = {}
    for eager in (True, False):
        raw = solver.solve(make_problem(A, b, abs_tol=tol_for(b, eager), eager=eager, **kw))
        out["eager" if eager else "masked"] = (raw.x, SolveStatus(int(raw.status)), int(raw.iterations))
    if vmap:

        def one(bb):
            raw = solver.solve(make_problem(A, bb, abs_tol=tol_for(bb, False), eager=False, **kw))
            return raw.x, torch.as_tensor(raw.status), torch.as_tensor(raw.iterations)

        xs, sts, its = torch.func.vmap(one)(torch.stack([b, *others]))
        out["vmap"] = (xs[0], SolveStatus(int(sts[0])), int(its[0]))
    return out


def residual(A, b, x) -> float:
    return float(torch.linalg.vector_norm(b - A @ x))


def spd(n, cond, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ q.T


def orthogonal(n, seed):
    return torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))[0]


def symmetric_with_spectrum(eig, seed):
    q = orthogonal(len(eig), seed)
    A = q @ torch.diag(eig) @ q.T
    return (A + A.T) / 2


def nonsymmetric(n, seed):
    m = torch.randn(n, n, generator=gen(seed), dtype=DT) / max(n, 1) ** 0.5
    return 2.0 * torch.eye(n, dtype=DT) + 0.8 * m


SINGULAR_DIAG = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=DT))
ONES4 = torch.ones(4, dtype=DT)
IN_RANGE4 = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT)


def rank_one_system(seed=1, n=6):
    """``2 a a^T u = g`` with ``g`` not parallel to ``a``: inconsistent, rank one."""
    g = gen(seed)
    a = torch.randn(n, generator=g, dtype=DT)
    rhs = torch.randn(n, generator=g, dtype=DT)
    return 2.0 * torch.outer(a, a), rhs


def random_singular_symmetric(n, nullity, seed, consistent=False):
    g = gen(seed)
    eig = torch.randn(n, generator=g, dtype=DT)
    eig[:nullity] = 0.0
    A = symmetric_with_spectrum(eig, seed + 1)
    b = torch.randn(n, generator=g, dtype=DT)
    return A, (A @ b if consistent else b)


def random_singular_general(n, rank, seed, consistent=False):
    g = gen(seed)
    sv = torch.logspace(0, -1, n, dtype=DT)
    sv[rank:] = 0.0
    A = orthogonal(n, seed) @ torch.diag(sv) @ orthogonal(n, seed + 7).T
    b = torch.randn(n, generator=g, dtype=DT)
    return A, (A @ b if consistent else b)


def ls_residual(A, b) -> float:
    x = torch.linalg.pinv(A, rtol=1e-10) @ b
    return residual(A, b, x)


# ---------------------------------------------------------------------------------------------
# 1. CG: best iterate at non-positive curvature; singular PSD systems


def reference_cg_best(A, b, maxiter):
    """Plain CG in float64, stopping at ``d^T A d <= 0``: (best x, its residual, iterations done)."""
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = float(r @ r)
    best_x, best_r = x, math.sqrt(rr)
    for k in range(maxiter):
        Ad = A @ d
        dAd = float(d @ Ad)
        if dAd <= 0:
            return best_x, best_r, k
        alpha = rr / dAd
        x = x + alpha * d
        r = r - alpha * Ad
        rr_new = float(r @ r)
        if math.sqrt(rr_new) < best_r:
            best_x, best_r = x, math.sqrt(rr_new)
        d = r + (rr_new / rr) * d
        rr = rr_new
    return best_x, best_r, maxiter


def test_cg_indefinite_systems_never_worse_than_initial_guess():
    # the reported case: 300 random indefinite 30x30 systems, zero initial guess; the last
    # iterate at negative curvature had median relative residual 9.5, worse than 0 in 95%
    g = gen(2024)
    fast, masked = [], []
    for i in range(300):
        q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT))[0]
        A = q @ torch.diag(torch.randn(30, generator=g, dtype=DT)) @ q.T
        A = (A + A.T) / 2
        b = torch.randn(30, generator=g, dtype=DT)
        ref_x, ref_r, ref_k = reference_cg_best(A, b, 300)
        bnorm = float(b.norm())
        for eager, store in ((True, fast), (False, masked)):
            raw = idiff.CG().solve(make_problem(A, b, abs_tol=1e-10 * bnorm, maxiter=300, eager=eager))
            status = SolveStatus(int(raw.status))
            assert status in (SolveStatus.NEGATIVE_CURVATURE, SolveStatus.CONVERGED)
            assert torch.isfinite(raw.x).all()
            true_r = residual(A, b, raw.x)
            assert true_r <= bnorm * (1 + 1e-12)
            assert float(raw.residual_norm) == pytest.approx(true_r, rel=1e-8)
            if status == SolveStatus.NEGATIVE_CURVATURE:
                assert int(raw.iterations) == ref_k
                assert torch.allclose(raw.x, ref_x, rtol=1e-9, atol=1e-12)
                assert float(raw.residual_norm) == pytest.approx(ref_r, rel=1e-9)
            store.append(true_r / bnorm)
    assert max(fast) <= 1.0 and max(masked) <= 1.0
    assert fast == pytest.approx(masked, rel=1e-9)


def test_cg_negative_curvature_best_iterate_all_paths():
    # a second member: residuals 2.24, 1.61, 2.07, 5.06, then negative curvature; the best
    # iterate is x1, the last (x3) is more than twice worse than x0
    A = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, -0.05], dtype=DT))
    b = torch.ones(5, dtype=DT)
    ref_x, ref_r, ref_k = reference_cg_best(A, b, 50)
    assert ref_k == 3 and ref_r == pytest.approx(1.61, abs=0.01)
    others = (torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=DT),)  # converges in one step
    for path, (x, status, iters) in solve_paths(idiff.CG(), A, b, rel_tol=1e-10, others=others).items():
        assert status == SolveStatus.NEGATIVE_CURVATURE, path
        assert iters == ref_k, path
        assert torch.allclose(x, ref_x, rtol=1e-10, atol=1e-13), path
        assert torch.allclose(x, (5.0 / 9.95) * b, rtol=1e-12), path  # x1 = (b^T b / b^T A b) b
        assert residual(A, b, x) == pytest.approx(ref_r, rel=1e-9)


@pytest.mark.parametrize(
    "system",
    ["reported", "random_psd"],
)
def test_cg_singular_inconsistent_psd_stops_finite(system):
    if system == "reported":
        A, b = SINGULAR_DIAG, ONES4
    else:  # a Gram matrix of rank 5 in dimension 8 and a right-hand side outside its range
        m = torch.randn(5, 8, generator=gen(3), dtype=DT)
        A, b = m.T @ m, torch.randn(8, generator=gen(4), dtype=DT)
    ref_x, ref_r, _ = reference_cg_best(A, b, 3)  # the curvature vanishes after rank(A) steps
    for path, (x, status, iters) in solve_paths(idiff.CG(), A, b, rel_tol=1e-10).items():
        assert status == SolveStatus.NEGATIVE_CURVATURE, path  # zero curvature: singular
        assert torch.isfinite(x).all(), path
        assert residual(A, b, x) <= float(b.norm()), path
        if system == "reported":
            # x1 = (2/3) b is the best iterate: residual sqrt(1/9 + 1/9 + 1 + 1)
            assert iters == 3, path
            assert torch.allclose(x, torch.full((4,), 2.0 / 3.0, dtype=DT), atol=1e-14), path
            assert residual(A, b, x) == pytest.approx(math.sqrt(2 / 9 + 2), rel=1e-12)
            assert torch.allclose(x, ref_x, atol=1e-14)


def test_cg_singular_consistent_psd_converges():
    for path, (x, status, _) in solve_paths(idiff.CG(), SINGULAR_DIAG, IN_RANGE4, rel_tol=1e-12).items():
        assert status == SolveStatus.CONVERGED, path
        assert torch.allclose(x, torch.tensor([1.0, 0.5, 1.0 / 3.0, 0.0], dtype=DT), atol=1e-12), path


# ---------------------------------------------------------------------------------------------
# 2. MINRES on singular systems


def test_minres_singular_inconsistent_reported_case():
    # was x4 = 7e16 and ||Ax - b|| = 5.6 > ||b|| = 2
    for path, (x, status, iters) in solve_paths(idiff.MINRES(), SINGULAR_DIAG, ONES4, rel_tol=1e-10).items():
        assert status == SolveStatus.LEAST_SQUARES, path
        assert iters == 3, path
        assert torch.allclose(x[:3], torch.tensor([1.0, 0.5, 1.0 / 3.0], dtype=DT), atol=1e-12), path
        assert torch.isfinite(x).all() and abs(float(x[3])) < 10.0, path
        assert residual(SINGULAR_DIAG, ONES4, x) == pytest.approx(1.0, abs=1e-12)  # the least-squares minimum


def test_minres_singular_consistent_converges():
    for path, (x, status, _) in solve_paths(idiff.MINRES(), SINGULAR_DIAG, IN_RANGE4, rel_tol=1e-12).items():
        assert status == SolveStatus.CONVERGED, path
        assert torch.allclose(x, torch.tensor([1.0, 0.5, 1.0 / 3.0, 0.0], dtype=DT), atol=1e-12), path


def test_minres_rank_one_system():
    # 2 a a^T u = g gave |u| ~ 1e15
    A, g = rank_one_system()
    x_min = torch.linalg.pinv(A) @ g
    for path, (x, status, _) in solve_paths(idiff.MINRES(), A, g, rel_tol=1e-10).items():
        assert status == SolveStatus.LEAST_SQUARES, path
        assert residual(A, g, x) == pytest.approx(ls_residual(A, g), rel=1e-10), path
        assert torch.allclose(A @ x, A @ x_min, atol=1e-10), path  # a least-squares solution
        assert float(x.norm()) < 10 * float(g.norm()), path


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_minres_random_singular_symmetric(seed):
    n, nullity = 12 + 3 * seed, 2 + seed
    A, b = random_singular_symmetric(n, nullity, seed)
    x_min = torch.linalg.pinv(A, rtol=1e-10, hermitian=True) @ b
    for path, (x, status, _) in solve_paths(idiff.MINRES(), A, b, rel_tol=1e-10).items():
        assert status == SolveStatus.LEAST_SQUARES, path
        assert residual(A, b, x) == pytest.approx(ls_residual(A, b), rel=1e-8), path
        assert float(x.norm()) <= 1e3 * float(x_min.norm()), path
    A, b = random_singular_symmetric(n, nullity, seed, consistent=True)
    x_min = torch.linalg.pinv(A, rtol=1e-10, hermitian=True) @ b
    for path, (x, status, _) in solve_paths(idiff.MINRES(), A, b, rel_tol=1e-10).items():
        assert status == SolveStatus.CONVERGED, path
        assert residual(A, b, x) <= 1e-10 * float(b.norm()) * (1 + 1e-6), path
        assert torch.allclose(x, x_min, atol=1e-8 * float(x_min.norm())), path  # Krylov: the minimum-norm solution


@pytest.mark.parametrize("system", ["singular_diag", "indefinite"])
def test_minres_residual_never_increases(system):
    if system == "singular_diag":
        A, b = SINGULAR_DIAG, ONES4
    else:
        A = symmetric_with_spectrum(torch.linspace(-3.0, 2.0, 10, dtype=DT), 5)
        b = torch.randn(10, generator=gen(6), dtype=DT)
    previous = float(b.norm())
    for k in range(1, 12):
        raw = idiff.MINRES().solve(make_problem(A, b, abs_tol=1e-12, maxiter=k))
        now = residual(A, b, raw.x)
        assert now <= previous * (1 + 1e-12) + 1e-14, k
        previous = now


def test_minres_preconditioned_singular():
    M = torch.diag(torch.tensor([1.0, 0.5, 0.25, 2.0], dtype=DT))
    for b, expected in ((ONES4, SolveStatus.LEAST_SQUARES), (IN_RANGE4, SolveStatus.CONVERGED)):
        for path, (x, status, _) in solve_paths(idiff.MINRES(), SINGULAR_DIAG, b, rel_tol=1e-10, M=M).items():
            assert status == expected, path
            assert torch.allclose(x[:3], torch.tensor([1.0, 0.5, 1.0 / 3.0], dtype=DT), atol=1e-10), path
            assert torch.isfinite(x).all()


def test_minres_ill_conditioned_nonsingular_still_converges():
    # the least-squares test must not fire on a non-singular (if ill-conditioned) system
    A = torch.diag(torch.tensor([1.0, 1e-9], dtype=DT))
    b = torch.ones(2, dtype=DT)
    for path, (x, status, _) in solve_paths(idiff.MINRES(), A, b, rel_tol=1e-6).items():
        assert status == SolveStatus.CONVERGED, path
        assert residual(A, b, x) <= 1e-6 * math.sqrt(2.0), path
        assert torch.allclose(x, torch.tensor([1.0, 1e9], dtype=DT), rtol=1e-5), path
    # below the attainable accuracy (eps ||A|| ||x|| ~ 1e-7): solved to working precision, not singular
    for path, (x, status, _) in solve_paths(idiff.MINRES(), A, b, rel_tol=1e-10).items():
        assert status == SolveStatus.STAGNATED, path
        assert torch.allclose(x, torch.tensor([1.0, 1e9], dtype=DT), rtol=1e-6), path


# ---------------------------------------------------------------------------------------------
# 3. Neumann: divergence


def richardson_residuals(A, b, step, k):
    x = torch.zeros_like(b)
    xs, rs = [x], [residual(A, b, x)]
    for _ in range(k):
        x = x + step * (b - A @ x)
        xs.append(x)
        rs.append(residual(A, b, x))
    return xs, rs


def test_neumann_diverging_series_reported_case():
    # Neumann(step_size=0.186) on 11 I: |1 - 2.046| = 1.046 > 1; was 1e18 after 1000 iterations, MAX_ITERATIONS
    A = 11.0 * torch.eye(3, dtype=DT)
    b = torch.ones(3, dtype=DT)
    others = (torch.zeros(3, dtype=DT),)
    for path, (x, status, iters) in solve_paths(
        idiff.Neumann(step_size=0.186), A, b, rel_tol=1e-10, maxiter=1000, others=others
    ).items():
        assert status == SolveStatus.DIVERGED, path
        assert iters < 200, path
        assert torch.equal(x, torch.zeros(3, dtype=DT)), path  # every iterate is worse than x0
    # with a warm start the best iterate is the warm start itself
    x0 = torch.full((3,), 0.05, dtype=DT)
    raw = idiff.Neumann(step_size=0.186).solve(make_problem(A, b, abs_tol=1e-12, maxiter=1000, x0=x0))
    assert raw.status == SolveStatus.DIVERGED and torch.equal(raw.x, x0)


def test_neumann_diverging_returns_best_iterate():
    # only the largest eigenvalue diverges (|1 - 0.25 * 10| = 1.5): the residual first drops, then grows
    A = torch.diag(torch.tensor([1.0, 2.0, 10.0], dtype=DT))
    b = torch.tensor([1.0, 1.0, 1e-6], dtype=DT)
    xs, rs = richardson_residuals(A, b, 0.25, 200)
    best = min(range(len(rs)), key=rs.__getitem__)
    assert 0 < best < 200 and rs[-1] > 1e3 * rs[best]
    paths = solve_paths(idiff.Neumann(step_size=0.25), A, b, rel_tol=1e-12, maxiter=1000)
    for path, (x, status, iters) in paths.items():
        assert status == SolveStatus.DIVERGED, path
        assert iters < 200, path
        assert torch.allclose(x, xs[best], rtol=1e-12, atol=1e-15), path
        assert residual(A, b, x) == pytest.approx(rs[best], rel=1e-9)


@pytest.mark.parametrize("coupling, rho", [(200.0, 0.5), (30.0, 0.95), (10.0, 0.99)])
def test_neumann_transient_growth_is_not_divergence(coupling, rho):
    # a non-normal contraction: ||J^k|| grows to ~ 100-400 before decaying
    J = torch.tensor([[rho, coupling], [0.0, rho]], dtype=DT)
    A = torch.eye(2, dtype=DT) - J
    b = torch.tensor([0.0, 1.0], dtype=DT)
    _, rs = richardson_residuals(A, b, 1.0, 60)
    assert max(rs) > 100 * rs[0]  # the transient exceeds the growth threshold
    ref = torch.linalg.solve(A, b)
    for path, (x, status, _) in solve_paths(idiff.Neumann(), A, b, rel_tol=1e-11, maxiter=5000, vmap=False).items():
        assert status == SolveStatus.CONVERGED, path
        assert torch.allclose(x, ref, rtol=1e-9), path


def test_neumann_max_iterations_returns_best_iterate():
    # a slow divergence (ratio 1.01) cut short: MAX_ITERATIONS, and the best iterate (x0) is returned
    A = 2.01 * torch.eye(4, dtype=DT)
    b = torch.ones(4, dtype=DT)
    for path, (x, status, iters) in solve_paths(idiff.Neumann(), A, b, rel_tol=1e-10, maxiter=40).items():
        assert status == SolveStatus.MAX_ITERATIONS and iters == 40, path
        assert torch.equal(x, torch.zeros(4, dtype=DT)), path
    # a fixed budget is the partial sum asked for, not a failure
    raw = idiff.Neumann().solve(make_problem(A, b, abs_tol=EPS * 2, maxiter=5, fixed=True))
    xs, _ = richardson_residuals(A, b, 1.0, 5)
    assert raw.status == SolveStatus.BUDGET_USED and torch.allclose(raw.x, xs[-1])


# ---------------------------------------------------------------------------------------------
# 4. NormalCG (CGLS): the true residual decides


def test_normal_cg_reported_case():
    # NormalCG(tol=1e-6) reported CONVERGED after 2 iterations at true relative residual 0.577
    A = torch.diag(torch.tensor([1.0, 1e-3, 1e-6], dtype=DT))
    b = torch.ones(3, dtype=DT)
    abs_tol = 1e-6 * float(b.norm())
    for path, (x, status, _) in solve_paths(idiff.NormalCG(tol=1e-6), A, b, rel_tol=1e-6).items():
        assert status == SolveStatus.CONVERGED, path
        assert residual(A, b, x) <= abs_tol, path
        assert torch.allclose(x, torch.tensor([1.0, 1e3, 1e6], dtype=DT), rtol=1e-6), path


def test_normal_cg_badly_scaled_nonsymmetric():
    # a second member: a non-symmetric operator with singular values 1 ... 1e-4
    A = orthogonal(6, 11) @ torch.diag(torch.logspace(0, -4, 6, dtype=DT)) @ orthogonal(6, 12).T
    b = torch.randn(6, generator=gen(13), dtype=DT)
    ref = torch.linalg.solve(A, b)
    for path, (x, status, _) in solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-8, maxiter=200).items():
        assert status == SolveStatus.CONVERGED, path
        assert residual(A, b, x) <= 1e-8 * float(b.norm()), path
        assert torch.allclose(x, ref, rtol=1e-5), path


def test_normal_cg_singular_inconsistent_is_least_squares():
    for path, (x, status, _) in solve_paths(idiff.NormalCG(), SINGULAR_DIAG, ONES4, rel_tol=1e-10).items():
        assert status == SolveStatus.LEAST_SQUARES, path
        # CGLS from zero stays in the range of A^T: the minimum-norm least-squares solution
        assert torch.allclose(x, torch.tensor([1.0, 0.5, 1.0 / 3.0, 0.0], dtype=DT), atol=1e-12), path
    for seed in (0, 1):
        A, b = random_singular_general(9, 6, seed)
        x_min = torch.linalg.pinv(A, rtol=1e-10) @ b
        for path, (x, status, _) in solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-10).items():
            assert status == SolveStatus.LEAST_SQUARES, path
            assert torch.allclose(x, x_min, rtol=1e-7, atol=1e-9), path
        A, b = random_singular_general(9, 6, seed, consistent=True)
        x_min = torch.linalg.pinv(A, rtol=1e-10) @ b
        for path, (x, status, _) in solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-10).items():
            assert status == SolveStatus.CONVERGED, path
            assert torch.allclose(x, x_min, rtol=1e-7, atol=1e-9), path


def test_normal_cg_preconditioner_and_default_rmatvec():
    # columns scaled over 4 decades: the Jacobi preconditioner of A^T A (1 / column norms^2) undoes it
    B = nonsymmetric(10, 21)
    A = B @ torch.diag(torch.logspace(0, 4, 10, dtype=DT))
    b = torch.randn(10, generator=gen(22), dtype=DT)
    ref = torch.linalg.solve(A, b)
    M = torch.diag(1.0 / (A * A).sum(0))
    plain = solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-10, maxiter=500, vmap=False)
    jacobi = solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-10, maxiter=500, M=M)
    for path, (x, status, iters) in jacobi.items():
        assert status == SolveStatus.CONVERGED, path
        assert torch.allclose(x, ref, rtol=1e-7), path
        assert iters < plain["eager"][2]
    # A^T derived by a vector-Jacobian product (no rmatvec given), eager and vmapped
    derived = solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-10, maxiter=500, M=M, rmatvec=False)
    for path, (x, status, _) in derived.items():
        assert status == SolveStatus.CONVERGED and torch.allclose(x, ref, rtol=1e-7), path


def test_normal_cg_max_iterations_is_honest():
    A = nonsymmetric(30, 1) + 3 * torch.diag(torch.logspace(0, 3, 30, dtype=DT))
    b = torch.randn(30, generator=gen(2), dtype=DT)
    for path, (x, status, iters) in solve_paths(idiff.NormalCG(), A, b, rel_tol=1e-12, maxiter=2).items():
        assert status == SolveStatus.MAX_ITERATIONS and iters == 2, path
        assert residual(A, b, x) > 1e-12 * float(b.norm())


# ---------------------------------------------------------------------------------------------
# 5. BiCGSTAB: breakdowns and the best iterate


@pytest.mark.parametrize("system", ["rotation", "skew4", "singular_diag", "rank_one"])
def test_bicgstab_breakdown_is_reported(system):
    if system == "rotation":  # rhat^T A p = e1^T A e1 = 0 at once
        A, b = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DT), torch.tensor([1.0, 0.0], dtype=DT)
    elif system == "skew4":  # any skew-symmetric operator: r^T A r = 0
        m = torch.randn(4, 4, generator=gen(8), dtype=DT)
        A, b = m - m.T, torch.randn(4, generator=gen(9), dtype=DT)
    elif system == "singular_diag":  # a search direction in the null space
        A, b = SINGULAR_DIAG, ONES4
    else:
        A, b = rank_one_system()
    for path, (x, status, iters) in solve_paths(idiff.BiCGSTAB(), A, b, rel_tol=1e-10).items():
        assert status == SolveStatus.BREAKDOWN, path
        assert torch.isfinite(x).all(), path
        assert residual(A, b, x) <= float(b.norm()) * (1 + 1e-12), path
        if system in ("rotation", "skew4"):
            assert iters == 0 and torch.equal(x, torch.zeros_like(b)), path
        if system == "singular_diag":
            assert float(x.norm()) < 100.0, path


def _plain_bicgstab(A, b, k):
    x, r = torch.zeros_like(b), b.clone()
    rhat, rho, alpha, omega = b.clone(), 1.0, 1.0, 1.0
    v, p = torch.zeros_like(b), torch.zeros_like(b)
    for _ in range(k):
        rho_new = float(rhat @ r)
        p = r + (rho_new / rho) * (alpha / omega) * (p - omega * v)
        v = A @ p
        alpha = rho_new / float(rhat @ v)
        s = r - alpha * v
        t = A @ s
        omega = float(t @ s) / float(t @ t)
        x = x + alpha * p + omega * s
        r = s - omega * t
        rho = rho_new
    return x


def test_bicgstab_returns_best_iterate():
    # an irregularly converging non-symmetric system: the returned residual never increases with the budget
    A = torch.diag(torch.linspace(-1.0, 3.0, 12, dtype=DT)) + 0.9 * torch.triu(
        torch.randn(12, 12, generator=gen(31), dtype=DT), diagonal=1
    )
    b = torch.randn(12, generator=gen(32), dtype=DT)
    previous = float(b.norm())
    floor = 1e-11 * float(b.norm())  # below it, recursive and true residuals part by rounding
    increases = 0
    for k in range(1, 25):
        for eager in (True, False):
            raw = idiff.BiCGSTAB().solve(make_problem(A, b, abs_tol=1e-300, maxiter=k, eager=eager))
            now = residual(A, b, raw.x)
            assert now <= previous * (1 + 1e-8) + floor, (k, eager)
            assert float(raw.residual_norm) == pytest.approx(now, rel=1e-6, abs=floor)
        # the plain last iterate does get worse on this system
        last = _plain_bicgstab(A, b, k)
        increases += residual(A, b, last) > previous * 1.01 + floor
        previous = now
    assert increases > 0


def test_bicgstab_preconditioned():
    A = nonsymmetric(15, 41) @ torch.diag(torch.logspace(0, 3, 15, dtype=DT))
    b = torch.randn(15, generator=gen(42), dtype=DT)
    M = torch.diag(1.0 / torch.diagonal(A))
    ref = torch.linalg.solve(A, b)
    for path, (x, status, _) in solve_paths(idiff.BiCGSTAB(), A, b, rel_tol=1e-10, M=M).items():
        assert status == SolveStatus.CONVERGED, path
        assert residual(A, b, x) <= 1e-10 * float(b.norm()), path
        assert torch.allclose(x, ref, rtol=1e-8), path


# ---------------------------------------------------------------------------------------------
# 6. GMRES: stagnation and singular breakdown


def cyclic_shift(n):
    return torch.roll(torch.eye(n, dtype=DT), 1, 0)  # e_i -> e_{i+1}


@pytest.mark.parametrize("restart", [1, 2, 4])
def test_gmres_stagnation_cyclic_shift(restart):
    # GMRES(m < n) makes no progress at all on the cyclic shift with b = e1
    A = cyclic_shift(5)
    b = torch.zeros(5, dtype=DT)
    b[0] = 1.0
    for path, (x, status, iters) in solve_paths(idiff.GMRES(restart=restart), A, b, rel_tol=1e-10, maxiter=500).items():
        assert status == SolveStatus.STAGNATED, path
        assert iters == restart, path  # one cycle, not the whole budget
        assert torch.equal(x, torch.zeros(5, dtype=DT)), path
    # a full Krylov space solves it exactly
    for path, (x, status, _) in solve_paths(idiff.GMRES(restart=5), A, b, rel_tol=1e-10).items():
        assert status == SolveStatus.CONVERGED and torch.allclose(x, A.T @ b, atol=1e-14), path


def test_gmres_stagnation_skew_dominant():
    # a second member: rotations (skew-symmetric blocks) with GMRES(1): r^T A r = 0, no progress
    blocks = [torch.tensor([[0.0, w], [-w, 0.0]], dtype=DT) for w in (1.0, 2.0, 3.0)]
    A = torch.block_diag(*blocks)
    b = torch.randn(6, generator=gen(51), dtype=DT)
    for path, (x, status, iters) in solve_paths(idiff.GMRES(restart=1), A, b, rel_tol=1e-10, maxiter=600).items():
        assert status == SolveStatus.STAGNATED and iters == 1, path
        assert residual(A, b, x) <= float(b.norm())
    ref = torch.linalg.solve(A, b)
    for path, (x, status, _) in solve_paths(idiff.GMRES(restart=6), A, b, rel_tol=1e-12).items():
        assert status == SolveStatus.CONVERGED and torch.allclose(x, ref, rtol=1e-10), path


def test_gmres_fixed_budget_runs_the_budget():
    A = cyclic_shift(5)
    b = torch.zeros(5, dtype=DT)
    b[0] = 1.0
    for eager in (True, False):
        raw = idiff.GMRES(restart=2).solve(make_problem(A, b, abs_tol=EPS, maxiter=7, fixed=True, eager=eager))
        assert SolveStatus(int(raw.status)) == SolveStatus.BUDGET_USED and int(raw.iterations) == 7


def test_gmres_singular_systems():
    for path, (x, status, _) in solve_paths(idiff.GMRES(), SINGULAR_DIAG, ONES4, rel_tol=1e-10).items():
        assert status == SolveStatus.BREAKDOWN, path  # was x4 = 1e45 on the eager path
        assert torch.allclose(x[:3], torch.tensor([1.0, 0.5, 1.0 / 3.0], dtype=DT), atol=1e-12), path
        assert torch.isfinite(x).all() and abs(float(x[3])) < 10.0, path
        assert residual(SINGULAR_DIAG, ONES4, x) == pytest.approx(1.0, abs=1e-12)
    for path, (x, status, _) in solve_paths(idiff.GMRES(), SINGULAR_DIAG, IN_RANGE4, rel_tol=1e-12).items():
        assert status == SolveStatus.CONVERGED, path
        assert torch.allclose(x, torch.tensor([1.0, 0.5, 1.0 / 3.0, 0.0], dtype=DT), atol=1e-12), path
    A, g = rank_one_system()
    for path, (x, status, _) in solve_paths(idiff.GMRES(), A, g, rel_tol=1e-10).items():
        assert status == SolveStatus.BREAKDOWN, path
        assert torch.isfinite(x).all() and float(x.norm()) < 10 * float(g.norm()), path
        assert residual(A, g, x) == pytest.approx(ls_residual(A, g), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# the singularity tests work in the preconditioner's geometry


@pytest.mark.parametrize("decades", [8, 16])
def test_preconditioned_badly_scaled_systems_are_not_singular(decades):
    # cond(A) ~ 10^decades, but the Jacobi-preconditioned operator is well conditioned: none of the
    # zero-curvature / null-direction / least-squares tests may fire
    d = torch.logspace(0, decades, 10, dtype=DT)
    A = d.sqrt()[:, None] * spd(10, 10.0, 3) * d.sqrt()[None, :]
    C = nonsymmetric(10, 5) * d[None, :]
    b = torch.randn(10, generator=gen(4), dtype=DT)
    cases = [
        (idiff.CG(), A, torch.diag(1 / torch.diagonal(A))),
        (idiff.MINRES(), A, torch.diag(1 / torch.diagonal(A))),
        (idiff.BiCGSTAB(), C, torch.diag(1 / torch.diagonal(C))),
        (idiff.GMRES(), C, torch.diag(1 / torch.diagonal(C))),
        (idiff.NormalCG(), C, torch.diag(1 / (C * C).sum(0))),
    ]
    for solver, op, M in cases:
        for path, (x, status, _) in solve_paths(solver, op, b, rel_tol=1e-8, M=M, maxiter=300).items():
            assert status == SolveStatus.CONVERGED, (solver.name, path, status)
            assert residual(op, b, x) <= 1e-8 * float(b.norm()), (solver.name, path)


# ---------------------------------------------------------------------------------------------
# 7. properties of every solver


def _well_posed(kind: str, n: int, seed: int):
    if kind == "spd":
        return spd(n, 30.0, seed)
    if kind == "sym_indefinite":
        eig = torch.linspace(1.0, 3.0, n, dtype=DT) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT)
        return symmetric_with_spectrum(eig, seed)
    if kind == "nonsymmetric":
        return nonsymmetric(n, seed)
    # "contraction": I - J with ||J|| = 0.5 (Neumann with step 1)
    j = torch.randn(n, n, generator=gen(seed), dtype=DT)
    return torch.eye(n, dtype=DT) - 0.5 * j / torch.linalg.matrix_norm(j, 2)


SOLVERS = [
    (idiff.CG(), "spd"),
    (idiff.MINRES(), "spd"),
    (idiff.MINRES(), "sym_indefinite"),
    (idiff.GMRES(restart=4), "nonsymmetric"),
    (idiff.BiCGSTAB(), "nonsymmetric"),
    (idiff.NormalCG(), "nonsymmetric"),
    (idiff.Neumann(), "contraction"),
    (idiff.Direct(), "nonsymmetric"),
]


@settings(max_examples=8)
@given(
    n=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**16),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
    tol_kind=st.sampled_from(["relative", "atol"]),
)
@pytest.mark.parametrize("solver, kind", SOLVERS, ids=lambda v: getattr(v, "name", v))
def test_converged_implies_true_residual_within_tolerance(solver, kind, n, seed, scale, tol_kind):
    A = _well_posed(kind, n, seed)
    b = scale * torch.randn(n, generator=gen(seed + 1), dtype=DT)
    # abs_tol from tol (relative to ||b||), or from an absolute atol independent of the scale of b
    abs_tol = 1e-9 * float(b.norm()) if tol_kind == "relative" else 1e-3
    for eager in (True, False):
        raw = solver.solve(make_problem(A, b, abs_tol=abs_tol, maxiter=2000, eager=eager))
        status = SolveStatus(int(raw.status))
        assert status == SolveStatus.CONVERGED, (eager, status)  # well posed: it converges
        assert torch.isfinite(raw.x).all()
        assert residual(A, b, raw.x) <= abs_tol, (eager, residual(A, b, raw.x), abs_tol)


def _singular_examples():
    A1, b1 = rank_one_system()
    A2, b2 = random_singular_symmetric(10, 3, 5)
    A3, b3 = random_singular_general(7, 4, 6)
    return {
        "singular_diag": (SINGULAR_DIAG, ONES4),
        "rank_one": (A1, b1),
        "random_symmetric": (A2, b2),
        "random_general": (A3, b3),
    }


@pytest.mark.parametrize("example", list(_singular_examples()))
@pytest.mark.parametrize(
    "solver",
    [idiff.CG(), idiff.MINRES(), idiff.GMRES(), idiff.GMRES(restart=3), idiff.BiCGSTAB(), idiff.NormalCG(),
     idiff.Neumann(step_size=0.1)],
    ids=lambda s: repr(s) if isinstance(s, idiff.GMRES) else s.name,
)
def test_singular_inconsistent_never_converged_never_nonfinite(solver, example):
    A, b = _singular_examples()[example]
    if solver.requires_symmetric and not torch.allclose(A, A.T):
        pytest.skip("a symmetric solver on a non-symmetric operator")
    if isinstance(solver, idiff.Neumann) and example == "random_general":
        pytest.skip("the Richardson iteration needs I - step A to be a contraction on the range")
    for path, (x, status, _) in solve_paths(solver, A, b, rel_tol=1e-8, maxiter=300).items():
        assert status not in (SolveStatus.CONVERGED, SolveStatus.NONFINITE), (path, status)
        assert torch.isfinite(x).all(), path
        assert residual(A, b, x) <= float(b.norm()) * (1 + 1e-10), path
        assert float(x.norm()) < 1e6 * float(b.norm()), path


def test_direct_rank_one_is_not_converged():
    A, g = rank_one_system()
    raw = idiff.Direct().solve(make_problem(A, g, abs_tol=1e-8 * float(g.norm()), eager=True))
    assert raw.status != SolveStatus.CONVERGED or residual(A, g, raw.x) <= 1e-8 * float(g.norm())


def test_direct_singular_masked_is_finite():
    raw = idiff.Direct().solve(make_problem(SINGULAR_DIAG, ONES4, abs_tol=1e-8, eager=False))
    assert torch.isfinite(raw.x).all()
