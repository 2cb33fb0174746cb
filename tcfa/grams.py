"""The n x n Gram matrices behind linear CKA: every <K_l, K_m> of a list of layers and the Grams'
diagonals (tcfa.similarity's Gram route), and the cost model that chooses that route.

K_l = X_l,c X_l,c^T, X_c the column-centred features. On the CPU without gradients the upper
triangles come from ops.gram_triu; past TRIANGLE_ENTRIES, off the CPU and with autograd, from row
blocks of panels through matmul.
"""
from __future__ import annotations

import torch

from .ops import _validate


def _centred(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Columns minus their mean, in the compute dtype. torch's reductions sum pairwise, so an fp32 mean
    of features far from the origin (a few channels 100x the rest, offset 50, as in transformer
    activations) is off by ~1e-6 of the offset: well below the spread. (An fp64 mean cost 6x the fp32
    one, 15 ms of the layer_map benchmark's 16 batches, and changed no entry beyond 1e-7.)"""
    ct = _validate.compute_dtype(feats[0].dtype)
    return [f.to(ct) - f.to(ct).mean(0) for f in feats]


def _gram_is_cheaper(n: int, wa: list[int], wb: list[int], half: bool) -> bool:
    """Multiply-adds of the two routes to every <K_c, L_c>: features, X_A^T X_B over the concatenated
    layers plus each X_l^T X_l; Grams, the upper triangle of each X_l X_l^T (ops.gram_triu) plus one
    (L_A, n^2) x (n^2, L_B) product. The count picks the faster route in each case measured (AMD EPYC,
    2 threads, debiased, 8 + 8 layers of widths 256 / 512 unless said): n 4096: features 576 ms,
    Grams 1037; n 2048: 291 against 223; n 1024: 141 against 42; n 512, 4 + 4 layers of 1024 / 2048:
    321 against 25.
    ``half``: the Grams are triangles (the CPU kernel); off it, matmul panels, counted whole (row
    blocks do about half once there are several, _blocked_gram_products)."""
    features = n * (sum(wa) * sum(wb) + sum(d * d for d in wa + wb))
    grams = n * n * (sum(wa + wb) / (2 if half else 1) + len(wa) * len(wb))
    return grams < features


def _wants_grad(feats) -> bool:
    return torch.is_grad_enabled() and any(f.requires_grad for f in feats)


def _triangles_only(feats) -> bool:
    """Whether _gram_products may run the CPU triangle kernel (half a Gram's work, no autograd) rather
    than matmul."""
    return feats[0].device.type == "cpu" and not _wants_grad(feats)


def _use_gram(route: str, n: int, wa: list[int], wb: list[int], half: bool) -> bool:
    return route == "gram" or (route == "auto" and _gram_is_cheaper(n, wa, wb, half))


# Entries of all layers' Gram triangles the triangle kernel may return at once (128 MiB in fp32); beyond
# it the Grams go in row blocks. Measured (AMD EPYC, widths 256 / 512, debiased pairwise_cka, first /
# later calls in one process): n 4096, 12 + 12 layers, whole triangles 3456 / 1202 ms and 1639 MiB,
# blocks 1374 / 1251 ms and 73 MiB (the triangles' first call is mostly page faults); n 2048, 8 + 8:
# 337 / 189-226 ms, 306 MiB against 265 / 222-226, 73 MiB; n 1024, 4 + 4: 27-32 against 46-48 ms.
TRIANGLE_ENTRIES = 1 << 25
# Entries of one row block's panels, all layers (64 MiB in fp32): small enough to stay resident
# between blocks, large enough for MKL's GEMM rate (blocks of >= 64 rows)
PANEL_ENTRIES = 1 << 24


def _gram_products(feats: list[torch.Tensor], centre: bool):
    """(<K_l, K_m> of every pair of layers (L, L) fp64, the Grams' diagonals (n, L) fp64), K_l the
    (centred when ``centre``) Gram X_l X_l^T. On the CPU without gradients, from the triangles of
    ops.gram_triu (half the multiply-adds of X X^T) while they fit TRIANGLE_ENTRIES:
    <K, L> = 2 <triu K, triu L> - sum_i K_ii L_ii. Otherwise in row blocks (_blocked_gram_products).
    The op is called directly: the features were validated by the callers, and the wrapper's
    finiteness pass over every layer would cost as much as centring them."""
    n, count = feats[0].shape[0], len(feats)
    if _triangles_only(feats) and count * n * n <= TRIANGLE_ENTRIES:
        upper = torch.ops.tcfa.gram_triu(feats, centre)
        diag = upper.diagonal(dim1=1, dim2=2).double().mT
        return 2.0 * _flat_products(upper.view(count, n * n)) - diag.mT @ diag, diag
    return _blocked_gram_products(_centred(feats) if centre else feats)


def _blocked_gram_products(feats: list[torch.Tensor]):
    """_gram_products by row blocks R = [s, e) of every Gram at once: the panels K_l[R, s:] = X_l[R] X_l[s:]^T
    (through matmul: any device, autograd) hold R's square block and every block right of it, whose
    mirror images below the diagonal are never formed, so <K, L> sums 2 <panels> - <square blocks>
    over the blocks: about half of X X^T's multiply-adds, and memory for one block's panels
    (PANEL_ENTRIES) instead of L n^2."""
    n, count = feats[0].shape[0], len(feats)
    rows = min(n, max(64, PANEL_ENTRIES // max(1, count * n)))
    grad = _wants_grad(feats)
    # one buffer for every block's panels (each block views a prefix): no allocation per block
    buffer = None if grad else feats[0].new_empty(count * rows * n)
    prod = torch.zeros(count, count, dtype=torch.float64, device=feats[0].device)
    diags = []
    for s in range(0, n, rows):
        e = min(n, s + rows)
        if grad:
            panels = torch.stack([f[s:e] @ f[s:].mT for f in feats])
        else:
            panels = buffer[:count * (e - s) * (n - s)].view(count, e - s, n - s)
            for f, out in zip(feats, panels):
                torch.matmul(f[s:e], f[s:].mT, out=out)
        square = panels[:, :, : e - s]
        if e - s == n:  # one block: the whole Grams
            prod = _flat_products(panels.reshape(count, -1))
        else:
            prod = prod + 2.0 * _flat_products(panels.reshape(count, -1)) - _flat_products(square.reshape(count, -1))
        diags.append(square.diagonal(dim1=1, dim2=2).to(torch.float64, copy=True).mT)  # the buffer is reused
    return prod, torch.cat(diags)


def _flat_products(flat: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """flat @ flat^T in fp64, from fp32 (or fp64) products of column slices of ``chunk``.

    One fp32 product of flattened Grams sums n^2 terms and lost 2e-4 of CKA at n 2048 on heavy-tailed
    features (AMD EPYC; tests/test_similarity.py); summing the slices' products in fp64 keeps it at
    5e-7 for the same GEMM flops. A batch of up to 256 rows is one slice."""
    out = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start:start + chunk]
        out += (part @ part.mT).double()
    return out
