"""Durable artifacts: fitted maps and stitches as safetensors + a verified JSON header.

A file is a plain safetensors file (any safetensors reader opens it) whose
``__metadata__["tcfa"]`` holds a JSON header:

    format        "tcfa.artifact/1"
    kind          what the tensors are: "GatedMultiStitch", "LowRankMaps", "tensors"
    tcfa_version, method, layers, conditions, config   (provenance; free-form)
    shapes        {name: [sizes]},  dtypes {name: "float32", ...}
    sha256        {name: hex} per tensor, and content_sha256 over all of them

The content hash is sha256 over every tensor in sorted-name order, each as
name, dtype, shape and raw bytes, so a renamed, reshaped, retyped or altered
tensor changes it. Per-tensor hashes are kept too so that a failed check can
say *which* tensor does not match.

Writes are atomic: the bytes go to a temp file in the destination's directory
(same file system, so the rename is atomic), are fsync'ed, then os.replace()
puts them in place. A crash at any point leaves either the old file or the
new one, never a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FORMAT = "tcfa.artifact/1"
_KEY = "tcfa"  # the __metadata__ entry holding the JSON header


@dataclass
class Artifact:
    """What :func:`load` returns: the tensors and the header they were saved with."""

    tensors: dict[str, torch.Tensor]
    header: dict = field(default_factory=dict)
    path: str = ""

    def check_shapes(self, shapes: dict) -> None:
        """Raises ValueError naming the first tensor whose shape is not ``shapes[name]``."""
        _check_shapes(self.path, self.tensors, self.header, shapes)

    @property
    def config(self) -> dict:
        return self.header.get("config") or {}

    def build(self, cls, **kwargs):
        """cls(**config, **kwargs): the module the header's config describes, or a ValueError naming
        the file when the config does not build one (an unknown key, a bad value)."""
        try:
            return cls(**self.config, **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: the header's config {self.config} does not build a {cls.__name__}: "
                             f"{err}") from err


# ------------------------------------------------------------------ hashing
def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, as safetensors stores them (no copy when contiguous)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def tensor_sha256(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
    h.update(_bytes(t))
    return h.hexdigest()


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in sorted-name order (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensor_sha256(name, tensors[name]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ write
def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], *, kind: str = "tensors",
         method: str | None = None, layers=None, conditions=None, config: dict | None = None,
         extra_metadata: dict[str, str] | None = None) -> dict:
    """Atomically writes ``tensors`` with a verified header; returns the header.

    ``layers`` (e.g. ``{"a": "blocks.3", "b": "layer2"}``), ``conditions`` (their
    names, in index order), ``method`` and ``config`` must be JSON-serialisable.
    ``extra_metadata`` adds plain string entries beside the header (for readers
    that predate it).
    """
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("tensors must be a non-empty dict of name -> torch.Tensor")
    prepared, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (views of one parameter, overlapping or not,
        # from any offset): every tensor after the first on a storage is written from a copy.
        key = t.untyped_storage().data_ptr()
        prepared[name] = t.clone() if key in seen and t.numel() else t
        seen.add(key)
    from ._version import __version__

    header = {
        "format": FORMAT, "kind": kind, "tcfa_version": __version__, "method": method,
        "layers": layers, "conditions": list(conditions) if conditions is not None else None,
        "config": config or {},
        "shapes": {n: list(t.shape) for n, t in sorted(prepared.items())},
        "dtypes": {n: str(t.dtype).removeprefix("torch.") for n, t in sorted(prepared.items())},
        "sha256": {n: tensor_sha256(n, t) for n, t in sorted(prepared.items())},
        "content_sha256": content_sha256(prepared),
    }
    metadata = {**(extra_metadata or {}), _KEY: json.dumps(header, sort_keys=True)}
    _atomic_save(os.fspath(path), prepared, metadata)
    return header


def _safetensors():
    """safetensors is imported on first use: `import tcfa` does not need it (pyproject lists
    only torch and numpy); saving and loading artifacts does."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as err:
        raise ImportError("tcfa artifacts need safetensors: pip install safetensors") from err
    return safetensors


def _umask() -> int:
    """The process's umask, read without setting it where the OS shows it (setting it, even to put it
    back, changes the mode of files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _atomic_save(path: str, tensors: dict, metadata: dict) -> None:
    save_file = _safetensors().torch.save_file
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_atomically(path, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it over ``path``: a
    crash or error mid-write leaves the previous file (and no temporary one). Every output file of
    tcfa (artifacts, figures, JSON) goes through here."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # writers close without fsync: data may sit in the page cache
            os.fsync(fh.fileno())
        # mkstemp's file is 0600: give the result the mode a plain open() would (the umask's), or the
        # mode of the file it replaces, so that others who could read the old one still can (after the
        # fsync: a read-only mode would refuse the rb+ open)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable once the directory entry is on disk; not every
    # platform lets a directory be opened for fsync, and the data is safe either way.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_text_atomically(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    write_atomically(path, write)


def save_figure(fig, path, **kwargs) -> str:
    """fig.savefig through write_atomically, the format taken from ``path``'s extension."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
    return os.fspath(path)


