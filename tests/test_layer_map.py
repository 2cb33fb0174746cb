"""tcfa.layer_map on real models: every entry against a direct per-pair call, structure, errors."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import tcfa
from stats_reference import kornblith_cka, svcca_rho
from tcfa.pipeline.layer_names import default_layers, resolve_layers


def mlp(width, depth=4, d_in=12, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(d_in, width), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth - 1)]
    return nn.Sequential(*blocks, nn.Linear(width, 3)).to(dtype).eval()


def rotated_copy(model):
    """Same function, every block's output rotated by its own orthogonal Q (next block undoes it)."""
    blocks, head = list(model)[:-1], model[-1]
    qs = [torch.linalg.qr(torch.randn(b[0].out_features, b[0].out_features, dtype=torch.float64))[0] for b in blocks]
    out, prev = [], None
    for b, q in zip(blocks, qs):
        lin = nn.Linear(b[0].in_features, b[0].out_features).double()
        with torch.no_grad():
            lin.weight.copy_(b[0].weight if prev is None else b[0].weight @ prev.T)
            lin.bias.copy_(b[0].bias)
        rot = nn.Linear(q.shape[0], q.shape[0], bias=False).double()
        with torch.no_grad():
            rot.weight.copy_(q)
        out.append(nn.Sequential(lin, nn.ReLU(), rot))
        prev = q
    last = nn.Linear(head.in_features, head.out_features).double()
    with torch.no_grad():
        last.weight.copy_(head.weight @ prev.T)
        last.bias.copy_(head.bias)
    return nn.Sequential(*out, last).eval()


