"""Command line: `tcfa demo`, `tcfa align`, `tcfa bench`."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

# The benchmark modules (tcfa/bench), shipped with the package so that `tcfa bench`
# runs from any install, not only from a checkout.
BENCHMARKS = ("sinkhorn", "stitch", "cca", "levels")


def _demo(args) -> int:
    from . import demo

    demo.run(args.out, seed=args.seed, epochs=args.epochs, tune_steps=args.tune_steps, cache=not args.no_cache)
    return 0


def _load_model(spec: str):
    """A model from a local torch.save'd nn.Module file, else a hub name (transformers
    AutoModelForImageClassification; only works where the user has the hub or its cache)."""
    import torch

    if os.path.exists(spec):
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(f"--model file {spec} holds a {type(model).__name__}, not a torch.save'd nn.Module")
        return model.eval()
    try:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(spec).eval()
    except Exception as exc:  # offline, unknown name: say what was tried
        raise SystemExit(f"cannot load model {spec!r}: not a local file, and the hub load failed ({exc})")


def _align(args) -> int:
    import torch

    from . import data
    from .align import TCFA
    from .models import extract, paired_rows

    model_a, model_b = _load_model(args.model_a), _load_model(args.model_b)
    if args.inputs:
        blob = torch.load(args.inputs, map_location="cpu")
        x, labels = (blob if isinstance(blob, (tuple, list)) else (blob, None))
    else:  # the embedded digits, upsampled to the requested size
        x, labels = data.digits_images(args.image_size)
    if args.conditions == "class":
        if labels is None:
            raise SystemExit("--conditions class needs labels: save (inputs, labels) in --inputs")
        cond = data.class_conditions(labels)
    else:
        cond = data.no_conditions(x.shape[0])
    act_a = extract(model_a, args.layer_a, x, progress=True)
    act_b = extract(model_b, args.layer_b, x, progress=True)
    rows_a, rows_b = paired_rows(act_a, act_b, args.mode)
    per = rows_a.shape[0] // x.shape[0]
    stitch = TCFA(args.method, rank=args.rank, conditions=cond.num, reg=args.reg, eps=args.eps).fit(
        rows_a, rows_b, cond.ids.repeat_interleave(per))
    stitch.save(args.out)
    print(f"wrote {args.out}: {stitch.extra_repr()} ({stitch.num_trainable()} parameters)")
    return 0


def _bench(args) -> int:
    names = [b for b in BENCHMARKS if not args.only or any(o in b for o in args.only)]
    if not names:
        print(f"no benchmark matches {args.only}; the benchmarks are {list(BENCHMARKS)}", file=sys.stderr)
        return 1
    env = dict(os.environ)
    if args.quick:  # toy sizes: checks the plumbing, the numbers mean nothing (the JSON says so)
        env["TCFA_BENCH_QUICK"] = "1"
    if args.out:
        env["TCFA_BENCH_RESULTS"] = os.path.abspath(args.out)
    status = 0
    for name in names:
        print(f"== tcfa.bench.{name}", flush=True)
        status |= subprocess.call([sys.executable, "-m", f"tcfa.bench.{name}"], env=env)
    if not args.no_plots:  # PNGs from every results JSON, including ones this run did not refresh
        print("== tcfa.bench.plots", flush=True)
        status |= subprocess.call([sys.executable, "-m", "tcfa.bench.plots"], env=env)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tcfa", description="Task-Conditioned Functional Alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="stitch a small CNN into a small ViT on sklearn digits with every TCFA method")
    d.add_argument("--out", default="demo_output", help="directory for results.json and stitching.png")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=12, help="training epochs of each model (cached by config)")
    d.add_argument("--tune-steps", type=int, default=60, help="optimizer steps of each tuning mode")
    d.add_argument("--no-cache", action="store_true", help="retrain instead of loading ~/.cache/tcfa weights")
    d.set_defaults(func=_demo)
    a = sub.add_parser("align", help="fit a TCFA stitch between two models' layers; save it as safetensors")
    a.add_argument("--model-a", required=True, help="torch.save'd nn.Module file, or a hub name")
    a.add_argument("--layer-a", required=True, help="dotted module path in model A")
    a.add_argument("--model-b", required=True)
    a.add_argument("--layer-b", required=True)
    a.add_argument("--method", default="cca", choices=["cca", "ot", "ridge", "procrustes"])
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--reg", type=float, default=1e-3)
    a.add_argument("--eps", type=float, default=0.01, help="OT eps relative to B's mean squared distance")
    a.add_argument("--conditions", default="class", choices=["class", "none"])
    a.add_argument("--mode", default="tokens", choices=["tokens", "pooled"])
    a.add_argument("--inputs", help="torch.save'd (inputs, labels) or inputs; default: sklearn digits images")
    a.add_argument("--image-size", type=int, default=32, help="digits upsampling when --inputs is not given")
    a.add_argument("--out", required=True, help="output .safetensors file")
    a.set_defaults(func=_align)
    b = sub.add_parser("bench", help=f"run the benchmarks {list(BENCHMARKS)} (peers timed in the same run)")
    b.add_argument("only", nargs="*", help="substrings of benchmark names to run")
    b.add_argument("--quick", action="store_true", help="toy sizes: checks that everything runs, measures nothing")
    b.add_argument("--out", help="results directory (default: a checkout's benchmarks/results, "
                   "else ./tcfa-bench-results)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots of the results")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
