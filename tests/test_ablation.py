"""tcfa ablate's pieces against independent references: the shared-basis stitch against its formula and a
planted model, the stitch's FLOP count against the products it performs, the parameter matching, and the
quick grid end to end (its verdict recomputed from its own records)."""
import json

import pytest
import torch

from tcfa.cli import ablate, ablate_report
from tcfa.pipeline.ablation import conditions_of, shifted_data
from tcfa import TCFA
from tcfa.shared_stitch import ScaledBasisStitch, SharedBasisStitch
from tcfa.stitch import GatedMultiStitch

D = torch.float64


@pytest.mark.parametrize("make", [
    lambda: SharedBasisStitch(7, 5, 3, 4, 2, top_k=2, temperature=0.5, dtype=D),
    lambda: ScaledBasisStitch(7, 5, 3, 4, top_k=1, temperature=2.0, dtype=torch.float32),
])
def test_save_load_round_trip_restores_the_module(tmp_path, make):
    torch.manual_seed(0)
    s = make()
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    path = tmp_path / "stitch.safetensors"
    s.save(str(path), method="cca", layers={"a": "blocks.1", "b": "layer2"})
    t = type(s).load(str(path))
    assert t.config() == s.config() and set(t.state_dict()) == set(s.state_dict())
    for name, value in s.state_dict().items():
        assert torch.equal(t.state_dict()[name], value), name
    x = torch.randn(9, 7, dtype=next(s.parameters()).dtype)
    assert torch.equal(t(x), s(x))
    other = ScaledBasisStitch if isinstance(s, SharedBasisStitch) else SharedBasisStitch
    with pytest.raises(ValueError, match=f"holds a '{type(s).__name__}' artifact, expected '{other.__name__}'"):
        other.load(str(path))


def test_shared_basis_forward_is_the_shared_map_plus_the_gated_corrections():
    torch.manual_seed(0)
    s = SharedBasisStitch(7, 5, 3, 4, 2, dtype=D)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    x = torch.randn(11, 7, dtype=D)
    r = s.residual
    g = torch.softmax(x @ r.gate_weight + r.gate_bias, 1)
    corr = sum(g[:, c:c + 1] * (r.mu_y[c] + (x - r.mu_x[c]) @ r.U[c] @ r.V[c]) for c in range(3))
    want = s.mu_y0 + (x - s.mu_x0) @ s.U0 @ s.V0 + corr
    torch.testing.assert_close(s(x), want, atol=1e-10, rtol=0)
    dx, dy, C, r0, rc = 7, 5, 3, 4, 2
    assert s.num_trainable() == r0 * (dx + dy) + dx + dy + C * (rc * (dx + dy) + dx + dy + dx + 1)


def test_shared_basis_fit_recovers_a_planted_shared_map_with_low_rank_corrections():
    gen = torch.Generator().manual_seed(1)
    dx, dy, C, n = 6, 5, 3, 600
    centres = torch.randn(C, dx, generator=gen, dtype=D) * 30  # far apart: the nearest-centroid gate is exact
    ids = torch.arange(n) % C
    x = centres[ids] + torch.randn(n, dx, generator=gen, dtype=D)
    M0 = torch.randn(dx, dy, generator=gen, dtype=D)
    deltas = [torch.randn(dx, 1, generator=gen, dtype=D) @ torch.randn(1, dy, generator=gen, dtype=D)
              for _ in range(C)]
    y = x @ M0 + torch.stack([x[i] @ deltas[int(c)] for i, c in enumerate(ids)])
    # the pooled fit is not M0 (the corrections bias it), so each condition's remainder is a full-rank affine
    # map: with full-rank corrections the stitch reproduces y exactly
    full = SharedBasisStitch.fit(x, y, ids, C, base_rank=min(dx, dy), cond_rank=min(dx, dy), base="ridge", reg=0.0,
                                 temperature=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(full(x), y, atol=1e-6, rtol=0)
    # a purely shared map leaves nothing to correct: rank-1 corrections are exact too
    shared = SharedBasisStitch.fit(x, x @ M0, ids, C, base_rank=min(dx, dy), cond_rank=1, base="ridge", reg=0.0,
                                   temperature=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), x @ M0, atol=1e-6, rtol=0)
        assert shared.residual.V.abs().max() * shared.residual.U.abs().max() < 1e-6


def test_rank_for_params_is_the_largest_unconditioned_rank_within_the_budget():
    for dx, dy, budget in ((64, 48, 6356), (48, 64, 22100), (96, 48, 900), (16, 16, 10**6)):
        r = ablate._rank_for_params(budget, dx, dy)
        assert r == min(dx, dy) or GatedMultiStitch(dx, dy, 1, r).num_trainable() <= budget < \
            GatedMultiStitch(dx, dy, 1, r + 1).num_trainable()


