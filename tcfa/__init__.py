"""tcfa: Task-Conditioned Functional Alignment for PyTorch."""
from . import ops

__version__ = "0.1.0"
