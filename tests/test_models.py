"""tcfa.models: taps, rows, streaming moments and StitchedModel on small random-weight transformers models.

References are independent of the code under test: the models' own full forward passes, and B's
full forward with its tap output replaced by a forward hook (which does run B's early layers).
"""
import pytest
import torch
import transformers as T
from torch import nn

import tcfa
from tcfa.models import (StitchedModel, capture, extract, get_module, layout_of, paired_rows, rows_per_sample,
                         stream_moments, to_rows)

ATOL = 1e-5  # fp32, same kernels on both sides; only summation order may differ


# ------------------------------------------------------------------ small models
def vit(width=16, image=16, patch=4, layers=3):
    cfg = T.ViTConfig(image_size=image, patch_size=patch, num_channels=3, hidden_size=width, num_hidden_layers=layers,
                      num_attention_heads=2, intermediate_size=2 * width, num_labels=5)
    return T.ViTForImageClassification(cfg).eval()


def resnet():
    cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], num_labels=5)
    return T.ResNetForImageClassification(cfg).eval()


def convnext():
    cfg = T.ConvNextConfig(num_channels=3, num_stages=3, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], num_labels=5)
    return T.ConvNextForImageClassification(cfg).eval()


def bert(width=16):
    cfg = T.BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=2 * width, max_position_embeddings=16, num_labels=3)
    return T.BertForSequenceClassification(cfg).eval()


def images(n=4, size=16):
    return torch.randn(n, 3, size, size)


def tokens(n=4, length=7):
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0  # padding must reach B's layers through its own attention-mask glue
    return {"input_ids": torch.randint(0, 50, (n, length)), "attention_mask": mask}


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def forward_with_tap_replaced(model, path, activation, inputs):
    """Reference: B's full forward with the tap's output replaced by ``activation`` via a hook."""
    handle = get_module(model, path).register_forward_hook(lambda m, a, out: activation)
    try:
        with torch.no_grad():
            return call(model, inputs).logits
    finally:
        handle.remove()


class CallCounter:
    """Counts forward calls of every named module of a model."""

    def __init__(self, model):
        self.calls = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules() if name]

    def _hook(self, name):
        def hook(module, args, out):
            self.calls[name] = self.calls.get(name, 0) + 1
        return hook

    def count(self, name):
        return self.calls.get(name, 0)

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------ get_module
def test_get_module_follows_dotted_paths_with_indices():
    m = bert()
    assert get_module(m, "bert.encoder.layer.2") is m.bert.encoder.layer[2]
    assert get_module(m, "") is m


def test_get_module_unknown_path_names_it_and_the_valid_children():
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.7.*\[0, 1, 2\]"):
        get_module(bert(), "bert.encoder.layer.7")
    with pytest.raises(ValueError, match="encoderr"):
        extract(bert(), "bert.encoderr", tokens())


# ------------------------------------------------------------------ extract / capture
@pytest.mark.parametrize("make, path, next_path, inputs", [
    (vit, "vit.layers.1", "vit.layers.2", images),
    (resnet, "resnet.encoder.stages.1", "resnet.encoder.stages.2", images),
    (bert, "bert.encoder.layer.0", "bert.encoder.layer.1", tokens),
])
def test_extract_equals_full_forward_activation_and_stops_after_the_tap(make, path, next_path, inputs):
    model, x = make(), inputs(5)
    seen = []
    handle = get_module(model, path).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        call(model, x)
    handle.remove()
    counter = CallCounter(model)
    got = extract(model, path, x, batch_size=2)  # 3 batches: 2 + 2 + 1
    counter.remove()
    torch.testing.assert_close(got, seen[0], atol=ATOL, rtol=0)
    assert counter.count(path) == 3
    assert counter.count(next_path) == 0 and counter.count("classifier") == 0


def test_extract_accepts_batches_of_tuples_and_dicts():
    model, x = bert(), tokens(5)
    whole = extract(model, "bert.encoder.layer.1", x)
    pairs = [({k: v[i:i + 2] for k, v in x.items()}, torch.zeros(2)) for i in (0, 2, 4)]
    torch.testing.assert_close(extract(model, "bert.encoder.layer.1", pairs), whole, atol=ATOL, rtol=0)
    with pytest.raises(TypeError, match="batch"):
        extract(model, "bert.encoder.layer.1", [3.0])


