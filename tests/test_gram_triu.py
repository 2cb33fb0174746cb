"""ops.gram_triu against an fp64 triu(X_c X_c^T) (the reference), at every compiled CPU level."""
import pytest
import torch

from tcfa import grams, ops
from tcfa.ops.registration import gram_triu_composite

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}  # relative to the largest |entry|


def reference(xs, centre):
    """The docstring's math in fp64, centring by the fp64 mean rounded to the input's dtype."""
    out = []
    for x in xs:
        shift = x.double().mean(0).to(x.dtype).double() if centre else 0.0
        c = x.double() - shift
        out.append(torch.triu(c @ c.T))
    return torch.stack(out)


def sample_inputs(dtype, seed=0):
    """Odd shapes: 1 row, prime sizes, rows not a multiple of the tile or the vector, zero width,
    widths that differ between layers, features far from the origin (where centring matters)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n in (1, 2, 3, 5, 17, 31, 33, 64, 97, 257):
        for widths in ([1], [7, 0, 13], [64, 129]):
            xs = [(torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 5).to(dtype) for d in widths]
            cases.append(xs)
    return cases


def check(got, xs, centre):
    want = reference(xs, centre)
    assert got.dtype == xs[0].dtype and got.shape == want.shape
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=TOL[xs[0].dtype] * scale, rtol=0)


@pytest.mark.usefixtures("cpu_level")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centre", [True, False])
def test_matches_reference(dtype, centre):
    for xs in sample_inputs(dtype):
        check(ops.gram_triu(xs, centre), xs, centre)


@pytest.mark.usefixtures("cpu_level")
def test_many_layers_and_a_non_contiguous_input():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, 3 + i, generator=g) for i in range(257)]
    xs[5] = torch.randn(9, 40, generator=g).T  # a transposed view: read through its strides
    check(ops.gram_triu(xs), xs, True)


def test_below_the_diagonal_is_exactly_zero_and_the_triangle_rebuilds_the_gram():
    x = torch.randn(70, 11, dtype=torch.float64)
    u = ops.gram_triu([x])[0]
    assert torch.equal(torch.tril(u, -1), torch.zeros_like(u))
    c = x - x.mean(0)
    torch.testing.assert_close(u + u.T - torch.diag(u.diagonal()), c @ c.T, atol=1e-12, rtol=0)


def test_composite_is_the_same_op():
    """The CUDA kernel and the autograd route of tcfa.similarity: the same math through matmul."""
    for xs in sample_inputs(torch.float64)[:12]:
        for centre in (True, False):
            check(gram_triu_composite(xs, centre), xs, centre)


def test_opcheck():
    xs = [torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.tcfa.gram_triu.default, (xs, True))


def test_registered_for_cuda_too():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tcfa::gram_triu", "CUDA")


@pytest.mark.parametrize("xs, err, match", [
    ([], ValueError, "xs must be a non-empty list"),
    ([torch.ones(3)], ValueError, r"xs\[0\] must be 2-D"),
    ([torch.ones(3, 2), torch.ones(4, 2)], ValueError, r"xs\[1\] must have xs\[0\]'s rows"),
    ([torch.ones(3, 2), torch.ones(3, 2, dtype=torch.float64)], ValueError, r"xs\[1\] must have xs\[0\]'s rows, dtype"),
    ([torch.ones(3, 2, dtype=torch.int64)], TypeError, r"xs\[0\] must have dtype"),
    ([torch.tensor([[1.0, float("nan")]])], ValueError, r"xs\[0\] must be finite"),
])
def test_bad_input_names_the_argument(xs, err, match):
    with pytest.raises(err, match=match):
        ops.gram_triu(xs)


def test_direct_op_calls_are_checked():
    with pytest.raises(ValueError, match="rows"):
        torch.ops.tcfa.gram_triu([torch.ones(3, 2), torch.ones(4, 2)], True)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=100, deadline=None, derandomize=True, print_blob=True)
@given(n=st.integers(1, 70), widths=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float64]), centre=st.booleans(),
       offset=st.sampled_from([0.0, 1.0, 100.0]), seed=st.integers(0, 2**16))
def test_property_matches_reference(n, widths, dtype, centre, offset, seed):
    """Any rows, widths (zero included) and offset from the origin (where centring matters)."""
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(n, d, generator=g, dtype=torch.float64) + offset).to(dtype) for d in widths]
    check(ops.gram_triu(xs, centre), xs, centre)


def test_composite_fills_one_buffer_without_grad_and_differentiates_with_it():
    xs = [torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 7, dtype=torch.float64)]
    check(gram_triu_composite(xs, True), xs, True)
    leaf = xs[0].clone().requires_grad_()
    out = gram_triu_composite([leaf, xs[1]], True)
    out.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_route_cost_counts_half_a_gram_only_where_the_triangle_kernel_runs():
    x = torch.randn(8, 3)
    assert grams._triangles_only([x])
    assert not grams._triangles_only([x.clone().requires_grad_()])
    assert not grams._triangles_only([torch.empty(8, 3, device="meta")])
    # n 2048, 8 + 8 layers of 256 / 512: the triangles are cheaper than the features, whole Grams are not
    wa, wb = [256] * 8, [512] * 8
    assert grams._gram_is_cheaper(2048, wa, wb, half=True)
    assert not grams._gram_is_cheaper(2048, wa, wb, half=False)
