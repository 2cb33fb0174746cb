"""Adapter transport (tcfa/lora.py, tcfa/pipeline/adapters.py) against independent references: a model B
built as model A with every hidden space orthogonally rotated and zero-padded, whose true adapter is known;
the dense formula and its SVD truncation; PEFT itself for the file format."""
import copy

import pytest
import torch
from torch import nn

from tcfa.lora import LoRALinear, anchor_map, lora_delta, transport_lora
from tcfa.pipeline.adapters import (add_lora, adapter_factors, load_adapter, merge_adapter, save_adapter,
                                    unmerge_adapter)

D = torch.float64


def rotation(d_b: int, d_a: int, gen, proper: bool = True) -> torch.Tensor:
    """A semi-orthogonal (d_b, d_a): a random d_a x d_a rotation (det +1, or -1 if not proper), zero-padded below."""
    Q, _ = torch.linalg.qr(torch.randn(d_a, d_a, generator=gen, dtype=D))
    if (torch.linalg.det(Q) > 0) != proper:
        Q[:, 0] = -Q[:, 0]
    return torch.cat([Q, torch.zeros(d_b - d_a, d_a, dtype=D)])


def mlp(widths, gen) -> nn.Sequential:
    layers = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(w_in, w_out, bias=False, dtype=D)
        lin.weight.data = torch.randn(w_out, w_in, generator=gen, dtype=D) / w_in**0.5
        layers += [lin] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def test_transport_recovers_the_true_adapter_of_a_rotated_padded_layer():
    gen = torch.Generator().manual_seed(0)
    d_in_a, d_out_a, d_in_b, d_out_b, r, n = 12, 10, 16, 13, 4, 200
    P_in, P_out = rotation(d_in_b, d_in_a, gen), rotation(d_out_b, d_out_a, gen)
    A, B = torch.randn(r, d_in_a, generator=gen, dtype=D), torch.randn(d_out_a, r, generator=gen, dtype=D)
    x_a = torch.randn(n, d_in_a, generator=gen, dtype=D) * torch.linspace(0.5, 3, d_in_a, dtype=D) + 2
    h_a = torch.randn(n, d_out_a, generator=gen, dtype=D) - 1
    m_in, m_out = anchor_map(x_a, x_a @ P_in.T), anchor_map(h_a, h_a @ P_out.T)
    assert not m_in.reflection and m_in.residual_max < 1e-12
    got = transport_lora({"fc": (A, B)}, {"fc": ("blk.fc", m_in.R, m_out.R)})
    A_b, B_b = got["blk.fc"]
    assert A_b.shape == (r, d_in_b) and B_b.shape == (d_out_b, r)
    want = P_out @ (B @ A) @ P_in.T
    torch.testing.assert_close(lora_delta(A_b, B_b), want, atol=1e-6, rtol=0)


def test_reflection_guard_fires_on_a_mirrored_space_and_the_proper_map_is_the_default():
    gen = torch.Generator().manual_seed(1)
    x_a = torch.randn(300, 8, generator=gen, dtype=D)
    mirrored = rotation(11, 8, gen, proper=False)
    x_b = x_a @ mirrored.T
    free = anchor_map(x_a, x_b, proper=False)
    assert free.reflection and not free.proper and free.residual_max < 1e-12
    torch.testing.assert_close(free.R, mirrored, atol=1e-10, rtol=0)
    kept = anchor_map(x_a, x_b)
    assert kept.reflection and kept.proper and torch.linalg.det(kept.R[:8, :8]) > 0
    assert kept.residual_mean > 1e-3  # the proper map cannot reproduce a mirror image
    assert not anchor_map(x_a, x_a @ rotation(11, 8, gen).T).reflection


@pytest.mark.parametrize("rank", [None, 3, 1])
def test_low_rank_path_equals_the_dense_formula_and_its_truncation(rank):
    gen = torch.Generator().manual_seed(2)
    A, B = torch.randn(5, 20, generator=gen, dtype=D), torch.randn(15, 5, generator=gen, dtype=D)
    R_in, R_out = torch.randn(30, 20, generator=gen, dtype=D), torch.randn(9, 15, generator=gen, dtype=D)
    A_b, B_b = transport_lora({"l": (A, B)}, {"l": ("m", R_in, R_out)}, rank=rank)["m"]
    dense = R_out @ B @ A @ R_in.T
    U, S, Vh = torch.linalg.svd(dense)
    k = 5 if rank is None else rank
    torch.testing.assert_close(lora_delta(A_b, B_b), U[:, :k] @ torch.diag(S[:k]) @ Vh[:k], atol=1e-10, rtol=0)


