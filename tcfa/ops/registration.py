"""What torch needs beside the C++ schemas and CPU kernels: fake (meta) kernels for
torch.compile, autograd of the differentiable ops, and the CUDA kernels (Triton, and
cuSOLVER's eigh for symmetric_top_eigh). Imported once by tcfa.ops; it registers at import."""
from __future__ import annotations

import torch

from ._validate import compute_dtype
from . import cpu_levels  # noqa: F401  (loads tcfa._C, which declares the schemas registered here)

# ------------------------------------------------------------------ fake kernels
# Shapes only, for torch.compile / meta tensors; dtype follows the inputs.


@torch.library.register_fake("tcfa::softmin")
def _softmin_fake(x, y, x_offsets, y_offsets, h, log_b, eps, cost, active=None):
    return x.new_empty(x.shape[0])


@torch.library.register_fake("tcfa::softmin_dense")
def _softmin_dense_fake(cost, x_offsets, y_offsets, log_a, log_b, h, eps, dim, active=None):
    n = log_a.shape[0] if dim == 1 else log_b.shape[0]
    return h.new_empty(n)


@torch.library.register_fake("tcfa::sinkhorn_dense")
def _sinkhorn_dense_fake(cost, x_offsets, y_offsets, log_a, log_b, f, g, eps, max_iter, tol, tau_a=1.0, tau_b=1.0,
                         schedule=(), omega=1.0, symmetric=None):
    B = x_offsets.shape[0] - 1
    return (torch.empty_like(f), torch.empty_like(g), f.new_empty(B, dtype=torch.int64), f.new_empty(B))


@torch.library.register_fake("tcfa::cost")
def _cost_fake(x, y, x_offsets, y_offsets, cost):
    size = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(size, dtype=compute_dtype(x.dtype))


@torch.library.register_fake("tcfa::barycentric")
def _barycentric_fake(x, y, x_offsets, y_offsets, g, log_b, values, eps, cost):
    return values.new_empty(x.shape[0], values.shape[1])


@torch.library.register_fake("tcfa::gated_stitch")
def _gated_stitch_fake(x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k=None, temperature=1.0):
    N, C, r, dy = x.shape[0], U.shape[0], U.shape[2], V.shape[2]
    k_saved = 0 if top_k is None else top_k
    ct = compute_dtype(x.dtype)
    return (x.new_empty(N, dy), x.new_empty(N, top_k or C, dtype=ct),
            x.new_empty(N, k_saved, dtype=torch.int64), x.new_empty(N, k_saved, r, dtype=ct))


@torch.library.register_fake("tcfa::gated_stitch_backward")
def _gated_stitch_backward_fake(grad_out, x, gate_weight, gate_bias, U, V, mu_x, mu_y, gates, index, z,
                                top_k=None, temperature=1.0):
    return tuple(torch.empty_like(t) for t in (x, gate_weight, gate_bias, U, V, mu_x, mu_y))


# ------------------------------------------------------------------ FLOP counts
# torch.utils.flop_counter.FlopCounterMode counts matmuls and convolutions of aten ops and skips
# unknown ops; these formulas let it count the fused stitch in a model's forward, by torch's own
# convention (2 per multiply-add of the products, elementwise work not counted).
from torch.utils.flop_counter import register_flop_formula  # noqa: E402


@register_flop_formula(torch.ops.tcfa.gated_stitch)
def _gated_stitch_flops(x_shape, gate_weight_shape, gate_bias_shape, U_shape, V_shape, *args, top_k=None,
                        out_shape=None, **kwargs) -> int:
    # the gate logits x W_g (N, dx) x (dx, C), then for each of the K maps a row evaluates
    # (x - mu_x[c]) U_c (dx x r) and z V_c (r x dy); K = C dense, top_k routed
    top_k = args[2] if len(args) > 2 else top_k
    (N, dx), (C, _, r), dy = x_shape, U_shape, V_shape[2]
    K = C if top_k is None else top_k
    return 2 * N * dx * C + 2 * N * K * r * (dx + dy)


# ------------------------------------------------------------------ autograd
def _gated_stitch_setup_context(ctx, inputs, output):
    x, gate_weight, gate_bias, U, V, mu_x, mu_y, top_k, temperature = inputs
    _, gates, index, z = output
    ctx.mark_non_differentiable(gates, index, z)
    ctx.save_for_backward(x, gate_weight, gate_bias, U, V, mu_x, mu_y, gates, index, z)
    ctx.top_k, ctx.temperature = top_k, temperature


