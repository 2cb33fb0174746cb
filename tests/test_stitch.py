"""tcfa.ops.gated_stitch (C++ and Triton) and tcfa.GatedMultiStitch against a naive reference."""
import json
import struct

import pytest
import torch

import tcfa
from tcfa import ops
from tcfa.maps import LowRankMaps

# (dtype, atol, rtol). fp32: sums of dx*r + C*r products of O(1) terms, rounded
# in a different order than the fp64 reference.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5)}
# (N, dx, dy, C, r): odd and prime widths, one row, one condition.
SHAPES = [(37, 9, 7, 5, 3), (1, 5, 3, 4, 2), (23, 13, 11, 1, 4), (64, 16, 17, 6, 1)]
ARGS = ("x", "gate_weight", "gate_bias", "U", "V", "mu_x", "mu_y")


def sample_inputs(device="cpu", dtype=torch.float64, shape=SHAPES[0]):
    """The op's tensor arguments, scaled so every term and the output are O(1)."""
    N, dx, dy, C, r = shape
    f = {"device": device, "dtype": dtype}
    return (torch.randn(N, dx, **f), torch.randn(dx, C, **f), torch.randn(C, **f),
            torch.randn(C, dx, r, **f) / dx**0.5, torch.randn(C, r, dy, **f) / r**0.5,
            0.3 * torch.randn(C, dx, **f), torch.randn(C, dy, **f))


def reference(x, W, b, U, V, mu_x, mu_y, top_k=None, temperature=1.0):
    """The docstring's math with einsum: every condition's map on every row, then the gates."""
    logits = x @ W + b
    if top_k is None:
        gates = torch.softmax(logits / temperature, dim=1)
    else:  # top-k by a stable sort: equal logits keep the lower index first
        chosen = torch.sort(-logits, dim=1, stable=True).indices[:, :top_k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, chosen, True)
        gates = torch.softmax((logits / temperature).masked_fill(~keep, float("-inf")), dim=1)
    maps = mu_y + torch.einsum("ncd,cdr,cre->nce", x[:, None, :] - mu_x, U, V)
    return torch.einsum("nc,nce->ne", gates, maps)


def modes(C):
    return [None, *range(1, C + 1)]


# ------------------------------------------------------------------ forward
@pytest.mark.usefixtures("cpu_level")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, dtype):
    args = sample_inputs(dtype=dtype, shape=shape)
    atol, rtol = TOL[dtype]
    for k in modes(shape[3]):
        for tau in (1.0, 0.37):
            out = ops.gated_stitch(*args, top_k=k, temperature=tau)
            assert out.dtype == dtype and out.shape == (shape[0], shape[2])
            want = reference(*(a.double() for a in args), top_k=k, temperature=tau)
            torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol, msg=f"top_k={k} tau={tau}")


@pytest.mark.usefixtures("cpu_level")
def test_routing_outputs_and_ties():
    x, W, b, U, V, mu_x, mu_y = sample_inputs(shape=(11, 5, 4, 6, 2))
    W = torch.zeros_like(W)
    b = torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0, 2.0], dtype=b.dtype)  # three-way tie at the top
    out, gates, index, z = torch.ops.tcfa.gated_stitch(x, W, b, U, V, mu_x, mu_y, 4, 1.0)
    assert index.tolist() == [[1, 3, 5, 2]] * 11  # largest first, ties to the lower index
    e = torch.exp(torch.tensor([0.0, 0.0, 0.0, -1.0], dtype=x.dtype))
    torch.testing.assert_close(gates, (e / e.sum()).expand(11, 4), atol=1e-15, rtol=0)
    torch.testing.assert_close(z, torch.einsum("nkd,kdr->nkr", x[:, None] - mu_x[index[0]], U[index[0]]))
    torch.testing.assert_close(out, reference(x, W, b, U, V, mu_x, mu_y, 4), atol=1e-12, rtol=1e-12)


@pytest.mark.usefixtures("cpu_level")
def test_routed_with_all_conditions_equals_dense():
    args = sample_inputs()
    torch.testing.assert_close(ops.gated_stitch(*args, top_k=5), ops.gated_stitch(*args), atol=1e-13, rtol=1e-13)


