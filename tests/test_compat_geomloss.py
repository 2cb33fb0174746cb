"""tcfa.compat.geomloss.SamplesLoss against GeomLoss itself (tensorized backend).

GeomLoss stops after its annealing schedule; at scaling 0.999 its residual is ~2e-6 of the value on
these clouds (tcfa iterates to tol 1e-12 here), which sets the tolerance.
"""
import pytest
import torch

from tcfa.compat.geomloss import SamplesLoss

geomloss = pytest.importorskip("geomloss")


def clouds(batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else ()
    x = torch.randn(*shape, 30, 2, generator=g, dtype=torch.float64)
    y = torch.randn(*shape, 40, 2, generator=g, dtype=torch.float64) + 1.0
    a = torch.rand(*shape, 30, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(*shape, 40, generator=g, dtype=torch.float64) + 0.1
    return x, y, 1.4 * a / a.sum(-1, keepdim=True), 0.7 * b / b.sum(-1, keepdim=True)


@pytest.mark.parametrize("reach", [None, 1.0])
@pytest.mark.parametrize("debias", [True, False])
def test_values_match_geomloss_and_gradients_match_finite_differences(reach, debias):
    x, y, a, b = clouds()
    if reach is None:
        a, b = a / a.sum(), b / b.sum()
    ours = SamplesLoss("sinkhorn", p=2, blur=0.5, reach=reach, debias=debias, scaling=0.9, tol=1e-13, max_iter=50000)
    theirs = geomloss.SamplesLoss("sinkhorn", p=2, blur=0.5, reach=reach, debias=debias, scaling=0.999,
                                  backend="tensorized")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    vo, vt = ours(a, xs[0], b, y), theirs(a, xs[1], b, y)
    assert float(vo) == pytest.approx(float(vt), abs=2e-5)
    go, gt = torch.autograd.grad(vo, xs[0])[0], torch.autograd.grad(vt, xs[1])[0]
    h = 1e-5
    for i, k in [(19, 0), (25, 1), (3, 0)]:
        E = torch.zeros_like(x)
        E[i, k] = h
        fd = (ours(a, x + E, b, y) - ours(a, x - E, b, y)) / (2 * h)
        assert float(go[i, k]) == pytest.approx(float(fd), abs=1e-8)
    if reach is None:  # balanced: GeomLoss's gradients differ from the exact ones by its residual
        torch.testing.assert_close(go, gt, atol=1e-4, rtol=0)
    else:  # GeomLoss 0.3.1's unbalanced gradients are ~10% off the finite differences of its own value
        assert float((go - gt).abs().max()) > 1e-3


@pytest.mark.parametrize("debias", [True, False])
def test_balanced_weights_of_any_common_mass_give_geomlosss_value(debias):
    # tcfa's solver normalises balanced weights: the value is scaled back (and, without debiasing,
    # GeomLoss's entropy constant -eps m log m added); it was the normalised value at every mass
    x, y, a, b = clouds(batch=2, seed=3)
    a, b = 2.5 * a / a.sum(-1, keepdim=True), 2.5 * b / b.sum(-1, keepdim=True)
    ours = SamplesLoss("sinkhorn", blur=0.5, debias=debias, tol=1e-13, max_iter=50000)
    theirs = geomloss.SamplesLoss("sinkhorn", blur=0.5, debias=debias, scaling=0.999, backend="tensorized")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    got, want = ours(a, xs[0], b, y), theirs(a, xs[1], b, y)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    gx = [torch.autograd.grad(v.sum(), t)[0] for v, t in ((got, xs[0]), (want, xs[1]))]
    torch.testing.assert_close(gx[0], gx[1], atol=3e-4, rtol=0)


def test_uniform_call_form_and_batches():
    x, y, _, _ = clouds(batch=3, seed=1)
    ours = SamplesLoss("sinkhorn", blur=0.4, scaling=0.9, tol=1e-12, max_iter=20000)
    theirs = geomloss.SamplesLoss("sinkhorn", blur=0.4, scaling=0.999, backend="tensorized")
    got, want = ours(x, y), theirs(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert float(ours(x[0], y[0])) == pytest.approx(float(want[0]), abs=2e-5)


def test_unsupported_arguments_raise_naming_them():
    for kwargs, name in ((dict(loss="energy"), "loss"), (dict(p=1), "p"), (dict(cost="x"), "cost"),
                         (dict(potentials=True), "potentials"), (dict(blur=0.0), "blur")):
        with pytest.raises(ValueError, match=name):
            SamplesLoss(**kwargs)
    x, y, _, _ = clouds()
    with pytest.raises(ValueError, match="takes \\(x, y\\) or \\(a, x, b, y\\)"):
        SamplesLoss()(x, y, x)
