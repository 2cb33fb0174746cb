"""`tcfa demo`: its timm models and taps, a short run's results.json, and the README section
rendered from the committed results (tcfa.cli.report)."""
import json
import math
import platform

import pytest
import timm
import torch
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from tcfa.cli import demo, report
from tcfa.pipeline.models import extract, get_module, layout_of

KEYS = {"name", "conditioning", "tuning", "accuracy", "cka", "trainable_params", "corrupted_accuracy"}


def test_demo_models_are_timm_models_with_the_taps_and_layouts_the_demo_assumes():
    a, b = demo.build(demo.MODELS["A"]), demo.build(demo.MODELS["B"])
    assert isinstance(a, ResNet) and isinstance(b, VisionTransformer)
    x = torch.rand(2, 3, demo.IMAGE, demo.IMAGE)
    la = layout_of(extract(a, demo.PATH_A, x), model=a)
    lb = layout_of(extract(b, demo.PATH_B, x), model=b)
    # A's stage feeds B's patch tokens position for position: the same 4 x 4 grid, CLS apart
    assert (la.kind, la.grid) == ("map", (4, 4)) and (lb.kind, lb.num_special, lb.grid) == ("tokens", 1, (4, 4))
    assert a(x).shape == b(x).shape == (2, 10)
    for path in demo.LATER_B:
        get_module(b, path)


def test_short_demo_writes_well_formed_results_and_reuses_its_weight_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TCFA_CACHE", str(tmp_path / "cache"))
    doc = demo.run(str(tmp_path / "out"), epochs=1, tune_steps=2, n_train=300, methods=("cca", "ot"),
                   tunings=("task",), log=lambda *a: None)
    with open(tmp_path / "out" / "results.json") as fh:
        written = json.load(fh)
    assert written == json.loads(json.dumps(doc))
    assert (tmp_path / "out" / "stitching.png").stat().st_size > 1000
    m = written["machine"]
    assert (m["cpu"], m["torch"], m["timm"], m["python"]) == (report.cpu_model(), torch.__version__, timm.__version__,
                                                              platform.python_version())
    assert written["settings"]["n_train"] == 300 and written["settings"]["models"]["A"]["tap"] == demo.PATH_A
    assert 0 < written["timings"]["train_seconds"] < written["timings"]["wall_seconds"]
    records = written["records"]
    assert all(KEYS <= set(r) for r in records)
    names = [(r["name"], r["conditioning"], r["tuning"]) for r in records]
    expected = {("TCFA-cca", "class", "zero_shot"), ("TCFA-cca", "none", "zero_shot"), ("TCFA-ot", "class", "zero_shot"),
                ("TCFA-ot", "none", "zero_shot"), ("TCFA-cca", "class", "task"), ("model A (CNN)", "-", "-"),
                ("model B (ViT)", "-", "-")}
    assert expected <= set(names) and len(names) == len(set(names))
    for r in records:
        if r.get("not_applicable"):  # CNN vs ViT: merging cannot apply, and says why
            assert "different architectures (ResNet vs VisionTransformer)" in r["not_applicable"]
            assert r["accuracy"] is None
            continue
        assert 0 <= r["accuracy"] <= 1
        assert set(r["corrupted_accuracy"]) == {"noise", "rotation"}
        if r["name"].startswith("TCFA"):
            assert 0 <= r["cka"] <= 1 + 1e-9 and len(r["cka_per_condition"]) == 10
            assert not any(math.isnan(c) for c in r["cka_per_condition"])
            assert r["trainable_params"] > 0
    by = {(r["name"], r["conditioning"], r["tuning"]): r for r in records}
    # Δθ: the class-conditioned stitch holds 10 maps, the unconditioned one 1
    delta_theta = {c: by[("TCFA-cca", c, "zero_shot")]["trainable_params"] for c in ("class", "none")}
    assert delta_theta["class"] > 5 * delta_theta["none"]
    # the cache was written, keyed by config: a second run loads both models instead of training
    assert len(list((tmp_path / "cache").glob("timm-*.pt"))) == 2
    again = demo.run(None, epochs=1, n_train=300, methods=(), log=lambda *a: None)
    assert again["timings"]["train_seconds"] == 0
    assert [r["accuracy"] for r in again["records"][:2]] == [r["accuracy"] for r in records[:2]]


def fake_doc(train_seconds):
    record = dict(name="TCFA-cca", conditioning="class", tuning="task", accuracy=0.9876, delta_accuracy=-0.0123, cka=0.5,
                  cka_per_condition=[0.5], trainable_params=123, corrupted_accuracy={"noise": 0.25, "rotation": 0.75})
    model = dict(name="resnet18", kwargs={"layers": [1, 1]}, params=4567, test_accuracy=0.5, tap="layer3",
                 tap_shape="64 channels on a 4x4 grid")
    return {"records": [record], "timings": {"wall_seconds": 41.6, "train_seconds": train_seconds},
            "machine": {"cpu": "Test CPU 9000", "cores": 2, "torch_threads": 2, "torch": "9.9", "timm": "8.8",
                        "python": "3.0", "time": "then"},
            "settings": {"seed": 0, "epochs": 12, "tune_steps": 60, "rank": 16, "image": 32, "n_train": 1348,
                         "n_test": 449, "models": {"A": model, "B": dict(model, name="vit_tiny_patch16_224")}}}


def test_demo_section_shows_the_machine_the_models_and_the_table():
    md = report.demo_section(fake_doc(17.2))
    assert "Test CPU 9000 (2 cores, 2 torch threads), torch 9.9, timm 8.8, Python 3.0" in md
    assert "Wall time 42 s, of which 17 s trained the models" in md
    assert "`timm.create_model('resnet18', pretrained=False, layers=[1, 1])`, 4,567 parameters" in md
    assert "`timm.create_model('vit_tiny_patch16_224'" in md and "tapped at `layer3` (64 channels on a 4x4 grid)" in md
    row = "TCFA-cca         class  task        0.988  -0.012     123  0.500  0.250  0.750"
    assert f"```\n{report.table(fake_doc(0)['records'])}\n```" in md and row in md
    assert "both models loaded from the weight cache" in report.demo_section(fake_doc(0))


def test_splice_replaces_only_the_marked_block_and_needs_its_markers():
    text = f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n"
    assert report.splice(text, "new", report.BEGIN, report.END) == f"intro\n{report.BEGIN}\nnew\n{report.END}\noutro\n"
    with pytest.raises(SystemExit, match="demo:begin"):
        report.splice("no markers", "new", report.BEGIN, report.END)


def test_readme_demo_section_is_rendered_from_the_committed_results():
    with open(report.DEMO_RESULTS) as fh:
        doc = json.load(fh)
    with open(report.README) as fh:
        text = fh.read()
    assert report.splice(text, report.demo_section(doc), report.BEGIN, report.END) == text, (
        "README.md's demo section is stale: run `python -m tcfa.cli.report demo_output/results.json`")
