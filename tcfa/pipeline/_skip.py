"""Running a model from one of its layers onward, without its earlier layers (for StitchedModel).

The model's own forward is called (so its glue code -- attention masks, pooling, heads -- is
exactly the model's), with its modules temporarily swapped: along the dotted path of the tap,
every sibling registered *before* the path (the embeddings, the earlier blocks) is replaced by a
placeholder that returns the injected activation without computing anything, and the tap module
itself by one that returns the injected activation. This relies on registration order being
execution order, which holds for transformers and timm backbones; a placeholder that is called
after the tap raises instead of giving a silent wrong result.

Glue code between skipped modules must not depend on their output's shape. Where a known family
has such glue, ``FAMILY_BYPASS`` names the method to bypass and the child it follows: timm's
VisionTransformer calls ``_pos_embed`` (prepend CLS / register tokens, add position embeddings)
between ``patch_embed`` and the blocks, so it is bypassed when the tap lies after
``patch_embed``, and runs as usual when the tap is ``patch_embed`` itself.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# class name (matched along the MRO, so DeiT's subclass counts) -> ((method, child it follows), ...)
FAMILY_BYPASS = {
    "VisionTransformer": (("_pos_embed", "patch_embed"),),
}


class _Inject(nn.Module):
    """Stands in for the tap module: returns the injected activation instead of computing."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.fired = False

    def forward(self, *args, **kwargs):
        self.fired = True
        return self.value


class _Skipped(nn.Module):
    """Stands in for a module before the tap: computes nothing, returns a placeholder.

    The placeholder is the injected activation itself, which has the right shape for the common
    chain of same-shape blocks; it never reaches the output because the tap replaces it.
    """

    def __init__(self, path, original: nn.Module, inject: _Inject):
        super().__init__()
        self.path = path
        self.inject = inject
        # Kept out of _modules (not a child: it must not run or be hooked), but reachable, because
        # glue code may read its attributes (transformers ViT reads patch_embeddings' weight dtype).
        self.__dict__["original"] = original

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["original"], name)

    def forward(self, *args, **kwargs):
        if self.inject.fired:
            raise RuntimeError(f"module {self.path!r} is registered before the tap but ran after it; "
                               "its model does not execute its children in registration order, so "
                               "StitchedModel cannot skip B's early layers by path")
        return self.inject.value


def _plan(model: nn.Module, path: str, inject: _Inject):
    """(swaps, bypasses) for a tap at ``path``: (parent, name, stand-in) of every module registered
    before the tap along its path and of the tap itself; (module, method) of the glue to bypass."""
    swaps, bypasses = [], []
    parent, prefix = model, []
    parts = path.split(".")
    for depth, part in enumerate(parts):
        order = list(parent._modules)
        for cls in type(parent).__mro__:
            for method, follows in FAMILY_BYPASS.get(cls.__name__, ()):
                if follows in order and order.index(follows) < order.index(part):
                    bypasses.append((parent, method))
        for name in order[:order.index(part)]:
            if parent._modules[name] is not None:
                swaps.append((parent, name, _Skipped(".".join(prefix + [name]), parent._modules[name], inject)))
        if depth == len(parts) - 1:
            swaps.append((parent, part, inject))
        prefix.append(part)
        parent = parent._modules[part]
    return swaps, bypasses


@contextlib.contextmanager
def run_from(model: nn.Module, path: str, activation: torch.Tensor):
    """While active, calling ``model`` skips everything before ``path`` and injects ``activation``
    there. ``path`` must name an existing submodule (tcfa.get_module checks it)."""
    inject = _Inject(activation)
    swaps, bypasses = _plan(model, path, inject)
    originals = [(parent, name, parent._modules[name]) for parent, name, _ in swaps]
    try:
        for parent, name, stub in swaps:
            parent._modules[name] = stub
        for m, method in bypasses:
            setattr(m, method, _identity)  # an instance attribute shadows the class's method
        yield inject
    finally:
        for parent, name, original in originals:
            parent._modules[name] = original
        for m, method in bypasses:
            m.__dict__.pop(method, None)


def _identity(x, *args, **kwargs):
    return x
