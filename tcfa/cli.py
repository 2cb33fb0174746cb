"""Command line: `tcfa demo`, `tcfa bench`."""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _demo(args) -> int:
    from . import demo

    demo.run(args.out, seed=args.seed)
    return 0


def _bench(args) -> int:
    scripts = sorted(glob.glob(os.path.join(BENCH_DIR, "bench_*.py")))
    if args.only:
        scripts = [s for s in scripts if any(o in os.path.basename(s) for o in args.only)]
    if not scripts:
        print(f"no benchmark scripts found under {BENCH_DIR}", file=sys.stderr)
        return 1
    status = 0
    for script in scripts:
        print(f"== {os.path.basename(script)}", flush=True)
        status |= subprocess.call([sys.executable, script])
    if not args.no_plots:  # PNGs from every results/*.json, including ones this run did not refresh
        print("== plots.py", flush=True)
        status |= subprocess.call([sys.executable, os.path.join(BENCH_DIR, "plots.py")])
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tcfa", description="Task-Conditioned Functional Alignment")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="align two real point clouds (sklearn digits) and report")
    d.add_argument("--out", default="demo_output", help="directory for results.json")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    b = sub.add_parser("bench", help="run every benchmarks/bench_*.py (peers timed in the same run)")
    b.add_argument("only", nargs="*", help="substrings of script names to run")
    b.add_argument("--no-plots", action="store_true", help="skip benchmarks/plots.py (PNGs from results/*.json)")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