def test_conditions_and_shifted_data_name_their_arguments():
    y = torch.arange(20) % 10
    assert conditions_of("class", 5, y).ids.tolist() == (y % 5).tolist()
    assert conditions_of("none", 1, y).num == 1
    with pytest.raises(ValueError, match="confidence="):
        conditions_of("confidence", 2, y)
    with pytest.raises(ValueError, match="transformed data"):
        conditions_of("transform", 2, y)
    with pytest.raises(ValueError, match="conditions"):
        conditions_of("colour", 2, y)
    x = torch.rand(8, 3, 8, 8)
    moved, cond = shifted_data(x, "rotation", 3, seed=0)
    assert cond.num == 3 and moved.shape == x.shape
    assert torch.equal(moved[cond.ids == 0], x[cond.ids == 0])  # level 0: no rotation
    with pytest.raises(ValueError, match="data"):
        shifted_data(x, "blur", 2, seed=0)


def test_quick_grid_runs_end_to_end_and_its_tables_follow_from_its_records(tmp_path, monkeypatch):
    monkeypatch.setenv("TCFA_CACHE", str(tmp_path / "cache"))
    out = ablate.run(str(tmp_path / "out"), seeds=(0,), log=lambda *a: None, **ablate.QUICK)  # = tcfa ablate --quick
    doc = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 10_000
    assert doc["settings"]["quick"] and doc["machine"]["cpu"]
    axes = {r["axis"] for r in doc["records"]}
    assert axes == {"point", "method", "conditions", "tuning", "candidates", "baselines"}
    cells = [r for r in doc["records"] if "layer_a" in r]
    for r in cells:
        assert 0 <= r["accuracy"] <= 1 and r["stitch_flops"] > 0 and 0 <= r["gate_accuracy"] <= 1
        assert r["trainable_params"] > 0 and -1 <= r["rsa_after"] <= 1
    # Δθ: one GatedMultiStitch for B's ordinary positions and one for its CLS token, counted from the modules
    plain = next(r for r in cells if r["axis"] == "method" and r["method"] == "ridge" and r["k"] == 1)
    default = next(r for r in cells if r["axis"] == "method" and r["method"] == "ridge" and r["k"] == 10)
    for r, C in ((plain, 1), (default, 10)):
        assert r["trainable_params"] == 2 * GatedMultiStitch(r["dx"], r["dy"], C, min(16, r["dx"], r["dy"])).num_trainable()
    # the verdict is the best unconditioned and conditioned cells of the records, recomputed here
    for v in ablate_report.verdict(out):
        here = [r for r in ablate_report.cells(out) if r["pair"] == v["pair"] and r["tuning"] == v["tuning"]
                and r["data"] == "original"]
        best_u = max((r for r in here if r["conditions"] == "none"), key=lambda r: r["accuracy"])
        assert v["acc (Δθ)"].startswith(f"{best_u['accuracy']:.3f}")
    assert "full fine-tuning of B" in ablate_report.baselines_table(out)


@pytest.mark.parametrize("dx,dy", [(16, 48), (64, 48), (48, 64), (96, 96)])
def test_equal_ranks_stay_within_their_budgets_and_are_the_largest_that_do(dx, dy):
    r = ablate.equal_ranks(dx, dy)
    plain = GatedMultiStitch(dx, dy, 1, min(16, dx, dy)).num_trainable()
    count = {"class at plain": lambda k: GatedMultiStitch(dx, dy, 10, k).num_trainable(),
             "shared at plain": lambda k: SharedBasisStitch(dx, dy, 10, k, 1).num_trainable(),
             "scaled at plain": lambda k: ScaledBasisStitch(dx, dy, 10, k).num_trainable()}
    for name, n in count.items():
        if r[name]:
            assert n(r[name]) <= plain and (r[name] == min(dx, dy) or n(r[name] + 1) > plain)
    shared = SharedBasisStitch(dx, dy, 10, 16, ablate.COND_RANK).num_trainable()
    assert GatedMultiStitch(dx, dy, 1, r["plain at shared"]).num_trainable() <= shared


def test_scaled_basis_forward_is_one_basis_with_gated_singular_values():
    torch.manual_seed(2)
    s = ScaledBasisStitch(6, 4, 3, 2, dtype=D)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    x = torch.randn(9, 6, dtype=D)
    g = torch.softmax(x @ s.gate_weight + s.gate_bias, 1)
    want = torch.stack([s.mu_y + sum(g[i, c] * (x[i] - s.mu_x) @ s.U @ torch.diag(s.scales[c]) @ s.V
                                     for c in range(3)) for i in range(9)])
    torch.testing.assert_close(s(x), want, atol=1e-10, rtol=0)
    s.top_k = 1  # hard routing: exactly the best-gated condition's map
    best = g.argmax(1)
    want = torch.stack([s.mu_y + (x[i] - s.mu_x) @ s.U @ torch.diag(s.scales[best[i]]) @ s.V for i in range(9)])
    torch.testing.assert_close(s(x), want, atol=1e-10, rtol=0)
    dx, dy, C, r = 6, 4, 3, 2
    assert s.num_trainable() == r * (dx + dy) + dx + dy + C * r + C * (dx + 1)


