"""A streaming run for tests/test_checkpoint.py: deterministic models and data, one entry point.

    python checkpoint_job.py ENTRY CHECKPOINT KILL_AT

runs ENTRY (stream_moments | fit_models | layer_map | layer_map_minibatch) with checkpoints every 2
batches and SIGKILLs its own process when model A's forward runs for the KILL_AT-th time, the way
a crashed or pre-empted job dies: no exception handler, no cleanup. run() is imported by the tests
for the uninterrupted and the resumed runs.
"""
import os
import signal
import sys

import torch

import tcfa


def models_and_data(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7), torch.nn.Tanh(),
                            torch.nn.Linear(7, 4)).double()
    b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 4)).double()
    x = torch.randn(230, 6, dtype=torch.float64)
    return a, b, x, torch.arange(230) % 3


def run(entry, checkpoint=None, kill_at=None, batch_size=16, data=None):
    """The entry point's result as a dict of tensors (to compare runs bitwise)."""
    a, b, x, labels = models_and_data()
    x = x if data is None else data
    if kill_at is not None:
        calls = [0]

        def die(module, inputs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        a.register_forward_pre_hook(die)
    resume = dict(checkpoint=checkpoint, checkpoint_every=2, batch_size=batch_size)
    if entry == "stream_moments":
        acc = tcfa.stream_moments(a, "2", b, "2", x, labels, tcfa.MomentAccumulator(3, 7, 8, dtype=torch.float64),
                                  **resume)
        return {k: v for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)}
    if entry == "fit_models":
        stitch = tcfa.TCFA("ridge", rank=3, conditions=3).fit_models(a, "2", b, "2", x, labels, progress=False,
                                                                     **resume)
        return {k: v.detach() for k, v in stitch.state_dict().items()}
    estimator = "minibatch" if entry == "layer_map_minibatch" else "full"
    m = tcfa.layer_map(a, ["0", "2", "4"], b, ["0", "2", "4"], x, conditions=labels, estimator=estimator,
                       num_anchors=200 if estimator == "full" else None, progress=False, **resume)
    return {"scores": m.scores, "per_condition": m.scores_per_condition}


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.exit(3)  # reaching here means the kill never happened
