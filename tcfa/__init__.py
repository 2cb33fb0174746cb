"""tcfa: Task-Conditioned Functional Alignment for PyTorch."""
from . import ops
from .maps import LowRankMaps
from .stats import (
    CCA,
    MomentAccumulator,
    Moments,
    cca,
    cca_maps,
    cka_from_moments,
    linear_cka,
    procrustes,
    rbf_cka,
    ridge_map,
    segment_moments,
)

__version__ = "0.1.0"
