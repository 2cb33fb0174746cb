"""Renders benchmarks/results/*.json as markdown tables into README.md (between the markers).

Run after the benchmarks:  .venv/bin/python benchmarks/report.py
The README's numbers are therefore always the last measured ones, never hand-copied.
"""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COLUMNS = ["case", "impl", "value", "unit", "tcfa_speedup", "note"]


def fmt(v):
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.3g}"
    return str(v)


def render(path: str) -> str:
    with open(path) as fh:
        doc = json.load(fh)
    cols = [c for c in COLUMNS if any(c in r for r in doc["rows"])]
    m = doc["machine"]
    lines = [f"### {doc['benchmark']}", "",
             f"Measured {m['time']} on {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in doc["rows"]]
    return "\n".join(lines)


def main():
    parts = [render(p) for p in sorted(glob.glob(os.path.join(HERE, "results", "*.json")))]
    with open(README) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = "\n\n".join(parts) if parts else "(no results yet: run `make bench`)"
    with open(README + ".tmp", "w") as fh:
        fh.write(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    os.replace(README + ".tmp", README)
    print(f"README.md: {len(parts)} benchmark table(s)")


if __name__ == "__main__":
    main()
