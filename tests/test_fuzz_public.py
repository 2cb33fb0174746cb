"""Property tests of the public numerical functions (hypothesis), each against an independent reference.

tcfa.sinkhorn's value and its gradients (envelope theorem) on dense, online and ragged batches,
sinkhorn_cost's gradient with respect to the cost, barycentric_map, sinkhorn_divergence (GeomLoss's
formula), MomentAccumulator under any split of the stream, cca (the SVCCA recipe), ridge_map (least
squares on the augmented system), procrustes (scipy), linear_cka (Kornblith's Gram formula).
Conventions of tests/test_fuzz.py: shapes drawn by hypothesis, values by a seeded generator,
derandomized, float64 references.
"""
import numpy as np
import pytest
import torch

import reference as ref
import tcfa
from stats_reference import kornblith_cka, svcca_rho
from test_fuzz import DTYPES, close, offsets_of
from test_linear_maps import numpy_ridge

hypothesis = pytest.importorskip("hypothesis")
scipy_linalg = pytest.importorskip("scipy.linalg")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True)
SEEDS = st.integers(0, 2**31 - 1)


@st.composite
def ot_case(draw):
    B = draw(st.integers(1, 3))
    return dict(nx=[draw(st.integers(1, 12)) for _ in range(B)], ny=[draw(st.integers(1, 12)) for _ in range(B)],
                d=draw(st.integers(1, 4)), dtype=draw(DTYPES), eps_rel=draw(st.sampled_from([0.3, 1.0, 3.0])),
                mode=draw(st.sampled_from(["dense", "online"])), scaling=draw(st.sampled_from([None, 0.6])),
                zeros=draw(st.booleans()), seed=draw(SEEDS))


