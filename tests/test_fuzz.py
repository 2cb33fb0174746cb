"""Property tests (hypothesis) of the C++ ops over ragged shapes, offsets, weights, dtypes and eps.

Each property: the op equals a naive float64 reference written from its
docstring in tcfa/ops/__init__.py, or raises a ValueError/TypeError whose message names
the bad argument -- never a NaN the reference does not have, never a crash.
Hypothesis draws the shapes and the kind of damage; a seeded torch generator
draws the values (hypothesis shrinks the shapes, which is what matters here).
derandomize=True: the same examples on every run, so CI is deterministic.
"""
import math

import pytest
import torch

import tcfa

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference as ref  # noqa: E402  (tests/reference.py: naive loops over explicit cost matrices)

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, print_blob=True)
DTYPES = st.sampled_from([torch.float32, torch.float64])
# Damage done to an otherwise valid call, and the words the error must contain.
DAMAGE = {
    None: None,
    "eps": "eps",
    "offsets_decreasing": "non-decreasing",
    "offsets_end": "must end at",
    "offsets_dtype": "int64",
    "dtype_mismatch": "dtype",
    "width_mismatch": "width",
}


def close(got, want, dtype, scale):
    """(dtype, atol, rtol): fp64 to 1e-9; fp32 to 1e-4 of the problem's scale (the
    affine cost |x|^2 + |y|^2 - 2 x.y loses ~1e-7 * |x|^2 to cancellation, and
    dividing by eps amplifies it in the exponent)."""
    atol, rtol = (1e-9 * scale, 1e-9) if dtype == torch.float64 else (1e-4 * scale, 1e-4)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, equal_nan=False)


def ragged_sizes(draw, lo=0):
    B = draw(st.integers(1, 6))
    return [draw(st.integers(lo, 20)) for _ in range(B)]


