"""Resumable streaming: a long pass over batches that survives a crash.

A streaming entry point (stream_moments, extract and through it TCFA.fit_models and `tcfa align`,
layer_map) given ``checkpoint=PATH, checkpoint_every=N`` writes its state every N batches: the
accumulated tensors, the number of batches consumed and the run's configuration, as one durable
artifact (tcfa.artifacts: safetensors, per-tensor sha256, atomic rename). Rerunning the same call
finds the file, checks that it was written by the same configuration (models' tap paths, mode,
batch size, data length, a hash of the first batch, ...), restores the state and skips the batches
already consumed: the result equals an uninterrupted run's, bitwise, when the loader yields the
same batches in the same order.

Two generations are kept, PATH and PATH.prev (the one before): a checkpoint that fails its checks
(a torn or altered file) is reported and the previous one is used, so at most N batches are redone.
A checkpoint written by a different configuration is refused with a ValueError naming what
differs; it is never mixed in. The final state is written too, so rerunning a finished call
returns at once with the same result; delete the file to start over.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from typing import Callable, Iterable, Iterator

import torch

from .. import artifacts

KIND = "tcfa.stream-checkpoint"
_POSITION = "__batches_done__"


def batch_fingerprint(inputs) -> str:
    """sha256 of a batch's tensors (a data-identity check: another dataset gives another first batch)."""
    h = hashlib.sha256()
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [v for _, v in sorted(inputs.items())
                                                                  if isinstance(v, torch.Tensor)]
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensors_of(state: dict) -> dict[str, torch.Tensor]:
    """The tensor entries of a state_dict (what a checkpoint stores; the rest is configuration)."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def state_fingerprint(state: dict) -> str:
    """sha256 of a state_dict's tensors: an accumulator that starts with other content is another run."""
    return artifacts.content_sha256({k: v.detach().cpu() for k, v in tensors_of(state).items()})


def model_fingerprint(model) -> str:
    """sha256 of a model's class and state_dict tensors: a checkpoint written with other weights (the
    same architecture included) holds another model's activations. Computed only when checkpointing."""
    return f"{type(model).__name__}:{state_fingerprint(model.state_dict())}"


def data_length(data) -> int | None:
    """The number of samples (Tensor / dict) or batches (a loader with len()), None when unknown."""
    if isinstance(data, torch.Tensor):
        return int(data.shape[0])
    if isinstance(data, dict):
        return next((int(v.shape[0]) for v in data.values() if isinstance(v, torch.Tensor)), None)
    try:
        return len(data)
    except TypeError:
        return None


class Checkpoint:
    """Where one streaming call saves and resumes its state; see the module docstring."""

    def __init__(self, path, every: int, config: dict):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(path).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive int (batches), got {every!r}")
        self.path = os.fspath(path)
        self.previous = self.path + ".prev"
        self.every = every
        self.config = _jsonable(config)

    @classmethod
    def optional(cls, path, every, make_config: Callable[[], dict]) -> "Checkpoint | None":
        """None when ``path`` is None (no checkpointing), else a Checkpoint. The configuration is
        built only then: it hashes the first batch (and an accumulator's whole starting state)."""
        return None if path is None else cls(path, every, make_config())

    def load(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """(state tensors, batches done) of the newest sound checkpoint of this configuration, or None."""
        for candidate in (self.path, self.previous):
            if not os.path.exists(candidate):
                continue
            try:
                art = artifacts.load(candidate, kind=KIND)
            except ValueError as err:  # torn, truncated or altered: fall back to the generation before
                warnings.warn(f"checkpoint {candidate} is unreadable ({err}); trying the previous one", stacklevel=3)
                continue
            self._check_config(candidate, art.config)
            tensors = dict(art.tensors)
            return tensors, int(tensors.pop(_POSITION))
        return None

    def _check_config(self, path: str, theirs: dict) -> None:
        for key in sorted(set(self.config) | set(theirs), key=lambda k: (k != "call", k)):  # the entry point first
            if self.config.get(key) != theirs.get(key):
                raise ValueError(f"checkpoint {path} was written by a different run: {key} was "
                                 f"{theirs.get(key)!r}, this call has {self.config.get(key)!r}. Pass another "
                                 "checkpoint path, or delete the file to start over")

    def save(self, state: dict[str, torch.Tensor], batches_done: int) -> None:
        """Writes the state atomically, keeping the current file as PATH.prev."""
        if os.path.exists(self.path):
            os.replace(self.path, self.previous)
        tensors = {**state, _POSITION: torch.tensor(batches_done, dtype=torch.int64)}
        artifacts.save(self.path, tensors, kind=KIND, config=self.config)


def run(batches: Iterable, step: Callable, checkpoint: Checkpoint | None, get_state: Callable[[], dict],
        set_state: Callable[[dict], None], stop: Callable[[], bool] = lambda: False) -> int:
    """Calls ``step(batch)`` on every batch until ``stop()``, resuming from and writing to ``checkpoint``.

    get_state() -> {name: tensor} is what a checkpoint holds; set_state(tensors) restores it.
    Batches already consumed by a resumed run are drawn from the iterator and dropped (the loader
    runs, the models do not). Returns the number of batches consumed in all.
    """
    done = 0
    if checkpoint is not None and (found := checkpoint.load()) is not None:
        state, done = found
        set_state(state)
    count = done
    if not stop():
        for batch in _skip(batches, done):
            step(batch)
            count += 1
            if checkpoint is not None and count % checkpoint.every == 0:
                checkpoint.save(get_state(), count)
            if stop():
                break
    if checkpoint is not None and count % checkpoint.every:
        checkpoint.save(get_state(), count)
    return count


def peek(iterable):
    """(first item or None, an iterator that still yields it): the first batch, for batch_fingerprint."""
    iterator = iter(iterable)
    first = next(iterator, None)
    return first, iterator if first is None else itertools.chain([first], iterator)


def _skip(batches: Iterable, n: int) -> Iterator:
    it = iter(batches)
    for i in range(n):
        if next(it, _END) is _END:
            raise ValueError(f"the checkpoint records {n} batches done but the data now holds only {i}")
    yield from it


_END = object()


def _jsonable(config: dict) -> dict:
    """The configuration as JSON values (tuples become lists), so a saved one compares equal."""
    return json.loads(json.dumps(config, default=str))
