"""`tcfa align` on timm models: a name (random init, seeded), a name with a checkpoint, a module file."""
import pytest
import timm
import torch

import tcfa
from tcfa import cli
from tcfa.pipeline import data
from tcfa.pipeline.models import extract, layout_of, paired_rows


@pytest.fixture
def digits(tmp_path):
    x, y = data.digits_images(32)
    path = tmp_path / "inputs.pt"
    torch.save((x[:40], y[:40]), path)
    return x[:40], y[:40], str(path)


def test_align_with_timm_names_checkpoint_and_module_file_saves_the_stitch_fitted_on_those_models(tmp_path, digits):
    x, y, inputs = digits
    torch.manual_seed(1)
    trained_a = timm.create_model("resnet18", pretrained=False, num_classes=10)  # stands in for trained weights
    torch.save(trained_a.state_dict(), tmp_path / "a.pt")
    torch.manual_seed(2)
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=10), tmp_path / "b_module.pt")
    out = tmp_path / "stitch.safetensors"
    assert cli.main(["align", "--model-a", "resnet18", "--checkpoint-a", str(tmp_path / "a.pt"), "--layer-a", "layer2",
                     "--model-b", str(tmp_path / "b_module.pt"), "--layer-b", "stages.1", "--inputs", inputs,
                     "--method", "ridge", "--rank", "4", "--out", str(out)]) == 0
    loaded = tcfa.GatedMultiStitch.load(str(out))
    assert (loaded.dx, loaded.dy, loaded.num_conditions) == (128, 80, 10)  # resnet18 layer2, convnext_atto stages.1

    # reference: the same models built by hand, the same fit in-process
    model_a = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model_a.load_state_dict(torch.load(tmp_path / "a.pt"))
    model_b = torch.load(tmp_path / "b_module.pt", weights_only=False)
    act_a, act_b = extract(model_a.eval(), "layer2", x), extract(model_b.eval(), "stages.1", x)
    rows_a, rows_b = paired_rows(act_a, act_b, "tokens", layout_a=layout_of(act_a), layout_b=layout_of(act_b))
    ref = tcfa.TCFA("ridge", rank=4, conditions=10).fit(rows_a, rows_b, y.repeat_interleave(16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(rows_a), ref(rows_a), atol=1e-4, rtol=1e-4)


def test_align_builds_a_timm_name_from_the_seed_without_a_checkpoint(tmp_path, digits):
    x, y, inputs = digits
    out = tmp_path / "stitch.safetensors"
    args = ["align", "--model-a", "resnet18", "--layer-a", "layer2", "--model-b", "resnet18", "--layer-b", "layer2",
            "--inputs", inputs, "--method", "ridge", "--rank", "4", "--conditions", "none", "--seed", "3"]
    assert cli.main(args + ["--out", str(out)]) == 0
    torch.manual_seed(3)
    model_a = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    model_b = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    rows_a, rows_b = paired_rows(extract(model_a, "layer2", x), extract(model_b, "layer2", x), "tokens")
    ref = tcfa.TCFA("ridge", rank=4, conditions=1).fit(rows_a, rows_b, None)
    with torch.no_grad():
        torch.testing.assert_close(tcfa.GatedMultiStitch.load(str(out))(rows_a), ref(rows_a), atol=1e-4, rtol=1e-4)


def test_align_rejects_a_checkpoint_that_does_not_fit_naming_the_flag(tmp_path, digits):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="--checkpoint-b .*bad.pt does not fit --model-b convnext_atto"):
        cli.main(["align", "--model-a", "resnet18", "--layer-a", "layer2", "--model-b", "convnext_atto",
                  "--checkpoint-b", str(tmp_path / "bad.pt"), "--layer-b", "stages.1", "--inputs", digits[2],
                  "--out", str(tmp_path / "s.safetensors")])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match="--checkpoint-a: .*holds a list, not a state_dict"):
        cli.main(["align", "--model-a", "resnet18", "--checkpoint-a", str(tmp_path / "list.pt"), "--layer-a", "layer2",
                  "--model-b", "resnet18", "--layer-b", "layer2", "--inputs", digits[2],
                  "--out", str(tmp_path / "s.safetensors")])


