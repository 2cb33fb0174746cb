"""Renders benchmarks/results/*.json as markdown into README.md (between the markers).

Run after the benchmarks:  .venv/bin/python benchmarks/report.py  (or python -m tcfa.cli.bench_report)
The README's numbers are therefore always the last measured ones, never hand-copied.
Each table is followed by its roofline line(s) (tcfa/bench/common.py), its N sweep
(time and peak memory per implementation and N) and links to the plots
tcfa.bench.plots wrote (time vs N, memory vs N, ratio to peers), when they exist.
"""
from __future__ import annotations

import glob
import json
import os

from ..bench import common as _common
from .report import README, REPO

RESULTS = os.path.join(REPO, "benchmarks", "results")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def fmt(v):
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.3g}"
    return str(v).replace("|", "\\|")  # a bare | would split the markdown cell


def columns(rows: list[dict]) -> list[str]:
    """Every key any row has, in first-seen order (benchmarks differ in their columns)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def markdown_table(cols: list[str], rows: list[dict]) -> list[str]:
    return (["| " + " | ".join(fmt(c) for c in cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def sweep_lines(doc: dict) -> list[str]:
    """The N sweep as one row per N: each implementation's time and peak memory beyond the inputs."""
    sweep = doc.get("sweep") or []
    if not sweep:
        return []
    impls = list(dict.fromkeys(p["impl"] for p in sweep))
    axes = {"N": "N", "time": "ms", **doc.get("sweep_axes", {})}
    by_n: dict[int, dict] = {}
    for p in sweep:
        row = by_n.setdefault(p["N"], {"N": p["N"]})
        row[f"{p['impl']} ms"] = p["seconds"] * 1e3
        if "peak_mib" in p:
            row[f"{p['impl']} MiB"] = p["peak_mib"]
    cols = ["N"] + [f"{i} {u}" for i in impls for u in ("ms", "MiB") if any(f"{i} {u}" in r for r in by_n.values())]
    return ["", f"N sweep (N: {axes['N']}; ms: {axes['time']}; MiB: peak memory beyond the inputs; "
                "every point in a fresh process):", ""] + markdown_table(cols, [by_n[n] for n in sorted(by_n)])


def render(path: str) -> str:
    with open(path) as fh:
        doc = json.load(fh)
    name, m = doc["benchmark"], doc["machine"]
    lines = [f"### {name}", "", f"Measured {m['time']} on {m.get('cpu', 'an unrecorded CPU')} ({m['cores']} cores, "
                                f"{m['torch_threads']} torch threads), torch {m['torch']}.", ""]
    if doc.get("quick"):
        lines += ["**Quick mode (TCFA_BENCH_QUICK=1): toy sweep sizes, the sweep's numbers mean nothing.**", ""]
    lines += markdown_table(columns(doc["rows"]), doc["rows"])
    # Older JSONs have no roofline record: derive FLOPs/bytes from their shapes (fractions need the roofs).
    roof = doc.get("roofline") or _common.roofline_lines(doc)
    rf = doc.get("roofs")
    if rf:
        lines += ["", f"Roofs measured in the same run: GEMM {rf['gemm_flops'] / 1e9:.0f} GFLOP/s, "
                      f"bandwidth {rf['bandwidth'] / 1e9:.1f} GB/s."]
    if roof:
        lines += [""] + [f"- {_common.roofline_text(r)}" for r in roof]
    lines += sweep_lines(doc)
    pngs = sorted(glob.glob(os.path.join(os.path.dirname(path), "plots", f"{name}_*.png")))  # plots.py's output
    if pngs:
        rel = lambda p: os.path.relpath(p, os.path.dirname(README))  # noqa: E731
        lines += ["", " ".join(f"![{os.path.basename(p)[:-4]}]({rel(p)})" for p in pngs)]
    return "\n".join(lines)


def section(results: str = RESULTS) -> str:
    parts = [render(p) for p in sorted(glob.glob(os.path.join(results, "*.json")))]
    return "\n\n".join(parts) if parts else "(no results yet: run `make bench`)"


def splice(text: str, body: str) -> str:
    return _common.splice(text, body, BEGIN, END)


def main():
    with open(README) as fh:
        text = fh.read()
    body = section()
    with open(README + ".tmp", "w") as fh:
        fh.write(splice(text, body))
    os.replace(README + ".tmp", README)
    print(f"README.md: {body.count('### ')} benchmark table(s)")


if __name__ == "__main__":
    main()
