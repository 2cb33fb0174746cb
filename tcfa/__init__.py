"""tcfa: Task-Conditioned Functional Alignment for PyTorch.

Fused kernels (torch.ops.tcfa) for streaming log-domain Sinkhorn on ragged
batches and a gated multi-stitch, with a thin Python API on top.
"""
from . import ops
from .maps import LowRankMaps
from .ot import GWResult, SinkhornResult, barycentric_map, entropic_gw, sinkhorn, sinkhorn_divergence
from .stitch import GatedMultiStitch

__version__ = "0.1.0"

__all__ = [
    "ops",
    "LowRankMaps",
    "sinkhorn",
    "SinkhornResult",
    "barycentric_map",
    "sinkhorn_divergence",
    "entropic_gw",
    "GWResult",
    "GatedMultiStitch",
]
