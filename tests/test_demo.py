"""A short `tcfa demo` run (tiny data and epochs) writes a well-formed results.json and plot."""
import json
import math

from tcfa import demo

KEYS = {"name", "conditioning", "tuning", "accuracy", "cka", "trainable_params", "corrupted_accuracy"}


def test_short_demo_writes_well_formed_results(tmp_path, monkeypatch):
    monkeypatch.setenv("TCFA_CACHE", str(tmp_path / "cache"))
    records = demo.run(str(tmp_path / "out"), epochs=1, tune_steps=2, n_train=300, methods=("cca", "ot"),
                       tunings=("task",), log=lambda *a: None)
    with open(tmp_path / "out" / "results.json") as fh:
        written = json.load(fh)
    assert written == json.loads(json.dumps(records))
    assert (tmp_path / "out" / "stitching.png").stat().st_size > 1000
    assert all(KEYS <= set(r) for r in written)
    names = [(r["name"], r["conditioning"], r["tuning"]) for r in written]
    expected = {("TCFA-cca", "class", "zero_shot"), ("TCFA-cca", "none", "zero_shot"), ("TCFA-ot", "class", "zero_shot"),
                ("TCFA-ot", "none", "zero_shot"), ("TCFA-cca", "class", "task"), ("model A (CNN)", "-", "-"),
                ("model B (ViT)", "-", "-")}
    assert expected <= set(names) and len(names) == len(set(names))
    for r in written:
        if r.get("not_applicable"):  # CNN vs ViT: merging cannot apply, and says why
            assert "different architectures" in r["not_applicable"] and r["accuracy"] is None
            continue
        assert 0 <= r["accuracy"] <= 1
        assert set(r["corrupted_accuracy"]) == {"noise", "rotation"}
        if r["name"].startswith("TCFA"):
            assert 0 <= r["cka"] <= 1 + 1e-9 and len(r["cka_per_condition"]) == 10
            assert not any(math.isnan(c) for c in r["cka_per_condition"])
            # Δθ: the class-conditioned stitch holds 10 maps, the unconditioned one 1
            assert r["trainable_params"] > 0
    by = {(r["name"], r["conditioning"], r["tuning"]): r for r in written}
    assert by[("TCFA-cca", "class", "zero_shot")]["trainable_params"] > 5 * by[("TCFA-cca", "none", "zero_shot")]["trainable_params"]
    # the cache was written, keyed by config: a second build loads instead of training
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
