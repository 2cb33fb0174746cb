"""tcfa.align (TCFA fitting, tuning), tcfa.data conditions, tcfa.baselines merges, against independent references."""
import pytest
import torch
from torch import nn

import tcfa
from tcfa.pipeline import data
from tcfa.pipeline.align import TCFA, normalised_mse, stitch_loss, tune
from tcfa.pipeline.baselines import merge_applicability, ties_merge, weight_average

C, N_PER, DX, DY, R = 3, 300, 12, 10, 4


def synthetic(orthogonal=False, noise=1e-3, seed=0):
    """Rows with a known affine map per condition: y = my_c + (x - mx_c) M_c (+ small noise)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(C).repeat_interleave(N_PER)
    mx = 4 * torch.randn(C, DX, generator=g, dtype=torch.float64)
    my = torch.randn(C, DY, generator=g, dtype=torch.float64)
    if orthogonal:  # R_c with orthonormal rows' restriction: the (DX, DY) block of a random orthogonal matrix
        M = torch.linalg.qr(torch.randn(C, DX, DX, generator=g, dtype=torch.float64)).Q[:, :, :DY]
    else:
        M = torch.randn(C, DX, R, generator=g, dtype=torch.float64) @ torch.randn(C, R, DY, generator=g, dtype=torch.float64) / DX**0.5
    x = torch.randn(C * N_PER, DX, generator=g, dtype=torch.float64)
    if orthogonal:  # isotropic centred rows per condition: there least squares and Procrustes agree exactly
        x = torch.cat([torch.linalg.qr(b - b.mean(0)).Q * N_PER**0.5 for b in x.split(N_PER)])
    x = mx[ids] + x
    y = my[ids] + torch.einsum("nd,nde->ne", x - mx[ids], M[ids]) + noise * torch.randn(C * N_PER, DY, generator=g, dtype=torch.float64)
    return x, y, ids, M, mx, my


def true_map_error(maps, M, mx, my):
    """Relative error of the fitted per-condition affine maps on fresh points, vs the truth."""
    g = torch.Generator().manual_seed(99)
    ids = torch.arange(C).repeat_interleave(50)
    x = mx[ids] + torch.randn(ids.shape[0], DX, generator=g, dtype=torch.float64)
    want = my[ids] + torch.einsum("nd,nde->ne", x - mx[ids], M[ids])
    got = maps.apply(x, ids)
    return float((got - want).norm() / (want - want.mean(0)).norm())


@pytest.mark.parametrize("method", ["cca", "ridge", "ot"])
def test_fit_recovers_known_per_condition_low_rank_map(method):
    x, y, ids, M, mx, my = synthetic()
    t = TCFA(method, rank=R, reg=1e-8, eps=1e-3)
    stitch = t.fit(x, y, ids)
    assert true_map_error(t.maps_, M, mx, my) < 0.02
    # The stitch's gate routes each row to its own condition: the conditions are separated in
    # x (means 4 sigma apart), so with a low temperature the stitch is the per-condition map.
    assert isinstance(stitch, tcfa.GatedMultiStitch) and stitch.num_conditions == C
    hard = TCFA(method, rank=R, reg=1e-8, eps=1e-3, temperature=1e-3).fit(x, y, ids)
    assert float((hard(x).detach() - y).norm() / (y - y.mean(0)).norm()) < 0.05


def test_fit_procrustes_recovers_orthogonal_map():
    x, y, ids, M, mx, my = synthetic(orthogonal=True)
    t = TCFA("procrustes")
    t.fit(x, y, ids)
    assert true_map_error(t.maps_, M, mx, my) < 0.01


def test_unconditioned_fit_cannot_recover_differing_maps():
    """The `none` baseline fits one map: on data whose conditions differ it must be clearly worse."""
    x, y, ids, M, mx, my = synthetic()
    t = TCFA("ridge", rank=R, reg=1e-8)
    t.fit(x, y, None)
    assert t.maps_.num_conditions == 1
    pooled = tcfa.maps.LowRankMaps(*(v.expand(C, *v.shape[1:]) for v in (t.maps_.U, t.maps_.V, t.maps_.mu_x, t.maps_.mu_y)))
    assert true_map_error(pooled, M, mx, my) > 0.3


def test_cca_path_equals_direct_op_call():
    x, y, ids, *_ = synthetic()
    t = TCFA("cca", rank=R, reg=1e-3)
    t.fit(x, y, ids)
    ref = tcfa.cca_maps(tcfa.segment_moments(x, y, ids, C), R, 1e-3)
    for a, b in zip((t.maps_.U, t.maps_.V, t.maps_.mu_x, t.maps_.mu_y), (ref.U, ref.V, ref.mu_x, ref.mu_y)):
        torch.testing.assert_close(a, b)


def test_ot_path_is_one_batched_sinkhorn_matching_direct_calls(monkeypatch):
    """TCFA('ot') makes one sinkhorn call for all conditions; its targets equal per-condition
    direct calls of tcfa.sinkhorn + barycentric_map, and its map the ridge fit to them."""
    x, y, ids, *_ = synthetic(noise=0.3)
    calls = []
    real = tcfa.pipeline.align.sinkhorn
    monkeypatch.setattr(tcfa.pipeline.align, "sinkhorn", lambda *a, **k: calls.append(k) or real(*a, **k))
    t = TCFA("ot", rank=R, reg=1e-3, eps=0.05, ot_max_rows=None)
    t.fit(x, y, ids)
    assert len(calls) == 1 and calls[0]["x_offsets"].tolist() == [0, N_PER, 2 * N_PER, 3 * N_PER]
    start = tcfa.ridge_map(tcfa.segment_moments(x, y, ids, C), 1e-3)
    moved = start.apply(x, ids)
    targets = []
    for c in range(C):
        rows = ids == c
        yc = y[rows]
        eps = 0.05 * float(torch.stack([2 * y[ids == k].var(0, unbiased=False).sum() for k in range(C)]).mean())
        r = tcfa.sinkhorn(moved[rows], yc, eps=eps, max_iter=500, tol=1e-4, scaling=0.7)
        targets.append(tcfa.barycentric_map(r, yc))
    ref = tcfa.ridge_map(tcfa.segment_moments(x, torch.cat(targets), ids, C), 1e-3, R)
    # the batched call anneals eps from the diameter over all problems, the direct calls per
    # problem: both stop at marginal error 1e-4, so they agree to that order, not to rounding
    torch.testing.assert_close(t.maps_.apply(x, ids), ref.apply(x, ids), atol=2e-4, rtol=0)


def test_ot_unpaired_with_anchors_recovers_map():
    x, y, ids, M, mx, my = synthetic()
    perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(3))
    yb, ids_b = y[perm], ids[perm]  # B's rows in another order: no pairing known
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    anchors_a = torch.arange(0, x.shape[0], 15)  # 1 in 15 rows has a known partner
    t = TCFA("ot", rank=R, reg=1e-6, eps=1e-3)
    t.fit(x, yb, ids, cond_b=ids_b, paired=False, anchors=(anchors_a, inv[anchors_a]))
    assert true_map_error(t.maps_, M, mx, my) < 0.1
    with pytest.raises(ValueError, match="anchors"):
        TCFA("ot", rank=R).fit(x, yb, ids, cond_b=ids_b, paired=False)


def test_fit_bad_input_names_argument():
    x, y, ids, *_ = synthetic()
    with pytest.raises(ValueError, match="method"):
        TCFA("pca")
    with pytest.raises(ValueError, match="rank"):
        TCFA("cca", rank=DY + 1).fit(x, y, ids)
    with pytest.raises(ValueError, match="xa"):
        TCFA("cca", rank=2).fit(x[:-1], y, ids)
    with pytest.raises(TypeError, match="cond"):
        TCFA("cca", rank=2).fit(x, y, ids.float())
    lonely = ids.clone()
    lonely[0] = 3  # condition 3 has one row
    with pytest.raises(ValueError, match="condition 3"):
        TCFA("cca", rank=2).fit(x, y, lonely)
    with pytest.raises(ValueError, match="paired"):
        TCFA("cca", rank=2).fit(x, y, ids, paired=False)


# ------------------------------------------------------------------ conditions
def test_condition_builders():
    labels = torch.tensor([0, 2, 1, 2])
    c = data.class_conditions(labels)
    assert c.ids.tolist() == [0, 2, 1, 2] and c.names == ["0", "1", "2"]
    n = data.no_conditions(5)
    assert n.ids.tolist() == [0] * 5 and n.num == 1
    v = torch.arange(12.0)
    b = data.binned_conditions(v, 3)
    assert b.ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # ties that fill a quantile give fewer bins, never an empty one (six zeros used to empty bin 0)
    tied = data.binned_conditions(torch.tensor([0.0] * 6 + [1, 2, 3, 4, 5, 6]), 4)
    assert torch.bincount(tied.ids).tolist() == [6, 3, 3] and tied.num == 3
    assert data.binned_conditions(torch.ones(8), 4).ids.tolist() == [0] * 8
    with pytest.raises(ValueError, match="bins"):
        data.binned_conditions(v, 0)
    with pytest.raises(ValueError, match="kind"):
        data.transform_conditions(torch.zeros(2, 1, 8, 8), "blur")


def test_transform_conditions_apply_the_transform():
    img, _ = data.digits_images(16)
    img = img[:40]
    out, c = data.transform_conditions(img, "rotation", levels=(0.0, 90.0), seed=1)
    assert set(c.ids.tolist()) == {0, 1}
    same = c.ids == 0
    torch.testing.assert_close(out[same], img[same], atol=1e-5, rtol=0)  # level 0: unchanged
    # 90 degrees: equal to torch.rot90 in one of the two directions (sign drawn per image)
    for i in (~same).nonzero().flatten().tolist():
        errs = [float((out[i] - torch.rot90(img[i], k, (1, 2))).abs().max()) for k in (1, -1)]
        assert min(errs) < 1e-4
    noisy, cn = data.transform_conditions(img, "noise", levels=(0.0, 0.5), seed=2)
    assert float((noisy[cn.ids == 0] - img[cn.ids == 0]).abs().max()) == 0
    assert float((noisy[cn.ids == 1] - img[cn.ids == 1]).abs().mean()) > 0.1
    shifted, cj = data.transform_conditions(img, "jitter", levels=(0.0,), seed=3)
    torch.testing.assert_close(shifted, img, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ tuning
def _tiny_pair():
    """Two small transformers models (CNN -> ViT) on 16 px inputs, random weights."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    a = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                  layer_type="basic", num_labels=4)).eval()
    b = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=3,
                                            num_attention_heads=2, intermediate_size=32, num_labels=4)).eval()
    return a, b


