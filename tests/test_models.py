"""tcfa.models: taps, rows, streaming moments and StitchedModel on small random-weight timm and
transformers models.

References are independent of the code under test: the models' own full forward passes, and B's
full forward with its tap output replaced by a forward hook (which does run B's early layers).
"""
import pytest
import torch
import transformers as T
from timm.models.convnext import ConvNeXt
from timm.models.deit import VisionTransformerDistilled
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tcfa
from tcfa.pipeline.models import (capture, extract, get_module, layout_of, paired_rows, rows_per_sample,
                                  stream_moments, to_rows)
from tcfa.pipeline.stitched import StitchedModel

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


# timm: zero_init_last / ls_init_value would make every residual branch start at ~0, so that a
# skipped or doubled branch could go unnoticed; these configs give every block a real effect.
def timm_resnet():
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), stem_width=8, num_classes=5,
                  zero_init_last=False).eval()


def timm_convnext():  # needs 32 px inputs: its last stage halves a 2 x 2 grid
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=5, ls_init_value=1.0).eval()


def timm_vit(reg_tokens=0, cls=VisionTransformer, image=16):  # a 4 x 4 patch grid
    return cls(img_size=image, patch_size=image // 4, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=5,
               reg_tokens=reg_tokens).eval()


def images(n=4, size=16):
    return torch.randn(n, 3, size, size)


def images32(n=4):
    return images(n, 32)