def offsets_of(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


@st.composite
def ot_case(draw):
    """A ragged batch for softmin/barycentric: empty problems (0 x rows or 0 y rows) included."""
    nx, ny = ragged_sizes(draw), ragged_sizes(draw)
    ny = ny[: len(nx)] + [draw(st.integers(0, 20)) for _ in range(len(nx) - len(ny))]
    return dict(nx=nx, ny=ny, d=draw(st.integers(1, 8)), dv=draw(st.integers(1, 5)), dtype=draw(DTYPES),
                eps=draw(st.sampled_from([0.05, 0.3, 1.0, 7.0])), cost=draw(st.sampled_from(["sqeuclidean", "cosine"])),
                zeros=draw(st.sampled_from([0.0, 0.4, 1.0])), seed=draw(st.integers(0, 2**31 - 1)),
                damage=draw(st.sampled_from(list(DAMAGE))))


def ot_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    x = torch.randn(sum(c["nx"]), c["d"], generator=g, dtype=torch.float64)
    y = torch.randn(sum(c["ny"]), c["d"], generator=g, dtype=torch.float64)
    h = 2 * torch.randn(y.shape[0], generator=g, dtype=torch.float64)
    w = torch.rand(y.shape[0], generator=g, dtype=torch.float64) + 0.1
    w[torch.rand(y.shape[0], generator=g) < c["zeros"]] = 0.0  # zero weights: log b = -inf
    v = torch.randn(y.shape[0], c["dv"], generator=g, dtype=torch.float64)
    args = dict(x=x.to(dt), y=y.to(dt), xo=offsets_of(c["nx"]), yo=offsets_of(c["ny"]), h=h.to(dt),
                log_b=w.log().to(dt), v=v.to(dt), eps=c["eps"])
    return damage(args, c["damage"])


def damage(a, kind):
    a = dict(a)
    if kind == "eps":
        a["eps"] = [0.0, -1.0][a["x"].shape[0] % 2]
    elif kind == "offsets_decreasing" and a["xo"].numel() > 2:
        a["xo"] = a["xo"].clone()
        a["xo"][1] = a["xo"][-1] + 1  # above the next entry, so the sequence steps down
    elif kind == "offsets_end":
        a["xo"] = a["xo"].clone()
        a["xo"][-1] += 1
    elif kind == "offsets_dtype":
        a["xo"] = a["xo"].to(torch.int32)
    elif kind == "dtype_mismatch":
        a["y"] = a["y"].to(torch.float64 if a["y"].dtype == torch.float32 else torch.float32)
    elif kind == "width_mismatch":
        a["y"] = torch.cat([a["y"], a["y"][:, :1]], 1)
    else:
        return a, None
    return a, kind


def expect_named_error(kind, call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert DAMAGE[kind] in str(info.value), f"{kind}: {info.value}"


def no_mass(a):
    """(Nx,) True where x row i's problem has no y row of positive weight."""
    out = torch.zeros(a["x"].shape[0], dtype=torch.bool)
    for _, sx, sy in ref.problems(a["xo"], a["yo"]):
        out[sx] = not bool(torch.isfinite(a["log_b"][sy]).any())
    return out


@FUZZ
@given(ot_case())
def test_softmin_matches_reference(c):
    a, hurt = ot_inputs(c)
    call = lambda: torch.ops.tcfa.softmin(a["x"], a["y"], a["xo"], a["yo"], a["h"], a["log_b"],  # noqa: E731
                                          a["eps"], c["cost"], None)
    if hurt:
        return expect_named_error(hurt, call)
    out = call()
    assert out.dtype == a["x"].dtype and out.shape == (a["x"].shape[0],)
    assert not out.isnan().any()
    d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in a.items()}
    want = ref.softmin(d["x"], d["y"], d["xo"], d["yo"], d["h"], d["log_b"], d["eps"], c["cost"])
    # A problem without y mass has softmin +inf (log of an empty sum); the op must say so, not NaN.
    empty = no_mass(a)
    assert torch.equal(out[empty], want[empty].to(out.dtype)) and bool((want[empty] == math.inf).all())
    scale = 1.0 + float(want[~empty].abs().max()) if (~empty).any() else 1.0
    close(out[~empty], want[~empty], a["x"].dtype, scale)


@FUZZ
@given(ot_case())
def test_barycentric_matches_reference(c):
    a, hurt = ot_inputs(c)
    call = lambda: torch.ops.tcfa.barycentric(a["x"], a["y"], a["xo"], a["yo"], a["h"], a["log_b"],  # noqa: E731
                                              a["v"], a["eps"], c["cost"])
    if hurt:
        return expect_named_error(hurt, call)
    if bool(no_mass(a).any()):  # x rows without y mass: the docstring's 0/0 is refused by name
        with pytest.raises(ValueError, match="no y row of positive weight"):
            call()
        return
    out = call()
    assert out.dtype == a["v"].dtype and out.shape == (a["x"].shape[0], c["dv"])
    d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in a.items()}
    want = ref.barycentric(d["x"], d["y"], d["xo"], d["yo"], d["h"], d["log_b"], d["v"], d["eps"], c["cost"])
    assert not out.isnan().any()
    # fp32: the scores x.y/eps carry ~1e-7 |C|/eps relative error into the weights.
    scale = 1.0 + (0 if a["x"].dtype == torch.float64 else 50.0 / c["eps"])
    close(out, want, a["x"].dtype, scale)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(ot_case())
def test_barycentric_without_y_mass_is_a_named_error(c):
    c = {**c, "damage": None, "zeros": 1.0}  # every y weight zero: no problem has mass
    a, _ = ot_inputs(c)
    if a["x"].shape[0] == 0:
        return  # no x row, nothing to map: nothing is undefined
    with pytest.raises(ValueError, match="log_b: problem .* no y row of positive weight"):
        torch.ops.tcfa.barycentric(a["x"], a["y"], a["xo"], a["yo"], a["h"], a["log_b"], a["v"], a["eps"], c["cost"])


