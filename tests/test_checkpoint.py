"""Resumable streaming (tcfa.pipeline.checkpoint): killed, resumed, equal; torn files; foreign checkpoints.

Also the plain-MLP taps: (N, D) activations are rows, as they are, in every tap-based entry point.
"""
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

import tcfa
from checkpoint_job import models_and_data, run

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRIES = ["stream_moments", "fit_models", "layer_map", "layer_map_minibatch"]


def killed_run(entry, path, kill_at):
    """The job in a fresh process, SIGKILLed by its own model at forward number kill_at."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "checkpoint_job.py"), entry, path, str(kill_at)],
                          cwd=HERE, capture_output=True, text=True)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])


def assert_bitwise(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert (got[k] is None) == (want[k] is None), k
        if want[k] is not None:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("entry", ENTRIES)
def test_killed_run_resumes_to_the_uninterrupted_result(entry, tmp_path):
    kill_at = random.Random(entry).randint(3, 12)  # 15 batches; checkpoints every 2
    path = str(tmp_path / "run.ckpt")
    killed_run(entry, path, kill_at)
    assert os.path.exists(path)
    assert_bitwise(run(entry, path), run(entry))


def test_torn_checkpoint_falls_back_to_the_previous_one(tmp_path):
    path = str(tmp_path / "run.ckpt")
    killed_run("stream_moments", path, 9)
    with open(path, "r+b") as fh:  # a write torn half-way: the tail of the file is gone
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.warns(UserWarning, match="unreadable"):
        resumed = run("stream_moments", path)
    assert_bitwise(resumed, run("stream_moments"))


def test_altered_checkpoint_is_detected(tmp_path):
    path = str(tmp_path / "run.ckpt")
    killed_run("stream_moments", path, 9)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x40  # one bit of the last tensor's bytes
    open(path, "wb").write(bytes(data))
    with pytest.warns(UserWarning, match="sha256"):
        assert_bitwise(run("stream_moments", path), run("stream_moments"))


def test_foreign_checkpoint_is_refused_by_name(tmp_path):
    path = str(tmp_path / "run.ckpt")
    run("stream_moments", path)
    with pytest.raises(ValueError, match="batch_size was 16, this call has 8"):
        run("stream_moments", path, batch_size=8)
    x = models_and_data()[2]
    with pytest.raises(ValueError, match="data_length was 230, this call has 229"):
        run("stream_moments", path, data=x[:229])
    with pytest.raises(ValueError, match="first_batch was"):
        run("stream_moments", path, data=x + 1)
    with pytest.raises(ValueError, match="call was 'stream_moments', this call has 'layer_map'"):
        run("layer_map", path)


def test_checkpoint_of_other_weights_is_refused(tmp_path):
    # same architecture, other weights: resuming would return the first model's activations
    a, b, x, _ = models_and_data()
    path = str(tmp_path / "x.ckpt")
    first = tcfa.extract(a, "2", x, batch_size=16, checkpoint=path, checkpoint_every=1)
    other = models_and_data(seed=5)[0]
    with pytest.raises(ValueError, match="models was"):
        tcfa.extract(other, "2", x, batch_size=16, checkpoint=path, checkpoint_every=1)
    assert torch.equal(tcfa.extract(a, "2", x, batch_size=16, checkpoint=path), first)
    path = str(tmp_path / "m.ckpt")
    run("stream_moments", path)
    with pytest.raises(ValueError, match="models was"):
        tcfa.stream_moments(other, "2", b, "2", x, torch.arange(230) % 3,
                            tcfa.MomentAccumulator(3, 7, 8, dtype=torch.float64), batch_size=16, checkpoint=path,
                            checkpoint_every=2)


def test_fit_models_pairs_rows_of_a_shuffling_loader():
    # both models tap each batch as it comes: a shuffled order fits the same (order-free) ridge maps
    a, b, x, _ = models_and_data()
    want = tcfa.TCFA("ridge", rank=3).fit_models(a, "2", b, "2", x, None, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    got = tcfa.TCFA("ridge", rank=3).fit_models(a, "2", b, "2", loader, None, progress=False)
    for name in ("U", "V", "mu_x", "mu_y"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-10, rtol=0)
    one_shot = tcfa.TCFA("ridge", rank=3).fit_models(a, "2", b, "2", iter(x.split(40)), None, progress=False)
    torch.testing.assert_close(one_shot.U, want.U, atol=1e-10, rtol=0)


def test_finished_run_resumes_without_running_the_models(tmp_path):
    path = str(tmp_path / "run.ckpt")
    first = run("stream_moments", path)
    a, b, x, labels = models_and_data()
    a.register_forward_pre_hook(lambda *args: pytest.fail("model A ran"))
    acc = tcfa.stream_moments(a, "2", b, "2", x, labels, tcfa.MomentAccumulator(3, 7, 8, dtype=torch.float64),
                              checkpoint=path, checkpoint_every=2, batch_size=16)
    assert_bitwise({k: v for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)}, first)


def test_bad_checkpoint_arguments_are_named(tmp_path):
    a, b, x, labels = models_and_data()
    acc = tcfa.MomentAccumulator(3, 7, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        tcfa.stream_moments(a, "2", b, "2", x, labels, acc, checkpoint=str(tmp_path / "c"), checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        tcfa.stream_moments(a, "2", b, "2", x, labels, acc, checkpoint=3)


def test_no_checkpoint_file_is_written_without_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("stream_moments")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ (N, D) taps
def test_mlp_taps_are_rows_in_every_entry_point():
    a, b, x, labels = models_and_data()
    x32 = x[:64]
    rows_a, rows_b = a[:3](x32), b[:3](x32)  # the taps "2" of the Sequentials: (N, 7) and (N, 8)
    for mode in ("pooled", "tokens"):
        acc = tcfa.stream_moments(a, "2", b, "2", x32, labels[:64], tcfa.MomentAccumulator(3, 7, 8, dtype=torch.float64),
                                  mode=mode)
        want = tcfa.segment_moments(rows_a.detach(), rows_b.detach(), labels[:64], 3)
        torch.testing.assert_close(acc.result().sxy, want.sxy)
    assert torch.equal(tcfa.extract(a, "2", x32), rows_a.detach())
    assert torch.equal(tcfa.to_rows(rows_a.detach(), "tokens"), rows_a.detach())
    stitch = tcfa.TCFA("ridge", rank=3, conditions=3).fit_models(a, "2", b, "2", x32, labels[:64], progress=False)
    out = tcfa.StitchedModel(a, "2", b, "2", stitch)(x32)
    torch.testing.assert_close(out, b[3:](stitch(rows_a.detach())))


def test_rows_tap_against_a_token_tap_needs_pooled_mode():
    rows, tokens = torch.randn(4, 6), torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match="use mode='pooled'"):
        tcfa.pipeline.models.paired_rows(rows, tokens, "tokens")
    xa, xb = tcfa.pipeline.models.paired_rows(rows, tokens, "pooled")
    assert torch.equal(xa, rows) and torch.equal(xb, tokens.mean(1))
