"""tcfa.artifacts: round trips, corruption and shape mismatches named, atomic writes."""
import json
import os
import struct

import pytest
import torch

import tcfa
from tcfa import artifacts

safetensors = pytest.importorskip("safetensors.torch")


def random_maps(C=3, dx=5, r=2, dy=4, dtype=torch.float64):
    return tcfa.LowRankMaps(torch.randn(C, dx, r, dtype=dtype), torch.randn(C, r, dy, dtype=dtype),
                            torch.randn(C, dx, dtype=dtype), torch.randn(C, dy, dtype=dtype))


def header_of(path):
    """The raw safetensors header: u64 length, then JSON (read without tcfa)."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return n, json.loads(fh.read(n))


def rewrite(path, tensors, metadata):
    """Writes a safetensors file directly, bypassing tcfa (to forge bad artifacts)."""
    safetensors.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def test_stitch_round_trip_with_provenance(tmp_path):
    s = tcfa.GatedMultiStitch.from_maps(random_maps(), top_k=2, temperature=0.5)
    path = str(tmp_path / "s.safetensors")
    s.save(path, method="cca", layers={"a": "blocks.3", "b": "layer2"}, conditions=["cat", "dog", "car"])
    t = tcfa.GatedMultiStitch.load(path)
    assert t.config() == s.config()
    for name in ("gate_weight", "gate_bias", "U", "V", "mu_x", "mu_y"):
        assert torch.equal(getattr(t, name), getattr(s, name)) and getattr(t, name).dtype == torch.float64
    head = artifacts.load(path).header
    assert head["kind"] == "GatedMultiStitch" and head["method"] == "cca"
    assert head["layers"] == {"a": "blocks.3", "b": "layer2"} and head["conditions"] == ["cat", "dog", "car"]
    assert head["tcfa_version"] == tcfa.__version__ and head["shapes"]["U"] == [3, 5, 2]
    assert head["content_sha256"] == artifacts.content_sha256({n: getattr(s, n).detach() for n in head["shapes"]})


def test_maps_and_tensor_dict_round_trip(tmp_path):
    maps = random_maps(dtype=torch.float32)
    artifacts.save_maps(tmp_path / "m.safetensors", maps, method="ridge")
    back = artifacts.load_maps(tmp_path / "m.safetensors")
    for name in ("U", "V", "mu_x", "mu_y"):
        assert torch.equal(getattr(back, name), getattr(maps, name))
    d = {"w": torch.arange(6.0).reshape(2, 3), "idx": torch.tensor([3, 1], dtype=torch.int64),
         "half": torch.randn(4).to(torch.bfloat16), "scalar": torch.tensor(2.5)}
    artifacts.save(tmp_path / "d.safetensors", d)
    got = artifacts.load(tmp_path / "d.safetensors").tensors
    assert set(got) == set(d) and all(torch.equal(got[k], d[k]) and got[k].dtype == d[k].dtype for k in d)


def test_hash_covers_name_shape_dtype_and_bytes():
    base = {"a": torch.arange(6.0), "b": torch.ones(2)}
    h = artifacts.content_sha256(base)
    assert h == artifacts.content_sha256(dict(reversed(base.items())))  # order-free: sorted names
    for changed in ({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)},
                    {"a": torch.arange(6.0).double(), "b": torch.ones(2)},
                    {"c": torch.arange(6.0), "b": torch.ones(2)},
                    {"a": torch.arange(6.0) + torch.tensor([0, 0, 0, 0, 0, 1e-6]), "b": torch.ones(2)}):
        assert artifacts.content_sha256(changed) != h


def test_corrupted_byte_is_detected_and_named(tmp_path):
    s = tcfa.GatedMultiStitch(4, 3, 2, 2)
    path = str(tmp_path / "s.safetensors")
    s.save(path)
    n, head = header_of(path)
    start, _ = head["mu_y"]["data_offsets"]  # flip one byte inside mu_y's data
    with open(path, "r+b") as fh:
        fh.seek(8 + n + start + 1)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ValueError, match="tensor 'mu_y' does not match its sha256"):
        tcfa.GatedMultiStitch.load(path)


def test_truncated_or_foreign_files_are_value_errors(tmp_path):
    path = str(tmp_path / "s.safetensors")
    tcfa.GatedMultiStitch(4, 3, 2, 2).save(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        artifacts.load(path)
    rewrite(path, {"x": torch.zeros(2)}, {"other": "tool"})
    with pytest.raises(ValueError, match="no tcfa header"):
        tcfa.GatedMultiStitch.load(path)
    artifacts.save(path, {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="holds a 'tensors' artifact, expected 'GatedMultiStitch'"):
        tcfa.GatedMultiStitch.load(path)


def test_shape_mismatch_is_named(tmp_path):
    # A header whose config promises rank 2 while U and V were saved with rank 3:
    # every hash is consistent, only the shapes the config implies disagree.
    s = tcfa.GatedMultiStitch(4, 3, 2, 3)
    path = str(tmp_path / "s.safetensors")
    tensors = {n: getattr(s, n).detach() for n in ("gate_weight", "gate_bias", "U", "V", "mu_x", "mu_y")}
    artifacts.save(path, tensors, kind="GatedMultiStitch", config={**s.config(), "rank": 2})
    with pytest.raises(ValueError, match=r"tensor 'U' has shape \(2, 4, 3\), the caller expects \(2, 4, 2\)"):
        tcfa.GatedMultiStitch.load(path)
    maps = random_maps(C=3, dx=5, r=2, dy=4)
    artifacts.save(path, {"U": maps.U, "V": maps.V, "mu_x": maps.mu_x[:2], "mu_y": maps.mu_y}, kind="LowRankMaps")
    with pytest.raises(ValueError, match=r"tensor 'mu_x' has shape \(2, 5\), the caller expects \(3, 5\)"):
        artifacts.load_maps(path)


def test_header_lying_about_a_shape_is_named(tmp_path):
    path = str(tmp_path / "d.safetensors")
    head = artifacts.save(path, {"w": torch.zeros(2, 3)})
    forged = {**head, "shapes": {"w": [3, 2]}}
    rewrite(path, {"w": torch.zeros(2, 3)}, {"tcfa": json.dumps(forged)})
    with pytest.raises(ValueError, match=r"tensor 'w' has shape \(2, 3\), the header expects \(3, 2\)"):
        artifacts.load(path)
    rewrite(path, {"w": torch.zeros(2, 3), "extra": torch.zeros(1)}, {"tcfa": json.dumps(head)})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        artifacts.load(path)


def test_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "s.safetensors")
    old = tcfa.GatedMultiStitch(4, 3, 2, 2)
    old.save(path)
    before = open(path, "rb").read()
    real_save = safetensors.save_file
    crashed_in = []

    def crash(tensors, target, metadata=None):
        real_save(tensors, target, metadata=metadata)
        with open(target, "r+b") as fh:  # half written, then the process "dies"
            fh.truncate(os.path.getsize(target) // 2)
        crashed_in.append(target)
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(safetensors, "save_file", crash)
    with pytest.raises(OSError, match="simulated crash"):
        tcfa.GatedMultiStitch(4, 3, 2, 2).save(path)
    # The torn bytes went to a temp file beside the target, never to the target.
    assert os.path.dirname(crashed_in[0]) == str(tmp_path) and crashed_in[0] != path
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["s.safetensors"]  # the temp file was removed
    t = tcfa.GatedMultiStitch.load(path)
    assert torch.equal(t.U, old.U)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-empty dict"):
        artifacts.save(tmp_path / "x", {})
    with pytest.raises(TypeError, match=r"tensors\['a'\] must be a torch.Tensor"):
        artifacts.save(tmp_path / "x", {"a": [1.0]})
    with pytest.raises(TypeError, match="maps must be a tcfa.LowRankMaps"):
        artifacts.save_maps(tmp_path / "x", {"U": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        artifacts.load(tmp_path / "missing")


def test_views_of_one_storage_at_any_offset_round_trip(tmp_path):
    w = torch.randn(3, 4)
    tensors = {"w": w, "tail": w[1:], "row": w[2], "col": w[:, 1]}
    artifacts.save(tmp_path / "v.safetensors", tensors)
    got = artifacts.load(tmp_path / "v.safetensors").tensors
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


def test_saved_file_mode_follows_the_umask_or_the_replaced_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.safetensors"
        artifacts.save(path, {"x": torch.zeros(2)})
        assert os.stat(path).st_mode & 0o777 == 0o644  # what open() would give, not mkstemp's 0600
        os.chmod(path, 0o640)
        artifacts.save(path, {"x": torch.ones(2)})
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_malformed_headers_and_maps_are_value_errors_naming_the_file(tmp_path):
    path = str(tmp_path / "h.safetensors")
    rewrite(path, {"x": torch.zeros(2)}, {"tcfa": "[1, 2]"})
    with pytest.raises(ValueError, match="the tcfa header must be a JSON object, got list"):
        artifacts.load(path)
    maps = random_maps()
    artifacts.save(path, {"V": maps.V, "mu_x": maps.mu_x, "mu_y": maps.mu_y}, kind="LowRankMaps")
    with pytest.raises(ValueError, match=r"lacks the LowRankMaps tensor\(s\) \['U'\]"):
        artifacts.load_maps(path)
    artifacts.save(path, {"U": maps.U[0], "V": maps.V, "mu_x": maps.mu_x, "mu_y": maps.mu_y}, kind="LowRankMaps")
    with pytest.raises(ValueError, match="U and V must be 3-D"):
        artifacts.load_maps(path)
    artifacts.save(path, {"U": maps.U.float(), "V": maps.V, "mu_x": maps.mu_x, "mu_y": maps.mu_y}, kind="LowRankMaps")
    with pytest.raises(ValueError, match="must share one dtype"):
        artifacts.load_maps(path)
    s = tcfa.GatedMultiStitch(4, 3, 2, 2)
    s.save(path)
    tensors = artifacts.load(path).tensors
    header = json.loads(safetensors.safe_open(path, "pt").metadata()["tcfa"])
    header["config"]["colour"] = "red"
    rewrite(path, tensors, {"tcfa": json.dumps(header)})
    with pytest.raises(ValueError, match="does not build a GatedMultiStitch"):
        tcfa.GatedMultiStitch.load(path)


def test_failed_figure_or_text_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "out.png"
    path.write_bytes(b"previous")

    class Broken:
        def savefig(self, target, **kwargs):
            with open(target, "wb") as fh:
                fh.write(b"half a png")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        artifacts.save_figure(Broken(), path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.png"]
    artifacts.write_text_atomically(tmp_path / "r.json", "{}")
    assert (tmp_path / "r.json").read_text() == "{}"
