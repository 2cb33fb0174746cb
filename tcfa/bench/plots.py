"""PNG plots of the benchmark results (<results>/*.json): time vs N, memory vs N, ratio to peers.

    python -m tcfa.bench.plots [results_dir]   -> results_dir/plots/<bench>_<kind>.png

matplotlib is not a dependency of this project (and not installed on the
benchmark machine), so the PNGs are drawn here on a plain RGB canvas with a
3x5 bitmap font and encoded with zlib: crude, but dependency-free and exact.

* ``time vs N`` and ``memory vs N`` come from the ``sweep`` list in the JSON
  (tcfa.bench.common.run_sweep; every bench_*.py writes one), one line per
  implementation, axes named by ``sweep_axes``; a JSON without a sweep gets no
  such plot, and this script says so.
* ``ratio to peers`` is drawn for every row column whose name says it is a
  ratio (``speedup`` or ``/this``): one horizontal bar per row, a line at 1.
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import zlib

from tcfa.bench import common

W, H = 720, 440
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (200, 200, 200)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]

# 3x5 glyphs, rows top to bottom; lower case is drawn as upper case.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100", "-": "000000111000000",
    "+": "000010111010000", ":": "000010000010000", "/": "001001010100100", "%": "101001010100101",
    "(": "010100100100010", ")": "010001001001010", "=": "000111000111000", "_": "000000000000111",
    "<": "001010100010001", ">": "100010001010100", "^": "010101000000000", "|": "010010010010010",
    "*": "000101010101000", "[": "110100100100110", "]": "011001001001011", "?": "111001010000010",
}


class Canvas:
    def __init__(self, w=W, h=H):
        self.w, self.h = w, h
        self.px = bytearray(WHITE * (w * h))

    def dot(self, x, y, c):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(c)

    def rect(self, x0, y0, x1, y1, c):
        for y in range(max(0, min(y0, y1)), min(self.h, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.w, max(x0, x1) + 1)):
                self.dot(x, y, c)

    def line(self, x0, y0, x1, y1, c, width=1):
        """Bresenham, thickened by drawing a small square at each step."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.rect(x0, y0, x0 + width - 1, y0 + width - 1, c)
            if (x0, y0) == (x1, y1):
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x, y, s, c=BLACK, scale=2):
        for ch in str(s).upper():
            g = _GLYPHS.get(ch, _GLYPHS["?"])
            for k, bit in enumerate(g):
                if bit == "1":
                    r, col = divmod(k, 3)
                    self.rect(x + col * scale, y + r * scale, x + col * scale + scale - 1, y + r * scale + scale - 1, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def text_width(s, scale=2):
    return 4 * scale * len(str(s))


def _fmt(v):
    # sizes such as N = 2048 read better whole than as 2.05e+03
    return f"{v:.0f}" if 100 <= abs(v) < 1e7 else f"{v:.3g}"


def line_plot(series: dict, title: str, xlabel: str, ylabel: str) -> Canvas:
    """series: {label: [(x, y), ...]}; log axes when the data spans more than 20x."""
    cv = Canvas()
    pts = [p for ps in series.values() for p in ps if p[0] > 0 and p[1] > 0]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    logx = max(xs) / min(xs) > 20
    logy = max(ys) / min(ys) > 20
    tx = (lambda v: math.log10(v)) if logx else (lambda v: v)  # noqa: E731
    ty = (lambda v: math.log10(v)) if logy else (lambda v: v)  # noqa: E731
    x0, x1 = tx(min(xs)), tx(max(xs))
    y0, y1 = (ty(min(ys)), ty(max(ys))) if logy else (0.0, max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    L, R, T, B = 90, W - 200, 40, H - 60  # plot box; legend on the right
    px = lambda v: int(L + (tx(v) - x0) / (x1 - x0) * (R - L))  # noqa: E731
    py = lambda v: int(B - (ty(v) - y0) / (y1 - y0) * (B - T))  # noqa: E731
    cv.text(L, 4, title)  # above the y label, which may be as wide as the tick labels
    cv.line(L, B, R, B, BLACK)
    cv.line(L, T, L, B, BLACK)
    for frac in (0.0, 0.5, 1.0):  # three ticks per axis, labelled in data units
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        xv, yv = (10**xv if logx else xv), (10**yv if logy else yv)
        X, Y = int(L + frac * (R - L)), int(B - frac * (B - T))
        cv.line(X, B, X, B + 4, BLACK)
        cv.text(X - text_width(_fmt(xv)) // 2, B + 8, _fmt(xv))
        cv.line(L - 4, Y, L, Y, BLACK)
        cv.text(L - 8 - text_width(_fmt(yv)), Y - 5, _fmt(yv))
    cv.text((L + R) // 2 - text_width(xlabel) // 2, H - 24, xlabel + (" (LOG)" if logx else ""))
    cv.text(4, T - 22, ylabel + (" (LOG)" if logy else ""))
    for k, (label, ps) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        ps = sorted(p for p in ps if p[0] > 0 and p[1] > 0)
        for a, b in zip(ps, ps[1:]):
            cv.line(px(a[0]), py(a[1]), px(b[0]), py(b[1]), c, width=2)
        for p in ps:
            cv.rect(px(p[0]) - 2, py(p[1]) - 2, px(p[0]) + 2, py(p[1]) + 2, c)
        cv.rect(R + 12, T + 18 * k, R + 22, T + 18 * k + 10, c)
        cv.text(R + 28, T + 18 * k, label[:20])
    return cv


def bar_plot(bars: list[tuple[str, float]], title: str) -> Canvas:
    """Horizontal bars of ratios (> 1: tcfa faster), with a line at 1."""
    h = max(120, 70 + 22 * len(bars))
    cv = Canvas(W, h)
    L, R, T = 300, W - 70, 40
    finite = [v for _, v in bars if v == v and v > 0]
    top = max([1.0, *finite]) * 1.1
    logx = top / min([1.0, *finite]) > 50
    pos = (lambda v: math.log10(v / min(finite + [1.0])) / math.log10(top / min(finite + [1.0]))) if logx \
        else (lambda v: v / top)  # noqa: E731
    cv.text(10, 12, title + (" (LOG)" if logx else ""))
    for k, (label, v) in enumerate(bars):
        y = T + 22 * k
        cv.text(10, y + 3, label[:35])
        if v == v and v > 0:
            cv.rect(L, y, L + max(1, int(pos(v) * (R - L))), y + 14, PALETTE[k % len(PALETTE)])
        cv.text(L + int(pos(v) * (R - L)) + 6 if v == v and v > 0 else L + 6, y + 3, _fmt(v) if v == v else "N/A")
    one = L + int(pos(1.0) * (R - L))
    cv.line(one, T - 6, one, T + 22 * len(bars), BLACK)
    cv.text(one - 4, T - 18, "1")
    return cv


def _label(row: dict) -> str:
    parts = [str(row[k]) for k in ("case", "method", "impl") if k in row]
    return " ".join(parts) or "?"


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s.lower()).strip("_")


def plots_for(doc: dict) -> dict[str, Canvas]:
    """{file stem: canvas} for one results JSON."""
    name, out = doc["benchmark"], {}
    sweep = doc.get("sweep") or []
    by_impl: dict[str, list] = {}
    for p in sweep:
        by_impl.setdefault(p["impl"], []).append(p)
    if by_impl:
        axes = {"N": "N", "time": "ms", **doc.get("sweep_axes", {})}
        out[f"{name}_time_vs_N"] = line_plot({k: [(p["N"], p["seconds"] * 1e3) for p in v] for k, v in by_impl.items()},
                                             f"{name}: time vs N", axes["N"], axes["time"])
        mem = {k: [(p["N"], p["peak_mib"]) for p in v if "peak_mib" in p] for k, v in by_impl.items()}
        if any(mem.values()):
            out[f"{name}_memory_vs_N"] = line_plot({k: v for k, v in mem.items() if v}, f"{name}: peak memory vs N",
                                                   axes["N"], "MiB beyond the inputs")
    ratio_keys = []
    for r in doc["rows"]:
        ratio_keys += [k for k in r if ("speedup" in k or "/this" in k) and k not in ratio_keys]
    for key in ratio_keys:
        bars = [(_label(r), float(r[key])) for r in doc["rows"] if isinstance(r.get(key), (int, float))]
        if bars:
            out[f"{name}_ratio_{_slug(key)}"] = bar_plot(bars, f"{name}: {key}")
    return out


def main(results: str | None = None) -> int:
    results = results or common.results_dir()
    out_dir = os.path.join(results, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as fh:
            doc = json.load(fh)
        plots = plots_for(doc)
        if not doc.get("sweep"):
            print(f"{os.path.basename(path)}: no 'sweep' record, so no time/memory vs N plot")
        for stem, cv in plots.items():
            target = os.path.join(out_dir, stem + ".png")
            with open(target + ".tmp", "wb") as fh:
                fh.write(cv.png())
            os.replace(target + ".tmp", target)
            written += 1
            print("wrote", os.path.relpath(target))
    return 0 if written or not glob.glob(os.path.join(results, "*.json")) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
