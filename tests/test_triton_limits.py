"""What the Triton kernels must survive on a real GPU, checked under the interpreter and by reading them.

* rank and conditions of any size (they used to be cut at 128 and 1024 without a word);
* 64-bit addresses wherever a program id or a condition index is scaled by a width;
* CUDA's grid limits (axes 1 and 2 stop at 65,535 programs), one device per launch;
* scalars reach the kernels in the input's dtype; dy = 0 still writes the gates.
Precision under TF32 (emulated): tests/test_precision_policy.py.
"""
import pathlib
import re

import pytest
import torch

from test_stitch import ARGS, TOL, reference, sample_inputs

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "tcfa" / "kernels"
pytestmark = pytest.mark.interpreter


def planted(shape, dtype, seed=0):
    """sample_inputs whose best condition is the last one (so it sits in the last condition block),
    the second best the first, so a top-k that stops early or merges blocks wrongly is caught."""
    torch.manual_seed(seed)
    x, W, b, U, V, mu_x, mu_y = sample_inputs(dtype=dtype, shape=shape)
    W, b = 0.05 * W, b.clone()  # logits of spread ~0.2 around the planted margins
    top = b.max()
    b[-1], b[0] = top + 3.0, top + 1.5
    return x, W, b, U, V, mu_x, mu_y


