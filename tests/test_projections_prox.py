"""Projections and proximal operators against brute force, optimality certificates, finite differences and loops."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from implicitdiff import projections, prox

DT = torch.float64


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=DT)


# ---------------------------------------------------------------- sets, their brute-force projections and members
@dataclasses.dataclass
class SetCase:
    """A set: the projection as a function of (x, *param tensors), scipy's description, points of the set."""

    raw: Callable[..., torch.Tensor]
    params: list[torch.Tensor]
    reference: Callable[[np.ndarray], np.ndarray]
    member: Callable[[str], np.ndarray]  # "inside" or "boundary"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw(x, *self.params)


def slsqp(x: np.ndarray, constraints=(), bounds=None, lift=None, size=None) -> np.ndarray:
    """argmin 0.5 ||lift(u) - x||^2 over u (u = z when lift is None) by SLSQP, to ~1e-10."""
    lift = lift or (lambda u: u)
    n = size or x.size

    def fun(u):
        r = lift(u) - x
        return 0.5 * r @ r

    res = scipy.optimize.minimize(
        fun, np.zeros(n), method="SLSQP", constraints=list(constraints), bounds=bounds,
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    return lift(res.x)


def make_set(name: str, n: int, rng: np.random.Generator, rows: int | None = None) -> SetCase:
    def pick_boundary(w, lo, up):
        w = w.copy()
        mask = rng.random(n) < 0.5
        mask[rng.integers(n)] = True
        w[mask] = np.where(rng.random(mask.sum()) < 0.5, lo[mask], up[mask])
        return w

    if name == "nonnegative":
        def member(kind):
            w = rng.uniform(0.1, 2, n)
            return pick_boundary(w, np.zeros(n), np.zeros(n)) if kind == "boundary" else w

        return SetCase(lambda x: projections.nonnegative(x), [], lambda x: slsqp(x, bounds=[(0, None)] * n), member)
    if name in ("box", "linf_ball"):
        if name == "box":
            lo = rng.uniform(-2, 0, n)
            up = lo + rng.uniform(0.1, 2, n)
            params = [t(lo), t(up)]
            raw = lambda x, lo, up: projections.box(x, (lo, up))  # noqa: E731
        else:
            r = rng.uniform(0.3, 2)
            lo, up = -np.full(n, r), np.full(n, r)
            params = [t(r)]
            raw = projections.linf_ball

        def member(kind):
            w = lo + rng.uniform(0.05, 0.95, n) * (up - lo)
            return pick_boundary(w, lo, up) if kind == "boundary" else w

        return SetCase(raw, params, lambda x: slsqp(x, bounds=list(zip(lo, up))), member)
    if name in ("hyperplane", "halfspace"):
        a, b = rng.normal(size=n), rng.normal()
        a[0] += np.sign(a[0]) * 0.5  # a != 0
        kind_ = "eq" if name == "hyperplane" else "ineq"
        sign = 1.0 if name == "hyperplane" else -1.0
        cons = [{"type": kind_, "fun": lambda z: sign * (a @ z - b), "jac": lambda z: sign * a}]
        raw = getattr(projections, name)

        def member(kind):
            w = rng.normal(size=n)
            on_plane = w - (a @ w - b) / (a @ a) * a
            return on_plane - 0.3 * a if (kind == "inside" and name == "halfspace") else on_plane

        return SetCase(lambda x, a, b: raw(x, (a, b)), [t(a), t(b)], lambda x: slsqp(x, cons), member)
    if name == "affine_set":
        m = rows or int(rng.integers(1, n + 1))
        A, b = rng.normal(size=(m, n)), rng.normal(size=m)

        def dense_kkt(x):  # the QP's optimality system [[I, A'], [A, 0]] [z; nu] = [x; b], solved densely
            K = np.block([[np.eye(n), A.T], [A, np.zeros((m, m))]])
            return np.linalg.solve(K, np.concatenate([x, b]))[:n]

        def member(kind):
            w = np.linalg.lstsq(A, b, rcond=None)[0]
            null = np.linalg.svd(A)[2][m:]
            return w + null.T @ rng.normal(size=n - m)

        return SetCase(lambda x, A, b: projections.affine_set(x, (A, b)), [t(A), t(b)], dense_kkt, member)
    if name == "simplex":
        s = rng.uniform(0.5, 2)
        cons = [{"type": "eq", "fun": lambda z: z.sum() - s, "jac": lambda z: np.ones(n)}]

        def member(kind):
            w = rng.uniform(0.1, 1, n)
            if kind == "boundary" and n > 1:
                w[rng.random(n) < 0.5] = 0.0
                w[rng.integers(n)] = 1.0
            return w / w.sum() * s

        return SetCase(projections.simplex, [t(s)], lambda x: slsqp(x, cons, bounds=[(0, None)] * n), member)
    if name == "l1_ball":
        r = rng.uniform(0.5, 2)
        cons = [{"type": "ineq", "fun": lambda u: r - u.sum(), "jac": lambda u: -np.ones(2 * n)}]

        def reference(x):  # the KKT form: z = sign(x) max(|x| - theta, 0), theta >= 0 found by bisection
            # (SLSQP on the lifted QP z = p - q, p, q >= 0, sum(p + q) <= r, was tried first: on some
            # draws it stops at an infeasible point, 0.06 outside the ball)
            if np.abs(x).sum() <= r:
                return x
            lo, hi = 0.0, float(np.abs(x).max())
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if np.maximum(np.abs(x) - mid, 0).sum() > r else (lo, mid)
            return np.sign(x) * np.maximum(np.abs(x) - 0.5 * (lo + hi), 0)

        def member(kind):
            w = rng.normal(size=n)
            if kind == "boundary":
                w[rng.random(n) < 0.3] = 0.0
                w[rng.integers(n)] = 1.0
                return w / np.abs(w).sum() * r
            return w / np.abs(w).sum() * r * rng.uniform(0.1, 0.9)

        return SetCase(projections.l1_ball, [t(r)], reference, member)
    if name == "l2_ball":
        r = rng.uniform(0.5, 2)
        cons = [{"type": "ineq", "fun": lambda z: r**2 - z @ z, "jac": lambda z: -2 * z}]

        def member(kind):
            w = rng.normal(size=n)
            return w / np.linalg.norm(w) * r * (1.0 if kind == "boundary" else rng.uniform(0.1, 0.9))

        return SetCase(projections.l2_ball, [t(r)], lambda x: slsqp(x, cons), member)
    if name == "box_section":
        lo = rng.uniform(-1, 0, n)
        up = lo + rng.uniform(0.2, 2, n)
        a = rng.normal(size=n)
        a[rng.random(n) < 0.2] = 0.0  # coordinates outside the equality
        inner = lo + rng.uniform(0.1, 0.9, n) * (up - lo)
        b = float(a @ inner)
        # with a = 0 the equality reads 0 = 0 (SLSQP cannot take a constraint with a zero gradient)
        cons = [{"type": "eq", "fun": lambda z: a @ z - b, "jac": lambda z: a}] if a.any() else []

        def member(kind):
            if kind == "inside":
                return inner
            w = pick_boundary(inner, lo, up)
            free = [i for i in range(n) if a[i] != 0 and lo[i] < w[i] < up[i]]
            if free:  # move one free coordinate so that a^T w = b again, if it stays in its bounds
                i = free[0]
                wi = w[i] + (b - a @ w) / a[i]
                if lo[i] <= wi <= up[i]:
                    w[i] = wi
                    return w
            return inner

        return SetCase(
            lambda x, lo, up, a, b: projections.box_section(x, (lo, up, a, b)),
            [t(lo), t(up), t(a), t(b)],
            lambda x: slsqp(x, cons, bounds=list(zip(lo, up))),
            member,
        )
    raise AssertionError(name)


SETS = ["nonnegative", "box", "hyperplane", "halfspace", "affine_set", "simplex", "l1_ball", "l2_ball", "linf_ball",
        "box_section"]

values = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("name", SETS)
@given(data=st.data(), n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       where=st.sampled_from(["anywhere", "inside", "boundary"]))
def test_projection_matches_brute_force(name, data, n, seed, where):
    case = make_set(name, n, np.random.default_rng(seed))
    if where == "anywhere":
        x = np.asarray(data.draw(st.lists(values, min_size=n, max_size=n)))
    else:
        x = case.member(where)
    z = case.project(t(x))
    assert z.shape == (n,) and z.dtype == DT
    np.testing.assert_allclose(z.numpy(), case.reference(x), atol=2e-6)
    if where != "anywhere":  # a point of the set is its own projection
        np.testing.assert_allclose(z.numpy(), x, atol=1e-12)
    np.testing.assert_allclose(case.project(z).numpy(), z.numpy(), atol=1e-12)  # idempotent


def finite_difference_jacobian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: float) -> torch.Tensor:
    flat = x.reshape(-1)
    columns = []
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        columns.append(((f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * h)).reshape(-1))
    return torch.stack(columns, -1).reshape(*f(x).shape, *x.shape)


