"""The README's "Bad input" table: each bad call below is run and its exact error recorded.

    .venv/bin/python benchmarks/bad_inputs.py           # rewrite the table in README.md
    .venv/bin/python benchmarks/bad_inputs.py --check   # exit 1 if README.md is stale

(benchmarks/bad_inputs.py runs this module, tcfa/cli/bad_inputs.py.)

tests/test_fuzz.py checks that the README's table is what this script
produces now, and that every call fails with a ValueError or TypeError.
The calls are source strings so the table shows exactly what was tried.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

import tcfa

from ..bench import common as _common
from .report import README
BEGIN, END = "<!-- bad-input:begin -->", "<!-- bad-input:end -->"

# The names the calls below use: small valid inputs, and a few damaged ones.
SETUP = """
x = torch.randn(6, 3, dtype=torch.float64); y = torch.randn(5, 3, dtype=torch.float64)
xn = x.clone(); xn[2, 1] = float("nan")
yi = torch.inf * torch.ones(5, 3, dtype=torch.float64)
r = tcfa.sinkhorn(x, y, eps=1.0)
labels = torch.tensor([0, 1, 0, 1, 2, 2]); ya = torch.randn(6, 4, dtype=torch.float64)
m = tcfa.segment_moments(x, ya, labels, 3)
acc = tcfa.MomentAccumulator(3, 3, 4)
s = tcfa.GatedMultiStitch(3, 4, 3, 2)
junk = os.path.join(tmp, "junk.safetensors"); open(junk, "wb").write(b"not a safetensors file")
"""

CASES = [
    # --- tcfa.sinkhorn
    "tcfa.sinkhorn(xn, y, eps=1.0)",
    "tcfa.sinkhorn(x, yi, eps=1.0)",
    "tcfa.sinkhorn(x, y, eps=0.0)",
    "tcfa.sinkhorn(x, y, eps=float('inf'))",
    "tcfa.sinkhorn(x, y, eps='1')",
    "tcfa.sinkhorn(x[0], y, eps=1.0)",
    "tcfa.sinkhorn(x, y[:, :2], eps=1.0)",
    "tcfa.sinkhorn(x, y.float(), eps=1.0)",
    "tcfa.sinkhorn(x.long(), y, eps=1.0)",
    "tcfa.sinkhorn(x.tolist(), y, eps=1.0)",
    "tcfa.sinkhorn(x, y, eps=1.0, x_offsets=torch.tensor([0, 4, 2, 6]), y_offsets=torch.tensor([0, 1, 3, 5]))",
    "tcfa.sinkhorn(x, y, eps=1.0, x_offsets=torch.tensor([0, 3, 7]), y_offsets=torch.tensor([0, 2, 5]))",
    "tcfa.sinkhorn(x, y, eps=1.0, x_offsets=torch.tensor([0, 3, 6], dtype=torch.int32), y_offsets=torch.tensor([0, 2, 5]))",
    "tcfa.sinkhorn(x, y, eps=1.0, x_offsets=torch.tensor([0, 3, 6]), y_offsets=torch.tensor([0, 5, 5]))",
    "tcfa.sinkhorn(x, y, eps=1.0, x_offsets=torch.tensor([0, 3, 6]), y_offsets=torch.tensor([0, 5]))",
    "tcfa.sinkhorn(x.reshape(2, 3, 3), y[:4].reshape(2, 2, 3), eps=1.0, x_offsets=torch.tensor([0, 3, 6]))",
    "tcfa.sinkhorn(x, y, -torch.ones(6, dtype=torch.float64), eps=1.0)",
    "tcfa.sinkhorn(x, y, None, torch.zeros(5, dtype=torch.float64), eps=1.0)",
    "tcfa.sinkhorn(x, y, torch.ones(5, dtype=torch.float64), eps=1.0)",
    "tcfa.sinkhorn(x, y, eps=1.0, cost='euclidean')",
    "tcfa.sinkhorn(x, y, eps=1.0, mode='fast')",
    "tcfa.sinkhorn(x, y, eps=1.0, max_iter=0)",
    # --- tcfa.barycentric_map
    "tcfa.barycentric_map(r, torch.randn(4, 2, dtype=torch.float64))",
    "tcfa.barycentric_map(r, torch.randn(5, 2, dtype=torch.float64).fill_(float('nan')))",
    "tcfa.barycentric_map('r', torch.randn(5, 2, dtype=torch.float64))",
    # --- tcfa.segment_moments
    "tcfa.segment_moments(x, ya, torch.tensor([0, 1, 0, 1, 2, 3]), 3)",
    "tcfa.segment_moments(x, ya, torch.tensor([0, -1, 0, 1, 2, 2]), 3)",
    "tcfa.segment_moments(x, ya, labels.float(), 3)",
    "tcfa.segment_moments(x, ya, labels, 0)",
    "tcfa.segment_moments(x, ya[:5], labels, 3)",
    "tcfa.segment_moments(xn, ya, labels, 3)",
    "tcfa.segment_moments(x, ya.float(), labels, 3)",
    # --- tcfa.MomentAccumulator
    "tcfa.MomentAccumulator(0, 3, 4)",
    "acc.update(x[:, :2], ya, labels)",
    "acc.update(x, ya, labels + 1)",
    "acc.merge(tcfa.MomentAccumulator(3, 3, 5))",
    "acc.merge(m)",
    # --- tcfa.cca
    "tcfa.cca(m, 5, 1e-3)",
    "tcfa.cca(m, 2, -1.0)",
    "tcfa.cca(m, 0, 1e-3)",
    "tcfa.cca(x, 2, 1e-3)",
    # --- tcfa.GatedMultiStitch
    "tcfa.GatedMultiStitch(0, 4, 3, 2)",
    "tcfa.GatedMultiStitch(3, 4, 3, 2, top_k=4)",
    "tcfa.GatedMultiStitch(3, 4, 3, 2, temperature=0.0)",
    "s(torch.randn(2, 5))",
    "s(xn.float())",
    "s(x)",
    "tcfa.GatedMultiStitch.load(junk)",
]


def run() -> list[tuple[str, str, str]]:
    """(call, error type, message) for every case; a call that does not raise is an error here."""
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ns = {"torch": torch, "tcfa": tcfa, "os": os, "tmp": tmp}
        exec(SETUP, ns)
        for call in CASES:
            try:
                eval(call, ns)
            except Exception as err:  # noqa: BLE001 -- recording every kind of failure is the point
                msg = str(err).splitlines()[0] if str(err) else ""
                rows.append((call, type(err).__name__, msg.replace(tmp, "<tmp>")))
            else:
                rows.append((call, "(no error)", ""))
    return rows


def table(rows) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| call | error | message |", "|---|---|---|"]
    lines += [f"| `{esc(c)}` | {t} | {esc(m)} |" for c, t, m in rows]
    return "\n".join(lines)


def splice(text: str, body: str) -> str:
    return _common.splice(text, body, BEGIN, END)


def main(argv) -> int:
    with open(README) as fh:
        text = fh.read()
    new = splice(text, table(run()))
    if "--check" in argv:
        if new != text:
            print("README.md's Bad input table is stale: run benchmarks/bad_inputs.py", file=sys.stderr)
            return 1
        return 0
    with open(README + ".tmp", "w") as fh:
        fh.write(new)
    os.replace(README + ".tmp", README)
    print(f"README.md: {len(CASES)} bad inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
