"""tcfa: Task-Conditioned Functional Alignment for PyTorch."""
from . import ops
from .stitch import GatedMultiStitch

__version__ = "0.1.0"