@pytest.mark.usefixtures("cpu_level")
def test_top1_is_the_selected_map():
    x, W, b, U, V, mu_x, mu_y = args = sample_inputs()
    label = (x @ W + b).argmax(1)
    want = LowRankMaps(U, V, mu_x, mu_y).apply(x, label)
    torch.testing.assert_close(ops.gated_stitch(*args, top_k=1), want, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ backward
def assert_backward_matches_reference(args, loss, what, **kw):
    """Gradients of loss(op(args)) equal autograd through the einsum reference (fp64, 1e-12)."""
    a = [t.clone().requires_grad_() for t in args]
    b = [t.clone().requires_grad_() for t in args]
    got = torch.autograd.grad(loss(ops.gated_stitch(*a, **kw)), a)
    want = torch.autograd.grad(loss(reference(*b, **kw)), b)
    for name, g1, g2 in zip(ARGS, got, want):
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12, msg=f"d{name}, {what}")


@pytest.mark.usefixtures("cpu_level")
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_autograd_of_reference(shape):
    args = sample_inputs(shape=shape)
    for k in modes(shape[3]):
        w = torch.randn(shape[0], shape[2], dtype=torch.float64)
        assert_backward_matches_reference(args, lambda out: (out * w).sum(), f"top_k={k}", top_k=k, temperature=0.8)


@pytest.mark.usefixtures("cpu_level")
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_of_broadcast_gradient(shape):
    """out.sum() and out.mean() hand the backward a stride-0 gradient, which the routed kernel reads in place."""
    args = sample_inputs(shape=shape)
    for k in modes(shape[3]):
        for loss in (torch.sum, torch.mean):
            assert_backward_matches_reference(args, loss, f"top_k={k}, {loss.__name__}", top_k=k)


@pytest.mark.usefixtures("cpu_level")
def test_backward_fp32_matches_fp64():
    args = sample_inputs(dtype=torch.float32, shape=(64, 16, 17, 6, 3))
    for k in (None, 2):
        a = [t.clone().requires_grad_() for t in args]
        b = [t.double().requires_grad_() for t in args]
        got = torch.autograd.grad(ops.gated_stitch(*a, top_k=k).square().sum(), a)
        want = torch.autograd.grad(reference(*b, top_k=k).square().sum(), b)
        for name, g1, g2 in zip(ARGS, got, want):
            assert g1.dtype == torch.float32
            torch.testing.assert_close(g1.double(), g2, atol=1e-4, rtol=1e-4, msg=f"d{name}, top_k={k}")


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_gradcheck(top_k):
    args = [t.requires_grad_() for t in sample_inputs(shape=(7, 5, 3, 3, 2))]
    assert torch.autograd.gradcheck(lambda *a: ops.gated_stitch(*a, top_k=top_k, temperature=0.6), args)


@pytest.mark.parametrize("top_k", [None, 2])
def test_opcheck(top_k):
    args = sample_inputs(shape=(9, 5, 4, 3, 2))
    grad_args = [t.clone().requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.tcfa.gated_stitch.default, (*grad_args, top_k, 0.7))
    _, gates, index, z = torch.ops.tcfa.gated_stitch(*args, top_k, 0.7)
    dout = torch.randn(9, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.tcfa.gated_stitch_backward.default, (dout, *args, gates, index, z, top_k, 0.7))


@pytest.mark.usefixtures("cpu_level")
def test_half_precision_computes_in_fp32():
    args = sample_inputs(dtype=torch.float32, shape=(16, 8, 8, 4, 2))
    out = ops.gated_stitch(*(a.bfloat16() for a in args), top_k=2)
    assert out.dtype == torch.bfloat16
    want = reference(*(a.bfloat16().double() for a in args), top_k=2)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    args = sample_inputs()
    x, W, b, U, V, mu_x, mu_y = args

    def call(**changes):
        kw = dict(zip(ARGS, args), top_k=2, temperature=1.0)
        kw.update(changes)
        return ops.gated_stitch(**kw)

    with pytest.raises(ValueError, match="x must have width dx = 9"):
        call(x=x[:, :8])
    with pytest.raises(ValueError, match="V must have shape"):
        call(V=V[:, :2])
    with pytest.raises(ValueError, match="mu_y must have shape"):
        call(mu_y=mu_y[:, :3])
    with pytest.raises(ValueError, match="gate_weight must have shape"):
        call(gate_weight=W.t())
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 5\].*got 6"):
        call(top_k=6)
    with pytest.raises(ValueError, match="top_k"):
        call(top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        call(top_k=1.5)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="x must be finite, found nan"):
        call(x=x.clone().index_put_((torch.tensor(3), torch.tensor(2)), torch.tensor(float("nan"), dtype=x.dtype)))
    # x is checked through the gates: an entry meeting only zero gate weights still counts
    W0 = W.clone()
    W0[2] = 0
    for k in (None, 2):
        for bad in (float("nan"), float("inf"), -float("inf")):
            xb = x.clone()
            xb[3, 2] = bad
            with pytest.raises(ValueError, match=rf"x must be finite, found {bad} at index \(3, 2\)"):
                call(x=xb, gate_weight=W0, top_k=k)
    with pytest.raises(ValueError, match="U must be finite"):
        call(U=U.clone().fill_(float("inf")))
    with pytest.raises(TypeError, match="U has dtype torch.float32"):
        call(U=U.float())
    with pytest.raises(TypeError, match="mu_x must be a torch.Tensor"):
        call(mu_x=mu_x.tolist())


