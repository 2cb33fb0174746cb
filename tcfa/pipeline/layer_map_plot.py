"""LayerMap.plot: the map as a heatmap PNG, its path drawn on it, one small multiple per condition."""
from __future__ import annotations

import math
import os


def _short(name: str) -> str:
    return name if len(name) <= 18 else "..." + name[-15:]


def _panel(ax, scores, lm, title, steps, labels: bool):
    import numpy as np

    data = scores.double().numpy()
    cmap = "viridis" if lm.larger_is_better else "viridis_r"
    image = ax.imshow(data, cmap=cmap, origin="lower", aspect="auto", interpolation="nearest")
    if steps:
        ax.plot([j for _, j in steps], [i for i, _ in steps], "o-", color="white", lw=1.5, ms=4, mec="black")
    ax.set_title(title, fontsize=9)
    if labels:
        ax.set_xticks(np.arange(len(lm.layers_b)), [_short(b) for b in lm.layers_b], rotation=90, fontsize=7)
        ax.set_yticks(np.arange(len(lm.layers_a)), [_short(a) for a in lm.layers_a], fontsize=7)
        ax.set_xlabel("layer of B")
        ax.set_ylabel("layer of A")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def plot_layer_map(lm, file: str, path: bool = True) -> str:
    """Writes ``file`` (PNG): the overall map large, each condition's map small beside it. Draws on
    its own Agg canvas: the caller's pyplot backend and figures are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..correspondence import monotone_path
    from ..artifacts import save_figure

    if not isinstance(file, (str, os.PathLike)):
        raise TypeError(f"file must be a path, got {type(file).__name__}")
    steps = monotone_path(lm.scores, lm.larger_is_better) if path and bool(lm.scores.isfinite().all()) else None
    per = lm.scores_per_condition
    conds = 0 if per is None else per.shape[0]
    cols = math.ceil(math.sqrt(conds)) if conds else 0
    rows = math.ceil(conds / cols) if conds else 1
    fig = Figure(figsize=(5.5 + 1.6 * cols, max(4.5, 1.6 * rows)), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, 2 + cols, width_ratios=[3.2, 0.15] + [1.0] * cols)
    main = fig.add_subplot(grid[:, 0])
    image = _panel(main, lm.scores, lm, f"{lm.metric}, all samples", steps, labels=True)
    fig.colorbar(image, cax=fig.add_subplot(grid[:, 1]))
    for c in range(conds):
        ax = fig.add_subplot(grid[c // cols, 2 + c % cols])
        finite = bool(per[c].isfinite().all())
        cond_steps = monotone_path(per[c], lm.larger_is_better) if path and finite else None
        _panel(ax, per[c], lm, f"condition {c}", cond_steps, labels=False)
    fig.tight_layout()
    return save_figure(fig, file)
