"""All-pairs layer similarity (tcfa.similarity) against per-pair NumPy references and brute force."""
import itertools

import numpy as np
import pytest
import torch

import tcfa
from stats_reference import kornblith_cka, svcca_rho
from tcfa import correspondence, grams, similarity


def stacks(n=60, wa=(5, 9, 5), wb=(7, 4), dtype=torch.float64, seed=0):
    """Layers of A and B sharing a latent signal (so pairs differ), widths wa and wb."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64)
    make = lambda d, s: (z @ torch.randn(6, d, generator=g, dtype=torch.float64) * s  # noqa: E731
                         + torch.randn(n, d, generator=g, dtype=torch.float64))
    xs = [make(d, 0.3 + i) for i, d in enumerate(wa)]
    ys = [make(d, 2.0 - 0.5 * i) for i, d in enumerate(wb)]
    return [x.to(dtype) for x in xs], [y.to(dtype) for y in ys]


@pytest.mark.parametrize("route", ["features", "gram", "auto"])
@pytest.mark.parametrize("debiased", [False, True])
def test_pairwise_cka_equals_kornblith_per_pair(route, debiased):
    xs, ys = stacks(wa=(5, 90, 3), wb=(70, 4))  # widths on both sides of n: both routes are exercised
    got = similarity.pairwise_cka(xs, ys, debiased=debiased, route=route)
    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        assert float(got[i, j]) == pytest.approx(kornblith_cka(x.numpy(), y.numpy(), debiased), abs=1e-6)
        assert float(got[i, j]) == pytest.approx(float(tcfa.linear_cka(x, y, debiased=debiased)), abs=1e-10)


def test_fp32_heavy_tailed_anisotropic_features():
    """A few channels 100x the rest and far from the origin, as in transformer activations."""
    g = torch.Generator().manual_seed(5)
    n = 2048
    z = torch.randn(n, 8, generator=g, dtype=torch.float64)

    def layer(d, seed):
        h = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # StudentT samples from the global generator: seed it, leave it as it was
            torch.manual_seed(seed)
            tails = torch.distributions.StudentT(3.0).sample((n, d))
        x = z @ torch.randn(8, d, generator=h, dtype=torch.float64) + tails
        x[:, :3] *= 100.0
        return x + 50.0

    xs, ys = [layer(64, 1), layer(96, 2)], [layer(128, 3), layer(32, 4)]
    for metric in ("cka", "cka_debiased", "procrustes"):
        fn = {"cka": similarity.pairwise_cka, "procrustes": similarity.pairwise_procrustes,
              "cka_debiased": lambda a, b: similarity.pairwise_cka(a, b, debiased=True)}[metric]
        want = fn(xs, ys)
        got = fn([x.float() for x in xs], [y.float() for y in ys])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=metric)
    want = similarity.pairwise_cka(xs, ys, route="gram")
    torch.testing.assert_close(similarity.pairwise_cka([x.float() for x in xs], [y.float() for y in ys], route="gram"),
                               want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_route_in_row_blocks_equals_the_triangles_and_kornblith(monkeypatch, debiased):
    # large L n^2 goes in row blocks of panels: force blocks of 64 rows on 150 samples (the last one
    # partial) and compare with the triangle kernel, the per-pair formula and the features route
    xs, ys = stacks(n=150, wa=(5, 90, 3), wb=(70, 4))
    whole = similarity.pairwise_cka(xs, ys, debiased=debiased, route="gram")
    monkeypatch.setattr(grams, "TRIANGLE_ENTRIES", 0)
    monkeypatch.setattr(grams, "PANEL_ENTRIES", 1)
    got = similarity.pairwise_cka(xs, ys, debiased=debiased, route="gram")
    torch.testing.assert_close(got, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, similarity.pairwise_cka(xs, ys, debiased=debiased, route="features"),
                               atol=1e-12, rtol=0)
    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        assert float(got[i, j]) == pytest.approx(kornblith_cka(x.numpy(), y.numpy(), debiased), abs=1e-10)
    est = similarity.MinibatchCKA(len(xs), len(ys), debiased=debiased, route="gram").update(xs, ys)  # one batch
    torch.testing.assert_close(est.result()[0], whole, atol=1e-12, rtol=0)
    # gradients through the blocks' panels equal the features route's
    leaf = xs[1].clone().requires_grad_()
    (g_blocks,) = torch.autograd.grad(similarity.pairwise_cka([xs[0], leaf], ys, route="gram").sum(), leaf)
    (g_feats,) = torch.autograd.grad(similarity.pairwise_cka([xs[0], leaf], ys, route="features").sum(), leaf)
    torch.testing.assert_close(g_blocks, g_feats, atol=1e-12, rtol=0)
    # fp32 heavy-tailed rows far from the origin stay within 1e-4 of fp64 in blocks too
    big = [x * torch.tensor([100.0] * 3 + [1.0] * (x.shape[1] - 3), dtype=x.dtype) + 50.0 for x in xs]
    torch.testing.assert_close(similarity.pairwise_cka([x.float() for x in big], [y.float() for y in ys], route="gram"),
                               similarity.pairwise_cka(big, ys, route="features"), atol=1e-4, rtol=0)


def numpy_unbiased_hsic(x, y):
    K, L = x @ x.T, y @ y.T
    n = len(K)
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def test_minibatch_cka_equals_summed_unbiased_hsic_of_uncentred_batches():
    xs, ys = stacks(n=70)
    xs = [x + 5.0 for x in xs]  # HSIC_u needs no centring: tcfa centres, the reference does not
    labels = torch.arange(70) % 3
    acc = similarity.MinibatchCKA(len(xs), len(ys), 3)
    overall = similarity.MinibatchCKA(len(xs), len(ys))
    cuts = [(0, 25), (25, 50), (50, 70)]
    for a, b in cuts:
        acc.update([x[a:b] for x in xs], [y[a:b] for y in ys], labels[a:b])
        overall.update([x[a:b] for x in xs], [y[a:b] for y in ys])
    for c in (None, 0, 2):
        got = overall.result()[0] if c is None else acc.result()[c]
        for i, j in itertools.product(range(len(xs)), range(len(ys))):
            sums = np.zeros(3)
            for a, b in cuts:
                rows = np.arange(a, b) if c is None else np.arange(a, b)[labels[a:b].numpy() == c]
                x, y = xs[i].numpy()[rows], ys[j].numpy()[rows]
                sums += [numpy_unbiased_hsic(x, y), numpy_unbiased_hsic(x, x), numpy_unbiased_hsic(y, y)]
            assert float(got[i, j]) == pytest.approx(sums[0] / np.sqrt(sums[1] * sums[2]), abs=1e-9)


@pytest.mark.parametrize("k", [None, 2])
def test_pairwise_cca_equals_svcca_recipe(k):
    xs, ys = stacks()
    reg = 1e-3
    got = similarity.pairwise_cca(xs, ys, k=k, reg=reg)
    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        rho = svcca_rho(x.numpy(), y.numpy(), reg)
        assert float(got[i, j]) == pytest.approx(rho[: k or len(rho)].mean(), abs=1e-6)


def test_pairwise_procrustes_equals_nuclear_norm_and_is_one_under_rotation():
    xs, ys = stacks()
    got = similarity.pairwise_procrustes(xs, ys)
    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        xc, yc = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
        ref = np.linalg.svd(xc.T @ yc, compute_uv=False).sum() / (np.linalg.norm(xc) * np.linalg.norm(yc))
        assert float(got[i, j]) == pytest.approx(ref, abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    same = similarity.pairwise_procrustes([xs[1]], [3.0 * xs[1] @ q + 1.0])
    assert float(same) == pytest.approx(1.0, abs=1e-10)


def test_pairwise_gw_equals_single_problem_calls():
    xs, ys = stacks(n=24, wa=(5, 3), wb=(4, 6, 2))
    got = correspondence.pairwise_gw(xs, ys, eps=0.1)

    def geometry(f):
        d2 = torch.cdist(f, f).square()
        return d2 / d2.mean()

    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        one = tcfa.divergence.gw_batch(geometry(x)[None], geometry(y)[None], eps=0.1, max_iter=200, tol=1e-7)
        assert float(got[i, j]) == pytest.approx(float(one[0]), rel=1e-6, abs=1e-9)
    # a layer against a rotated, scaled copy of itself has the smallest value of its row
    same = correspondence.pairwise_gw([xs[0]], [xs[0] @ torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0] * 4,
                                            ys[1]], eps=0.1)
    assert float(same[0, 0]) < float(same[0, 1])


def test_gw_batch_matches_pot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(15, 3, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    c1, c2 = torch.cdist(x, x).square(), torch.cdist(y, y).square()
    c1, c2 = c1 / c1.mean(), c2 / c2.mean()
    got = tcfa.divergence.gw_batch(c1[None], c2[None], eps=0.05, max_iter=500, tol=1e-10)
    p, q = np.full(15, 1 / 15), np.full(12, 1 / 12)
    T, log = ot.gromov.entropic_gromov_wasserstein(c1.numpy(), c2.numpy(), p, q, "square_loss", epsilon=0.05,
                                                   max_iter=500, tol=1e-10, log=True, solver="PGD")
    assert float(got[0]) == pytest.approx(log["gw_dist"], rel=1e-4)


def brute_force_path(s):
    la, lb = s.shape
    best = None
    for js in itertools.combinations_with_replacement(range(lb), la):  # non-decreasing
        total = sum(s[i, j] for i, j in enumerate(js))
        if best is None or total > best[0]:
            best = (total, js)
    return list(enumerate(best[1]))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (1, 5), (5, 1)])
def test_monotone_path_equals_brute_force(shape):
    s = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    assert correspondence.monotone_path(s) == brute_force_path(s.numpy())
    assert correspondence.monotone_path(-s, larger_is_better=False) == brute_force_path(s.numpy())
    eye = torch.eye(5, dtype=torch.float64) + 0.5 * torch.rand(5, 5, dtype=torch.float64).clamp(max=0.9)
    assert correspondence.monotone_path(eye) == [(i, i) for i in range(5)]


def test_unit_intersection_against_naive_loops():
    xs, ys = stacks(wa=(5, 9), wb=(7, 4))
    out = correspondence.unit_intersection(xs, ys, top_k=3)
    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        r = np.abs(np.corrcoef(x.numpy().T, y.numpy().T)[: x.shape[1], x.shape[1]:])
        pa = {(u, int(r[u].argmax())) for u in np.argsort(-r.max(1), kind="stable")[:3]}
        pb = {(int(r[:, v].argmax()), v) for v in np.argsort(-r.max(0), kind="stable")[:3]}
        mutual = sum(int(r[:, r[u].argmax()].argmax() == u) for u in range(r.shape[0]))
        assert float(out["jaccard"][i, j]) == pytest.approx(len(pa & pb) / len(pa | pb))
        assert float(out["coverage"][i, j]) == pytest.approx(2 * mutual / sum(r.shape))
        assert float(out["confidence"][i, j]) == pytest.approx(sum(r[p] for p in pa & pb) / len(pa | pb))


def test_bad_inputs_name_the_argument():
    xs, ys = stacks()
    with pytest.raises(TypeError, match="xs must be a non-empty list"):
        similarity.pairwise_cka(xs[0], ys)
    with pytest.raises(ValueError, match=r"ys\[1\] has 59 rows, expected 60"):
        similarity.pairwise_cka(xs, [ys[0], ys[1][1:]])
    with pytest.raises(ValueError, match="route"):
        similarity.pairwise_cka(xs, ys, route="fast")
    with pytest.raises(ValueError, match="at least 4 rows"):
        similarity.pairwise_cka([x[:3] for x in xs], [y[:3] for y in ys], debiased=True)
    bad = xs[1].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"xs\[1\] must be finite"):
        similarity.pairwise_cca([xs[0], bad], ys)
    with pytest.raises(ValueError, match="scores must be finite"):
        correspondence.monotone_path(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("route", ["features", "gram"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_minibatch_update_names_a_non_finite_layer_and_adds_nothing(route, value):
    # without labels, MinibatchCKA reads the layers only when the Grams' diagonals are not finite:
    # the error must still name the layer and the entry, and leave the sums as they were
    xs, ys = stacks()
    est = similarity.MinibatchCKA(len(xs), len(ys), route=route).update(xs, ys)
    before = {k: getattr(est, k).clone() for k in est.SUMS}
    for name, feats in (("xs", xs), ("ys", ys)):
        bad = [f.clone() for f in feats]
        bad[-1][7, 2] = value
        args = (bad, ys) if name == "xs" else (xs, bad)
        with pytest.raises(ValueError, match=rf"{name}\[{len(feats) - 1}\] must be finite, found .* at index \(7, 2\)"):
            est.update(*args)
        with pytest.raises(ValueError, match=rf"{name}\[{len(feats) - 1}\] must be finite"):
            est.update(*args, labels=torch.zeros(xs[0].shape[0], dtype=torch.int64))
        with pytest.raises(ValueError, match=rf"{name}\[{len(feats) - 1}\] must be finite"):  # a batch too small to add
            est.update(*[[f[5:8] for f in a] for a in args])
    for k in est.SUMS:
        assert torch.equal(getattr(est, k), before[k])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_computed_in_fp32(dtype):
    xs, ys = stacks(n=50, dtype=dtype)
    up = lambda feats: [f.float() for f in feats]  # noqa: E731  (the same values, widened)
    for route in ("features", "gram"):
        torch.testing.assert_close(similarity.pairwise_cka(xs, ys, route=route),
                                   similarity.pairwise_cka(up(xs), up(ys), route=route), atol=1e-6, rtol=0)
    half, full = similarity.MinibatchCKA(3, 2), similarity.MinibatchCKA(3, 2)
    half.update(xs, ys)
    full.update(up(xs), up(ys))
    torch.testing.assert_close(half.result(), full.result(), atol=1e-6, rtol=0)


def test_entropic_gw_is_not_converged_when_an_inner_solve_was_cut_short():
    # at eps 0.2 the first inner Sinkhorn needs ~14k iterations: cut at 1000 the outer loop settles
    # elsewhere (42.086 against 42.054) and must not say converged; given the iterations it agrees
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20, 4, generator=g, dtype=torch.float64) * 1.3
    a = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(20, generator=g, dtype=torch.float64) + 0.1
    short = tcfa.entropic_gw(x, y, a / a.sum(), b / b.sum(), eps=0.2)
    full = tcfa.entropic_gw(x, y, a / a.sum(), b / b.sum(), eps=0.2, inner_max_iter=100_000)
    assert not short.converged and full.converged
    tight = tcfa.entropic_gw(x, y, a / a.sum(), b / b.sum(), eps=0.2, inner_max_iter=200_000, inner_tol=1e-12)
    assert float(full.value) == pytest.approx(float(tight.value), abs=1e-6)