@st.composite
def moments_case(draw):
    return dict(N=draw(st.integers(0, 40)), dx=draw(st.integers(1, 8)), dy=draw(st.integers(1, 8)),
                C=draw(st.integers(1, 6)), dtype=draw(DTYPES), flags=draw(st.tuples(*[st.booleans()] * 3)),
                offset=draw(st.sampled_from([0.0, 1e3])), seed=draw(st.integers(0, 2**31 - 1)),
                damage=draw(st.sampled_from([None, None, "label_high", "label_low", "labels_dtype", "rows"])))


def moments_reference(x, y, labels, C):
    """The docstring, one segment at a time, in float64."""
    x, y = x.double(), y.double()
    out = {k: [] for k in ("count", "mean_x", "mean_y", "sxx", "syy", "sxy")}
    for c in range(C):
        xs, ys = x[labels == c], y[labels == c]
        n = xs.shape[0]
        mx = xs.mean(0) if n else torch.zeros(x.shape[1], dtype=torch.float64)
        my = ys.mean(0) if n else torch.zeros(y.shape[1], dtype=torch.float64)
        out["count"].append(torch.tensor(n))
        out["mean_x"].append(mx)
        out["mean_y"].append(my)
        out["sxx"].append((xs - mx).T @ (xs - mx))
        out["syy"].append((ys - my).T @ (ys - my))
        out["sxy"].append((xs - mx).T @ (ys - my))
    return {k: torch.stack(v) for k, v in out.items()}