def tokens(n=4, length=7):
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0  # padding must reach B's layers through its own attention-mask glue
    return {"input_ids": torch.randint(0, 50, (n, length)), "attention_mask": mask}


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def logits(model, inputs):
    """transformers models return an output with .logits, timm models the logits tensor."""
    out = call(model, inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def forward_with_tap_replaced(model, path, activation, inputs):
    """Reference: B's full forward with the tap's output replaced by ``activation`` via a hook."""
    handle = get_module(model, path).register_forward_hook(lambda m, a, out: activation)
    try:
        with torch.no_grad():
            return logits(model, inputs)
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
@pytest.mark.parametrize("make, path, next_path, head, inputs", [
    (vit, "vit.layers.1", "vit.layers.2", "classifier", images),
    (resnet, "resnet.encoder.stages.1", "resnet.encoder.stages.2", "classifier", images),
    (bert, "bert.encoder.layer.0", "bert.encoder.layer.1", "classifier", tokens),
    (timm_resnet, "layer2", "layer3", "fc", images),
    (timm_convnext, "stages.1", "stages.2", "head", images32),
    (timm_vit, "blocks.1", "blocks.2", "head", images),
])
def test_extract_equals_full_forward_activation_and_stops_after_the_tap(make, path, next_path, head, inputs):
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
    assert counter.count(next_path) == 0 and counter.count(head) == 0
    assert head in dict(model.named_modules())  # the count above is of a module that exists


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



def test_layout_of_timm_models_takes_prefix_tokens_and_grid_from_the_model():
    model = timm_vit(reg_tokens=2)
    act = extract(model, "blocks.0", images(1))
    got = layout_of(act, model=model)
    assert act.shape[1] == 19 and (got.kind, got.num_special, got.grid, got.width) == ("tokens", 3, (4, 4), 16)
    # without the model, 19 tokens fit no square grid after 0-2 special tokens: a plain sequence
    assert (layout_of(act).num_special, layout_of(act).grid) == (0, None)
    cnn = timm_resnet()
    r = layout_of(extract(cnn, "layer2", images(1)), model=cnn)
    assert (r.kind, r.width, r.grid, r.positions) == ("map", 16, (2, 2), 4)
    assert got.describe() == "3 special + 4x4 patch tokens of width 16"
    assert r.describe() == "16 channels on a 2x2 grid"

# ------------------------------------------------------------------ StitchedModel: identity reproduces the model
@pytest.mark.parametrize("make, path, inputs", [
    (vit, "vit.layers.1", images),
    (bert, "bert.encoder.layer.1", tokens),
    (resnet, "resnet.encoder.stages.1", images),
    (convnext, "convnext.encoder.stages.1", images),
    (timm_resnet, "layer2", images),
    (timm_convnext, "stages.1", images32),
    (timm_vit, "blocks.1", images),
    (lambda: timm_vit(reg_tokens=2), "blocks.0", images),
    (timm_vit, "norm_pre", images),  # after _pos_embed: it is bypassed
    (timm_vit, "patch_embed", images),  # before _pos_embed: it must run on the injected patches
    (lambda: timm_vit(cls=VisionTransformerDistilled), "blocks.1", images),  # a subclass's own _pos_embed
])
def test_identity_stitch_between_a_model_and_itself_reproduces_it(make, path, inputs):
    model, x = make(), inputs(3)
    with torch.no_grad():
        ref = logits(model, x)
        assert ref.std(0).max() > 1e-3  # the model's output depends on its input
        got = StitchedModel(model, path, model, path, nn.Identity())(x)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ what runs
def under(name, paths):
    """``name`` is one of ``paths`` or inside one of them ("norm" does not cover "norm_pre")."""
    return any(name == p or name.startswith(p + ".") for p in paths)


@pytest.mark.parametrize("make_a, path_a, make_b, path_b, inputs, before_b, after_b, after_a", [
    (resnet, "resnet.encoder.stages.1", vit, "vit.layers.1", images,
     ("vit.embeddings", "vit.layers.0", "vit.layers.1"), ("vit.layers.2", "classifier"),
     ("resnet.encoder.stages.2", "resnet.pooler", "classifier")),
    (timm_resnet, "layer2", lambda: timm_vit(reg_tokens=2), "blocks.1", images,
     ("patch_embed", "blocks.0", "blocks.1"), ("blocks.2", "norm", "head"), ("layer3", "layer4", "global_pool", "fc")),
    (lambda: timm_vit(image=32), "blocks.0", timm_convnext, "stages.1", images32,
     ("stem", "stages.0", "stages.1"), ("stages.2", "stages.3", "head"), ("blocks.1", "blocks.2", "norm", "head")),
])
def test_b_early_layers_and_a_late_layers_do_not_run(make_a, path_a, make_b, path_b, inputs, before_b, after_b,
                                                      after_a):
    a, b, x = make_a(), make_b(), inputs(2)
    stitched = StitchedModel(a, path_a, b, path_b, tcfa.GatedMultiStitch(16, 16, 2, 4), example_input=x)
    modules_b = dict(b.named_modules())
    ca, cb = CallCounter(a), CallCounter(b)
    stitched(x)
    ca.remove()
    cb.remove()
    skipped = [n for n in modules_b if under(n, before_b)]
    assert skipped and all(cb.count(n) == 0 for n in skipped)
    assert all(cb.count(n) == 1 for n in after_b)
    late_a = [n for n, _ in a.named_modules() if under(n, after_a)]
    assert late_a and all(ca.count(n) == 0 for n in late_a)
    assert ca.count(path_a) == 1
    # the swapped modules and bypassed methods are back in place
    assert all(m is modules_b[n] for n, m in b.named_modules()) and len(dict(b.named_modules())) == len(modules_b)
    assert "_pos_embed" not in vars(b)


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


@pytest.mark.parametrize("make_a, path_a, make_b, path_b, special", [
    (vit, "vit.layers.0", resnet, "resnet.encoder.stages.1", 1),
    (lambda: timm_vit(reg_tokens=2), "blocks.0", timm_resnet, "layer2", 3),  # CLS + 2 register tokens
])
def test_vit_to_cnn_drops_the_prefix_tokens_and_resamples_the_patches(make_a, path_a, make_b, path_b, special):
    a, b, x = make_a(), make_b(), images(2)
    stitched = StitchedModel(a, path_a, b, path_b, nn.Identity())
    with torch.no_grad():
        act = stitched.stitched_activation(x)
        tok = extract(a, path_a, x)
        grid = tok[:, special:].transpose(1, 2).reshape(2, 16, 4, 4)
        ref = nn.functional.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False)
        torch.testing.assert_close(act, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(stitched(x), forward_with_tap_replaced(b, path_b, act, x), atol=ATOL, rtol=0)


def test_cnn_to_timm_vit_fills_every_prefix_token_from_the_pool_and_resamples_the_grid():
    a, b, x = timm_resnet(), timm_vit(reg_tokens=2), images(3)
    cls_map = nn.Linear(16, 16)
    stitched = StitchedModel(a, "layer2", b, "blocks.1", nn.Identity(), cls_stitch=cls_map)
    with torch.no_grad():
        act = stitched.stitched_activation(x)
        fmap = extract(a, "layer2", x)  # (3, 16, 2, 2); B: CLS + 2 registers + 4 x 4 patches
        up = nn.functional.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False)
        assert act.shape == (3, 19, 16)
        torch.testing.assert_close(act[:, 3:], up.flatten(2).transpose(1, 2), atol=ATOL, rtol=0)
        pooled = cls_map(fmap.mean(dim=(2, 3)))
        torch.testing.assert_close(act[:, :3], pooled[:, None].expand(3, 3, 16), atol=ATOL, rtol=0)
        torch.testing.assert_close(stitched(x), forward_with_tap_replaced(b, "blocks.1", act, x), atol=ATOL, rtol=0)


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
    # layers before the tap do not run in a stitched forward: their stand-ins would have returned the
    # stitched activation itself
    late = StitchedModel(model, "vit.layers.1", model, "vit.layers.1", nn.Identity())
    for early in ("vit.layers.0", "vit.layers.0.mlp", "vit.embeddings"):
        with pytest.raises(ValueError, match=r"come before the tap 'vit.layers.1'"):
            late.forward_taps(x, [early, "vit.layers.2"])
    with pytest.raises(ValueError, match=r"inside the tap 'vit.layers.1'"):
        late.forward_taps(x, ["vit.layers.1.mlp"])


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
