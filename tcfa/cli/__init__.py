"""Command line: `tcfa demo`, `tcfa align`, `tcfa layers`, `tcfa bench`."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from . import layers

# The benchmark modules (tcfa/bench), shipped with the package so that `tcfa bench`
# runs from any install, not only from a checkout.
BENCHMARKS = ("sinkhorn", "sinkhorn_iterations", "stitch", "cca", "levels", "layer_map", "memory")


def _demo(args) -> int:
    from . import demo

    _check_counts(args, epochs=1, tune_steps=0)

    if args.adapters:  # issue 15's experiment: a LoRA carried between two ViTs (tcfa/cli/demo_adapters.py)
        from . import demo_adapters

        out = args.out if args.out != "demo_output" else "demo_adapters_output"
        if args.quick:
            demo_adapters.run(out, seeds=(args.seed,), epochs=1, lora_steps=5, ranks=(4,), alphas=(0.5,), n_anchors=50,
                              n_train=300, cache=not args.no_cache)
        else:
            _check_counts(args, seeds=1)
            demo_adapters.run(out, seeds=tuple(range(args.seed, args.seed + args.seeds)), epochs=args.epochs,
                              cache=not args.no_cache)
        return 0
    if args.quick:  # the whole pipeline on a few hundred images in seconds: a check, not a result
        demo.run(args.out, seed=args.seed, epochs=1, tune_steps=2, n_train=300, cache=not args.no_cache)
    else:
        demo.run(args.out, seed=args.seed, epochs=args.epochs, tune_steps=args.tune_steps, cache=not args.no_cache)
    return 0


def _ablate(args) -> int:
    from . import ablate  # the grid and its cells: tcfa/cli/ablate.py

    _check_counts(args, tune_steps=0)

    if args.quick:  # one pair, one seed, a reduced grid on 300 images: checks the plumbing in minutes
        ablate.run(args.out, seeds=(args.seed,), cache=not args.no_cache, **ablate.QUICK)
    else:
        _check_counts(args, seeds=1)
        ablate.run(args.out, seeds=tuple(range(args.seed, args.seed + args.seeds)), pairs=tuple(args.pairs),
                   tune_steps=args.tune_steps, cache=not args.no_cache)
    return 0


def _state_dict(path: str, flag: str) -> dict:
    """The parameter dict in a checkpoint file: .safetensors, or a torch.save'd dict of tensors."""
    import torch

    if not os.path.exists(path):
        raise SystemExit(f"{flag}: no such file {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"{flag}: {path} holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    return state


def _is_timm_name(spec: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(spec)


def _load_model(spec: str, checkpoint: str | None, role: str, num_classes: int):
    """A model from ``spec`` (a local torch.save'd nn.Module file; a timm model name, built
    random-init without any download; else a transformers hub name, which only works where the
    user has the hub or its cache), with ``checkpoint``'s state_dict loaded into it when given.
    ``role`` ("a" or "b") names the command-line flags in errors."""
    import torch

    flag, ckpt_flag = f"--model-{role}", f"--checkpoint-{role}"

    if os.path.exists(spec):
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(f"{flag} file {spec} holds a {type(model).__name__}, not a torch.save'd nn.Module")
    elif _is_timm_name(spec):
        import timm

        model = timm.create_model(spec, pretrained=False, num_classes=num_classes)
    else:
        try:
            from transformers import AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(spec)
        except Exception as exc:  # offline, unknown name: say what was tried
            raise SystemExit(f"cannot load {flag} {spec!r}: not a local file nor a timm model name, and the "
                             f"transformers hub load failed ({exc})")
    if checkpoint is not None:
        try:
            model.load_state_dict(_state_dict(checkpoint, ckpt_flag))
        except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
            raise SystemExit(f"{ckpt_flag} {checkpoint} does not fit {flag} {spec}: {exc}")
    return model.eval()


def _check_counts(args, **least) -> None:
    """Each --flag (an attribute of args) >= its least value, checked before anything is trained or written."""
    for name, lo in least.items():
        value = getattr(args, name)
        if value < lo:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {lo}, got {value}")


def _check_out_dirs(**paths) -> None:
    """Each --flag's output path (None: not asked for) in an existing directory, before any work."""
    for name, path in paths.items():
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f"--{name} {path}: its directory does not exist")


def _models_and_inputs(args):
    """Models A and B, the inputs and their conditions, from the shared flags of align and layers."""
    import pickle

    import torch

    from ..pipeline import data
    from ..pipeline.models import _batch_len

    torch.manual_seed(args.seed)  # the random init of timm models built by name
    model_a = _load_model(args.model_a, args.checkpoint_a, "a", args.num_classes)
    model_b = _load_model(args.model_b, args.checkpoint_b, "b", args.num_classes)
    if args.inputs:
        try:
            blob = torch.load(args.inputs, map_location="cpu")
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # not torch.save's
            raise SystemExit(f"--inputs {args.inputs} is not a torch.save file of inputs or (inputs, labels): {exc}")
        if isinstance(blob, (tuple, list)) and len(blob) != 2:
            raise SystemExit(f"--inputs {args.inputs} must hold inputs or (inputs, labels), got a "
                             f"{type(blob).__name__} of {len(blob)} items")
        x, labels = (blob if isinstance(blob, (tuple, list)) else (blob, None))
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.is_floating_point() or labels.dim() != 1:
                raise SystemExit(f"--inputs {args.inputs}: labels must be a 1-D integer tensor, got "
                                 f"{labels.dtype} of shape {tuple(labels.shape)}")
            labels = labels.long()
            if labels.shape[0] != _batch_len(x):
                raise SystemExit(f"--inputs {args.inputs} holds {_batch_len(x)} inputs but {labels.shape[0]} labels")
    else:  # the embedded digits, upsampled to the requested size
        x, labels = data.digits_images(args.image_size)
    if args.conditions == "class":
        if labels is None:
            raise SystemExit("--conditions class needs labels: save (inputs, labels) in --inputs")
        cond = data.class_conditions(labels)
    else:
        cond = data.no_conditions(_batch_len(x))
    return model_a, model_b, x, cond


def _model_flags(parser) -> None:
    """The flags align and layers share: the two models, their checkpoints, the inputs."""
    parser.add_argument("--model-a", required=True,
                        help="a torch.save'd nn.Module file; or a timm model name (e.g. resnet18), built by "
                             "timm.create_model(NAME, pretrained=False, num_classes=--num-classes): random init "
                             "seeded by --seed, no download; or else a transformers hub name")
    parser.add_argument("--checkpoint-a", help="state_dict for model A (torch.save'd dict of tensors or "
                                               ".safetensors), loaded into it: the trained weights of a timm "
                                               "model given by name")
    parser.add_argument("--model-b", required=True, help="as --model-a")
    parser.add_argument("--checkpoint-b", help="as --checkpoint-a, for model B")
    parser.add_argument("--num-classes", type=int, default=10, help="classifier size of timm models built by name")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init of timm models built by name")
    parser.add_argument("--conditions", default="class", choices=["class", "none"])
    parser.add_argument("--inputs", help="torch.save'd (inputs, labels) or inputs; default: sklearn digits images")
    parser.add_argument("--image-size", type=int, default=32, help="digits upsampling when --inputs is not given")


def _align(args) -> int:
    from ..pipeline.align import TCFA
    from ..pipeline.models import extract_many, layout_of, paired_rows

    model_a, model_b, x, cond = _models_and_inputs(args)
    for flag, path in (("--layer-a", args.layer_a), ("--layer-b", args.layer_b)):
        if not path.strip():  # "" resolves to the whole model, whose output is not a tap StitchedModel can use
            raise SystemExit(f"{flag} must name a module path (or auto), got an empty string")
    _check_out_dirs(out=args.out)
    if "auto" in (args.layer_a, args.layer_b):
        from ..pipeline.layer_map import auto_layers

        args.layer_a, args.layer_b, why, _ = auto_layers(model_a, args.layer_a, model_b, args.layer_b, x)
        print(f"chose --layer-a {args.layer_a} --layer-b {args.layer_b}: {why}")
    act_a, act_b = extract_many([(model_a, args.layer_a), (model_b, args.layer_b)], x, progress=True,
                                checkpoint=args.stream_checkpoint, checkpoint_every=args.checkpoint_every)
    # the models say how many prefix (CLS, register) tokens precede their patch grids
    rows_a, rows_b = paired_rows(act_a, act_b, args.mode, layout_a=layout_of(act_a, model=model_a),
                                 layout_b=layout_of(act_b, model=model_b))
    per = rows_a.shape[0] // act_a.shape[0]  # rows per sample (x may be a dict of model kwargs)
    stitch = TCFA(args.method, rank=args.rank, conditions=cond.num, reg=args.reg, eps=args.eps).fit(
        rows_a, rows_b, cond.ids.repeat_interleave(per))
    stitch.save(args.out, method=args.method, layers={"a": args.layer_a, "b": args.layer_b},
                conditions=list(cond.names))
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
    d = sub.add_parser("demo", help="stitch a small timm CNN into a small timm ViT on sklearn digits with every TCFA method")
    d.add_argument("--out", default="demo_output", help="directory for results.json and stitching.png")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=12, help="training epochs of each model (cached by config)")
    d.add_argument("--tune-steps", type=int, default=60, help="optimizer steps of each tuning mode")
    d.add_argument("--no-cache", action="store_true", help="retrain instead of loading ~/.cache/tcfa weights")
    d.add_argument("--quick", action="store_true",
                   help="1 epoch, 2 tuning steps, 300 training images: checks an install in seconds")
    d.add_argument("--adapters", action="store_true",
                   help="carry a LoRA from one timm ViT to another of a different width and depth (anchor maps, "
                        "transport, merge sweep, retention vs drift); writes adapters.json")
    d.add_argument("--seeds", type=int, default=3, help="with --adapters: seeds --seed, --seed + 1, ... (mean, std)")
    d.set_defaults(func=_demo)
    from .ablate import PAIRS  # noqa: PLC0415  (light: the grid's names)

    ab = sub.add_parser("ablate", help="the TCFA ablation grid (stitch point, method, conditions, architecture pair, "
                                       "tuning, candidates) over seeds; writes ablation.json and ablation.png")
    ab.add_argument("--out", default="ablation_output")
    ab.add_argument("--seed", type=int, default=0, help="first seed")
    ab.add_argument("--seeds", type=int, default=3, help="seeds --seed, --seed + 1, ... (mean, std per cell)")
    ab.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ab.add_argument("--tune-steps", type=int, default=60)
    ab.add_argument("--no-cache", action="store_true", help="retrain the models instead of loading cached weights")
    ab.add_argument("--quick", action="store_true", help="CNN->ViT, one seed, a reduced grid, toy training: a check")
    ab.set_defaults(func=_ablate)
    a = sub.add_parser("align", help="fit a TCFA stitch between two models' layers; save it as safetensors")
    _model_flags(a)
    a.add_argument("--layer-a", required=True, help="dotted module path in model A (timm resnet18: layer2), or "
                                                    "auto: chosen from a CKA layer map of A's blocks")
    a.add_argument("--layer-b", required=True, help="dotted module path in model B (timm ViT: blocks.5), or auto")
    a.add_argument("--method", default="cca", choices=["cca", "ot", "ridge", "procrustes"])
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--reg", type=float, default=1e-3)
    a.add_argument("--eps", type=float, default=0.01, help="OT eps relative to B's mean squared distance")
    a.add_argument("--mode", default="tokens", choices=["tokens", "pooled"])
    a.add_argument("--out", required=True, help="output .safetensors file")
    a.add_argument("--stream-checkpoint", metavar="PATH",
                   help="save the extraction state (both models, one pass) to PATH every --checkpoint-every batches; "
                        "rerunning the same command resumes from it (a crash loses at most that many batches)")
    a.add_argument("--checkpoint-every", type=int, default=100, help="batches between stream checkpoints")
    a.set_defaults(func=_align)
    layers.add_parser(sub)
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