def test_raw_op_checks_bounds():
    args = sample_inputs()
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.tcfa.gated_stitch(*args, 9, 1.0)
    with pytest.raises(ValueError, match="mu_x must have shape"):
        torch.ops.tcfa.gated_stitch(*args[:5], args[5][:, :3], args[6], 2, 1.0)
    _, gates, index, z = torch.ops.tcfa.gated_stitch(*args, 2, 1.0)
    dout = torch.randn(37, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="index must lie in"):
        torch.ops.tcfa.gated_stitch_backward(dout, *args, gates, index + 5, z, 2, 1.0)


# ------------------------------------------------------------------ module
def random_maps(C=4, dx=6, dy=5, r=2, dtype=torch.float64):
    return LowRankMaps(torch.randn(C, dx, r, dtype=dtype), torch.randn(C, r, dy, dtype=dtype),
                       3 * torch.randn(C, dx, dtype=dtype), torch.randn(C, dy, dtype=dtype))


def test_module_parameters_and_count():
    s = tcfa.GatedMultiStitch(10, 7, num_conditions=4, rank=3, top_k=2)
    shapes = {n: tuple(p.shape) for n, p in s.named_parameters()}
    assert shapes == {"gate_weight": (10, 4), "gate_bias": (4,), "U": (4, 10, 3), "V": (4, 3, 7),
                      "mu_x": (4, 10), "mu_y": (4, 7)}
    assert s.num_trainable() == 40 + 4 + 120 + 84 + 40 + 28
    s.mu_x.requires_grad_(False)
    assert s.num_trainable() == 40 + 4 + 120 + 84 + 28
    with pytest.raises(ValueError, match="top_k"):
        tcfa.GatedMultiStitch(10, 7, 4, 3, top_k=5)


def test_module_forward_keeps_leading_dims():
    s = tcfa.GatedMultiStitch(6, 5, 3, 2, top_k=2, dtype=torch.float64)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    params = [getattr(s, n) for n in ARGS[1:]]
    want = reference(x.reshape(14, 6), *params, top_k=2).reshape(2, 7, 5)
    torch.testing.assert_close(s(x), want, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\)"):
        s(torch.randn(3, 5, dtype=torch.float64))


