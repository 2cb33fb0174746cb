"""Embedded default data: scikit-learn's digits (shipped inside the package, no download)."""
from __future__ import annotations

import torch


def digits(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digit images as (N, 64) pixel rows in [0, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=dtype), torch.tensor(d.target, dtype=torch.int64)


def random_rotation(dim: int, angle: float, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal (dim, dim) matrix exp(angle * A) with A a random unit skew-symmetric matrix."""
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    a = a - a.T
    a = a / torch.linalg.matrix_norm(a, ord=2)
    return torch.linalg.matrix_exp(angle * a)
