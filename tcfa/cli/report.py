"""The demo's results table, and README.md's demo section rendered from the demo's results.json.

    python -m tcfa.cli.report [demo_output/results.json]

copies the given results to benchmarks/results/demo/results.json (committed, so that a test can
check the README without running the demo) and rewrites README.md between the markers
<!-- demo:begin --> and <!-- demo:end --> with ``demo_section`` of that copy. tests/test_demo.py
fails when the README's block differs from what ``demo_section`` renders now. The benchmark
tables (benchmarks/report.py) are spliced into the README by the same ``splice``.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
DEMO_RESULTS = os.path.join(REPO, "benchmarks", "results", "demo", "results.json")
BEGIN, END = "<!-- demo:begin -->", "<!-- demo:end -->"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a demo run ran on: CPU, cores, library versions, time (UTC)."""
    import timm
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(records) -> str:
    """The demo's results as the fixed-width text table it prints."""
    head = f"{'method':<16} {'cond':<6} {'tuning':<10} {'acc':>6} {'Δacc':>7} {'Δθ':>7} {'CKA':>6} {'noise':>6} {'rot':>6}"
    lines = [head, "-" * len(head)]
    for r in records:
        if r.get("not_applicable"):
            lines.append(f"{r['name']:<16} {r['not_applicable']}")
            continue
        ca = r["corrupted_accuracy"] or {}
        lines.append(f"{r['name']:<16} {r['conditioning']:<6} {r['tuning']:<10} {_fmt(r['accuracy']):>6} "
                     f"{_fmt(r['delta_accuracy'], '+.3f'):>7} {r['trainable_params']:>7} {_fmt(r['cka']):>6} "
                     f"{_fmt(ca.get('noise')):>6} {_fmt(ca.get('rotation')):>6}")
    return "\n".join(lines)


def _model_line(role: str, m: dict) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in m["kwargs"].items())
    return (f"- Model {role}: `timm.create_model({m['name']!r}, pretrained=False, {kwargs})`, "
            f"{m['params']:,} parameters, {m['test_accuracy']:.3f} test accuracy; tapped at `{m['tap']}` "
            f"({m['tap_shape']}).")


def demo_section(doc: dict) -> str:
    """README markdown for one demo run's results.json: machine, settings, wall time, table."""
    m, s, t = doc["machine"], doc["settings"], doc["timings"]
    if t["train_seconds"] > 0:
        wall = (f"Wall time {t['wall_seconds']:.0f} s, of which {t['train_seconds']:.0f} s trained the models "
                "(a run that finds them in the weight cache skips that).")
    else:
        wall = f"Wall time {t['wall_seconds']:.0f} s, both models loaded from the weight cache."
    lines = [f"Run {m['time']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), "
             f"torch {m['torch']}, timm {m['timm']}, Python {m['python']}. Seed {s['seed']}, "
             f"{s['epochs']} training epochs, {s['tune_steps']} tuning steps, rank {s['rank']}; "
             f"{s['n_train']} training / {s['n_test']} test images of {s['image']} px. {wall}", ""]
    lines += [_model_line(role, s["models"][role]) for role in ("A", "B")]
    lines += ["", "```", table(doc["records"]), "```"]
    if "layer_map" in doc:
        from .demo_layer_map import section

        lines += ["", *section(doc)]
    return "\n".join(lines)


def splice(text: str, body: str, begin: str, end: str) -> str:
    """README text with what stands between the markers begin ... end replaced by body."""
    if begin not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source = argv[0] if argv else os.path.join("demo_output", "results.json")
    if os.path.abspath(source) != DEMO_RESULTS:
        os.makedirs(os.path.dirname(DEMO_RESULTS), exist_ok=True)
        shutil.copyfile(source, DEMO_RESULTS)
    with open(DEMO_RESULTS) as fh:
        doc = json.load(fh)
    with open(README) as fh:
        text = fh.read()
    with open(README + ".tmp", "w") as fh:
        fh.write(splice(text, demo_section(doc), BEGIN, END))
    os.replace(README + ".tmp", README)
    print(f"README.md: demo section from {DEMO_RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