@pytest.mark.parametrize("mode", ["direct", "task", "fula", "partial"])
def test_every_tuning_mode_lowers_its_own_loss(mode):
    from tcfa.pipeline.stitched import StitchedModel

    a, b = _tiny_pair()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g)
    with torch.no_grad():  # labels B itself can reach: its own predictions
        y = b(x).logits.argmax(-1)
    torch.manual_seed(1)
    stitch = tcfa.GatedMultiStitch(8, 16, 2, 4)  # a random start, far from every optimum
    sm = StitchedModel(a, "resnet.encoder.stages.0", b, "vit.layers.0", stitch, example_input=x[:1])
    later = ("vit.layers.1", "vit.layers.2")
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    with torch.no_grad():
        before = float(stitch_loss(sm, mode, x, y, later))
    losses = tune(sm, mode, x, y, steps=30, lr=1e-2, batch_size=64, later_paths=later, seed=0)
    with torch.no_grad():
        after = float(stitch_loss(sm, mode, x, y, later))
    assert len(losses) == 30 and after < 0.9 * before
    for k, v in b.state_dict().items():  # the caller's B is never changed (partial tunes a copy)
        torch.testing.assert_close(v, b_before[k])
    if mode == "partial":
        assert sm.num_trainable() == stitch.num_trainable() + sum(p.numel() for p in sm.model_b.vit.layers[1].parameters())
    else:
        assert sm.num_trainable() == stitch.num_trainable()