def check_jacobians(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """jacrev, jacfwd and plain autograd w.r.t. every input against central differences (away from kinks)."""
    argnums = tuple(range(len(inputs)))
    reverse = torch.func.jacrev(fn, argnums=argnums)(*inputs)
    forward = torch.func.jacfwd(fn, argnums=argnums)(*inputs)
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    cotangent = torch.linspace(-1.0, 1.0, out.numel(), dtype=DT).reshape(out.shape)
    plain = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
    for g, jac, x in zip(plain, reverse, inputs):
        contracted = torch.tensordot(cotangent, jac, dims=out.dim()) if out.dim() else cotangent * jac
        torch.testing.assert_close(torch.zeros_like(x) if g is None else g, contracted, atol=1e-12, rtol=1e-12)
    for i, x in enumerate(inputs):
        def partial(v, i=i):
            return fn(*inputs[:i], v, *inputs[i + 1:])

        coarse = finite_difference_jacobian(partial, x, 1e-5)
        fine = finite_difference_jacobian(partial, x, 1e-6)
        assume(torch.allclose(coarse, fine, atol=1e-6))  # a kink within 1e-5: the derivative is not defined there
        torch.testing.assert_close(reverse[i], fine, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(forward[i], reverse[i], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", SETS)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_projection_jacobian_matches_finite_differences(name, n, seed):
    rng = np.random.default_rng(seed)
    case = make_set(name, n, rng)
    x = t(rng.normal(scale=2.0, size=n))
    check_jacobians(case.raw, [x, *case.params])


@pytest.mark.parametrize("name", SETS)
def test_projection_vmap_equals_loop(name):
    rng = np.random.default_rng(1)
    cases = [make_set(name, 5, rng, rows=2) for _ in range(4)]
    xs = torch.stack([t(rng.normal(scale=2.0, size=5)) for _ in cases])
    params = [torch.stack(ps) for ps in zip(*[c.params for c in cases])]
    batched = torch.func.vmap(lambda x, *ps: cases[0].raw(x, *ps))(xs, *params)
    looped = torch.stack([c.project(x) for c, x in zip(cases, xs)])
    torch.testing.assert_close(batched, looped, atol=1e-14, rtol=0)
    argnums = tuple(range(1 + len(params)))
    jac = torch.func.jacrev(cases[0].raw, argnums=argnums)
    batched_jac = torch.func.vmap(jac)(xs, *params)
    for i, c in enumerate(cases):
        for got, want in zip(batched_jac, jac(xs[i], *c.params)):
            torch.testing.assert_close(got[i], want, atol=1e-13, rtol=0)


def test_projection_kinks_take_the_active_piece():
    x = t([0.0, 1.0, 2.0])
    # on a bound: derivative 0 w.r.t. x, 1 w.r.t. the bound
    jx, jlo, jup = torch.func.jacrev(lambda x, lo, up: projections.box(x, (lo, up)), argnums=(0, 1, 2))(x, t(0.0), t(2.0))
    torch.testing.assert_close(jx, torch.diag(t([0.0, 1.0, 0.0])))
    torch.testing.assert_close(jlo, t([1.0, 0.0, 0.0]))
    torch.testing.assert_close(jup, t([0.0, 0.0, 1.0]))
    assert torch.equal(torch.func.jacfwd(projections.nonnegative)(x), torch.diag(t([0.0, 1.0, 1.0])))
    # an entry exactly at the simplex threshold is outside the support
    z = t([1.25, 0.75, 0.5])  # theta = 0.5: support {0, 1}, z_2 exactly at theta
    torch.testing.assert_close(projections.simplex(z), t([0.75, 0.25, 0.0]))
    j, js = torch.func.jacrev(projections.simplex, argnums=(0, 1))(z, t(1.0))
    torch.testing.assert_close(j, t([[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(js, t([0.5, 0.5, 0.0]))
    # finite at the origin of the l2 ball and on the sphere of the l1 ball
    assert torch.isfinite(torch.func.jacrev(projections.l2_ball)(torch.zeros(3, dtype=DT))).all()
    on_sphere = t([0.5, -0.5, 0.0])
    j = torch.func.jacrev(projections.l1_ball)(on_sphere)
    torch.testing.assert_close(j, t([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- proximal operators
@dataclasses.dataclass
class ProxCase:
    raw: Callable[..., torch.Tensor]  # raw(x, *param tensors, scaling)
    params: list[torch.Tensor]
    scaling: float
    certificate: Callable[[np.ndarray, np.ndarray], None]  # asserts z = prox(x, scaling) by the subdifferential
    reference: Callable[[np.ndarray], np.ndarray] | None = None  # brute force of prox(x, scaling), where practical
    penalty: Callable[[np.ndarray], float] | None = None  # scaling * g(z), to compare with the brute force


def _norm_certificate(x, z, threshold, norm, dual_norm, extra=0.0):
    """x - z - extra * z = threshold * G with G in the subdifferential of a norm at z: dual(G) <= 1, <G, z> = ||z||."""
    G = (x - z - extra * z) / threshold
    assert dual_norm(G) <= 1 + 1e-10
    assert abs(float(np.sum(G * z)) - norm(z)) <= 1e-10 * max(1.0, norm(z))


def make_prox(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> ProxCase:
    s = rng.uniform(0.3, 1.5)
    lam = rng.uniform(0.1, 1.5)
    size = int(np.prod(shape))
    if name in ("l1", "elastic_net", "nonnegative_l1"):
        weights = rng.uniform(0.1, 1.5, shape) if name == "l1" else lam  # per-coordinate weights for l1
        thr = s * np.asarray(weights)
        if name == "l1":
            raw = lambda x, lam, scaling: prox.l1(x, lam, scaling)  # noqa: E731
            params = [t(weights)]
            extra = 0.0
        elif name == "nonnegative_l1":
            raw = lambda x, lam, scaling: prox.nonnegative_l1(x, lam, scaling)  # noqa: E731
            params = [t(lam)]
            extra = 0.0
        elif name == "elastic_net":
            gamma = rng.uniform(0.1, 2)
            raw = lambda x, lam, gamma, scaling: prox.elastic_net(x, (lam, gamma), scaling)  # noqa: E731
            params = [t(lam), t(gamma)]
            extra = s * gamma

        def penalty(z):
            if name == "nonnegative_l1":
                return float((thr * z).sum()) if (z >= 0).all() else np.inf
            return float((np.broadcast_to(thr, z.shape) * np.abs(z)).sum() + 0.5 * extra * (z * z).sum())

        if name == "nonnegative_l1":
            def certificate(x, z):  # x - z - s lam in the normal cone of {z >= 0} at z
                r = x - z - thr
                assert (z >= 0).all() and (r <= 1e-12).all() and np.allclose(r[z > 0], 0, atol=1e-12)

            def reference(x):
                res = scipy.optimize.minimize(
                    lambda z: 0.5 * ((z - x) ** 2).sum() + thr * z.sum(), np.zeros(size), jac=lambda z: z - x + thr,
                    method="SLSQP", bounds=[(0, None)] * size, options={"ftol": 1e-16, "maxiter": 500})
                return res.x
        else:
            def certificate(x, z):  # coordinatewise: (x - z - extra z) / thr_i in the subdifferential of |z_i|
                G = (x - z - extra * z) / thr
                assert (np.abs(G) <= 1 + 1e-10).all()
                np.testing.assert_allclose(G[z != 0], np.sign(z[z != 0]), atol=1e-10)

            def reference(x):  # z = p - q, p, q >= 0: min 0.5||p - q - x||^2 + thr.(p + q) + extra/2 ||p - q||^2
                w = np.broadcast_to(thr, (size,)).reshape(-1)

                def fun(u):
                    z = u[:size] - u[size:]
                    return 0.5 * ((z - x.reshape(-1)) ** 2).sum() + w @ (u[:size] + u[size:]) + 0.5 * extra * z @ z

                def jac(u):
                    z = u[:size] - u[size:]
                    gz = z - x.reshape(-1) + extra * z
                    return np.concatenate([gz + w, -gz + w])

                res = scipy.optimize.minimize(fun, np.zeros(2 * size), jac=jac, method="SLSQP",
                                              bounds=[(0, None)] * (2 * size), options={"ftol": 1e-16, "maxiter": 500})
                return (res.x[:size] - res.x[size:]).reshape(x.shape)

        return ProxCase(raw, params, s, certificate, reference, penalty)
    if name == "l2_squared":
        def certificate(x, z):
            np.testing.assert_allclose(x - z, s * lam * z, atol=1e-12)

        return ProxCase(lambda x, lam, scaling: prox.l2_squared(x, lam, scaling), [t(lam)], s, certificate, None)
    if name == "identity":
        def certificate(x, z):
            np.testing.assert_array_equal(x, z)

        return ProxCase(lambda x, scaling: prox.identity(x, None, scaling), [], s, certificate, None)
    if name == "group_lasso":
        def group_norm(z):
            return float(np.linalg.norm(z, axis=-1).sum())

        def certificate(x, z):
            _norm_certificate(x, z, s * lam, group_norm, lambda G: float(np.linalg.norm(G, axis=-1).max()))

        def reference(x):  # epigraph: min 0.5||z - x||^2 + s lam sum(tau_g), tau_g^2 >= ||z_g||^2, tau_g >= 0
            G, d = x.reshape(-1, x.shape[-1]).shape

            def fun(u):
                return 0.5 * ((u[: G * d] - x.reshape(-1)) ** 2).sum() + s * lam * u[G * d:].sum()

            def jac(u):
                return np.concatenate([u[: G * d] - x.reshape(-1), np.full(G, s * lam)])

            def epigraph(g):
                def fun(u):
                    return u[G * d + g] ** 2 - (u[g * d:(g + 1) * d] ** 2).sum()

                def grad(u):
                    out = np.zeros_like(u)
                    out[g * d:(g + 1) * d] = -2 * u[g * d:(g + 1) * d]
                    out[G * d + g] = 2 * u[G * d + g]
                    return out

                return {"type": "ineq", "fun": fun, "jac": grad}

            u0 = np.concatenate([x.reshape(-1), np.linalg.norm(x.reshape(G, d), axis=-1) + 1.0])
            res = scipy.optimize.minimize(fun, u0, jac=jac, method="SLSQP", constraints=[epigraph(g) for g in range(G)],
                                          bounds=[(None, None)] * (G * d) + [(0, None)] * G,
                                          options={"ftol": 1e-16, "maxiter": 1000})
            return res.x[: G * d].reshape(x.shape)

        return ProxCase(lambda x, lam, scaling: prox.group_lasso(x, lam, scaling), [t(lam)], s, certificate, reference,
                        lambda z: s * lam * group_norm(z))
    if name == "nuclear":
        def nuclear_norm(z):
            return float(np.linalg.norm(z, "nuc"))

        def certificate(x, z):
            _norm_certificate(x, z, s * lam, nuclear_norm, lambda G: float(np.linalg.norm(G, 2)))

        return ProxCase(lambda x, lam, scaling: prox.nuclear(x, lam, scaling), [t(lam)], s, certificate, None)
    raise AssertionError(name)


PROXES = ["l1", "elastic_net", "group_lasso", "nonnegative_l1", "l2_squared", "identity", "nuclear"]
MATRIX = {"group_lasso", "nuclear"}


@pytest.mark.parametrize("name", PROXES)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 3), cols=st.integers(1, 4),
       at_threshold=st.booleans())
def test_prox_matches_certificate_and_brute_force(name, data, seed, rows, cols, at_threshold):
    shape = (rows, cols) if name in MATRIX else (rows * cols,)
    rng = np.random.default_rng(seed)
    case = make_prox(name, shape, rng)
    s = case.scaling
    x = np.asarray(data.draw(st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))).reshape(shape)
    if at_threshold and name in ("l1", "elastic_net", "nonnegative_l1"):
        thr = s * case.params[0].numpy()
        x = np.where(rng.random(shape) < 0.5, np.broadcast_to(thr, shape) * np.sign(x + 0.5), x)  # exactly +-s lam
    z = case.raw(t(x), *case.params, s).numpy()
    case.certificate(x, z)
    if case.reference is not None:  # no point the brute-force search finds has a lower prox objective
        z_ref = case.reference(x)

        def objective(z):
            return 0.5 * float(((z - x) ** 2).sum()) + case.penalty(z)

        assert objective(z) <= objective(z_ref) + 1e-10 * max(1.0, abs(objective(z_ref)))
        # the objective is 1-strongly convex: objective(z_ref) - objective(z) >= |z_ref - z|^2 / 2
        assert 0.5 * float(((z_ref - z) ** 2).sum()) <= objective(z_ref) - objective(z) + 1e-10


@pytest.mark.parametrize("name", PROXES)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 3), cols=st.integers(1, 4))
def test_prox_jacobian_matches_finite_differences(name, seed, rows, cols):
    shape = (rows, cols) if name in MATRIX else (rows * cols,)
    rng = np.random.default_rng(seed)
    case = make_prox(name, shape, rng)
    x = t(rng.normal(scale=2.0, size=shape))
    check_jacobians(case.raw, [x, *case.params, t(rng.uniform(0.3, 1.5))])


@pytest.mark.parametrize("name", PROXES)
def test_prox_vmap_equals_loop(name):
    rng = np.random.default_rng(2)
    shape = (3, 4) if name in MATRIX else (6,)
    cases = [make_prox(name, shape, rng) for _ in range(3)]
    xs = torch.stack([t(rng.normal(scale=2.0, size=shape)) for _ in cases])
    scalings = t(rng.uniform(0.3, 1.5, 3))
    params = [torch.stack(ps) for ps in zip(*[c.params for c in cases])]
    batched = torch.func.vmap(cases[0].raw)(xs, *params, scalings)
    looped = torch.stack([c.raw(x, *c.params, s) for c, x, s in zip(cases, xs, scalings)])
    torch.testing.assert_close(batched, looped, atol=1e-13, rtol=0)
    jac = torch.func.jacrev(cases[0].raw, argnums=tuple(range(2 + len(params))))
    batched_jac = torch.func.vmap(jac)(xs, *params, scalings)
    for i, c in enumerate(cases):
        for got, want in zip(batched_jac, jac(xs[i], *c.params, scalings[i])):
            torch.testing.assert_close(got[i], want, atol=1e-12, rtol=0)


def test_soft_thresholding_at_the_threshold_takes_the_zero_piece():
    # |x_i| = lam * scaling exactly: not differentiable; the documented derivative is the zero piece's
    x = t([0.5, -0.5, 0.7, 0.1])
    jx, jlam = torch.func.jacrev(prox.l1, argnums=(0, 1))(x, t(1.0), 0.5)
    torch.testing.assert_close(jx, torch.diag(t([0.0, 0.0, 1.0, 0.0])))
    torch.testing.assert_close(jlam, t([0.0, 0.0, -0.5, 0.0]))
    assert torch.equal(torch.func.jacfwd(prox.l1)(x, t(1.0), 0.5), jx)
    # the zero piece is the one-sided derivative from below the threshold
    h = 1e-7
    torch.testing.assert_close((prox.l1(x, 1.0, 0.5) - prox.l1(x - h * torch.sign(x), 1.0, 0.5)) / h, t([0.0, 0.0, 1.0, 0.0]))
    # group lasso: a group with norm exactly at the threshold is zeroed with derivative 0
    g = t([[3.0, 4.0], [0.6, 0.8]])
    j = torch.func.jacrev(prox.group_lasso)(g, 1.0)
    assert torch.equal(j[1], torch.zeros(2, 2, 2, dtype=DT)) and j[0].abs().sum() > 0


@pytest.mark.parametrize("singular_values", [(2.0, 2.0, 0.3), (2.0, 0.0, 0.0), (1.5, 1.5, 1.5), (0.2, 0.2, 0.0)])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (3, 3)])
def test_nuclear_prox_derivative_at_repeated_and_zero_singular_values(singular_values, shape):
    # singular value thresholding is differentiable wherever no singular value equals the threshold, including
    # repeated and zero singular values, where a derivative through torch.linalg.svd is not finite
    g = torch.Generator().manual_seed(0)
    m, n = shape
    U, _ = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=DT))
    X = U @ torch.diag(t(singular_values)) @ V.T
    f = lambda X, lam: prox.nuclear(X, lam, 1.0)  # noqa: E731
    jx, jlam = torch.func.jacrev(f, argnums=(0, 1))(X, t(0.5))
    torch.testing.assert_close(jx, finite_difference_jacobian(lambda v: f(v, t(0.5)), X, 1e-6), atol=1e-7, rtol=0)
    torch.testing.assert_close(jlam, finite_difference_jacobian(lambda v: f(X, v), t(0.5), 1e-6), atol=1e-7, rtol=0)
    fx, flam = torch.func.jacfwd(f, argnums=(0, 1))(X, t(0.5))
    torch.testing.assert_close(fx, jx, atol=1e-12, rtol=0)
    torch.testing.assert_close(flam, jlam, atol=1e-12, rtol=0)


def test_nuclear_prox_second_derivative_where_singular_values_are_distinct():
    X = torch.randn(4, 3, dtype=DT)
    loss = lambda X: (prox.nuclear(X, 0.4) ** 3).sum()  # noqa: E731
    hessian = torch.func.hessian(loss)(X)
    reference = finite_difference_jacobian(torch.func.grad(loss), X, 1e-6)
    torch.testing.assert_close(hessian, reference, atol=1e-6, rtol=0)