def test_capture_returns_every_requested_layer():
    model, x = vit(), images(2)
    got = capture(model, ["vit.layers.0", "vit.layers.2"], x)
    torch.testing.assert_close(got["vit.layers.2"], extract(model, "vit.layers.2", x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ rows
def test_to_rows_pooled_and_tokens():
    act = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(to_rows(act, "pooled"), act.mean(dim=(2, 3)))
    rows = to_rows(act, "tokens")
    assert rows.shape == (2 * 16, 3) and rows_per_sample(act, "tokens") == 16
    torch.testing.assert_close(rows[16 + 5], act[1, :, 1, 1])  # sample 1, row-major position (1, 1)
    up = to_rows(act, "tokens", grid=(8, 8))
    ref = nn.functional.interpolate(act, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref.permute(0, 2, 3, 1).reshape(-1, 3))
    assert rows_per_sample(act, "tokens", grid=(8, 8)) == 64
    tok = torch.randn(2, 5, 3)
    torch.testing.assert_close(to_rows(tok, "pooled"), tok.mean(1))
    assert to_rows(tok, "tokens").shape == (10, 3)
    with pytest.raises(ValueError, match="mode"):
        to_rows(act, "mean")


def test_layout_of_vit_and_bert_tokens():
    v = layout_of(extract(vit(), "vit.layers.0", images(1)), model=vit())
    assert (v.kind, v.num_special, v.grid) == ("tokens", 1, (4, 4))
    b = layout_of(torch.zeros(1, 17, 16), model=bert())  # 17 = 1 + 4*4, but a text model has no grid
    assert (b.num_special, b.grid) == (0, None)


# ------------------------------------------------------------------ StitchedModel: identity reproduces the model
@pytest.mark.parametrize("make, path, inputs", [
    (vit, "vit.layers.1", images),
    (bert, "bert.encoder.layer.1", tokens),
    (resnet, "resnet.encoder.stages.1", images),
    (convnext, "convnext.encoder.stages.1", images),
])
def test_identity_stitch_between_a_model_and_itself_reproduces_it(make, path, inputs):
    model, x = make(), inputs(3)
    with torch.no_grad():
        ref = call(model, x).logits
        got = StitchedModel(model, path, model, path, nn.Identity())(x)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ what runs
def test_b_early_layers_and_a_late_layers_do_not_run():
    a, b, x = resnet(), vit(), images(2)
    stitched = StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", tcfa.GatedMultiStitch(16, 16, 2, 4),
                             example_input=x)
    ca, cb = CallCounter(a), CallCounter(b)
    stitched(x)
    ca.remove()
    cb.remove()
    before_b = [n for n, _ in b.named_modules() if n.startswith(("vit.embeddings", "vit.layers.0", "vit.layers.1"))]
    assert before_b and all(cb.count(n) == 0 for n in before_b)
    assert cb.count("vit.layers.2") == 1 and cb.count("classifier") == 1
    after_a = [n for n, _ in a.named_modules() if n.startswith(("resnet.encoder.stages.2", "resnet.pooler",
                                                                  "classifier"))]
    assert after_a and all(ca.count(n) == 0 for n in after_a)
    assert ca.count("resnet.encoder.stages.1") == 1
    # the swapped modules are back in place
    assert isinstance(get_module(b, "vit.layers.0"), T.models.vit.modeling_vit.ViTLayer)


def test_module_registered_before_the_tap_but_run_after_it_is_an_error():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, executed last
            self.body = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.body(x))

    m = HeadFirst()
    stitched = StitchedModel(m, "body", m, "body", nn.Identity(), example_input=torch.randn(1, 4, 4))
    with pytest.raises(RuntimeError, match="'head' is registered before the tap"):
        stitched(torch.randn(2, 4, 4))


# ------------------------------------------------------------------ cross-architecture shapes
def test_cnn_to_vit_resamples_bilinearly_and_fills_cls_from_the_pool():
    a, b, x = resnet(), vit(), images(3)
    cls_map = nn.Linear(16, 16)
    stitched = StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", nn.Identity(), cls_stitch=cls_map)
    with torch.no_grad():
        act = stitched.stitched_activation(x)
        fmap = extract(a, "resnet.encoder.stages.1", x)  # (3, 16, 2, 2); B's grid is 4 x 4 after 1 CLS
        up = nn.functional.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False)
        assert act.shape == (3, 17, 16)
        torch.testing.assert_close(act[:, 1:], up.flatten(2).transpose(1, 2), atol=ATOL, rtol=0)
        torch.testing.assert_close(act[:, 0], cls_map(fmap.mean(dim=(2, 3))), atol=ATOL, rtol=0)
        torch.testing.assert_close(stitched(x), forward_with_tap_replaced(b, "vit.layers.1", act, x),
                                   atol=ATOL, rtol=0)


