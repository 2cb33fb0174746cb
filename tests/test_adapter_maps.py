"""Adapter transport on whole models (tcfa.fit_adapter_maps, per-condition anchor maps, transformers Conv1D).

The reference model B is model A with every hidden space orthogonally transformed and zero-padded: the
residual stream by a random rotation, each MLP's hidden space (behind tanh) by a signed permutation, the
only orthogonal maps an odd elementwise nonlinearity commutes with. B computes A's function exactly, and
the adapter B needs to match A + adapter is known in closed form.
"""
import copy

import pytest
import torch
from torch import nn

import tcfa
from tcfa.lora import anchor_map, lora_delta, transport_lora
from tcfa.pipeline.adapters import add_lora, adapter_factors, load_adapter, merge_adapter, unmerge_adapter

D = torch.float64


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h, dtype=D), nn.Linear(h, d, dtype=D)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class ResidualMLP(nn.Module):
    def __init__(self, d_in, d, h, depth, n_out):
        super().__init__()
        self.embed = nn.Linear(d_in, d, dtype=D)
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(depth)])
        self.head = nn.Linear(d, n_out, dtype=D)

    def forward(self, u):
        x = self.embed(u)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def rotation(d_b, d_a, gen, proper=True):
    Q, _ = torch.linalg.qr(torch.randn(d_a, d_a, generator=gen, dtype=D))
    if (torch.linalg.det(Q) > 0) != proper:
        Q[:, 0] = -Q[:, 0]
    return torch.cat([Q, torch.zeros(d_b - d_a, d_a, dtype=D)])


def signed_permutation(d_b, d_a, gen, proper=True):
    Q = torch.eye(d_a, dtype=D)[torch.randperm(d_a, generator=gen)]
    Q = Q * torch.where(torch.rand(d_a, generator=gen) < 0.5, -1.0, 1.0).to(D)
    if (torch.linalg.det(Q) > 0) != proper:
        Q[:, 0] = -Q[:, 0]
    return torch.cat([Q, torch.zeros(d_b - d_a, d_a, dtype=D)])


def rotated_twin(a: ResidualMLP, d_b, h_b, gen, mirror_block=None):
    """B = A with the residual stream rotated by P (d_b x d) and block l's hidden space by Q_l (h_b x h)."""
    d, h = a.embed.out_features, a.blocks[0].fc1.out_features
    P = rotation(d_b, d, gen)
    Qs = [signed_permutation(h_b, h, gen, proper=(i != mirror_block)) for i in range(len(a.blocks))]
    b = ResidualMLP(a.embed.in_features, d_b, h_b, len(a.blocks), a.head.out_features)
    with torch.no_grad():
        b.embed.weight.copy_(P @ a.embed.weight), b.embed.bias.copy_(P @ a.embed.bias)
        for ba, bb, Q in zip(a.blocks, b.blocks, Qs):
            bb.fc1.weight.copy_(Q @ ba.fc1.weight @ P.T), bb.fc1.bias.copy_(Q @ ba.fc1.bias)
            bb.fc2.weight.copy_(P @ ba.fc2.weight @ Q.T), bb.fc2.bias.copy_(P @ ba.fc2.bias)
        b.head.weight.copy_(a.head.weight @ P.T), b.head.bias.copy_(a.head.bias)
    return b, P, Qs


def model_pair(seed, mirror_block=None):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # widths equal (8) and the input wider (10): every adapted layer's anchors then span its whole space
    a = ResidualMLP(10, 8, 8, 3, 4)
    b, P, Qs = rotated_twin(a, 11, 10, gen, mirror_block)
    u = torch.randn(60, 4, 10, generator=gen, dtype=D)  # 60 samples of 4 tokens: 240 rows per layer
    return a, b, P, Qs, u


PAIRS = {f"blocks.{i}.{n}": f"blocks.{i}.{n}" for i in range(3) for n in ("fc1", "fc2")}