def check_forward(args, top_k, dtype):
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    got = gated_stitch_forward(*args, top_k, 0.7)
    want = torch.ops.tcfa.gated_stitch(*args, top_k, 0.7)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(("out", "gates", "index", "z"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"{name} vs C++, top_k={top_k}")
    ref = reference(*(a.double() for a in args), top_k=top_k, temperature=0.7)
    torch.testing.assert_close(got[0].double(), ref, atol=atol, rtol=rtol, msg=f"out vs reference, top_k={top_k}")
    return got


# (N, dx, dy, C, r): rank past one chunk (129: the first value the old kernel cut; 300: several chunks),
# conditions past one block and past the old 1024 cap (1025, 5000). The interpreter walks conditions
# one by one (~10 ms each in the dense kernels), so the largest cases run in one dtype and fewer modes
# (C 5000: dense ~45 s, routed ~10 s here).
LARGE = [(9, 20, 7, 2, 129), (5, 12, 6, 3, 300), (6, 10, 5, 1025, 3), (3, 8, 4, 5000, 2)]
FORWARD = [(shape, dtype, modes) for shape in LARGE[:2] for dtype in (torch.float64, torch.float32)
           for modes in [(None, 1, 2)]] + [(LARGE[2], torch.float64, (None, 1, 2)),
                                           (LARGE[3], torch.float32, (None, 2))]


@pytest.mark.parametrize("shape, dtype, modes", FORWARD, ids=lambda v: f"C{v[3]}-R{v[4]}" if isinstance(v, tuple)
                         and len(v) == 5 else str(v))
def test_forward_any_rank_and_conditions(shape, dtype, modes):
    args = planted(shape, dtype)
    for top_k in modes:
        out, gates, index, _ = check_forward(args, top_k, dtype)
        if top_k is not None:
            assert (index[:, 0] == shape[3] - 1).all(), "the planted best condition (last block) was missed"


# dense backward also at C = 130 (three condition blocks of dlogit W_g^T, fast); at 1025 it takes ~50 s
BACKWARD = [(LARGE[0], None), (LARGE[0], 2), (LARGE[1], None), (LARGE[1], 2), ((7, 6, 5, 130, 3), None),
            (LARGE[2], None), (LARGE[2], 2)]


@pytest.mark.parametrize("shape, top_k", BACKWARD, ids=str)
def test_backward_any_rank_and_conditions(shape, top_k):
    from tcfa.kernels.gated_stitch_backward import gated_stitch_backward_forward

    dtype = torch.float64
    args = planted(shape, dtype, seed=1)
    _, gates, index, z = torch.ops.tcfa.gated_stitch(*args, top_k, 0.7)
    dout = torch.randn(shape[0], shape[2], dtype=dtype)
    got = gated_stitch_backward_forward(dout, *args, gates, index, z, top_k, 0.7)
    cpp = torch.ops.tcfa.gated_stitch_backward(dout, *args, gates, index, z, top_k, 0.7)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    want = torch.autograd.grad((reference(*ref_args, top_k=top_k, temperature=0.7) * dout).sum(), ref_args)
    atol, rtol = TOL[dtype]
    for name, a, b, w in zip(ARGS, got, cpp, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"d{name} vs C++")
        torch.testing.assert_close(a, w, atol=atol, rtol=rtol, msg=f"d{name} vs reference")


def test_topk_ties_across_condition_blocks():
    """Equal logits in different blocks (64 conditions each) go to the lower index, as in the C++ op."""
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    x, W, b, U, V, mu_x, mu_y = sample_inputs(shape=(4, 5, 3, 200, 2))
    b = torch.zeros(200, dtype=x.dtype)
    b[[7, 70, 150, 199]] = 3.0
    b[[64, 128]] = 2.0
    args = (x, torch.zeros_like(W), b, U, V, mu_x, mu_y)
    _, _, index, _ = gated_stitch_forward(*args, 6, 1.0)
    assert index.tolist() == [[7, 70, 150, 199, 64, 128]] * 4
    assert torch.equal(index, torch.ops.tcfa.gated_stitch(*args, 6, 1.0)[2])


@pytest.mark.parametrize("top_k", [None, 2])
def test_zero_output_width_still_writes_gates_and_z(top_k):
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    args = sample_inputs(shape=(7, 5, 0, 3, 2))
    got = gated_stitch_forward(*args, top_k, 1.0)
    want = torch.ops.tcfa.gated_stitch(*args, top_k, 1.0)
    for name, a, b in zip(("out", "gates", "index", "z"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_fp64_temperature_reaches_the_kernel_in_fp64():
    """1/temperature used to reach the kernel as a Python float, i.e. rounded to fp32 (7 digits)."""
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    args = sample_inputs(shape=(6, 5, 4, 3, 2))
    tau = 1.0 / 3.0 + 1e-9  # 1/tau is not an fp32 number
    got = gated_stitch_forward(*args, None, tau)[1]
    want = torch.softmax((args[0] @ args[1] + args[2]) / tau, dim=1)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-13)


# ------------------------------------------------------------------ launches
class Recorder:
    """Stands in for a @triton.jit kernel: records each launch's grid instead of running it.

    int64 outputs (the routed conditions) are zero-filled so the host code after a launch sees
    valid indices."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: [a.zero_() for a in args if isinstance(a, torch.Tensor)
                                        and a.dtype == torch.int64 and a.dim() == 2]


def test_grid_axes_within_cuda_limits(monkeypatch):
    """Conditions go on grid axis 0 (2^31 - 1 programs); axes 1 and 2 stay <= 65,535."""
    from tcfa.kernels import gated_stitch, gated_stitch_backward, segment_moments

    rec = Recorder()
    for module in (gated_stitch, gated_stitch_backward, segment_moments):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, rec)
    C = 70_000  # more than one axis-1 grid can hold
    x, y = torch.randn(2 * C, 3), torch.randn(2 * C, 2)
    segment_moments.segment_moments_forward(x, y, torch.arange(2 * C) % C, C)
    args = sample_inputs(dtype=torch.float32, shape=(40, 3, 2, C, 2))
    gates = torch.full((40, C), 1.0 / C)
    for top_k in (None, 2):
        index = torch.zeros(40, 2, dtype=torch.int64) if top_k else torch.empty(40, 0, dtype=torch.int64)
        z = torch.zeros(40, 2, 2) if top_k else torch.empty(40, 0, 2)
        gated_stitch.gated_stitch_forward(*args, top_k, 1.0)
        gated_stitch_backward.gated_stitch_backward_forward(torch.ones(40, 2), *args, gates[:, :2] if top_k else gates,
                                                            index, z, top_k, 1.0)
    assert len(rec.grids) > 5
    for grid in rec.grids:
        assert all(n <= 65_535 for n in grid[1:]), grid


def test_widths_past_the_grid_axis_limit_are_refused_by_name(monkeypatch):
    """Widths are tiled on grid axis 1 (64 or 128 per program): past 65,535 programs a launch would
    fail on the GPU, so the launchers refuse those widths, naming the argument."""
    from tcfa.kernels import _ragged, barycentric, segment_moments

    rec = Recorder()
    for module in (barycentric, segment_moments):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, rec)
    assert _ragged.width_tiles("w", 65_535 * 64, 64) == 65_535
    with pytest.raises(ValueError, match=r"w is 4194241 wide.*at most 4194240"):
        _ragged.width_tiles("w", 65_535 * 64 + 1, 64)
    wide = 65_535 * 64 + 1
    with pytest.raises(ValueError, match="x and y \\(each\\) is 4194241 wide"):
        segment_moments.segment_moments_forward(torch.zeros(1, wide), torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64), 1)
    x, off = torch.zeros(1, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="values is 8388481 wide"):
        barycentric.barycentric_forward(x, x, off, off, torch.zeros(1), torch.zeros(1), torch.zeros(1, 65_535 * 128 + 1), 1.0)
    assert not rec.grids  # refused before any launch


def test_triton_segment_moments_removes_the_rounding_residue_of_a_common_offset():
    """fp32 rows far from the origin: the fp64 means rounded to fp32 leave n delta delta^T in the
    co-moments unless it is removed (as the C++ kernel does); it was 1.7e-3 of them at offset 1e4."""
    from tcfa.kernels.segment_moments import segment_moments_forward

    gen = torch.Generator().manual_seed(0)
    for offset, spread in ((1e6, 1.0), (1e4, 1e-2), (1e2, 1e-4)):
        x = (offset + spread * torch.randn(90, 3, generator=gen, dtype=torch.float64)).float()
        labels = torch.arange(90) % 3
        got = segment_moments_forward(x, x[:, :2], labels, 3)
        for c in range(3):
            rows = x[labels == c].double()
            centred = rows - rows.mean(0)
            want = centred.T @ centred
            for block, ref in ((got[3][c], want), (got[5][c], want[:, :2])):
                assert float((block.double() - ref).abs().max()) <= 1e-5 * float(want.abs().max())


def test_mixed_devices_are_named():
    """Every launcher checks that its tensors share one device before it launches (meta stands in for cuda:1)."""
    from tcfa.kernels.gated_stitch import gated_stitch_forward
    from tcfa.kernels.segment_moments import segment_moments_forward
    from tcfa.kernels.softmin import cost_forward

    args = list(sample_inputs(shape=(4, 3, 2, 2, 1)))
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match="U is on meta but x is on cpu"):
        gated_stitch_forward(*args)
    with pytest.raises(ValueError, match="y is on meta"):
        segment_moments_forward(torch.randn(4, 2), torch.randn(4, 2, device="meta"), torch.zeros(4, dtype=torch.int64),
                                1)
    off = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="y is on meta"):
        cost_forward(torch.randn(4, 2), torch.randn(4, 2, device="meta"), off, off, "sqeuclidean")


# ------------------------------------------------------------------ reading the sources
def kernel_bodies():
    """(file, kernel name, body) of every @triton.jit function under tcfa/kernels."""
    for path in sorted(KERNELS.glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"@triton\.jit\ndef (\w+)\(.*?(?=\n@|\n(?:def|class) |\Z)", text, re.S):
            yield path.name, m.group(1), m.group(0)


def test_sources_use_int64_addresses():
    """A program id, or a loop index over conditions, scaled by a width must be int64 first.

    Rules (cheap, every kernel): every tl.program_id(...) is cast with .to(tl.int64) where it is
    read; a `for v in range(...)` variable that is multiplied in a pointer expression is cast
    likewise (`c = tl.cast(cj, tl.int64)`). Row indices built from these, or loaded from int64 tables
    (offsets, sort orders), are int64 by promotion.
    """
    bodies = list(kernel_bodies())
    assert len(bodies) >= 15
    problems = []
    for file, name, body in bodies:
        for m in re.finditer(r"tl\.program_id\(\d\)(?!\.to\(tl\.int64\))", body):
            problems.append(f"{file}:{name}: {m.group(0)} without .to(tl.int64)")
        for var in re.findall(r"for (\w+) in (?:tl\.)?range\(", body):
            scaled = re.search(rf"_ptr \+[^\n]*(\b{var}\s*\*|\*\s*{var}\b)", body)
            if scaled:
                problems.append(f"{file}:{name}: loop index {var!r} scaled in an address: {scaled.group(0)}")
    assert not problems, "\n".join(problems)