def test_vit_to_cnn_drops_cls_and_resamples_patches():
    a, b, x = vit(image=16, patch=4), resnet(), images(2)
    stitched = StitchedModel(a, "vit.layers.0", b, "resnet.encoder.stages.1", nn.Identity())
    with torch.no_grad():
        act = stitched.stitched_activation(x)
        tok = extract(a, "vit.layers.0", x)
        grid = tok[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
        ref = nn.functional.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(act, ref, atol=ATOL, rtol=0)


def test_bert_to_bert_of_different_widths_matches_hooked_reference_and_trains_only_the_stitch():
    a, b, x = bert(16), bert(24), tokens(3)
    stitch = nn.Linear(16, 24)
    stitched = StitchedModel(a, "bert.encoder.layer.0", b, "bert.encoder.layer.1", stitch)
    out = stitched(x)
    with torch.no_grad():
        ref_act = stitch(extract(a, "bert.encoder.layer.0", x))
    torch.testing.assert_close(out, forward_with_tap_replaced(b, "bert.encoder.layer.1", ref_act, x),
                               atol=ATOL, rtol=0)
    out.square().sum().backward()
    assert stitch.weight.grad is not None and stitch.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in (*a.parameters(), *b.parameters()))
    assert stitched.num_trainable() == 16 * 24 + 24


def test_pooled_mode_broadcasts_the_mapped_pool_to_every_position():
    a, b, x = resnet(), vit(), images(2)
    stitch = nn.Linear(16, 16)
    stitched = StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", stitch, mode="pooled")
    with torch.no_grad():
        act = stitched.stitched_activation(x)
        pooled = stitch(extract(a, "resnet.encoder.stages.1", x).mean(dim=(2, 3)))
    torch.testing.assert_close(act, pooled[:, None].expand(2, 17, 16), atol=ATOL, rtol=0)


def test_forward_taps_returns_b_later_activations_as_b_computes_them():
    model, x = vit(), images(2)
    stitched = StitchedModel(model, "vit.layers.0", model, "vit.layers.0", nn.Identity())
    with torch.no_grad():
        logits, acts = stitched.forward_taps(x, ["vit.layers.0", "vit.layers.2"])
        ref = capture(model, ["vit.layers.0", "vit.layers.2"], x)
        torch.testing.assert_close(logits, model(x).logits, atol=ATOL, rtol=0)
    for path in ref:
        torch.testing.assert_close(acts[path], ref[path], atol=ATOL, rtol=0)


# ------------------------------------------------------------------ bad input
def test_stitch_widths_that_do_not_match_the_taps_are_rejected():
    a, b, x = resnet(), vit(), images(1)
    with pytest.raises(ValueError, match=r"stitch maps width 8 -> 16.*width 16"):
        StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", nn.Linear(8, 16), example_input=x)
    undeclared = StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", nn.Sequential(nn.Linear(16, 12)))
    with pytest.raises(ValueError, match="stitch returned width 12"):
        undeclared(x)
    with pytest.raises(ValueError, match="layer path 'vit.blocks.1'"):
        StitchedModel(a, "resnet.encoder.stages.1", b, "vit.blocks.1", nn.Identity())
    with pytest.raises(TypeError, match="stitch"):
        StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", lambda r: r)
    with pytest.raises(ValueError, match="mode"):
        StitchedModel(a, "resnet.encoder.stages.1", b, "vit.layers.1", nn.Identity(), mode="cls")


# ------------------------------------------------------------------ streaming moments
@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_stream_moments_equals_moments_of_all_paired_rows(mode):
    a, b, x = resnet(), vit(), images(6)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    acc = tcfa.MomentAccumulator(2, 16, 16)
    stream_moments(a, "resnet.encoder.stages.1", b, "vit.layers.1", x, labels, acc, mode=mode, batch_size=4)
    xa, xb = paired_rows(extract(a, "resnet.encoder.stages.1", x), extract(b, "vit.layers.1", x), mode)
    per = xa.shape[0] // 6
    assert per == (1 if mode == "pooled" else 17)
    ref = tcfa.segment_moments(xa.double(), xb.double(), labels.repeat_interleave(per), 2)
    got = acc.result()
    torch.testing.assert_close(got.count, ref.count)
    torch.testing.assert_close(got.sxy, ref.sxy, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(got.mean_x, ref.mean_x, atol=1e-8, rtol=1e-8)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        stream_moments(a, "resnet.encoder.stages.1", b, "vit.layers.1", x, labels[:5], tcfa.MomentAccumulator(2, 16, 16))