def test_scaled_basis_fit_solves_each_conditions_scales_by_least_squares_on_the_pooled_basis():
    gen = torch.Generator().manual_seed(3)
    n, dx, dy, C, r = 300, 7, 5, 4, 3
    x = torch.randn(n, dx, generator=gen, dtype=D)
    y = x @ torch.randn(dx, dy, generator=gen, dtype=D) + 0.3 * torch.randn(n, dy, generator=gen, dtype=D)
    ids = torch.randint(0, C - 1, (n,), generator=gen)  # condition C - 1 has no rows
    s = ScaledBasisStitch.fit(x, y, ids, C, rank=r, base="ridge", reg=0.0)
    pooled = TCFA("ridge", rank=r, reg=0.0).fit(x, y)  # the basis is the unconditioned map of all rows
    torch.testing.assert_close((s.U @ s.V).detach(), (pooled.U[0] @ pooled.V[0]).detach(), atol=1e-10, rtol=0)
    for c in range(C - 1):  # reference: the vectorised regression of T_c on the r columns vec(z_k V_k)
        rows = ids == c
        z, t = (x[rows] - s.mu_x) @ s.U, y[rows] - s.mu_y
        design = torch.stack([(z[:, k:k + 1] * s.V[k]).reshape(-1) for k in range(r)], 1)
        want = torch.linalg.lstsq(design, t.reshape(-1, 1)).solution[:, 0]
        torch.testing.assert_close(s.scales[c].detach(), want, atol=1e-8, rtol=0)
    assert torch.equal(s.scales[C - 1].detach(), torch.ones(r, dtype=D))


def test_scaled_basis_of_one_exact_map_keeps_every_scale_at_one():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 6, generator=gen, dtype=D)
    M = torch.randn(6, 2, generator=gen, dtype=D) @ torch.randn(2, 5, generator=gen, dtype=D)
    y = x @ M + 1.5
    s = ScaledBasisStitch.fit(x, y, torch.arange(200) % 5, 5, rank=2, base="ridge", reg=0.0)
    torch.testing.assert_close(s.scales.detach(), torch.ones(5, 2, dtype=D), atol=1e-8, rtol=0)
    torch.testing.assert_close(s(x).detach(), y, atol=1e-8, rtol=0)


def test_readme_ablation_section_is_rendered_from_the_committed_run():
    with open(ablate_report.RESULT) as fh:
        out = json.load(fh)
    with open(ablate_report.README) as fh:
        text = fh.read()
    assert ablate_report.BEGIN in text and ablate_report.END in text, "README.md has no ablation section"
    inside = text.split(ablate_report.BEGIN, 1)[1].split(ablate_report.END, 1)[0]
    assert inside == "\n" + ablate_report.readme_section(out) + "\n", (
        "README.md's ablation section is stale: run `python -m tcfa.cli.ablate_report`")
    assert not out["settings"]["quick"] and len(out["settings"]["seeds"]) >= 3


@pytest.mark.parametrize("call,match", [
    (lambda x, y, i: ScaledBasisStitch.fit(x, y, i, 3, rank=0), "rank"),
    (lambda x, y, i: ScaledBasisStitch.fit(x, y[:5], i, 3, rank=2), "xa and xb"),
    (lambda x, y, i: ScaledBasisStitch.fit(x, y, i + 3, 3, rank=2), "ids"),
    (lambda x, y, i: ScaledBasisStitch.fit(x, y, i, 3, rank=2, base="pca"), "base"),
    (lambda x, y, i: ScaledBasisStitch.fit(x, y, i, 3, rank=2, top_k=4), "top_k"),
    (lambda x, y, i: SharedBasisStitch.fit(x, y, i, 3, base_rank=2, cond_rank=0), "cond_rank"),
    (lambda x, y, i: ScaledBasisStitch.fit(x, y, i, 3, rank=2)(torch.randn(2, 5, dtype=D)), "x must have shape"),
])
def test_shared_and_scaled_basis_name_their_bad_arguments(call, match):
    x, y = torch.randn(30, 6, dtype=D), torch.randn(30, 4, dtype=D)
    with pytest.raises(ValueError, match=match):
        call(x, y, torch.arange(30) % 3)
