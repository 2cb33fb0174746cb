"""`tcfa layers`: the layer map of two models (every block of A against every block of B), as a table
of the best pairs and a heatmap PNG."""
from __future__ import annotations


def add_parser(sub) -> None:
    from . import _model_flags

    p = sub.add_parser("layers", help="draw the layer map of two models: best pairs, path, heatmap PNG")
    _model_flags(p)
    p.add_argument("--layers-a", nargs="+", default=["auto"],
                   help="module paths or patterns (blocks.*) of model A, in depth order; auto: its blocks")
    p.add_argument("--layers-b", nargs="+", default=["auto"], help="as --layers-a, for model B")
    p.add_argument("--metric", default="cka", choices=["cka", "cca", "procrustes", "gw"])
    p.add_argument("--estimator", default="full", choices=["full", "minibatch"])
    p.add_argument("--mode", default="pooled", choices=["pooled", "flatten", "tokens"],
                   help="rows: one per sample (pooled, or every position flattened) or one per position")
    p.add_argument("--num-anchors", type=int, default=None,
                   help="samples the map is computed on (default: all; 256 for gw)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--top", type=int, default=5, help="how many best pairs to print")
    p.add_argument("--out", required=True, help="heatmap PNG")
    p.add_argument("--save", help="also write the map as a tcfa artifact (.safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from . import _check_out_dirs, _models_and_inputs
    from ..pipeline.layer_map import layer_map

    if args.top < 1:  # before the map is drawn
        raise SystemExit(f"--top must be >= 1, got {args.top}")
    _check_out_dirs(out=args.out, save=args.save)
    model_a, model_b, x, cond = _models_and_inputs(args)
    pick = lambda given: "auto" if given == ["auto"] else given  # noqa: E731
    lm = layer_map(model_a, pick(args.layers_a), model_b, pick(args.layers_b), x, metric=args.metric,
                   estimator=args.estimator, mode=args.mode, num_anchors=args.num_anchors,
                   batch_size=args.batch_size, conditions=cond if cond.num > 1 else None, progress=True)
    print(lm.table(args.top))
    print(f"wrote {lm.plot(args.out)}")
    if args.save:
        lm.save(args.save)
        print(f"wrote {args.save}")
    return 0
