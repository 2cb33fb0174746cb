"""tcfa: Task-Conditioned Functional Alignment for PyTorch.

Fused kernels (torch.ops.tcfa) for streaming log-domain Sinkhorn on ragged
batches, per-condition moments and CCA, and a gated multi-stitch, with a thin Python API on top.
"""
from . import artifacts, ops
from .maps import LowRankMaps
from .pipeline.models import capture, extract, get_module, paired_rows, stream_moments, to_rows
from .pipeline.stitched import StitchedModel
from .ot import SinkhornResult, barycentric_map, sinkhorn
from .ot_cost import CostSinkhornResult, sinkhorn_cost
from .divergence import GWResult, entropic_gw, sinkhorn_divergence
from .shared_stitch import ScaledBasisStitch, SharedBasisStitch
from .stitch import GatedMultiStitch
from .pipeline.align import TCFA, TUNING, tune
from .pipeline.data import Conditions, binned_conditions, class_conditions, no_conditions, transform_conditions
from .stats import MomentAccumulator, Moments, cka_from_moments, linear_cka, rbf_cka, segment_moments
from .linear_maps import CCA, cca, cca_maps, procrustes, ridge_map
from . import correspondence, similarity
from .pipeline.layer_map import LayerMap, layer_map
from .lora import AnchorMap, LoRALinear, anchor_map, roughness, transport_lora
from .pipeline.adapter_maps import AdapterMaps, fit_adapter_maps
from .pipeline.adapters import (add_lora, adapter_factors, attach_adapter, load_adapter, merge_adapter, remove_lora,
                                save_adapter, unmerge_adapter)

from ._version import __version__ as __version__

__all__ = [
    "ops",
    "LoRALinear",
    "AnchorMap",
    "anchor_map",
    "transport_lora",
    "roughness",
    "AdapterMaps",
    "fit_adapter_maps",
    "add_lora",
    "attach_adapter",
    "remove_lora",
    "adapter_factors",
    "save_adapter",
    "load_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "similarity",
    "correspondence",
    "layer_map",
    "LayerMap",
    "artifacts",
    "LowRankMaps",
    "sinkhorn",
    "sinkhorn_cost",
    "CostSinkhornResult",
    "SinkhornResult",
    "barycentric_map",
    "sinkhorn_divergence",
    "entropic_gw",
    "GWResult",
    "GatedMultiStitch",
    "SharedBasisStitch",
    "ScaledBasisStitch",
    "StitchedModel",
    "get_module",
    "extract",
    "capture",
    "stream_moments",
    "to_rows",
    "paired_rows",
    "segment_moments",
    "Moments",
    "MomentAccumulator",
    "cca",
    "CCA",
    "cca_maps",
    "ridge_map",
    "procrustes",
    "linear_cka",
    "cka_from_moments",
    "rbf_cka",
    "TCFA",
    "TUNING",
    "tune",
    "Conditions",
    "class_conditions",
    "no_conditions",
    "binned_conditions",
    "transform_conditions",
]
