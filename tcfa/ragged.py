"""The ragged convention of every op (docs/architecture.md, "Ragged batches"), in one place.

A batch of B problems is flat rows (N, d) plus int64 offsets (B+1,): problem k owns rows
[offsets[k], offsets[k+1]). A dense (B, n, d) batch is the case of equal sizes and is
viewed as ragged without a copy. A kernel covers the whole batch with one launch: a
block table lists every row block of every problem, and program p works on row p of it.

Nothing here checks its arguments: user input is checked once, by tcfa/ops/_validate.py
(``ragged``, ``offsets``, ``weights``), before it becomes a :class:`Ragged`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ragged:
    """Flat rows + offsets, the view of either a dense (B, n, d) batch or (N, d) rows."""

    rows: torch.Tensor  # (N, d)
    offsets: torch.Tensor  # (B+1,) int64
    batch_shape: tuple | None = None  # (B, n) when the input was dense

    @classmethod
    def from_dense(cls, t: torch.Tensor) -> "Ragged":
        """(B, n, d) as B problems of n rows each; the rows are a view of t."""
        B, n, d = t.shape
        return cls(t.reshape(B * n, d), torch.arange(B + 1, dtype=torch.int64, device=t.device) * n, (B, n))

    @classmethod
    def single(cls, t: torch.Tensor) -> "Ragged":
        """(N, d) rows as one problem."""
        return cls(t, torch.tensor([0, t.shape[0]], dtype=torch.int64, device=t.device))

    @property
    def sizes(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_problems(self) -> int:
        return self.offsets.numel() - 1

    def problem_index(self) -> torch.Tensor:
        """(N,) problem id of every row."""
        return torch.repeat_interleave(torch.arange(self.num_problems, device=self.rows.device), self.sizes)

    def unflatten(self, t: torch.Tensor) -> torch.Tensor:
        """Per-row output (N, ...) back to (B, n, ...) for dense input."""
        return t if self.batch_shape is None else t.reshape(*self.batch_shape, *t.shape[1:])


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, d) rows of (N, d) rows or of a dense (B, n, d) batch (a view)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def offsets_from_sizes(sizes: torch.Tensor) -> torch.Tensor:
    """(B+1,) int64 offsets of consecutive problems of the given (B,) sizes."""
    return torch.cat([sizes.new_zeros(1, dtype=torch.int64), sizes.to(torch.int64).cumsum(0)])


def sort_by_labels(labels: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): rows[order] groups the rows by label (stably), label k being problem k of offsets."""
    order = torch.sort(labels, stable=True).indices
    return order, offsets_from_sizes(torch.bincount(labels, minlength=num))


def block_table(offsets: torch.Tensor, block: int, active: torch.Tensor | None, device) -> torch.Tensor:
    """(T, 2) int64 rows (problem k, first row) of every ``block``-row block of every active problem.

    Built with vectorised ops on CPU offsets, then one small copy to the device. Empty
    and inactive problems contribute no blocks, so their rows are never touched (the
    launchers pre-fill outputs with what those rows return).
    """
    sizes = offsets[1:] - offsets[:-1]
    num_blocks = (sizes + block - 1) // block
    if active is not None:
        num_blocks = num_blocks * active.to(torch.int64)
    problem = torch.repeat_interleave(torch.arange(sizes.numel()), num_blocks)
    first_block = torch.cumsum(num_blocks, 0) - num_blocks  # of each problem
    local = torch.arange(problem.numel()) - first_block[problem]
    first_row = offsets[problem] + local * block
    return torch.stack([problem, first_row], dim=1).to(device)


def block_offsets(x_offsets: torch.Tensor, y_offsets: torch.Tensor) -> torch.Tensor:
    """(B+1,) int64 start of every problem's row-major n_k x m_k block in a flat cost."""
    return offsets_from_sizes((x_offsets[1:] - x_offsets[:-1]) * (y_offsets[1:] - y_offsets[:-1]))
