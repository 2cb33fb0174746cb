"""StitchedModel: A up to its tap -> stitch -> B from its tap onward.

The shape of B's tap (and of A's) is learned once from one example by running each model up to its
tap (``example_input``, or the first sample of the first batch); afterwards B's earlier layers
never run (tcfa/pipeline/_skip.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ._skip import _Skipped, run_from
from .layouts import Layout, _check_mode, _from_rows, _source, layout_of
from .models import _call, _head, _inference, _logits, _taps, capture, get_module


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _widths(stitch: nn.Module):
    """(in, out) widths a stitch declares (GatedMultiStitch: dx/dy, nn.Linear: in/out_features), or Nones."""
    dx = getattr(stitch, "dx", getattr(stitch, "in_features", None))
    dy = getattr(stitch, "dy", getattr(stitch, "out_features", None))
    return (dx if isinstance(dx, int) else None), (dy if isinstance(dy, int) else None)


class StitchedModel(nn.Module):
    """A up to ``path_a`` -> stitch -> B from ``path_b`` onward; returns B's logits.

    ``stitch`` maps rows (n, dx) -> (n, dy), dx = A's channel width at its tap, dy = B's.
    ``mode``: "tokens" maps every position (see the module docstring for how A's positions are
    paired with B's), "pooled" maps A's pooled features and broadcasts them to all of B's positions.
    ``cls_stitch`` maps A's pooled features to B's special tokens when they are filled from the pool
    (different layouts in tokens mode); default: ``stitch``.
    ``example_input``: one batch (or a sample) used to learn the two tap layouts by running each
    model up to its tap; default: the first forward's first sample. ``layout_a``/``layout_b``
    override the inferred layouts (non-square patch grids).
    A and B are frozen (requires_grad False) and kept in eval mode; only the stitch trains.
    """

    def __init__(self, model_a: nn.Module, path_a: str, model_b: nn.Module, path_b: str, stitch: nn.Module, *,
                 mode: str = "tokens", cls_stitch: nn.Module | None = None, example_input=None,
                 layout_a: Layout | None = None, layout_b: Layout | None = None, freeze: bool = True):
        super().__init__()
        for name, m in (("model_a", model_a), ("model_b", model_b), ("stitch", stitch)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        if cls_stitch is not None and not isinstance(cls_stitch, nn.Module):
            raise TypeError(f"cls_stitch must be an nn.Module or None, got {type(cls_stitch).__name__}")
        _check_mode(mode)
        get_module(model_a, path_a)
        get_module(model_b, path_b)
        if path_b == "":
            raise ValueError("path_b must name a layer inside model_b, not the model itself")
        self.model_a, self.model_b = model_a, model_b
        self.path_a, self.path_b = path_a, path_b
        self.stitch, self.cls_stitch = stitch, cls_stitch
        self.mode = mode
        self.layout_a, self.layout_b = layout_a, layout_b
        self.train()
        if freeze:
            _freeze(model_a)
            _freeze(model_b)
        if example_input is not None:
            self._learn_layouts(example_input)

    # ---------------------------------------------------------------- layouts
    def _learn_layouts(self, inputs) -> None:
        """Runs A and B up to their taps on one sample to learn the layouts, then checks the stitch widths."""
        one = _head(inputs, 1)
        with _inference(self.model_a, self.model_b):
            if self.layout_a is None:
                act = capture(self.model_a, [self.path_a], one)[self.path_a]
                self.layout_a = layout_of(act, model=self.model_a)
            if self.layout_b is None:
                act = capture(self.model_b, [self.path_b], one)[self.path_b]
                self.layout_b = layout_of(act, model=self.model_b)
        self._check_widths()

    def _check_widths(self) -> None:
        dx, dy = self.layout_a.width, self.layout_b.width
        for name, stitch in (("stitch", self.stitch), ("cls_stitch", self.cls_stitch)):
            if stitch is None:
                continue
            sx, sy = _widths(stitch)
            if (sx is not None and sx != dx) or (sy is not None and sy != dy):
                raise ValueError(f"{name} maps width {sx} -> {sy}, but A's tap {self.path_a!r} has width {dx} "
                                 f"and B's tap {self.path_b!r} has width {dy}")

    # ---------------------------------------------------------------- forward
    def _run_a(self, inputs) -> torch.Tensor:
        """A's activation at its tap (A stops there); without autograd when A is frozen."""
        a_trains = any(p.requires_grad for p in self.model_a.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and a_trains):
            return capture(self.model_a, [self.path_a], inputs)[self.path_a]

    def stitched_activation(self, inputs) -> torch.Tensor:
        """The activation the stitch hands to B, in B's tap layout ((N, C, H, W) or (N, T, D))."""
        if self.layout_a is None or self.layout_b is None:
            self._learn_layouts(inputs)
        act_a = self._run_a(inputs)
        src, pooled_mask = _source(act_a, self.layout_a, self.layout_b, self.mode)
        n, p, dx = src.shape
        out = self._apply(self.stitch, src.reshape(n * p, dx)).reshape(n, p, -1)
        if pooled_mask is not None and self.cls_stitch is not None:
            special = self._apply(self.cls_stitch, src[:, pooled_mask].reshape(-1, dx))
            out = torch.cat([special.reshape(n, -1, out.shape[-1]), out[:, ~pooled_mask]], dim=1)
        if out.shape[-1] != self.layout_b.width:
            raise ValueError(f"the stitch returned width {out.shape[-1]}, but B's tap {self.path_b!r} "
                             f"has width {self.layout_b.width}")
        return _from_rows(out, self.layout_b, self.mode)

    @staticmethod
    def _apply(stitch, rows):
        out = stitch(rows)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, inputs):
        """B's logits for ``inputs`` (a Tensor, or a dict of kwargs given to both models)."""
        return self.forward_taps(inputs, [])[0]

    def forward_taps(self, inputs, paths_b) -> tuple:
        """(B's logits, {path: activation}) for layers of B at or after its tap, from one stitched forward.

        ``path_b`` itself gives the stitched activation; later paths give what B's later layers
        compute from it (for losses that match B's own activations at several depths, e.g. with
        ``capture(model_b, paths_b, inputs)`` as the target).
        """
        paths_b = [paths_b] if isinstance(paths_b, str) else list(paths_b)
        activation = self.stitched_activation(inputs)
        later = [p for p in paths_b if p != self.path_b]
        inside = [p for p in later if p.startswith(self.path_b + ".")]
        if inside:  # the tap's output is injected: its own submodules never run
            raise ValueError(f"layers {inside} of model_b are inside the tap {self.path_b!r}, which the stitched "
                             "forward replaces: paths_b must be the tap or layers after it")
        for p in later:
            get_module(self.model_b, p)  # names an unknown path before anything runs
        with run_from(self.model_b, self.path_b, activation):
            # a module before the tap is a stand-in now, whose hook would fire with the injected activation
            early = [p for p in later if _before_tap(self.model_b, p)]
            if early:
                raise ValueError(f"layers {early} of model_b come before the tap {self.path_b!r}: the stitched "
                                 "forward does not run them (paths_b must be at or after the tap)")
            with _taps(self.model_b, later, False) as found:
                out = _call(self.model_b, inputs)
        missing = [p for p in later if p not in found]
        if missing:
            raise ValueError(f"layers {missing} of model_b did not run after the tap {self.path_b!r}")
        acts = {p: activation if p == self.path_b else found[p] for p in paths_b}
        return _logits(out), acts

    def train(self, mode: bool = True) -> "StitchedModel":
        """Sets the stitch's mode; A and B stay in eval mode (their dropout and batch-norm
        statistics are part of the frozen functions, not of what is trained)."""
        super().train(mode)
        self.model_a.eval()
        self.model_b.eval()
        return self

    def num_trainable(self) -> int:
        """Trainable parameters (the stitch's, plus any the caller unfroze in A or B)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _before_tap(model: nn.Module, path: str) -> bool:
    """Inside run_from: whether ``path`` is, or lies inside, a module skipped before the tap."""
    module = model
    for part in path.split("."):
        module = module._modules.get(part) if module is not None else None
        if isinstance(module, _Skipped):
            return True
    return False
