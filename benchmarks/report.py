"""Renders benchmarks/results/*.json as markdown into README.md (between the markers).

Run after the benchmarks:  .venv/bin/python benchmarks/report.py
The README's numbers are therefore always the last measured ones, never hand-copied.
Each table is followed by its roofline line(s) (benchmarks/_common.py) and links to
the plots benchmarks/plots.py wrote, when they exist.
"""
from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

README = os.path.join(os.path.dirname(HERE), "README.md")
RESULTS = os.path.join(HERE, "results")
PLOTS = os.path.join(RESULTS, "plots")
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


def render(path: str) -> str:
    with open(path) as fh:
        doc = json.load(fh)
    name, m = doc["benchmark"], doc["machine"]
    cols = columns(doc["rows"])
    lines = [f"### {name}", "",
             f"Measured {m['time']} on {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}.", "",
             "| " + " | ".join(fmt(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in doc["rows"]]
    # Older JSONs have no roofline record: derive FLOPs/bytes from their shapes (fractions need the roofs).
    roof = doc.get("roofline") or _common.roofline_lines(doc)
    rf = doc.get("roofs")
    if rf:
        lines += ["", f"Roofs measured in the same run: GEMM {rf['gemm_flops'] / 1e9:.0f} GFLOP/s, "
                      f"bandwidth {rf['bandwidth'] / 1e9:.1f} GB/s."]
    if roof:
        lines += [""] + [f"- {_common.roofline_text(r)}" for r in roof]
    pngs = sorted(glob.glob(os.path.join(PLOTS, f"{name}_*.png")))
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