def test_from_maps_routes_to_nearest_centroid():
    maps = random_maps()
    s = tcfa.GatedMultiStitch.from_maps(maps, top_k=1)
    x = maps.mu_x.repeat_interleave(5, 0) + 0.5 * torch.randn(20, 6, dtype=torch.float64)
    nearest = torch.cdist(x, maps.mu_x).argmin(1)
    torch.testing.assert_close(s(x), maps.apply(x, nearest), atol=1e-12, rtol=1e-12)
    # Dense gates are softmax(-|x - m_c|^2 / tau).
    soft = tcfa.GatedMultiStitch.from_maps(maps, temperature=4.0)
    _, gates, _ = ops.gated_stitch(x, *(getattr(soft, n) for n in ARGS[1:]), temperature=4.0, return_routing=True)
    torch.testing.assert_close(gates, torch.softmax(-torch.cdist(x, maps.mu_x) ** 2 / 4.0, 1))
    explicit = tcfa.GatedMultiStitch.from_maps(maps, gate=torch.zeros(4, 6, dtype=torch.float64))
    assert torch.equal(explicit.gate_weight, torch.zeros(6, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate centroids must have shape"):
        tcfa.GatedMultiStitch.from_maps(maps, gate=torch.zeros(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="gate must be one of"):
        tcfa.GatedMultiStitch.from_maps(maps, gate="kmeans")


def test_save_load_roundtrip(tmp_path):
    s = tcfa.GatedMultiStitch.from_maps(random_maps(), top_k=2, temperature=0.5)
    path = str(tmp_path / "stitch.safetensors")
    s.save(path)
    with open(path, "rb") as fh:  # safetensors: u64 header length, then the JSON header
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    assert header["U"]["shape"] == [4, 6, 2] and header["V"]["shape"] == [4, 2, 5]
    assert json.loads(header["__metadata__"]["tcfa.GatedMultiStitch"])["top_k"] == 2
    t = tcfa.GatedMultiStitch.load(path)
    assert t.config() == s.config()
    for n in ARGS[1:]:
        assert torch.equal(getattr(t, n), getattr(s, n))


def test_load_balancing_loss():
    s = tcfa.GatedMultiStitch(6, 5, 4, 2, top_k=2, temperature=0.9, dtype=torch.float64)
    x = torch.randn(50, 6, dtype=torch.float64)
    out, aux = s(x, return_aux_loss=True)
    logits = x @ s.gate_weight + s.gate_bias
    chosen = torch.sort(-logits, dim=1, stable=True).indices[:, :2]
    frac = torch.stack([(chosen == c).sum() for c in range(4)]).double() / 100
    probs = torch.softmax(logits / 0.9, 1).mean(0)
    torch.testing.assert_close(aux, 4 * (frac * probs).sum())
    aux.backward()
    assert s.gate_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="routed"):
        tcfa.GatedMultiStitch(6, 5, 4, 2)(x.float(), return_aux_loss=True)


def test_torch_compile_module_runs():
    torch._dynamo.reset()
    s = tcfa.GatedMultiStitch(8, 6, 4, 2, top_k=2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), s, torch.nn.Tanh())
    x = torch.randn(16, 5)
    compiled = torch.compile(model)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert s.U.grad is not None and s.gate_weight.grad is not None


# ------------------------------------------------------------------ Triton (interpreter)
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(37, 9, 7, 5, 3), (1, 5, 3, 4, 2), (23, 13, 11, 1, 4), (70, 71, 150, 6, 17)])
def test_triton_matches_cpp(shape, dtype):
    """Several row blocks, column tiles and dx chunks in the last shape; exact dots in the interpreter."""
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    args = sample_inputs(dtype=dtype, shape=shape)
    atol, rtol = TOL[dtype]
    for k in sorted({None, 1, 2, shape[3]} - ({2} if shape[3] < 2 else set()), key=str):
        got = gated_stitch_forward(*args, k, 0.7)
        want = torch.ops.tcfa.gated_stitch(*args, k, 0.7)
        for name, a, b in zip(("out", "gates", "index", "z"), got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"{name}, top_k={k}")


@pytest.mark.interpreter
def test_triton_ties_go_to_lower_index():
    from tcfa.kernels.gated_stitch import gated_stitch_forward

    x, W, b, U, V, mu_x, mu_y = sample_inputs(shape=(11, 5, 4, 6, 2))
    b = torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0, 2.0], dtype=b.dtype)
    _, _, index, _ = gated_stitch_forward(x, torch.zeros_like(W), b, U, V, mu_x, mu_y, 4, 1.0)
    assert index.tolist() == [[1, 3, 5, 2]] * 11


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, top_k", [((37, 9, 7, 5, 3), None), ((37, 9, 7, 5, 3), 2), ((37, 9, 7, 5, 3), 5),
                                          ((23, 13, 11, 1, 4), None), ((23, 13, 11, 1, 4), 1),
                                          ((70, 71, 150, 6, 17), None), ((70, 71, 150, 6, 17), 2)])
def test_triton_backward_matches_cpp_and_reference(shape, top_k, dtype):
    """Odd widths, C = 1, and (last shape) several pair blocks, dx tiles and dy chunks; dense and top-k.

    Given the C++ forward's saved (gates, index, z), the Triton backward must equal the C++ backward
    and autograd through the einsum reference."""
    from tcfa.kernels.gated_stitch_backward import gated_stitch_backward_forward

    args = sample_inputs(dtype=dtype, shape=shape)
    _, gates, index, z = torch.ops.tcfa.gated_stitch(*args, top_k, 0.7)
    dout = torch.randn(shape[0], shape[2], dtype=dtype)
    got = gated_stitch_backward_forward(dout, *args, gates, index, z, top_k, 0.7)
    cpp = torch.ops.tcfa.gated_stitch_backward(dout, *args, gates, index, z, top_k, 0.7)
    ref_args = [a.double().requires_grad_() for a in args]
    want = torch.autograd.grad((reference(*ref_args, top_k=top_k, temperature=0.7) * dout.double()).sum(), ref_args)
    atol, rtol = TOL[dtype]
    ref_tol = TOL[dtype] if dtype == torch.float64 else (1e-4, 1e-4)  # test_backward_fp32_matches_fp64's
    for name, a, b, w in zip(ARGS, got, cpp, want):
        assert a.shape == b.shape and a.dtype == b.dtype == dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"d{name} vs C++")
        torch.testing.assert_close(a.double(), w, atol=ref_tol[0], rtol=ref_tol[1], msg=f"d{name} vs reference")