# ------------------------------------------------------------------ read
def load(path: str | os.PathLike, *, kind: str | None = None, shapes: dict | None = None,
         device="cpu") -> Artifact:
    """Reads an artifact, verifying its hashes, its shapes and (optionally) its kind.

    ``shapes`` maps tensor names to the shapes the caller needs (e.g. derived
    from a config). Every mismatch raises ValueError naming the tensor, what
    was expected and what the file holds.
    """
    path = os.fspath(path)
    st = _safetensors()
    try:
        with st.safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (st.SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if _KEY not in meta:
        raise ValueError(f"{path} has no tcfa header (not written by tcfa.artifacts.save)")
    try:
        header = json.loads(meta[_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the tcfa header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the tcfa header must be a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: header format must be {FORMAT!r}, got {header.get('format')!r}")
    if kind is not None and header.get("kind") != kind:
        raise ValueError(f"{path} holds a {header.get('kind')!r} artifact, expected {kind!r}")
    _verify(path, tensors, header, shapes or {})
    if str(device) != "cpu":
        tensors = {n: t.to(device) for n, t in tensors.items()}
    return Artifact(tensors, header, path)


def _verify(path: str, tensors: dict, header: dict, wanted: dict) -> None:
    _check_shapes(path, tensors, header, wanted)
    for name in sorted(tensors):
        if tensor_sha256(name, tensors[name]) != header.get("sha256", {}).get(name):
            raise ValueError(f"{path}: tensor {name!r} does not match its sha256 in the header "
                             f"(corrupted or altered after saving)")
    if content_sha256(tensors) != header.get("content_sha256"):
        raise ValueError(f"{path}: content hash {content_sha256(tensors)[:12]}... does not match the "
                         f"header's {str(header.get('content_sha256'))[:12]}...")


def _check_shapes(path: str, tensors: dict, header: dict, wanted: dict) -> None:
    """Names, shapes and dtypes against the header and against what the caller needs."""
    names, listed = set(tensors), set(header.get("shapes", {}))
    if names != listed:
        raise ValueError(f"{path}: tensors {sorted(names)} do not match the header's {sorted(listed)} "
                         f"(missing {sorted(listed - names)}, unexpected {sorted(names - listed)})")
    for name in sorted(wanted):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing (expected shape {tuple(wanted[name])})")
    for name in sorted(tensors):
        got = tuple(tensors[name].shape)
        for source, expected in (("header", header["shapes"][name]), ("caller", wanted.get(name))):
            if expected is not None and tuple(expected) != got:
                raise ValueError(f"{path}: tensor {name!r} has shape {got}, the {source} expects {tuple(expected)}")
        dtype = str(tensors[name].dtype).removeprefix("torch.")
        if header.get("dtypes", {}).get(name, dtype) != dtype:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, the header says {header['dtypes'][name]}")


# ------------------------------------------------------------------ typed helpers
def save_maps(path, maps, *, method=None, layers=None, conditions=None, config=None) -> dict:
    """Saves a :class:`tcfa.LowRankMaps` (U, V, mu_x, mu_y)."""
    from .maps import LowRankMaps

    if not isinstance(maps, LowRankMaps):
        raise TypeError(f"maps must be a tcfa.LowRankMaps, got {type(maps).__name__}")
    tensors = {"U": maps.U, "V": maps.V, "mu_x": maps.mu_x, "mu_y": maps.mu_y}
    return save(path, tensors, kind="LowRankMaps", method=method, layers=layers, conditions=conditions,
                config=config)


def load_maps(path, device="cpu"):
    """The :class:`tcfa.LowRankMaps` saved by :func:`save_maps`, shapes checked against each other."""
    from .maps import LowRankMaps

    art = load(path, kind="LowRankMaps")
    names = ("U", "V", "mu_x", "mu_y")
    missing = [n for n in names if n not in art.tensors]
    if missing:
        raise ValueError(f"{art.path} lacks the LowRankMaps tensor(s) {missing}")
    shapes = art.header["shapes"]
    if len(shapes["U"]) != 3 or len(shapes["V"]) != 3:
        raise ValueError(f"{art.path}: U and V must be 3-D, (C, dx, r) and (C, r, dy), got shapes {shapes['U']} "
                         f"and {shapes['V']}")
    dtypes = {n: art.tensors[n].dtype for n in names}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{art.path}: U, V, mu_x and mu_y must share one dtype, got {dtypes}")
    C, dx, r = shapes["U"]
    dy = shapes["V"][2]
    art.check_shapes({"V": (C, r, dy), "mu_x": (C, dx), "mu_y": (C, dy)})
    t = {n: v.to(device) for n, v in art.tensors.items()}
    return LowRankMaps(t["U"], t["V"], t["mu_x"], t["mu_y"])
