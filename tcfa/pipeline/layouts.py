"""Activation layouts and the rows aligned between two taps (re-exported by tcfa.models).

A tap gives a "map" (N, C, H, W) (CNNs: timm ResNet / ConvNeXt stages, transformers
ResNet / ConvNeXt stages), "tokens" (N, T, D) (ViT, BERT) or "rows" (N, D) (an MLP's nn.Linear, a
pooled head: one row per sample, used as it is, in either mode); tokens hold ``num_special``
leading special tokens (CLS, distillation, register tokens: timm's ``num_prefix_tokens``) and,
for vision models, an h x w grid of patch tokens after them. Rows pair positions of A with
positions of B in B's order:

  * "pooled": one row per sample, the mean over every spatial position / every token (special
    tokens included: BERT and ViT expose no padding-free patch mean that holds for both, and the
    mean over all tokens needs no knowledge of the layout).
  * "tokens": one row per position of B. Same layout on both sides (ViT->ViT, BERT->BERT, equal
    CNN maps): position i of A feeds position i of B, CLS feeds CLS. Different layouts
    (CNN->ViT, ViT->CNN, different grids): A's grid is resampled bilinearly to B's grid, and each
    of B's special tokens is filled from A's pooled features (mapped by ``cls_stitch`` if given).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Layout", "layout_of", "to_rows", "rows_per_sample", "paired_rows"]


@dataclass(frozen=True)
class Layout:
    """How one sample's activation is laid out: a "map" (C, H, W), "tokens" (T, D) or "rows" (D,).

    ``grid`` is (H, W) for a map, the (h, w) patch grid for vision tokens and None for text tokens;
    ``num_special`` counts the leading special tokens (CLS...) of a token layout.
    """

    kind: str
    width: int
    positions: int
    grid: tuple | None = None
    num_special: int = 0

    def describe(self) -> str:
        """In words, e.g. "32 channels on a 4x4 grid", "1 special + 4x4 patch tokens of width 48"."""
        if self.kind == "map":
            return f"{self.width} channels on a {self.grid[0]}x{self.grid[1]} grid"
        if self.kind == "rows":
            return f"one row of width {self.width}"
        if self.grid is None:
            return f"{self.positions} tokens of width {self.width}"
        return f"{self.num_special} special + {self.grid[0]}x{self.grid[1]} patch tokens of width {self.width}"


def _infer_special(model, tokens: int) -> tuple[int, tuple | None]:
    """(num_special, grid) of a token sequence: from the model when it says, else a square grid."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size") and not hasattr(config, "patch_size"):
        return 0, None  # a text model (BERT): a sequence, whatever its length
    if model is not None:
        prefix = getattr(model, "num_prefix_tokens", None)  # timm VisionTransformer
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if isinstance(prefix, int) and grid is not None and prefix + grid[0] * grid[1] == tokens:
            return prefix, tuple(grid)
    for special in (1, 0, 2):  # CLS (ViT), none, CLS + distillation (DeiT)
        side = math.isqrt(max(tokens - special, 0))
        if side > 1 and side * side == tokens - special:
            return special, (side, side)
    return 0, None  # text: a sequence without a spatial grid


def layout_of(act: torch.Tensor, *, model=None, num_special=None, grid=None) -> Layout:
    """The Layout of a tap's activation (N, C, H, W), (N, T, D) or (N, D).

    For tokens, ``num_special`` and ``grid`` default to the model's own description (timm's
    ``num_prefix_tokens`` and ``patch_embed.grid_size``), else to a square grid after 1, 0 or 2
    special tokens, else a text sequence (no grid). Pass them for non-square grids.
    """
    if not isinstance(act, torch.Tensor):
        raise TypeError(f"act must be a Tensor, got {type(act).__name__}")
    if act.dim() == 4:
        return Layout("map", act.shape[1], act.shape[2] * act.shape[3], (act.shape[2], act.shape[3]))
    if act.dim() == 2:
        return Layout("rows", act.shape[1], 1)
    if act.dim() != 3:
        raise ValueError(f"act must be (N, C, H, W), (N, T, D) or (N, D), got shape {tuple(act.shape)}")
    tokens = act.shape[1]
    if num_special is None and grid is None:
        num_special, grid = _infer_special(model, tokens)
    num_special = num_special or 0
    if grid is not None:
        grid = tuple(grid)
        if num_special + grid[0] * grid[1] != tokens:
            raise ValueError(f"grid {grid} with num_special={num_special} does not cover the {tokens} tokens")
    return Layout("tokens", act.shape[2], tokens, grid, num_special)


def _check_mode(mode):
    if mode not in ("pooled", "tokens"):
        raise ValueError(f"mode must be 'pooled' or 'tokens', got {mode!r}")


def _pooled(act: torch.Tensor) -> torch.Tensor:
    """(N, D): the mean over spatial positions (maps) or over all tokens (special ones included); rows as they are."""
    if act.dim() == 2:
        return act
    return act.mean(dim=(2, 3)) if act.dim() == 4 else act.mean(dim=1)


def _positions(act: torch.Tensor) -> torch.Tensor:
    """(N, P, D): one entry per position, in row-major order (a map's grid flattened, rows as P = 1)."""
    if act.dim() == 4:
        return act.flatten(2).transpose(1, 2)
    return act[:, None, :] if act.dim() == 2 else act


