"""ops.symmetric_top_eigh against torch.linalg.eigh in float64 (the reference)."""
import pytest
import torch

from tcfa import ops

# parity with the reference at every compiled CPU level (conftest.cpu_level)
pytestmark = pytest.mark.usefixtures("cpu_level")

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}  # relative to the largest |eigenvalue|


def random_symmetric(B, n, dtype, psd=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if psd:  # a Gram of wider rows, like CCA's M M^T
        a = torch.randn(B, n, n + 7, generator=g, dtype=torch.float64)
        return (a @ a.mT / (n + 7)).to(dtype)
    a = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    return (a + a.mT).to(dtype)


def with_spectrum(values, seed=0):
    """Q diag(values) Q^T for a random orthogonal Q (float64)."""
    n = values.shape[-1]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (Q * values) @ Q.T


def check_pairs(A, k, values, vectors, dtype):
    """Eigenvalues equal the reference's, Z is orthonormal and A Z = Z diag(values)."""
    A64, Z = A.double(), vectors.double()
    want = torch.linalg.eigvalsh(A64)[:, -k:].flip(-1)
    scale = want.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    tol = TOL[dtype] * scale
    assert values.dtype == vectors.dtype == dtype
    assert values.shape == (A.shape[0], k) and vectors.shape == (A.shape[0], A.shape[1], k)
    torch.testing.assert_close(values.double(), want, atol=tol, rtol=0)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    eye = torch.eye(k, dtype=torch.float64).expand(A.shape[0], k, k)
    torch.testing.assert_close(Z.mT @ Z, eye, atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(A64 @ Z, Z * values.double()[:, None, :], atol=tol * 10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 100])
@pytest.mark.parametrize("psd", [False, True])
def test_matches_eigh(dtype, n, psd):
    A = random_symmetric(3, n, dtype, psd=psd, seed=n)
    for k in sorted({1, max(1, n // 3), n}):
        values, vectors, ok = torch.ops.tcfa.symmetric_top_eigh(A, k)
        assert ok.all(), "the kernel's own check failed: the fast path was not what ran"
        check_pairs(A, k, values, vectors, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_eigenvalues_give_an_orthonormal_basis_of_the_eigenspace(dtype):
    spectrum = torch.tensor([5.0] * 4 + [3.0, 3.0, 3.0] + [2.0 - 1e-3 * i for i in range(8)] + [-1.0] * 5,
                            dtype=torch.float64)
    A = torch.stack([with_spectrum(spectrum, seed=s) for s in range(2)]).to(dtype)
    for k in (4, 7, 10):
        values, vectors, ok = torch.ops.tcfa.symmetric_top_eigh(A, k)
        assert ok.all()
        check_pairs(A, k, values, vectors, dtype)
    # the top-4 eigenspace itself: its projector equals the reference's
    _, V = torch.linalg.eigh(A.double())
    _, Z, _ = torch.ops.tcfa.symmetric_top_eigh(A, 4)
    P_ref = V[..., -4:] @ V[..., -4:].mT
    torch.testing.assert_close(Z.double() @ Z.double().mT, P_ref, atol=TOL[dtype] * 100, rtol=0)
    # the identity: one eigenvalue of multiplicity n
    values, vectors, ok = torch.ops.tcfa.symmetric_top_eigh(torch.eye(30, dtype=dtype)[None], 12)
    assert ok.all()
    check_pairs(torch.eye(30, dtype=dtype)[None], 12, values, vectors, dtype)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-30), (torch.float32, 1e30), (torch.float64, 1e-250),
                                          (torch.float64, 1e250)])
def test_any_scale(dtype, scale):
    A = random_symmetric(2, 40, torch.float64, psd=True, seed=3) * scale
    values, vectors, ok = torch.ops.tcfa.symmetric_top_eigh(A.to(dtype), 6)
    assert ok.all()
    check_pairs(A.to(dtype), 6, values, vectors, dtype)


def test_zero_matrix():
    values, vectors, ok = torch.ops.tcfa.symmetric_top_eigh(torch.zeros(2, 5, 5), 3)
    assert ok.all() and (values == 0).all()
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(3).expand(2, 3, 3))


def test_wrapper_recomputes_flagged_matrices_with_eigh(monkeypatch):
    A = random_symmetric(4, 20, torch.float64, seed=5)
    raw = torch.ops.tcfa.symmetric_top_eigh

    class Flagging:  # the op, with matrices 1 and 3 reported as failed and their outputs spoiled
        def __call__(self, A, k):
            values, vectors, ok = raw(A, k)
            ok = ok.clone()
            ok[[1, 3]] = False
            return values.index_fill(0, torch.tensor([1, 3]), float("nan")), vectors, ok

    monkeypatch.setattr(torch.ops.tcfa, "symmetric_top_eigh", Flagging())
    values, vectors = ops.symmetric_top_eigh(A, 5)
    check_pairs(A, 5, values, vectors, torch.float64)


def test_opcheck():
    A = random_symmetric(3, 9, torch.float64, seed=2)
    torch.library.opcheck(torch.ops.tcfa.symmetric_top_eigh.default, (A, 4))


def test_registered_for_cuda_too():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tcfa::symmetric_top_eigh", "CUDA")


@pytest.mark.parametrize("A, k, err, match", [
    (torch.zeros(2, 3, 4), 1, ValueError, "A must be a batch of square matrices"),
    (torch.zeros(3, 3), 1, ValueError, "A must be 3-D"),
    (torch.zeros(2, 3, 3), 4, ValueError, "k must be <= n = 3, got 4"),
    (torch.zeros(2, 3, 3), 0, ValueError, "k must be >= 1"),
    (torch.zeros(2, 3, 3, dtype=torch.int64), 1, TypeError, "A must have dtype"),
    (torch.full((1, 2, 2), float("nan")), 1, ValueError, "A must be finite, found nan"),
])
def test_bad_input_names_the_argument(A, k, err, match):
    with pytest.raises(err, match=match):
        ops.symmetric_top_eigh(A, k)
