"""Embedded default data (scikit-learn's digits, shipped inside sklearn: no download), image
transforms, and the condition builders TCFA aligns under."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import _validate


def digits(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digit images as (N, 64) pixel rows in [0, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=dtype), torch.tensor(d.target, dtype=torch.int64)


# ------------------------------------------------------------------ images
def digits_images(size: int = 32, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as (N, 3, size, size) images in [0, 1] (bilinear upsampling of the 8x8 grid,
    grey copied to 3 channels so off-the-shelf image models take them) and (N,) labels."""
    x, y = digits(dtype)
    size = _validate.integer("size", size, lo=8)
    img = torch.nn.functional.interpolate(x.view(-1, 1, 8, 8), size=(size, size), mode="bilinear", align_corners=False)
    return img.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), y


def split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (train, test) split of range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, H, W) rotated about its centre by its own angle (bilinear, zero fill)."""
    t = torch.deg2rad(degrees.to(images.dtype))
    cos, sin, zero = t.cos(), t.sin(), torch.zeros_like(t)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, align_corners=False)


def shift(images: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Each image translated by its own (dx, dy) in pixels, (N, 2) (bilinear, zero fill)."""
    N, _, H, W = images.shape
    p = pixels.to(images.dtype)
    theta = torch.zeros(N, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # affine_grid works in [-1, 1] coordinates: a pixel is 2/W wide; sampling at x - d moves content by +d
    theta[:, 0, 2], theta[:, 1, 2] = -2 * p[:, 0] / W, -2 * p[:, 1] / H
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, align_corners=False)


def gaussian_noise(images: torch.Tensor, sigma: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """images + sigma * N(0, 1), clamped to [0, 1]; sigma a float or one value per image."""
    s = torch.as_tensor(sigma, dtype=images.dtype)
    s = s.view(-1, *([1] * (images.dim() - 1))) if s.dim() else s
    return (images + s * torch.randn(images.shape, generator=generator, dtype=images.dtype)).clamp(0, 1)


# ------------------------------------------------------------------ conditions
@dataclass
class Conditions:
    """Condition id per sample, (N,) int64 in [0, len(names)), and a name per condition."""

    ids: torch.Tensor
    names: list

    def __post_init__(self):
        if not isinstance(self.names, (list, tuple)) or not self.names:
            raise ValueError(f"names must be a non-empty list, got {self.names!r}")
        self.names = [str(n) for n in self.names]
        if not isinstance(self.ids, torch.Tensor) or self.ids.dim() != 1:
            raise TypeError(f"ids must be a 1-D int64 torch.Tensor, got {self.ids!r:.60}")
        _validate.labels("ids", self.ids, self.ids.shape[0], len(self.names))

    @property
    def num(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index) -> "Conditions":
        return Conditions(self.ids[index], self.names)


def condition_ids(name: str, cond, n: int | None, num: int | None):
    """(ids, num_conditions) from a Conditions, an int64 tensor, or None (one condition over n rows).

    ``n`` is the number of rows the ids must cover; None takes the ids' own length. ``num`` None
    takes the Conditions' count, or max id + 1.
    """
    if cond is None:
        return torch.zeros(n, dtype=torch.int64), 1 if num is None else num
    if isinstance(cond, Conditions):
        ids, num = cond.ids, cond.num if num is None else num
    else:
        ids = cond
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a tcfa.data.Conditions, an int64 tensor or None, got {type(cond).__name__}")
        if num is None:
            num = int(ids.max()) + 1 if ids.numel() else 1
    return _validate.labels(name, ids, ids.numel() if n is None else n, num), num


def no_conditions(n: int) -> Conditions:
    """One condition for all n samples: the unconditioned baseline."""
    return Conditions(torch.zeros(_validate.integer("n", n, lo=1), dtype=torch.int64), ["all"])


def class_conditions(labels: torch.Tensor, names=None) -> Conditions:
    """Class-stratified: condition = class label. ``names`` default to the label values."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D int64 tensor, got {labels!r:.60}")
    num = int(labels.max()) + 1 if labels.numel() else 1
    names = [str(c) for c in range(num)] if names is None else list(names)
    return Conditions(labels, names)


def binned_conditions(values: torch.Tensor, bins: int = 4, name: str = "value") -> Conditions:
    """Any scalar per sample into ``bins`` quantile bins (equal counts up to ties). Ties can leave a
    quantile edge at the minimum or twice at one value, which would be a bin no sample reaches: those
    edges are dropped, so heavy ties give fewer bins (all values equal: one), never an empty one."""
    values = _validate.tensor("values", values, dim=1)
    bins = _validate.integer("bins", bins, lo=1)
    if values.numel() < bins:
        raise ValueError(f"values must hold at least bins={bins} entries, got {values.numel()}")
    v = values.double()
    edges = torch.quantile(v, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    edges = torch.unique(edges[edges > v.min()])  # sorted; an edge at the minimum leaves bin 0 empty
    ids = torch.bucketize(v, edges, right=True)
    lo = [float(v.min())] + edges.tolist()
    hi = edges.tolist() + [float(v.max())]
    return Conditions(ids, [f"{name} [{a:.3g}, {b:.3g}]" for a, b in zip(lo, hi)])


TRANSFORMS = ("rotation", "jitter", "noise")
_DEFAULT_LEVELS = {"rotation": (0.0, 15.0, 30.0), "jitter": (0.0, 1.0, 2.0), "noise": (0.0, 0.1, 0.2)}


def transform_conditions(images: torch.Tensor, kind: str, levels=None, *, seed: int = 0):
    """Transform-conditioned samples: each image gets one level of a transform, drawn at random.

    kind "rotation" (degrees, random sign), "jitter" (translation of up to that many pixels
    in each axis) or "noise" (Gaussian sigma). Returns (transformed images, Conditions) with
    condition = the level index; the transform is applied here, so the condition is what
    the model actually saw.
    """
    images = _validate.tensor("images", images, dim=4)
    kind = _validate.choice("kind", kind, TRANSFORMS)
    levels = tuple(_DEFAULT_LEVELS[kind] if levels is None else levels)
    if not levels:
        raise ValueError("levels must be non-empty")
    gen = torch.Generator().manual_seed(seed)
    N = images.shape[0]
    ids = torch.randint(len(levels), (N,), generator=gen)
    amount = torch.tensor(levels, dtype=images.dtype)[ids]
    if kind == "rotation":
        sign = torch.randint(2, (N,), generator=gen).to(images.dtype) * 2 - 1
        out = rotate(images, amount * sign)
    elif kind == "jitter":
        out = shift(images, (torch.rand(N, 2, generator=gen, dtype=images.dtype) * 2 - 1) * amount[:, None])
    else:
        out = gaussian_noise(images, amount, gen)
    return out, Conditions(ids, [f"{kind}={lv:g}" for lv in levels])
