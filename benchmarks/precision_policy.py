"""Measures the error of each Triton kernel's dots in IEEE fp32 and in TF32, by emulation on the CPU.

    TRITON_INTERPRET=1 python benchmarks/precision_policy.py [--write]

No GPU is needed: the interpreter computes every fp32 dot exactly, so
* the stitch kernels run with tcfa.kernels._precision.emulate_tf32(), which rounds both operands of
  every bulk dot to TF32 inside the kernel and multiplies exactly, as a tensor core does;
* for the OT and moments kernels, whose only dot is x.y of the inputs (or of the centred rows),
  rounding those inputs to TF32 and running the exact kernel is the same computation.
Errors are against fp64 references. --write puts the table in docs/precision.md, which the policy
in tcfa/kernels/_precision.py cites.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1: the kernels run on CPU tensors under the Triton interpreter")

import torch  # noqa: E402

import tcfa  # noqa: E402,F401
from tcfa.kernels import _precision  # noqa: E402
from tcfa.kernels.gated_stitch import gated_stitch_forward  # noqa: E402
from tcfa.kernels.gated_stitch_backward import gated_stitch_backward_forward  # noqa: E402
from tcfa.kernels.segment_moments import segment_moments_forward  # noqa: E402
from tcfa.kernels.softmin import softmin_forward  # noqa: E402

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "precision.md"


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 (10-bit mantissa, ties away from zero): the host twin of _precision._round_tf32."""
    bits = t.float().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: the error on the output's own scale."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