def test_tuning_is_deterministic_with_a_seed():
    from tcfa.pipeline.stitched import StitchedModel

    a, b = _tiny_pair()
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(4, (32,), generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        st = tcfa.GatedMultiStitch(16, 16, 2, 4)
        sm = StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.0", st, example_input=x[:1])
        runs.append(tune(sm, "task", x, y, steps=5, batch_size=8, seed=3))
    assert runs[0] == runs[1]


def test_normalised_mse_reference():
    t = torch.randn(5, 7, 3, dtype=torch.float64)
    p = torch.randn(5, 7, 3, dtype=torch.float64)
    rows = t.reshape(-1, 3)
    want = ((p.reshape(-1, 3) - rows) ** 2).mean() / rows.var(0, unbiased=False).mean()
    torch.testing.assert_close(normalised_mse(p, t), want)
    assert abs(float(normalised_mse(rows.mean(0).expand_as(rows), rows)) - 1.0) < 1e-12


# ------------------------------------------------------------------ merges
def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_weight_average_and_ties_against_elementwise_reference():
    base, m1, m2 = _mlp(0), _mlp(1), _mlp(2)
    avg = weight_average([m1, m2])
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, (m1.state_dict()[k] + m2.state_dict()[k]) / 2)
    density = 0.5
    merged = ties_merge(base, [m1, m2], density=density).state_dict()
    for k, b in base.state_dict().items():
        taus = [m.state_dict()[k].flatten() - b.flatten() for m in (m1, m2)]
        trimmed = []
        for t in taus:  # keep the top half by magnitude, entry by entry
            keep = max(1, round(density * t.numel()))
            cut = sorted(t.abs().tolist(), reverse=True)[keep - 1]
            trimmed.append([v if abs(v) >= cut else 0.0 for v in t.tolist()])
        want = []
        for j in range(b.numel()):
            vals = [tr[j] for tr in trimmed]
            total = sum(vals)
            sign = (total > 0) - (total < 0)
            agree = [v for v in vals if v != 0 and ((v > 0) - (v < 0)) == sign]
            want.append(sum(agree) / len(agree) if agree else 0.0)
        torch.testing.assert_close(merged[k].flatten(), b.flatten() + torch.tensor(want, dtype=b.dtype))


def test_merges_refuse_cross_architecture():
    ok, why = merge_applicability(_mlp(0), nn.Sequential(nn.Linear(4, 2)))
    assert not ok and "not applicable" in why
    with pytest.raises(ValueError, match="models\\[1\\]"):
        weight_average([_mlp(0), nn.Sequential(nn.Linear(4, 2))])


def test_fit_models_takes_an_fp32_model_against_an_fp64_one():
    # the activations meet in the wider dtype (as layer_map's do); the fit equals the fp64 one
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))

    class ToDouble(nn.Module):
        def forward(self, t):
            return t.double()

    b = torch.nn.Sequential(ToDouble(), torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(60, 4)
    got = tcfa.TCFA("ridge", rank=2).fit_models(a, "1", b, "2", x, None, progress=False)
    want = tcfa.TCFA("ridge", rank=2).fit_models(a.double(), "1", b, "2", x.double(), None, progress=False)
    assert got.U.dtype == torch.float64
    torch.testing.assert_close(got.U @ got.V, want.U @ want.V, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mode must be 'pooled' or 'tokens'"):
        tcfa.TCFA("ridge").fit_models(a, "1", b, "2", x, None, mode="flatten", progress=False)