def data(n=96, d=12, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def blocks(model):
    return [str(i) for i in range(len(model) - 1)]


@pytest.mark.parametrize("metric", ["cka", "cca", "procrustes"])
def test_entries_equal_direct_calls(metric):
    a, b, x = mlp(9, seed=0), mlp(14, depth=3, seed=1), data()
    lm = tcfa.layer_map(a, blocks(a), b, blocks(b), x, metric=metric, batch_size=40, progress=False)
    assert lm.scores.shape == (4, 3) and lm.layers_a == ["0", "1", "2", "3"]
    for (i, pa), (j, pb) in itertools.product(enumerate(lm.layers_a), enumerate(lm.layers_b)):
        fa, fb = tcfa.extract(a, pa, x), tcfa.extract(b, pb, x)
        if metric == "cka":
            want = kornblith_cka(fa.numpy(), fb.numpy())
        elif metric == "cca":  # the svcca recipe with tcfa's default reg, mean of all correlations
            want = svcca_rho(fa.numpy(), fb.numpy(), 1e-4).mean()
        else:
            xc, yc = fa.numpy() - fa.numpy().mean(0), fb.numpy() - fb.numpy().mean(0)
            want = np.linalg.svd(xc.T @ yc, compute_uv=False).sum() / (np.linalg.norm(xc) * np.linalg.norm(yc))
        assert float(lm.scores[i, j]) == pytest.approx(want, abs=1e-6)


def test_self_map_identity_path_and_rotated_copy_diagonal_one():
    a, x = mlp(10, depth=5), data()
    lm = tcfa.layer_map(a, blocks(a), a, blocks(a), x, progress=False)
    assert lm.path() == [(p, p) for p in blocks(a)]
    torch.manual_seed(3)
    b = rotated_copy(a)
    torch.testing.assert_close(b(x), a(x))
    lm = tcfa.layer_map(a, blocks(a), b, blocks(b), x, progress=False)
    np.testing.assert_allclose(lm.scores.diagonal().numpy(), 1.0, atol=1e-10)
    assert lm.path() == [(p, p) for p in blocks(a)]


def test_conditions_and_minibatch_estimator():
    a, b, x = mlp(9), mlp(7, depth=3, seed=2), data(n=120)
    cond = torch.arange(120) % 3
    lm = tcfa.layer_map(a, "*", b, blocks(b), x, conditions=cond, batch_size=50, progress=False)
    assert lm.layers_a == [str(i) for i in range(5)] and lm.scores_per_condition.shape == (3, 5, 3)
    for c in range(3):
        fa = [tcfa.extract(a, p, x[cond == c]) for p in lm.layers_a]
        fb = [tcfa.extract(b, p, x[cond == c]) for p in lm.layers_b]
        torch.testing.assert_close(lm.scores_per_condition[c], tcfa.similarity.pairwise_cka(fa, fb))
    mb = tcfa.layer_map(a, blocks(a), b, blocks(b), x, estimator="minibatch", batch_size=50, progress=False)
    for i, j in itertools.product(range(4), range(3)):
        fa, fb = tcfa.extract(a, blocks(a)[i], x), tcfa.extract(b, blocks(b)[j], x)
        h = np.zeros(3)
        for s in range(0, 120, 50):
            u, v = fa[s:s + 50].numpy(), fb[s:s + 50].numpy()
            h += [kornblith_hsic_u(u, v), kornblith_hsic_u(u, u), kornblith_hsic_u(v, v)]
        assert float(mb.scores[i, j]) == pytest.approx(h[0] / np.sqrt(h[1] * h[2]), abs=1e-8)


def kornblith_hsic_u(u, v):
    K, L = u @ u.T, v @ v.T
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    n, one = len(K), np.ones(len(K))
    return (np.sum(K * L) + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def test_one_forward_per_batch_stopped_after_the_deepest_tap():
    a, b, x = mlp(8, depth=5), mlp(8, depth=5, seed=4), data(n=64)
    calls = {"root": 0, "after": 0}
    a.register_forward_pre_hook(lambda m, i: calls.__setitem__("root", calls["root"] + 1))
    a[3].register_forward_hook(lambda m, i, o: calls.__setitem__("after", calls["after"] + 1))
    tcfa.layer_map(a, ["0", "1", "2"], b, ["1"], x, batch_size=16, progress=False)
    assert calls == {"root": 4, "after": 0}


def test_anchors_limit_the_samples_and_gw_runs():
    a, b, x = mlp(6), mlp(5, depth=2, seed=5), data(n=100)
    lm = tcfa.layer_map(a, blocks(a), b, blocks(b), x, num_anchors=30, batch_size=16, progress=False)
    fa, fb = tcfa.extract(a, "2", x[:30]), tcfa.extract(b, "1", x[:30])
    assert float(lm.scores[2, 1]) == pytest.approx(kornblith_cka(fa.numpy(), fb.numpy()), abs=1e-9)
    gw = tcfa.layer_map(a, blocks(a), a, blocks(a), x, metric="gw", num_anchors=40, progress=False)
    assert not gw.larger_is_better and gw.path() == [(p, p) for p in blocks(a)]
    assert gw.best_pairs(1)[0][2] == pytest.approx(float(gw.scores.min()))


def test_best_pairs_choose_stitch_save_load_plot(tmp_path):
    a, b, x = mlp(9), mlp(11, depth=4, seed=6), data()
    lm = tcfa.layer_map(a, blocks(a), b, blocks(b), x, conditions=torch.arange(96) % 2, progress=False)
    best = lm.best_pairs(3)
    assert [s for *_, s in best] == sorted(lm.scores.flatten().tolist(), reverse=True)[:3]
    la, lb, why = lm.choose_stitch()
    allowed = lm.scores[:, :-1]
    assert float(lm.scores[int(la), int(lb)]) == float(allowed.max()) and lb != "3" and "cka" in why
    path = tmp_path / "map.safetensors"
    lm.save(path)
    back = tcfa.LayerMap.load(path)
    torch.testing.assert_close(back.scores, lm.scores)
    torch.testing.assert_close(back.scores_per_condition, lm.scores_per_condition)
    assert back.layers_b == lm.layers_b and back.diagnostics.keys() == lm.diagnostics.keys()
    png = lm.plot(str(tmp_path / "map.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_names_patterns_and_default_blocks():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                            num_classes=4)
    assert default_layers(vit) == ["blocks.0", "blocks.1", "blocks.2"]
    assert resolve_layers("layers_b", vit, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    res = timm.create_model("resnet18", pretrained=False, num_classes=4)
    assert default_layers(res) == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    with pytest.raises(ValueError, match=r"layers_a: layer path 'blocks.9' does not exist .* children are \[0, 1, 2\]"):
        resolve_layers("layers_a", vit, ["blocks.9"])
    with pytest.raises(ValueError, match="pattern 'stage.*' matches no module"):
        resolve_layers("layers_a", vit, "stage.*")


def test_bad_inputs():
    a, b, x = mlp(6), mlp(5, depth=2), data(n=40)
    with pytest.raises(ValueError, match="layers_a must be in depth order"):
        tcfa.layer_map(a, ["2", "0"], b, ["0"], x, progress=False)
    with pytest.raises(ValueError, match=r"layers_b: layer path '7'"):
        tcfa.layer_map(a, ["0"], b, ["7"], x, progress=False)
    with pytest.raises(ValueError, match="num_anchors must be >= 4"):
        tcfa.layer_map(a, ["0"], b, ["0"], x, num_anchors=3, debiased=True, progress=False)
    with pytest.raises(ValueError, match="needs at least 2 anchors"):
        tcfa.layer_map(a, ["0"], b, ["0"], x[:1], progress=False)
    with pytest.raises(ValueError, match="estimator='minibatch' is for metric='cka'"):
        tcfa.layer_map(a, ["0"], b, ["0"], x, metric="cca", estimator="minibatch", progress=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        tcfa.layer_map(a, ["0"], b, ["0"], x, metric="svcca", progress=False)
    with pytest.raises(ValueError, match="conditions"):
        tcfa.layer_map(a, ["0"], b, ["0"], x, conditions=torch.full((40,), -1), progress=False)


def test_tokens_mode_pairs_every_layer_on_the_positions_of_bs_first_layer():
    timm = pytest.importorskip("timm")
    from tcfa.pipeline.models import layout_of, paired_rows

    torch.manual_seed(0)
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=4, layers=[1, 1, 1, 1],
                            channels=[8, 16, 16, 16], stem_width=8).eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24,
                            depth=3, num_heads=2, num_classes=4).eval()
    x = torch.randn(20, 3, 32, 32)
    cond = torch.arange(20) % 2
    lm = tcfa.layer_map(cnn, ["layer1.0", "layer3.0"], vit, "blocks.*", x, mode="tokens", conditions=cond,
                        batch_size=8, progress=False)
    for (i, pa), (j, pb) in itertools.product(enumerate(lm.layers_a), enumerate(lm.layers_b)):
        aa, ab = tcfa.extract(cnn, pa, x), tcfa.extract(vit, pb, x)
        ra, rb = paired_rows(aa, ab, "tokens", layout_a=layout_of(aa), layout_b=layout_of(ab, model=vit))
        assert float(lm.scores[i, j]) == pytest.approx(float(tcfa.linear_cka(ra, rb)), abs=1e-5)
        per = ra.shape[0] // 20  # 1 CLS + 16 patches: each inherits its sample's condition
        rows = cond.repeat_interleave(per) == 1
        assert float(lm.scores_per_condition[1, i, j]) == pytest.approx(
            float(tcfa.linear_cka(ra[rows], rb[rows])), abs=1e-5)
    with pytest.raises(ValueError, match="mode='tokens' needs"):
        tcfa.layer_map(mlp(5), ["0"], mlp(5), ["0"], data(n=10), mode="tokens", progress=False)


def test_bert_layers_by_pattern_and_default_blocks_with_dict_inputs():
    T = pytest.importorskip("transformers")

    def bert(width, seed):
        torch.manual_seed(seed)
        cfg = T.BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=2 * width, max_position_embeddings=16, num_labels=2)
        return T.BertForSequenceClassification(cfg).eval()

    a, b = bert(16, 0), bert(24, 1)
    assert default_layers(a) == [f"bert.encoder.layer.{i}" for i in range(3)]
    ids = torch.randint(0, 50, (30, 9), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lm = tcfa.layer_map(a, "bert.encoder.layer.*", b, "auto", inputs, batch_size=12, progress=False)
    assert lm.layers_a == lm.layers_b == [f"bert.encoder.layer.{i}" for i in range(3)]
    fa = tcfa.extract(a, "bert.encoder.layer.1", inputs).mean(1)  # pooled over tokens
    fb = tcfa.extract(b, "bert.encoder.layer.2", inputs).mean(1)
    assert float(lm.scores[1, 2]) == pytest.approx(kornblith_cka(fa.double().numpy(), fb.double().numpy()), abs=1e-5)


def test_review_cases_mixed_dtypes_options_minibatch_batches_and_unreached_conditions():
    b, x = mlp(5, depth=2, seed=3).float(), data(n=40)
    # fp32 against fp32, bf16 against fp32: one compute dtype, no dtype error
    xf = x.float()
    a32 = mlp(6).float()
    got = tcfa.layer_map(a32, ["1"], b, ["1"], xf, progress=False).scores
    want = kornblith_cka(tcfa.extract(a32, "1", xf).double().numpy(), tcfa.extract(b, "1", xf).double().numpy())
    assert float(got[0, 0]) == pytest.approx(want, abs=1e-5)
    class ToBF16(nn.Module):
        def forward(self, t):
            return t.to(torch.bfloat16)

    half = nn.Sequential(ToBF16(), *mlp(6).to(torch.bfloat16))  # a bf16 model taking the same fp32 inputs
    got = tcfa.layer_map(half, ["2"], b, ["1"], xf, progress=False).scores
    assert bool(got.isfinite().all())
    for kwargs, name in ((dict(k=0, metric="cca"), "k"), (dict(reg=-0.5), "reg"), (dict(top_units=0), "top_units"),
                         (dict(gw_eps=0.0, metric="gw"), "gw_eps"),
                         (dict(estimator="minibatch", batch_size=3), "batch_size must be >= 4")):
        with pytest.raises((ValueError, TypeError), match=name):
            tcfa.layer_map(a32, ["1"], b, ["1"], xf, progress=False, **kwargs)
    cond = torch.tensor([0] * 37 + [1] * 3)
    mb = tcfa.layer_map(a32, ["0", "1"], b, ["1"], xf, estimator="minibatch", conditions=cond, batch_size=20,
                        progress=False)
    assert bool(mb.scores_per_condition[1].isnan().all()) and bool(mb.scores_per_condition[0].isfinite().all())
    # a condition the map never reached has no path: the error says so instead of "scores must be finite"
    with pytest.raises(ValueError, match="condition 1 has no scores: too few of its samples"):
        mb.path(condition=1)
    assert len(mb.path(condition=0)) == 2


def test_conditions_longer_than_the_data_are_refused():
    a, b, x = mlp(6), mlp(5, depth=2, seed=3), data(n=40)
    for estimator in ("full", "minibatch"):
        with pytest.raises(ValueError, match="conditions has 50 entries but data held 40 samples"):
            tcfa.layer_map(a, ["1"], b, ["1"], x, conditions=torch.arange(50) % 2, estimator=estimator,
                           batch_size=16, progress=False)
    # a map cut by num_anchors reads only the first conditions, as many as anchors
    tcfa.layer_map(a, ["1"], b, ["1"], x, conditions=torch.arange(40) % 2, num_anchors=20, progress=False)