@FUZZ
@given(moments_case())
def test_segment_moments_matches_reference(c):
    g = torch.Generator().manual_seed(c["seed"])
    x = (torch.randn(c["N"], c["dx"], generator=g, dtype=torch.float64) + c["offset"]).to(c["dtype"])
    y = torch.randn(c["N"], c["dy"], generator=g, dtype=torch.float64).to(c["dtype"])
    labels = torch.randint(0, c["C"], (c["N"],), generator=g)
    kind, words = c["damage"], None
    if kind in ("label_high", "label_low") and c["N"]:
        labels[c["N"] // 2] = c["C"] if kind == "label_high" else -1
        words = "labels must lie in"
    elif kind == "labels_dtype":
        labels, words = labels.to(torch.int32), "labels must be int64"
    elif kind == "rows":
        y, words = torch.cat([y, y[:1] if c["N"] else torch.zeros(1, c["dy"], dtype=y.dtype)]), "same number of rows"
    xx, yy, xy = c["flags"]
    call = lambda: tcfa.ops.segment_moments(x, y, labels, c["C"], xx, yy, xy)  # noqa: E731
    if words:
        with pytest.raises((ValueError, TypeError), match=words):
            call()
        return
    got = dict(zip(("count", "mean_x", "mean_y", "sxx", "syy", "sxy"), call()))
    want = moments_reference(x, y, labels, c["C"])
    assert torch.equal(got["count"], want["count"])
    # fp32 co-moments: rows shifted by fp64 means, so the error scales with the spread, not the offset.
    scale = 1.0 + c["N"] * (1.0 if c["dtype"] == torch.float64 else 10.0)
    for name, on in (("mean_x", True), ("mean_y", True), ("sxx", xx), ("syy", yy), ("sxy", xy)):
        assert not got[name].isnan().any(), name
        if not on:
            assert got[name].shape == (c["C"], 0, 0), name
            continue
        s = (1.0 + c["offset"]) if name == "mean_x" else scale
        close(got[name], want[name], c["dtype"], s)


@st.composite
def stitch_case(draw):
    C = draw(st.integers(1, 6))
    top_k = draw(st.one_of(st.none(), st.integers(1, C), st.sampled_from([0, C + 1])))
    return dict(N=draw(st.integers(0, 20)), dx=draw(st.integers(1, 8)), dy=draw(st.integers(1, 8)), C=C,
                r=draw(st.integers(1, 4)), top_k=top_k, tau=draw(st.sampled_from([0.1, 1.0, 5.0, 0.0, -1.0])),
                dtype=draw(DTYPES), seed=draw(st.integers(0, 2**31 - 1)),
                damage=draw(st.sampled_from([None, None, None, "V", "mu_y", "dtype"])))


def stitch_reference(x, W, b, U, V, mu_x, mu_y, top_k, tau):
    """The docstring of tcfa.ops.gated_stitch, one row and one condition at a time, in float64."""
    x, W, b, U, V, mu_x, mu_y = (t.double() for t in (x, W, b, U, V, mu_x, mu_y))
    out = torch.zeros(x.shape[0], V.shape[2], dtype=torch.float64)
    for i in range(x.shape[0]):
        logits = (x[i] @ W + b) / tau
        keep = range(len(logits)) if top_k is None else sorted(range(len(logits)), key=lambda c: (-logits[c], c))[:top_k]
        z = torch.stack([logits[c] for c in keep])
        gates = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        for gc, c in zip(gates, keep):
            out[i] += gc * (mu_y[c] + (x[i] - mu_x[c]) @ U[c] @ V[c])
    return out


@FUZZ
@given(stitch_case())
def test_gated_stitch_matches_reference(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, dx, dy, C, r = c["N"], c["dx"], c["dy"], c["C"], c["r"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(c["dtype"])

    args = [rnd(N, dx), rnd(dx, C), rnd(C), rnd(C, dx, r), rnd(C, r, dy), rnd(C, dx), rnd(C, dy)]
    words = None
    if c["damage"] == "V":
        args[4], words = rnd(C, r + 1, dy), "V must have shape"
    elif c["damage"] == "mu_y":
        args[6], words = rnd(C, dy + 1), "mu_y must have shape"
    elif c["damage"] == "dtype":
        args[3] = args[3].to(torch.float64 if c["dtype"] == torch.float32 else torch.float32)
        words = "dtype"
    elif c["top_k"] is not None and not 1 <= c["top_k"] <= C:
        words = "top_k"
    elif c["tau"] <= 0:
        words = "temperature"
    call = lambda: tcfa.ops.gated_stitch(*args, c["top_k"], c["tau"])  # noqa: E731
    if words:
        with pytest.raises((ValueError, TypeError), match=words):
            call()
        return
    out = call()
    assert out.dtype == c["dtype"] and out.shape == (N, dy) and not out.isnan().any()
    want = stitch_reference(*args, c["top_k"], c["tau"])
    scale = 1.0 + (float(want.abs().max()) if N else 0.0)
    close(out, want, c["dtype"], scale)


# ------------------------------------------------------------------ bad input table, benchmark tooling
# Not fuzzing proper, but the same question -- what does bad input get? -- and the README tables
# that report it, so they live here: the README must say what the code does now.
# Bad calls that do not (yet) get a named ValueError/TypeError; the README shows what they get.
KNOWN_GAPS: dict = {}  # bad calls that do not yet raise a named error (none left)


def test_bad_inputs_raise_named_errors_and_readme_is_current():
    from tcfa.cli import bad_inputs as bad

    rows = bad.run()
    assert len(rows) == len(bad.CASES) >= 40
    for call, kind, msg in rows:
        if call in KNOWN_GAPS:  # still a gap? then the README keeps showing it; fixed? move it out of here
            assert kind == KNOWN_GAPS[call], f"{call} now raises {kind}: remove it from KNOWN_GAPS"
            continue
        assert kind in ("ValueError", "TypeError"), f"{call} -> {kind}: {msg}"
        assert msg, call
    with open(bad.README) as fh:
        text = fh.read()
    assert bad.splice(text, bad.table(rows)) == text, "README.md's Bad input table is stale: run benchmarks/bad_inputs.py"


def fake_results(tmp_path, roofs=True):
    import json

    doc = {"benchmark": "stitch", "machine": {"time": "t", "cores": 2, "torch_threads": 2, "torch": "x"},
           "shape": {"N": 10, "dx": 2, "dy": 3, "C": 4, "r": 1},
           "rows": [{"impl": "torch top-2 loop", "forward ms": 4.0, "fwd speedup vs torch": 1.0},
                    {"impl": "tcfa top-2", "forward ms": 1.0, "fwd speedup vs torch": 4.0}],
           "sweep": [{"impl": "tcfa top-2", "N": n, "seconds": n * 1e-4, "peak_mib": n / 10} for n in (10, 100, 1000)]}
    if roofs:
        doc["roofs"] = {"gemm_flops": 360e3, "bandwidth": 816e3}
    (tmp_path / "stitch.json").write_text(json.dumps(doc))
    return doc


def test_roofline_of_a_fake_result(tmp_path):
    from tcfa.bench import common

    from tcfa.cli import bench_report as report

    doc = fake_results(tmp_path)
    # By hand: gate 2*N*dx*C = 160 FLOP, two maps 2*N*2*r*(dx+dy) = 200; bytes: rows 4*N*(dx+dy) = 200
    # plus weights 4*(dx*C + C + C*r*(dx+dy) + C*(dx+dy)) = 4*52 = 208.
    (line,) = common.roofline_lines(doc)
    assert (line["flops"], line["bytes"], line["seconds"]) == (360, 408, 1e-3)
    assert line["frac_gemm"] == pytest.approx(1.0) and line["frac_bandwidth"] == pytest.approx(0.5)
    assert line["bound"] == "compute"
    md = report.section(str(tmp_path))
    assert "| impl | forward ms | fwd speedup vs torch |" in md
    assert "roofline tcfa top-2 forward: 3.6e-07 GFLOP, 0.000408 MB in 1 ms" in md
    assert "100% of measured GEMM, 50% of measured bandwidth (compute-bound)" in md
    fake_results(tmp_path, roofs=False)
    assert "(roofs not measured in this run)" in report.section(str(tmp_path))


def test_plots_of_a_fake_result(tmp_path):
    import struct
    import zlib

    from tcfa.bench import plots
    fake_results(tmp_path)
    assert plots.main(str(tmp_path)) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["stitch_memory_vs_N.png", "stitch_ratio_fwd_speedup_vs_torch.png", "stitch_time_vs_N.png"]
    data = (tmp_path / "plots" / "stitch_time_vs_N.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    n = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + n])
    assert len(raw) == h * (1 + 3 * w)
    # The first series' colour is on the canvas: the line was drawn, not just the frame.
    assert bytes(plots.PALETTE[0]) in raw


def test_report_of_a_fake_result_shows_sweep_and_plots(tmp_path):
    from tcfa.bench import plots

    from tcfa.cli import bench_report as report

    fake_results(tmp_path)
    assert plots.main(str(tmp_path)) == 0
    md = report.section(str(tmp_path))
    assert "| N | tcfa top-2 ms | tcfa top-2 MiB |" in md
    assert "| 100 | 10 | 10 |" in md
    for stem in ("stitch_time_vs_N", "stitch_memory_vs_N", "stitch_ratio_fwd_speedup_vs_torch"):
        assert f"![{stem}](" in md


def test_sweep_point_counts_only_the_works_memory():
    """Memory the inputs' construction touched and freed must not hide the work's smaller peak."""
    from tcfa.bench import common

    def make(mib):
        scratch = torch.ones(2 * mib * 2**18)  # twice the work's peak, then freed
        del scratch
        return lambda: torch.ones(mib * 2**18).sum()

    _, peak = common.measure_point(make, 64, 1, timer=lambda work: common.timeit(work, repeat=1))
    assert 60 <= peak < 100
