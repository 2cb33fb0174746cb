"""RSA against scipy (pdist + spearmanr) and the stitch's FLOP formula against torch's own count of the same
math written with aten matmuls."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tcfa
from tcfa.similarity import rdm, rsa


@pytest.mark.parametrize("seed", [0, 1])
def test_rsa_is_the_spearman_correlation_of_correlation_distance_rdms(seed):
    spatial = pytest.importorskip("scipy.spatial.distance")
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(7, 5, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(40, 5, generator=gen,
                                                                                       dtype=torch.float64)
    torch.testing.assert_close(rdm(x), torch.from_numpy(spatial.pdist(x.numpy(), "correlation")), atol=1e-12, rtol=0)
    want = stats.spearmanr(spatial.pdist(x.numpy(), "correlation"), spatial.pdist(y.numpy(), "correlation"))[0]
    assert rsa(x, y) == pytest.approx(want, abs=1e-12)
    # ties (few distinct features give repeated distances) share their mean rank; two computations of
    # one distance may differ in the last bit, so scipy ranks its own distances snapped to 10 decimals
    xr, yr = x.sign()[:, :3], y.sign()[:, :3]
    assert rdm(xr).unique().numel() < 10
    assert rsa(xr, yr) == pytest.approx(_spearman_of_snapped_pdist(xr, yr), abs=1e-12)
    with pytest.raises(ValueError, match="same samples"):
        rsa(x, y[:-1])


def _spearman_of_snapped_pdist(x, y):
    spatial = pytest.importorskip("scipy.spatial.distance")
    stats = pytest.importorskip("scipy.stats")
    # scipy's NaN for a row without spread is tcfa's documented correlation 0: dissimilarity 1
    snap = lambda t: np.nan_to_num(spatial.pdist(t.numpy(), "correlation"), nan=1.0).round(10)  # noqa: E731
    return stats.spearmanr(snap(x), snap(y))[0]


def test_rsa_ties_identical_and_proportional_samples():
    # 7 pairs of these integer samples have dissimilarity 0 (identical or proportional centred rows), and
    # fp64 rounding left one of them at -2e-16, a rank of its own, which moved Spearman by 0.02
    x = torch.tensor([[0., 2, 0], [2, 2, 0], [0, 0, 2], [0, 1, 0], [2, 1, 0], [2, 2, 1], [2, 2, 1], [2, 2, 0]],
                     dtype=torch.float64)
    y = torch.tensor([[2., 1, 1, 1], [1, 0, 0, 2], [0, 0, 2, 0], [1, 2, 2, 2], [0, 0, 2, 2], [2, 2, 2, 1],
                      [2, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.float64)
    assert rsa(x, y) == pytest.approx(_spearman_of_snapped_pdist(x, y), abs=1e-12)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    x = torch.cat([base, base[:4], 3.0 * base[4:7] + 1.0])  # repeats and positive rescalings of samples
    y = x @ torch.randn(6, 4, generator=gen, dtype=torch.float64) + torch.randn(16, 4, generator=gen, dtype=torch.float64)
    assert (rdm(x).abs() < 1e-12).sum() == 7
    assert rsa(x, y) == pytest.approx(_spearman_of_snapped_pdist(x, y), abs=1e-12)


def _stitch_by_aten(x, s: tcfa.GatedMultiStitch):
    """The stitch's math with aten matmuls over the maps it evaluates (all C dense, the top_k routed)."""
    logits = x @ s.gate_weight + s.gate_bias
    K = s.num_conditions if s.top_k is None else s.top_k
    chosen = logits.topk(K, dim=1).indices
    out = 0
    for k in range(K):
        c = chosen[:, k]
        z = torch.bmm((x - s.mu_x[c]).unsqueeze(1), s.U[c]).squeeze(1)  # the counter sees (N, 1, dx) x (N, dx, r)
        out = out + torch.bmm(z.unsqueeze(1), s.V[c]).squeeze(1)
    return out


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_fused_stitch_flops_equal_torch_count_of_the_same_products(top_k):
    s = tcfa.GatedMultiStitch(12, 9, 4, 3, top_k=top_k)
    x = torch.randn(7, 12)
    with FlopCounterMode(display=False) as fused:
        s(x)
    with FlopCounterMode(display=False) as aten:
        _stitch_by_aten(x, s)
    assert fused.get_total_flops() == aten.get_total_flops() > 0