def _gated_stitch_backward(ctx, grad_out, _grad_gates, _grad_index, _grad_z):
    grads = torch.ops.tcfa.gated_stitch_backward(grad_out, *ctx.saved_tensors, ctx.top_k, ctx.temperature)
    return (*grads, None, None)


torch.library.register_autograd("tcfa::gated_stitch", _gated_stitch_backward, setup_context=_gated_stitch_setup_context)
@torch.library.register_fake("tcfa::segment_moments")
def _segment_moments_fake(x, y, labels, num_segments, xx=True, yy=True, xy=True):
    dt = compute_dtype(x.dtype)
    C, dx, dy = num_segments, x.shape[1], y.shape[1]

    def block(on, a, b):
        return x.new_empty((C, a, b) if on else (C, 0, 0), dtype=dt)

    return (x.new_empty(C, dtype=torch.int64), x.new_empty(C, dx, dtype=dt), x.new_empty(C, dy, dtype=dt),
            block(xx, dx, dx), block(yy, dy, dy), block(xy, dx, dy))


@torch.library.register_fake("tcfa::symmetric_top_eigh")
def _symmetric_top_eigh_fake(A, k):
    B, n = A.shape[0], A.shape[1]
    return A.new_empty(B, k), A.new_empty(B, n, k), A.new_empty(B, dtype=torch.bool)


def _symmetric_top_eigh_eigh(A, k):
    """The op for devices without a tcfa kernel: cuSOLVER's eigh through torch, every matrix ok."""
    w, V = torch.linalg.eigh(A)
    return w[:, -k:].flip(-1).contiguous(), V[..., -k:].flip(-1).contiguous(), torch.ones(A.shape[0], dtype=torch.bool, device=A.device)


torch.library.register_kernel("tcfa::symmetric_top_eigh", "cuda", _symmetric_top_eigh_eigh)


@torch.library.register_fake("tcfa::gram_triu")
def _gram_triu_fake(xs, centre=True):
    return xs[0].new_empty(len(xs), xs[0].shape[0], xs[0].shape[0])


def gram_triu_composite(xs, centre=True):
    """The op from torch's matmul (cuBLAS has no symmetric product through torch): the kernel of
    devices without a tcfa one, and tcfa.similarity's route when gradients are wanted."""
    def centred(x):
        return x - x.mean(0, dtype=torch.float64).to(x.dtype) if centre else x

    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return torch.stack([torch.triu(c @ c.mT) for c in map(centred, xs)])  # differentiable
    # one (L, n, n) buffer filled in place: the stack of per-layer products held two copies at its peak
    n = xs[0].shape[0]
    out = xs[0].new_empty(len(xs), n, n)
    for i, c in enumerate(map(centred, xs)):
        torch.matmul(c, c.mT, out=out[i]).triu_()
    return out


torch.library.register_kernel("tcfa::gram_triu", "cuda", gram_triu_composite)


# ------------------------------------------------------------------ Triton (CUDA key)
def _register_triton():
    """Registers the Triton launchers for CUDA tensors when Triton is installed.

    Without triton, CUDA tensors hit the dispatcher's clear "no kernel" error.
    """
    try:
        from ..kernels import barycentric as tk_bary
        from ..kernels import gated_stitch as tk_stitch
        from ..kernels import gated_stitch_backward as tk_stitch_bwd
        from ..kernels import segment_moments as tk_moments
        from ..kernels import softmin as tk_softmin
    except ImportError:
        return
    torch.library.register_kernel("tcfa::softmin", "cuda", tk_softmin.softmin_forward)
    torch.library.register_kernel("tcfa::softmin_dense", "cuda", tk_softmin.softmin_dense_forward)
    torch.library.register_kernel("tcfa::sinkhorn_dense", "cuda", tk_softmin.sinkhorn_dense_forward)
    torch.library.register_kernel("tcfa::cost", "cuda", tk_softmin.cost_forward)
    torch.library.register_kernel("tcfa::barycentric", "cuda", tk_bary.barycentric_forward)
    torch.library.register_kernel("tcfa::gated_stitch", "cuda", tk_stitch.gated_stitch_forward)
    torch.library.register_kernel("tcfa::segment_moments", "cuda", tk_moments.segment_moments_forward)
    torch.library.register_kernel("tcfa::gated_stitch_backward", "cuda", tk_stitch_bwd.gated_stitch_backward_forward)


_register_triton()