def _as_grid(act: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(N, D, H, W): a map, or the patch tokens of a vision token layout."""
    if layout.kind == "map":
        return act
    if layout.grid is None:
        raise ValueError(f"a text token sequence ({layout.positions} tokens) has no spatial grid to resample; "
                         "pass grid= (and num_special=) when the tokens are patches")
    patches = act[:, layout.num_special:]
    return patches.transpose(1, 2).reshape(act.shape[0], layout.width, *layout.grid)


def _resample(grid_act: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resampling of (N, D, H, W) to ``size``; a no-op when it already has that size."""
    if tuple(grid_act.shape[-2:]) == tuple(size):
        return grid_act
    return nn.functional.interpolate(grid_act, size=tuple(size), mode="bilinear", align_corners=False)


def to_rows(act: torch.Tensor, mode: str = "pooled", grid=None) -> torch.Tensor:
    """Rows for alignment from one tap's activation.

    pooled: (N, D), the mean over positions (all tokens incl. CLS for token activations).
    tokens: (N * P, D), one row per position in row-major order; a map (N, C, H, W) is first
    resampled bilinearly to ``grid`` = (h, w) when given (B's patch grid for CNN -> ViT). Token
    activations (N, T, D) give their T tokens as they are (``grid`` must be None).
    """
    _check_mode(mode)
    layout = layout_of(act, num_special=0)
    if mode == "pooled" or act.dim() == 2:
        return _pooled(act)
    if act.dim() == 3:
        if grid is not None:
            raise ValueError("grid resamples CNN maps only; token activations (N, T, D) are used as they are")
        return act.reshape(-1, act.shape[-1])
    grid_act = _resample(act, grid if grid is not None else layout.grid)
    return grid_act.flatten(2).transpose(1, 2).reshape(-1, act.shape[1])


def rows_per_sample(act: torch.Tensor, mode: str = "pooled", grid=None) -> int:
    """How many rows ``to_rows(act, mode, grid)`` gives per sample (to expand per-sample labels)."""
    _check_mode(mode)
    if mode == "pooled" or act.dim() == 2:
        return 1
    if act.dim() == 4 and grid is not None:
        return int(grid[0]) * int(grid[1])
    return act.shape[1] if act.dim() == 3 else act.shape[2] * act.shape[3]


def _same_positions(la: Layout, lb: Layout) -> bool:
    """Position i of A corresponds to position i of B without resampling."""
    return la.positions == lb.positions and la.num_special == lb.num_special and (
        la.kind == lb.kind or la.grid == lb.grid)


def _source(act_a: torch.Tensor, la: Layout, lb: Layout, mode: str):
    """A's features per position of B: (N, P_b, dx), plus a mask of B's positions fed from A's pool.

    The mask is None when no position is pooled-fed (so one stitch maps every row).
    """
    n = act_a.shape[0]
    if mode == "pooled":
        return _pooled(act_a)[:, None, :], None
    if _same_positions(la, lb):
        return _positions(act_a), None
    if "rows" in (la.kind, lb.kind):
        raise ValueError(f"tokens mode pairs positions, but A's tap is {la.describe()} and B's {lb.describe()}: "
                         "an (N, D) tap has one position per sample; use mode='pooled'")
    if lb.grid is None:
        raise ValueError(f"tokens mode cannot pair A's {la.kind} layout ({la.positions} positions) with B's text "
                         f"sequence of {lb.positions} tokens; use mode='pooled'")
    patches = _resample(_as_grid(act_a, la), lb.grid).flatten(2).transpose(1, 2)
    if lb.num_special == 0:
        return patches, None
    special = _pooled(act_a)[:, None, :].expand(n, lb.num_special, -1)
    mask = torch.zeros(lb.positions, dtype=torch.bool, device=act_a.device)
    mask[:lb.num_special] = True
    return torch.cat([special, patches], dim=1), mask


def _target(act_b: torch.Tensor, lb: Layout, mode: str) -> torch.Tensor:
    """B's features per position in B's order: (N, P_b, dy) (P_b = 1 when pooled)."""
    if mode == "pooled":
        return _pooled(act_b)[:, None, :]
    return _positions(act_b)


def _from_rows(rows: torch.Tensor, lb: Layout, mode: str) -> torch.Tensor:
    """(N, P_b, dy) rows back to B's activation shape; pooled rows are broadcast to every position."""
    n = rows.shape[0]
    if mode == "pooled":
        rows = rows.expand(n, lb.positions, rows.shape[-1])
    if lb.kind == "map":
        return rows.transpose(1, 2).reshape(n, lb.width, *lb.grid)
    return rows.reshape(n, -1) if lb.kind == "rows" else rows


def paired_rows(act_a: torch.Tensor, act_b: torch.Tensor, mode: str = "tokens", *, layout_a=None,
                layout_b=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) row pairs that StitchedModel maps: rows_a (N * P, dx), rows_b (N * P, dy).

    Uses the same correspondence as StitchedModel (see the module docstring), so a map fitted to
    these rows is the one the stitched model applies. Rows come sample-major: P per sample.
    """
    _check_mode(mode)
    if act_a.shape[0] != act_b.shape[0]:
        raise ValueError(f"act_a and act_b must hold the same samples, got {act_a.shape[0]} and {act_b.shape[0]}")
    la = layout_a or layout_of(act_a)
    lb = layout_b or layout_of(act_b)
    src, _ = _source(act_a, la, lb, mode)
    tgt = _target(act_b, lb, mode)
    return src.reshape(-1, src.shape[-1]), tgt.reshape(-1, tgt.shape[-1])