def test_layers_prints_best_pairs_writes_the_heatmap_and_the_map(tmp_path, digits, capsys):
    x, y, inputs = digits
    out, saved = tmp_path / "map.png", tmp_path / "map.safetensors"
    assert cli.main(["layers", "--model-a", "resnet18", "--model-b", "convnext_atto", "--inputs", inputs,
                     "--layers-b", "stages.*.blocks.*", "--num-anchors", "30", "--conditions", "none", "--out", str(out),
                     "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "layer of A" in printed and "path: layer1.0->" in printed
    assert open(out, "rb").read(4) == b"\x89PNG"
    lm = tcfa.LayerMap.load(str(saved))
    assert lm.layers_a == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert lm.layers_b == [f"stages.{s}.blocks.{i}" for s, n in enumerate((2, 2, 6, 2)) for i in range(n)]
    assert lm.scores.shape == (8, 12)
    # the same map in-process: the models built from the same seed, the first 30 inputs
    torch.manual_seed(0)
    model_a = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    model_b = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    fa = extract(model_a, "layer3.1", x[:30]).mean((2, 3))
    fb = extract(model_b, "stages.2.blocks.0", x[:30]).mean((2, 3))
    assert float(lm.scores[5, 4]) == pytest.approx(float(tcfa.linear_cka(fa, fb)), abs=1e-5)


def test_align_auto_chooses_from_the_layer_map(tmp_path, digits, capsys):
    x, y, inputs = digits
    out = tmp_path / "stitch.safetensors"
    assert cli.main(["align", "--model-a", "resnet18", "--layer-a", "auto", "--model-b", "resnet18", "--layer-b",
                     "auto", "--inputs", inputs, "--method", "ridge", "--rank", "4", "--conditions", "none",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chose --layer-a" in printed and "leaving B" in printed
    torch.manual_seed(0)  # A and B as the command builds them: one seed, A first
    model_a = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    model_b = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    lm = tcfa.layer_map(model_a, "auto", model_b, "auto", x, num_anchors=512, progress=False)
    scores = lm.scores[:, :-1]  # B's last block leaves nothing after it
    i, j = divmod(int(scores.argmax()), scores.shape[1])
    assert f"--layer-a {lm.layers_a[i]} --layer-b {lm.layers_b[j]}:" in printed


def test_fit_models_auto_records_the_choice():
    x, y = data.digits_images(32)
    torch.manual_seed(0)
    a = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    b = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                          num_classes=10).eval()
    fitter = tcfa.TCFA("ridge", rank=4)
    stitch = fitter.fit_models(a, "auto", b, "auto", x[:60], y[:60], mode="pooled", progress=False)
    la, lb = fitter.layers_
    assert lb in ("blocks.0", "blocks.1") and la in fitter.layer_map_.layers_a
    assert "leaving B" in fitter.layer_choice_ and stitch.num_conditions == 10
    # B's tap given (its last block): only A's layer is chosen, the best against it on the map
    fixed = tcfa.TCFA("ridge", rank=4)
    fixed.fit_models(a, "auto", b, "blocks.2", x[:60], y[:60], mode="pooled", progress=False)
    scores = fixed.layer_map_.scores[:, 0]
    assert fixed.layers_ == (fixed.layer_map_.layers_a[int(scores.argmax())], "blocks.2")
    assert "against the given layer_b" in fixed.layer_choice_


def test_bad_counts_paths_and_inputs_exit_naming_the_flag_before_any_work(tmp_path, digits, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("ran before its arguments were checked")

    from tcfa.cli import ablate, demo
    monkeypatch.setattr(demo, "run", no_training)
    monkeypatch.setattr(ablate, "run", no_training)
    for argv, message in ((["demo", "--tune-steps", "-1"], "--tune-steps must be >= 0, got -1"),
                          (["demo", "--epochs", "0"], "--epochs must be >= 1, got 0"),
                          (["ablate", "--seeds", "0"], "--seeds must be >= 1, got 0")):
        with pytest.raises(SystemExit, match=message):
            cli.main(argv)
    base = ["align", "--model-a", "resnet18", "--model-b", "resnet18", "--layer-b", "layer2", "--image-size", "32"]
    with pytest.raises(SystemExit, match="--layer-a must name a module path"):
        cli.main(base + ["--layer-a", "", "--out", str(tmp_path / "s.safetensors")])
    with pytest.raises(SystemExit, match="its directory does not exist"):
        cli.main(base + ["--layer-a", "layer1", "--out", str(tmp_path / "missing" / "s.safetensors")])
    (tmp_path / "bad.pt").write_text("not a torch file")
    with pytest.raises(SystemExit, match="--inputs .*bad.pt is not a torch.save file"):
        cli.main(base + ["--layer-a", "layer1", "--inputs", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "s")])
    torch.save((torch.zeros(4, 3, 32, 32), torch.zeros(3, dtype=torch.int64)), tmp_path / "short.pt")
    with pytest.raises(SystemExit, match="holds 4 inputs but 3 labels"):
        cli.main(base + ["--layer-a", "layer1", "--inputs", str(tmp_path / "short.pt"), "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="--top must be >= 1"):
        cli.main(["layers", "--model-a", "resnet18", "--model-b", "resnet18", "--top", "0", "--out", str(tmp_path / "m.png")])