@pytest.mark.parametrize("in_b, out_b, r", [(3, 8, 4), (8, 3, 4), (2, 3, 4), (2, 7, 5), (2, 2, 4)])
def test_rank_above_a_width_of_b_keeps_the_shapes_with_zero_ranks(in_b, out_b, r):
    # Delta W_B has rank <= min(in_b, out_b) < r: the factors keep shapes (r, in_b), (out_b, r), the
    # ranks past min(...) zero, and their product is still the dense formula
    gen = torch.Generator().manual_seed(in_b * 10 + out_b)
    A, B = torch.randn(r, 6, generator=gen, dtype=D), torch.randn(5, r, generator=gen, dtype=D)
    R_in, R_out = torch.randn(in_b, 6, generator=gen, dtype=D), torch.randn(out_b, 5, generator=gen, dtype=D)
    A_b, B_b = transport_lora({"l": (A, B)}, {"l": ("m", R_in, R_out)})["m"]
    assert A_b.shape == (r, in_b) and B_b.shape == (out_b, r)
    assert not A_b[min(in_b, out_b):].any() and not B_b[:, min(in_b, out_b):].any()
    torch.testing.assert_close(lora_delta(A_b, B_b), R_out @ B @ A @ R_in.T, atol=1e-10, rtol=0)


def test_bad_inputs_are_named():
    for alpha, err in ((float("nan"), ValueError), (float("inf"), ValueError), (0.0, ValueError), ("x", TypeError)):
        with pytest.raises(err, match="alpha must be"):
            LoRALinear(torch.nn.Linear(3, 2), 2, alpha=alpha)
    A, B = torch.randn(4, 6, dtype=D), torch.randn(5, 4, dtype=D)
    maps = {"l": ("m", torch.randn(7, 6, dtype=D), torch.randn(8, 5, dtype=D))}
    with pytest.raises(ValueError, match="rank must be at most the adapter's rank 4"):
        transport_lora({"l": (A, B)}, maps, rank=5)
    with pytest.raises(ValueError, match=r"maps has no layer pair for adapted layer\(s\) \['k'\]"):
        transport_lora({"l": (A, B), "k": (A, B)}, maps)
    with pytest.raises(ValueError, match="a width mismatch with no map"):
        transport_lora({"l": (A, B)}, {"l": ("m", torch.randn(7, 3, dtype=D), torch.randn(8, 5, dtype=D))})
    with pytest.raises(ValueError, match=r"maps\['l'\] R_in must be 2-D"):
        transport_lora({"l": (A, B)}, {"l": ("m", torch.randn(6, dtype=D), torch.randn(8, 5, dtype=D))})
    with pytest.raises(ValueError, match=r"maps\['l'\] R_out must be finite"):
        transport_lora({"l": (A, B)}, {"l": ("m", torch.randn(7, 6, dtype=D), torch.full((8, 5), float("nan"), dtype=D))})
    with pytest.raises(TypeError, match=r"adapter\['l'\] A must be a torch.Tensor"):
        transport_lora({"l": (A.numpy(), B)}, maps)
    with pytest.raises(ValueError, match="at least 2 anchors"):
        anchor_map(torch.randn(1, 3), torch.randn(1, 4))


def test_lora_layer_starts_as_the_base_and_merge_unmerge_restores_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(3)
    model = mlp([6, 9, 4], gen)
    x = torch.randn(5, 6, generator=gen, dtype=D)
    before = model(x)
    layers = add_lora(model, ["0", "2"], rank=3, alpha=6)
    assert isinstance(model[0], LoRALinear)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # lora_B starts at zero
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    for m in layers.values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=gen, dtype=D)
    with_adapter = model(x)
    factors = adapter_factors(model)
    plain = mlp([6, 9, 4], gen)
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if "lora" not in k})
    original = {k: v.clone() for k, v in plain.state_dict().items()}
    saved = merge_adapter(plain, factors)
    torch.testing.assert_close(plain(x), with_adapter, atol=1e-12, rtol=0)
    unmerge_adapter(plain, saved)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, original[k])
    with pytest.raises(ValueError, match=r"give Delta W of shape \(4, 6\), the layer's weight is \(9, 6\)"):
        merge_adapter(plain, {"0": (factors["0"][0], factors["2"][1])})