def ot_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    xo, yo = offsets_of(c["nx"]), offsets_of(c["ny"])
    x = torch.randn(sum(c["nx"]), c["d"], generator=g, dtype=torch.float64)
    y = torch.randn(sum(c["ny"]), c["d"], generator=g, dtype=torch.float64) + 0.3
    a = torch.rand(x.shape[0], generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(y.shape[0], generator=g, dtype=torch.float64) + 0.1
    if c["zeros"]:
        a[xo[:-1][xo.diff() > 1]] = 0.0
    return x, y, a, b, xo, yo


def eps_of(c, x, y, xo, yo):
    """eps relative to the largest squared distance of the batch, (x, x) and (y, y) pairs included:
    the reference's plain Sinkhorn converges at a rate that degrades like exp(-C_max / eps), and at
    C_max / eps = 13 neither it nor tcfa converged in 20,000 iterations (small eps: the POT property)."""
    diam = max(float(ref.cost_flat(p, q, po, qo).max()) for p, q, po, qo in ((x, y, xo, yo), (x, x, xo, xo),
                                                                            (y, y, yo, yo)))
    return c["eps_rel"] * max(diam, 1e-2)


def reference_plans(x, y, a, b, xo, yo, eps):
    """Each problem's plan by plain log-domain Sinkhorn on its explicit cost (weights normalised)."""
    out = []
    for _, sx, sy in ref.problems(xo, yo):
        C = ref.cost(x[sx], y[sy], "sqeuclidean")
        ak, bk = a[sx] / a[sx].sum(), b[sy] / b[sy].sum()
        keep = ak > 0  # zero-weight rows carry no mass: solved without them
        P = torch.zeros(len(ak), len(bk), dtype=torch.float64)
        P[keep] = ref.sinkhorn_plan(ak[keep], bk, C[keep], eps)
        out.append((P, C, ak, bk))
    return out


@FUZZ
@given(ot_case())
def test_sinkhorn_value_and_gradients(c):
    """value() = <P, C> + eps KL(P | a b) at the optimum; d value / dx_i = sum_j P_ij 2 (x_i - y_j),
    d value / dy_j = sum_i P_ij 2 (y_j - x_i) (envelope theorem), for every problem of the batch."""
    x, y, a, b, xo, yo = ot_inputs(c)
    dt, eps = c["dtype"], eps_of(c, x, y, xo, yo)
    xt, yt = x.to(dt).requires_grad_(), y.to(dt).requires_grad_()
    r = tcfa.sinkhorn(xt, yt, a.to(dt), b.to(dt), eps=eps, x_offsets=xo, y_offsets=yo, mode=c["mode"],
                      scaling=c["scaling"], tol=1e-6 if dt == torch.float32 else 1e-12, max_iter=20000)
    value = r.value()
    value.sum().backward()
    want_value, gx, gy = [], torch.zeros_like(x), torch.zeros_like(y)
    for (P, C, ak, bk), (_, sx, sy) in zip(reference_plans(x, y, a, b, xo, yo, eps), ref.problems(xo, yo)):
        mass = ak[:, None] * bk[None, :]
        kl = torch.where(P > 0, P * (P / mass.clamp_min(1e-300)).log(), 0.0).sum() - P.sum() + 1.0
        want_value.append((P * C).sum() + eps * kl)
        gx[sx] = 2 * (P.sum(1, keepdim=True) * x[sx] - P @ y[sy])
        gy[sy] = 2 * (P.sum(0)[:, None] * y[sy] - P.T @ x[sx])
    scale = 1.0 + float(torch.stack(want_value).abs().max())
    close(value.detach(), torch.stack(want_value), dt, scale * (30 if dt == torch.float32 else 1))
    close(xt.grad, gx, dt, 30 * scale if dt == torch.float32 else scale)
    close(yt.grad, gy, dt, 30 * scale if dt == torch.float32 else scale)


@FUZZ
@given(ot_case())
def test_sinkhorn_cost_gradient_is_the_plan_and_barycentric_map(c):
    """sinkhorn_cost on the explicit costs: d value / dC = P; barycentric_map = P v / P 1."""
    x, y, a, b, xo, yo = ot_inputs(c)
    eps = eps_of(c, x, y, xo, yo)
    plans = reference_plans(x, y, a, b, xo, yo, eps)
    flat = torch.cat([C.reshape(-1) for _, C, _, _ in plans]).requires_grad_()
    r = tcfa.sinkhorn_cost(flat, a, b, eps=eps, x_offsets=xo, y_offsets=yo, tol=1e-12, max_iter=20000)
    r.value().sum().backward()
    close(flat.grad, torch.cat([P.reshape(-1) for P, _, _, _ in plans]), torch.float64, 1.0)
    v = torch.randn(y.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(c["seed"] + 1))
    rp = tcfa.sinkhorn(x, y, a, b, eps=eps, x_offsets=xo, y_offsets=yo, mode=c["mode"], tol=1e-12, max_iter=20000)
    T = tcfa.barycentric_map(rp, v)
    for (P, _, ak, _), (_, sx, sy) in zip(plans, ref.problems(xo, yo)):
        rows = ak > 0  # a zero-weight row's map is the softmax of its (free) potential: not compared
        close(T[sx][rows], (P @ v[sy])[rows] / P.sum(1, keepdim=True)[rows], torch.float64, 1.0)


@FUZZ
@given(ot_case())
def test_sinkhorn_divergence_is_geomloss_formula(c):
    """S(a, b) = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2 with each OT the entropic value of the reference plan."""
    x, y, a, b, xo, yo = ot_inputs(c)
    eps = eps_of(c, x, y, xo, yo)

    def values(p, q, po, qo, u, w):
        out = []
        for P, C, ak, bk in reference_plans(p, q, u, w, po, qo, eps):
            mass = ak[:, None] * bk[None, :]
            kl = torch.where(P > 0, P * (P / mass.clamp_min(1e-300)).log(), 0.0).sum() - P.sum() + 1.0
            out.append((P * C).sum() + eps * kl)
        return torch.stack(out)

    want = values(x, y, xo, yo, a, b) - values(x, x, xo, xo, a, a) / 2 - values(y, y, yo, yo, b, b) / 2
    got = tcfa.sinkhorn_divergence(x, y, a, b, eps=eps, x_offsets=xo, y_offsets=yo, tol=1e-12, max_iter=20000)
    close(got, want, torch.float64, 1.0 + float(want.abs().max()))


@st.composite
def stats_case(draw):
    C = draw(st.integers(1, 4))
    n = draw(st.integers(4 * C + 12, 120))
    return dict(C=C, n=n, dx=draw(st.integers(1, 7)), dy=draw(st.integers(1, 7)), dtype=draw(DTYPES),
                cuts=sorted(draw(st.lists(st.integers(0, n), max_size=5))), seed=draw(SEEDS),
                reg=draw(st.sampled_from([1e-3, 0.1, 1.0])))


def stats_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    labels = torch.arange(c["n"]) % c["C"]
    labels = labels[torch.randperm(c["n"], generator=g)]
    x = torch.randn(c["n"], c["dx"], generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, c["dx"],
                                                                                        dtype=torch.float64) + 1
    y = x @ torch.randn(c["dx"], c["dy"], generator=g, dtype=torch.float64) * 0.5 \
        + torch.randn(c["n"], c["dy"], generator=g, dtype=torch.float64)
    return x, y, labels


@FUZZ
@given(stats_case())
def test_accumulator_any_split_equals_one_pass(c):
    x, y, labels = stats_inputs(c)
    dt = c["dtype"]
    acc = tcfa.MomentAccumulator(c["C"], c["dx"], c["dy"], dtype=dt)
    bounds = [0, *c["cuts"], c["n"]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # empty batches included
        acc.update(x[lo:hi].to(dt), y[lo:hi].to(dt), labels[lo:hi])
    one = tcfa.segment_moments(x, y, labels, c["C"])
    for name in ("mean_x", "mean_y", "sxx", "syy", "sxy"):
        close(getattr(acc.result(), name), getattr(one, name), dt, 1.0 + c["n"])


@FUZZ
@given(stats_case())
def test_cca_ridge_procrustes_and_cka_against_references(c):
    x, y, labels = stats_inputs(c)
    m = tcfa.segment_moments(x, y, labels, c["C"])
    k = min(c["dx"], c["dy"])
    rho = tcfa.cca(m, k, c["reg"]).rho
    maps = tcfa.ridge_map(m, c["reg"])
    pro = tcfa.procrustes(x, y, labels, c["C"])
    d = max(c["dx"], c["dy"])
    for cond in range(c["C"]):
        xc, yc = x[labels == cond].numpy(), y[labels == cond].numpy()
        np.testing.assert_allclose(rho[cond].numpy(), svcca_rho(xc, yc, c["reg"])[:k], atol=1e-8)
        _, _, B = numpy_ridge(xc, yc, c["reg"])
        np.testing.assert_allclose((maps.U[cond] @ maps.V[cond]).numpy(), B, atol=1e-8)
        X, Y = np.zeros((len(xc), d)), np.zeros((len(yc), d))
        X[:, :c["dx"]], Y[:, :c["dy"]] = xc - xc.mean(0), yc - yc.mean(0)
        R, _ = scipy_linalg.orthogonal_procrustes(X, Y)
        np.testing.assert_allclose((pro.U[cond] @ pro.V[cond]).numpy(), R[:c["dx"], :c["dy"]], atol=1e-8)
    for debiased in (False, True):
        got = float(tcfa.linear_cka(x.to(c["dtype"]), y.to(c["dtype"]), debiased=debiased))
        want = kornblith_cka(x.numpy(), y.numpy(), debiased=debiased)
        assert abs(got - want) < (1e-10 if c["dtype"] == torch.float64 else 1e-5), (debiased, got, want)


@FUZZ
@given(stats_case())
def test_cka_from_moments_and_rbf_cka(c):
    """cka_from_moments per condition = Kornblith's Gram CKA of that condition's rows; rbf_cka =
    the centred RBF-Gram alignment with the median-distance bandwidth."""
    x, y, labels = stats_inputs(c)
    got = tcfa.cka_from_moments(tcfa.segment_moments(x, y, labels, c["C"]))
    want = [kornblith_cka(x[labels == k].numpy(), y[labels == k].numpy()) for k in range(c["C"])]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    xs, ys = x[:40].numpy(), y[:40].numpy()

    def gram(a):
        d2 = ((a[:, None] - a[None]) ** 2).sum(-1)
        med = np.median(np.sqrt(d2[np.triu_indices(len(a), 1)]))
        return np.exp(-d2 / (2 * med**2))

    H = np.eye(len(xs)) - 1.0 / len(xs)
    Kc, Lc = H @ gram(xs) @ H, H @ gram(ys) @ H
    want_rbf = np.sum(Kc * Lc) / np.sqrt(np.sum(Kc * Kc) * np.sum(Lc * Lc))
    assert abs(float(tcfa.rbf_cka(x[:40], y[:40])) - want_rbf) < 1e-10


@st.composite
def gw_case(draw):
    return dict(n=draw(st.integers(2, 10)), m=draw(st.integers(2, 10)), dx=draw(st.integers(1, 4)),
                dy=draw(st.integers(1, 4)), eps_rel=draw(st.sampled_from([0.05, 0.2, 1.0])), seed=draw(SEEDS))


@settings(max_examples=20, deadline=None, derandomize=True, print_blob=True)
@given(gw_case())
def test_entropic_gw_equals_pot(c):
    """entropic_gw against POT's entropic_gromov_wasserstein (square loss, projected gradient) from the
    product coupling: the same iteration, so the same coupling and value where both converge."""
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["n"], c["dx"], generator=g, dtype=torch.float64)
    y = torch.randn(c["m"], c["dy"], generator=g, dtype=torch.float64) * 1.5
    C1, C2 = ref.cost(x, x, "sqeuclidean"), ref.cost(y, y, "sqeuclidean")
    eps = c["eps_rel"] * float(max(C1.max(), C2.max())) ** 2
    p, q = torch.full((c["n"],), 1.0 / c["n"], dtype=torch.float64), torch.full((c["m"],), 1.0 / c["m"],
                                                                               dtype=torch.float64)
    T, log = ot.gromov.entropic_gromov_wasserstein(C1, C2, p, q, "square_loss", epsilon=eps, max_iter=1000,
                                                   tol=1e-11, log=True)
    r = tcfa.entropic_gw(x, y, eps=eps, tol=1e-11, inner_tol=1e-13)
    np.testing.assert_allclose(r.plan.numpy(), T.numpy(), atol=1e-6)