def test_twin_computes_the_same_function():
    a, b, _, _, u = model_pair(0)
    torch.testing.assert_close(b(u), a(u), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_transport_recovers_the_true_adapter_of_every_layer_of_a_rotated_padded_model(seed):
    a, b, P, Qs, u = model_pair(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    adapter = {p: (torch.randn(3, w.in_features, generator=gen, dtype=D),
                   torch.randn(w.out_features, 3, generator=gen, dtype=D) * 0.1)
               for p, w in ((p, a.get_submodule(p)) for p in PAIRS)}
    fitted = tcfa.fit_adapter_maps(a, b, PAIRS, u)
    moved = transport_lora(adapter, fitted.maps)
    for i, Q in enumerate(Qs):
        A1, B1 = adapter[f"blocks.{i}.fc1"]
        A2, B2 = adapter[f"blocks.{i}.fc2"]
        torch.testing.assert_close(lora_delta(*moved[f"blocks.{i}.fc1"]), Q @ B1 @ A1 @ P.T, atol=1e-6, rtol=0)
        torch.testing.assert_close(lora_delta(*moved[f"blocks.{i}.fc2"]), P @ B2 @ A2 @ Q.T, atol=1e-6, rtol=0)
    # and B with the transported adapter merged computes A with A's adapter merged
    merge_adapter(a, adapter), merge_adapter(b, moved)
    torch.testing.assert_close(b(u), a(u), atol=1e-6, rtol=0)
    d = {x["a"]: x for x in fitted.diagnostics}
    assert all(x["residual_in_max"] < 1e-9 and x["residual_out_max"] < 1e-9 for x in d.values())
    assert all(x["span_in"] == 1 and x["span_out"] == 1 for x in d.values())
    assert not any(x["reflection_in"] or x["reflection_out"] for x in d.values())
    # one residual rotation for every block: fc1's input maps do not turn; each block's hidden maps do
    assert d["blocks.0.fc1"]["roughness_in"] is None
    assert d["blocks.1.fc1"]["roughness_in"] < 1e-9 and d["blocks.2.fc2"]["roughness_out"] < 1e-9
    assert d["blocks.1.fc1"]["roughness_out"] > 0.1
    # a signed permutation matches every unit of A both ways (padded units of B stay unmatched)
    assert d["blocks.0.fc2"]["coverage_in"] == pytest.approx(2 * 8 / (8 + 10))
    assert d["blocks.0.fc1"]["coverage_in"] < d["blocks.0.fc2"]["coverage_in"]


def test_reflection_guard_fires_on_a_mirrored_model_and_only_there():
    a, b, _, Qs, u = model_pair(2, mirror_block=1)
    fitted = tcfa.fit_adapter_maps(a, b, PAIRS, u)
    flagged = {x["a"]: (x["reflection_in"], x["reflection_out"]) for x in fitted.diagnostics}
    assert flagged == {"blocks.0.fc1": (False, False), "blocks.0.fc2": (False, False),
                       "blocks.1.fc1": (False, True), "blocks.1.fc2": (True, False),
                       "blocks.2.fc1": (False, False), "blocks.2.fc2": (False, False)}
    # the proper default cannot reproduce the mirror; the unconstrained fit does, exactly
    assert fitted.maps["blocks.1.fc2"][1].sub(Qs[1]).abs().max() > 0.1
    free = tcfa.fit_adapter_maps(a, b, PAIRS, u, proper=False)
    torch.testing.assert_close(free.maps["blocks.1.fc2"][1], Qs[1], atol=1e-9, rtol=0)


def test_layer_map_score_of_the_blocks_holding_each_pair():
    a, b, _, _, u = model_pair(3)
    scores = torch.arange(9, dtype=D).reshape(3, 3)
    m = tcfa.LayerMap(scores, [f"blocks.{i}" for i in range(3)], [f"blocks.{j}" for j in range(3)])
    fitted = tcfa.fit_adapter_maps(a, b, {"blocks.2.fc1": "blocks.0.fc1", "head": "head"}, u, layer_map=m)
    assert [x["layer_map_score"] for x in fitted.diagnostics] == [6.0, None]
    u[..., 5:] = 0  # inputs on 5 of 10 directions: block 0's residual stream spans 5 of its 8 dimensions
    narrow = tcfa.fit_adapter_maps(a, b, {"blocks.0.fc1": "blocks.0.fc1"}, u)
    assert narrow.diagnostics[0]["span_in"] == 5 / 8


def test_per_condition_anchor_maps_equal_a_fit_on_each_condition_alone():
    gen = torch.Generator().manual_seed(4)
    x_a = torch.randn(90, 6, generator=gen, dtype=D)
    labels = torch.randint(0, 3, (90,), generator=gen)
    rots = [rotation(9, 6, gen, proper=(c != 2)) for c in range(3)]
    x_b = torch.stack([rots[int(c)] @ x for x, c in zip(x_a, labels)]) + torch.randn(90, 9, generator=gen,
                                                                                     dtype=D) * 0.01
    got = anchor_map(x_a, x_b, labels, 3, proper=False)
    assert [m.reflection for m in got] == [False, False, True]
    for c, m in enumerate(got):
        rows = labels == c
        xa, xb = x_a[rows] - x_a[rows].mean(0), x_b[rows] - x_b[rows].mean(0)
        U, _, Vh = torch.linalg.svd(xb.T @ xa, full_matrices=False)  # independent of the moments kernel
        torch.testing.assert_close(m.R, U @ Vh, atol=1e-10, rtol=0)
        torch.testing.assert_close(m.mu_b, x_b[rows].mean(0), atol=1e-12, rtol=0)
        single = anchor_map(x_a[rows], x_b[rows], proper=False)
        assert m.residual_mean == pytest.approx(single.residual_mean, rel=1e-9)
    kept = anchor_map(x_a, x_b, labels, 3)
    assert torch.linalg.det(kept[2].R[:6, :6]) > 0 and kept[2].reflection
    torch.testing.assert_close(kept[0].R, got[0].R, atol=0, rtol=0)


def test_fit_adapter_maps_per_condition_and_bad_inputs_are_named():
    a, b, _, _, u = model_pair(5)
    labels = torch.arange(60) % 2
    fitted = tcfa.fit_adapter_maps(a, b, PAIRS, u, labels=labels, num_segments=2)
    got = {}
    for name, model in (("a", a), ("b", b)):  # block 0's fc1 input: the residual stream after the embedding
        got[name] = model.embed(u).reshape(-1, model.embed.out_features).detach()
    for c in range(2):
        rows = (labels == c).repeat_interleave(4)
        want = anchor_map(got["a"][rows], got["b"][rows]).R
        torch.testing.assert_close(fitted.per_condition[c]["blocks.0.fc1"][1], want, atol=1e-10, rtol=0)
    assert len(fitted.diagnostics[0]["residual_in_per_condition"]) == 2
    with pytest.raises(ValueError, match="pairs must hold at least one"):
        tcfa.fit_adapter_maps(a, b, {}, u)
    with pytest.raises(TypeError, match=r"the layer at 'blocks.0' must be an nn.Linear or a transformers Conv1D"):
        tcfa.fit_adapter_maps(a, b, {"blocks.0": "blocks.0"}, u)
    with pytest.raises(ValueError, match="labels"):
        tcfa.fit_adapter_maps(a, b, PAIRS, u, labels=torch.arange(60) % 3, num_segments=2)
    with pytest.raises(ValueError, match=r"condition\(s\) \[1\] got fewer"):
        anchor_map(torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 0, 0, 0, 1]), 2)