def test_peft_named_files_round_trip_with_peft_itself(tmp_path):
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(4)
    base = mlp([6, 9, 4], gen).float()
    twin = copy.deepcopy(base)  # get_peft_model wraps base in place
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    model.save_pretrained(tmp_path / "peft")
    factors, config = load_adapter(tmp_path / "peft")
    assert config["r"] == 2 and sorted(factors) == ["0", "2"]
    for path in ("0", "2"):
        layer = model.base_model.model.get_submodule(path)
        want = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        torch.testing.assert_close(lora_delta(*factors[path]), want.detach(), atol=1e-6, rtol=0)
    save_adapter(tmp_path / "tcfa", factors, alpha=4)  # and back: PEFT loads tcfa's file
    again = peft.PeftModel.from_pretrained(twin, tmp_path / "tcfa")
    x = torch.randn(3, 6, generator=gen)
    model.eval(), again.eval()
    torch.testing.assert_close(again(x), model(x), atol=1e-6, rtol=0)


def test_adapter_experiment_runs_end_to_end_and_its_ratios_follow_from_its_accuracies(tmp_path, monkeypatch):
    # the experiment of `tcfa demo --adapters` at toy size (a check of the plumbing, not a result)
    import json

    from tcfa.cli import demo_adapters

    monkeypatch.setenv("TCFA_CACHE", str(tmp_path / "cache"))
    out = demo_adapters.run(str(tmp_path / "out"), seeds=(0,), epochs=1, lora_steps=3, ranks=(2,), alphas=(0.5,),
                            n_anchors=30, n_train=120, log=lambda *a: None)
    doc = json.loads((tmp_path / "out" / "adapters.json").read_text())
    assert doc["settings"]["ranks"] == [2] and doc["settings"]["seeds"] == [0] and doc["machine"]["cpu"]
    base = next(r for r in out["records"] if r["method"] == "B alone (no-op)")
    direct = next(r for r in out["records"] if r["method"] == "direct LoRA on B")
    moved = [r for r in out["records"] if r["method"] == "transported"]
    assert {(r["anchors"], r["pairing"], r["maps"]) for r in moved} == {
        (a, p, m) for a in ("random", "stratified", "layer map") for p in ("layer map", "proportional")
        for m in ("pooled", "rotated only")}
    gain = direct["shifted"] - base["shifted"]
    for r in moved:
        assert r["drift"] == pytest.approx(base["original"] - r["original"])
        if gain > 0:
            assert r["retention"] == pytest.approx((r["shifted"] - base["shifted"]) / gain)
    assert any("not applicable" in str(r.get("note", "")) or "differ" in str(r.get("note", ""))
               for r in out["records"] if r["method"] == "weight averaging / TIES")
    assert all(d["residual_in_mean"] >= 0 and 0 < d["span_in"] <= 1 for d in out["diagnostics"])
    assert "layer map" in demo_adapters.diagnostics_summary(out) and "±" in demo_adapters.summary(out)


def test_fp32_adapter_through_fp64_maps_is_computed_wide_and_returned_in_fp32():
    gen = torch.Generator().manual_seed(5)
    A, B = torch.randn(3, 7, generator=gen), torch.randn(6, 3, generator=gen)
    R_in, R_out = torch.randn(9, 7, generator=gen, dtype=D), torch.randn(8, 6, generator=gen, dtype=D)
    A_b, B_b = transport_lora({"l": (A, B)}, {"l": ("m", R_in, R_out)})["m"]
    assert A_b.dtype == B_b.dtype == torch.float32
    want = R_out @ B.double() @ A.double() @ R_in.T
    torch.testing.assert_close(lora_delta(A_b, B_b).double(), want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_adapter_kept_as_a_side_branch_computes_the_merge_and_comes_off_cleanly():
    from tcfa.pipeline.adapters import attach_adapter, remove_lora

    gen = torch.Generator().manual_seed(6)
    model = mlp([6, 9, 4], gen)
    model[2].weight.requires_grad_(False)  # a flag the adapter must give back as it found it
    layers = list(model)
    factors = {"0": (torch.randn(2, 6, generator=gen, dtype=D), torch.randn(9, 2, generator=gen, dtype=D)),
               "2": (torch.randn(3, 9, generator=gen, dtype=D), torch.randn(4, 3, generator=gen, dtype=D))}
    x = torch.randn(5, 6, generator=gen, dtype=D)
    merged = copy.deepcopy(model)
    merge_adapter(merged, factors, alpha=0.35)
    attach_adapter(model, factors, alpha=0.35)
    assert isinstance(model[0], LoRALinear)
    torch.testing.assert_close(model(x), merged(x), atol=1e-12, rtol=0)
    remove_lora(model)
    assert list(model) == layers and model[0].weight.requires_grad and not model[2].weight.requires_grad
    with pytest.raises(ValueError, match=r"factors\['0'\] must be \(A \(r, 6\), B \(9, r\)\)"):
        attach_adapter(model, {"0": factors["2"]})
    with pytest.raises(ValueError, match=r"paths \['0'\] hold no LoRALinear"):
        remove_lora(model, "0")