def stitch_inputs(N=128, dx=192, dy=160, C=6, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    return (torch.randn(N, dx, **f), torch.randn(dx, C, **f) / dx**0.5, torch.randn(C, **f),
            torch.randn(C, dx, r, **f) / dx**0.5, torch.randn(C, r, dy, **f) / r**0.5,
            0.3 * torch.randn(C, dx, **f), torch.randn(C, dy, **f))


def stitch_rows(top_k):
    """Forward output and the largest relative error over the seven gradients, IEEE and emulated TF32."""
    args64 = stitch_inputs()
    args32 = [a.float() for a in args64]
    out64, gates, index, z = torch.ops.tcfa.gated_stitch(*args64, top_k, 1.0)
    dout = torch.randn(out64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads64 = torch.ops.tcfa.gated_stitch_backward(dout, *args64, gates, index, z, top_k, 1.0)
    errors = {}
    for mode, ctx in (("ieee", _precision.IEEE), ("tf32", _precision.EMULATED_TF32)):
        _precision._override = ctx
        try:
            out, gates32, index32, z32 = gated_stitch_forward(*args32, top_k, 1.0)
            grads = gated_stitch_backward_forward(dout.float(), *args32, gates32, index32, z32, top_k, 1.0)
        finally:
            _precision._override = None
        same_routing = top_k is None or torch.equal(index32, index)
        errors[mode] = (rel(out, out64), max(rel(a, b) for a, b in zip(grads, grads64)), same_routing)
    name = "gated_stitch dense" if top_k is None else f"gated_stitch top_k={top_k}"
    shape = "N 128, dx 192, dy 160, C 6, r 32"
    return [(name + " forward", shape, errors["ieee"][0], errors["tf32"][0], errors["tf32"][2]),
            (name + " backward (max over grads)", shape, errors["ieee"][1], errors["tf32"][1], errors["tf32"][2])]


def softmin_rows(eps_list=(0.5, 0.05, 0.005)):
    """Soft-min of unit-scale clouds (d 32): error of the potential, in units of eps."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 32, generator=g) / 32**0.5, torch.randn(260, 32, generator=g) / 32**0.5
    off_x, off_y = torch.tensor([0, 300]), torch.tensor([0, 260])
    h, log_b = torch.zeros(260), torch.full((260,), -torch.log(torch.tensor(260.0)).item())
    rows = []
    for eps in eps_list:
        want = torch.ops.tcfa.softmin(x.double(), y.double(), off_x, off_y, h.double(), log_b.double(), eps,
                                      "sqeuclidean")
        ieee = softmin_forward(x, y, off_x, off_y, h, log_b, eps)
        # TF32 rounds only the dot's operands; the norms |x|^2, |y|^2 are computed on the host in fp32.
        cost = (x.double() ** 2).sum(1)[:, None] + (y.double() ** 2).sum(1)[None, :] \
            - 2 * round_tf32(x).double() @ round_tf32(y).double().T
        tf32 = -eps * torch.logsumexp(log_b.double()[None, :] - cost / eps, dim=1)
        rows.append((f"softmin / sinkhorn potentials, eps = {eps}", "300 x 260, d 32, norms ~ 1",
                     float((ieee.double() - want).abs().max() / eps), float((tf32 - want).abs().max() / eps), None))
    return rows


def routing_row():
    """Why the gate logits stay IEEE: rows whose top-2 conditions change if x W_g ran in TF32."""
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(4000, 192, generator=g), torch.randn(192, 64, generator=g) / 192**0.5
    want = torch.topk(x.double() @ W.double(), 2, dim=1).indices
    ieee = torch.topk(x @ W, 2, dim=1).indices
    tf32 = torch.topk(round_tf32(x).double() @ round_tf32(W).double(), 2, dim=1).indices
    changed = lambda idx: float((idx != want).any(1).double().mean())  # noqa: E731
    return [("gate top-2 conditions: fraction of rows changed", "4000 rows, dx 192, C 64", changed(ieee),
             changed(tf32), None)]


def moments_row():
    """Co-moments of rows with a common offset (centred in the kernel): relative error of S_xy."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2000, 48, generator=g) + 3.0, torch.randn(2000, 40, generator=g) - 2.0
    labels = torch.randint(0, 5, (2000,), generator=g)
    want = torch.ops.tcfa.segment_moments(x.double(), y.double(), labels, 5)
    ieee = segment_moments_forward(x, y, labels, 5)
    xc, yc = x - ieee[1][labels], y - ieee[2][labels]
    sxy = torch.zeros(5, 48, 40, dtype=torch.float64).index_add_(
        0, labels, round_tf32(xc).double()[:, :, None] * round_tf32(yc).double()[:, None, :])
    return [("segment_moments S_xy", "2000 rows, 48 x 40, 5 segments", rel(ieee[5], want[5]), rel(sxy, want[5]),
             None)]


def table(rows) -> str:
    lines = ["| kernel and output | shape | IEEE fp32 error | TF32 error (emulated) | TF32 routing = IEEE |",
             "|---|---|---|---|---|"]
    for name, shape, e_ieee, e_tf32, same in rows:
        routed = "" if same is None else ("yes" if same else "**no**")
        lines.append(f"| {name} | {shape} | {e_ieee:.1e} | {e_tf32:.1e} | {routed} |")
    return "\n".join(lines)


HEADER = """# Precision of the Triton kernels

The policy (which dot runs in which precision, and why) is written once, in
`tcfa/kernels/_precision.py`: the OT kernels, `segment_moments` and the stitch's gate logits always
use IEEE fp32 dots; the stitch's shrink/expand products and its backward use TF32 only when the user
allows TF32 for fp32 matmuls in torch (`torch.backends.cuda.matmul.fp32_precision = "tf32"`),
IEEE otherwise (torch's default). fp64 is IEEE fp64 everywhere.

Measured on the CPU by emulation (`TRITON_INTERPRET=1 python benchmarks/precision_policy.py --write`):
the interpreter's fp32 dot is exact, so the TF32 column rounds the dot operands to TF32 (10-bit
mantissa) and multiplies exactly, which is what a tensor core does. Errors are against fp64
references: relative to the output's largest entry, except the potentials, whose error is given in
units of eps (what a Sinkhorn plan exp((f + g - C)/eps) sees).

"""

FOOTER = """
Reading the table: TF32 costs the stitch a few 1e-4 relative error, the same as `nn.Linear` under TF32,
so the stitch follows torch's switch; TF32 gate logits would move the top-2 conditions of some
rows (the "gate top-2" row), so the gate stays IEEE and routing on a GPU is the C++ op's. For the potentials the TF32 error grows as 1/eps and reaches
a sizeable fraction of eps at the small eps users anneal to, so the OT kernels stay IEEE. The CUDA
tests (tests/test_cuda.py) use these figures, with a margin, as their fp32 tolerances.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
    args = parser.parse_args()
    rows = stitch_rows(None) + stitch_rows(2) + routing_row() + softmin_rows() + moments_row()
    text = table(rows)
    print(text)
    if args.write:
        DOC.write_text(HEADER + text + "\n" + FOOTER)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