def _gpt2(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=50)
    return transformers.GPT2Model(cfg).eval()


def test_lora_on_transformers_conv1d_merges_as_the_adapter_computes():
    model = _gpt2(0)
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).last_hidden_state
    original = model.h[0].attn.c_attn.weight.detach().clone()
    layers = add_lora(model, ["h.0.attn.c_attn", "h.1.mlp.c_proj"], rank=2)
    torch.testing.assert_close(model(ids).last_hidden_state, before, atol=0, rtol=0)
    for m in layers.values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    with torch.no_grad():
        with_adapter = model(ids).last_hidden_state
    factors = adapter_factors(model)
    assert factors["h.0.attn.c_attn"][1].shape == (96, 2)  # (out, r): Conv1D's weight is (in, out)
    plain = _gpt2(0)
    saved = merge_adapter(plain, factors)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).last_hidden_state, with_adapter, atol=1e-5, rtol=0)
    unmerge_adapter(plain, saved)
    assert torch.equal(plain.h[0].attn.c_attn.weight, original)


def test_peft_adapter_on_conv1d_loads_and_merges_to_peft_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base = _gpt2(1)
    twin = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
                          fan_in_fan_out=True)
    model = peft.get_peft_model(base, cfg).eval()
    model.save_pretrained(tmp_path)
    factors, _ = load_adapter(tmp_path)
    assert sorted(factors) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    merge_adapter(twin, factors)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-5, rtol=0)
