"""Tables and plots of `tcfa ablate`'s ablation.json: means and standard deviations over seeds."""
from __future__ import annotations

import os

import torch

from ..artifacts import save_figure, write_text_atomically
from ..bench.common import table
from .report import README, REPO

RESULT = os.path.join(REPO, "benchmarks", "results", "ablation", "ablation.json")
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"

# a cell across seeds: the default stitch point is the layer map's choice, which may differ between seeds
KEY = ("pair", "axis", "point", "method", "conditions", "k", "data", "levels", "tuning", "variant")
METRICS = ("accuracy", "trainable_params", "stitch_flops", "cka_before", "cka_after", "rsa_before", "rsa_after",
           "gate_accuracy")


def _stats(values) -> tuple[float, float]:
    t = torch.tensor([float(v) for v in values if v is not None and v == v], dtype=torch.float64)
    return (float("nan"), float("nan")) if t.numel() == 0 else (float(t.mean()), float(t.std(unbiased=False)))


def cells(out: dict) -> list[dict]:
    """One row per cell: its configuration, the seeds, and mean / std of each metric."""
    groups = {}
    for r in out["records"]:
        if r["axis"] != "baselines" or "layer_a" in r:
            point = f"{r['layer_a']}->{r['layer_b']}" if r["axis"] == "point" else "default"
            groups.setdefault(tuple({**r, "point": point}.get(k) for k in KEY), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(KEY, key), seeds=len(rs), by_seed={r["seed"]: r["accuracy"] for r in rs},
                   points=", ".join(sorted({f"{r['layer_a']}->{r['layer_b']}" for r in rs})))
        for m in METRICS:
            row[m], row[m + "_std"] = _stats(r.get(m) for r in rs)
        rows.append(row)
    return rows


def conditioned(row: dict) -> bool:
    return row["conditions"] != "none"


def _label(row: dict) -> str:
    cond = "none" if not conditioned(row) else f"{row['conditions']} k={row['k']}"
    data = "" if row["data"] == "original" else f" on {row['data']} ({row['levels']} levels)"
    variant = f" [{row['variant']}]" if row["variant"] else ""
    return f"{row['method']} {cond}{data}{variant}"


def paired_gain(better: dict, worse: dict) -> tuple[float, float]:
    """Mean and standard error over the seeds both cells ran of better's accuracy less worse's (same seed:
    same models, data split and default stitch point, so the seeds' shared variation cancels)."""
    seeds = sorted(set(better["by_seed"]) & set(worse["by_seed"]))
    d = torch.tensor([better["by_seed"][s] - worse["by_seed"][s] for s in seeds], dtype=torch.float64)
    if d.numel() < 2:
        return float(d.sum()), float("inf")
    return float(d.mean()), float(d.std() / len(seeds) ** 0.5)


def verdict(out: dict) -> list[dict]:
    """Per pair and tuning: the best unconditioned stitch on the original digits, the best conditioned one
    at no more trainable parameters, and the best conditioned one overall, among cells run on every seed.
    It pays when the cheaper conditioned stitch's paired gain over the seeds is more than twice its
    standard error."""
    # only cells run on every seed: a stitch point on one seed's path alone is a max over one noisy draw
    seeds = len(out["settings"]["seeds"])
    rows = [r for r in cells(out) if r["data"] == "original" and r["tuning"] in ("zero_shot", "task")
            and r["seeds"] == seeds]
    base = _baselines(out)
    out_rows = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        for tuning in ("zero_shot", "task"):
            here = [r for r in rows if r["pair"] == pair and r["tuning"] == tuning]
            unc = [r for r in here if not conditioned(r)]
            con = [r for r in here if conditioned(r)]
            if not unc or not con:
                continue
            best_u = max(unc, key=lambda r: r["accuracy"])
            cheap = [r for r in con if r["trainable_params"] <= best_u["trainable_params"]]
            best_c = max(con, key=lambda r: r["accuracy"])
            best_cheap = max(cheap, key=lambda r: r["accuracy"]) if cheap else None
            gain = paired_gain(best_cheap, best_u) if cheap else None
            alone = {m: base.get((pair, m)) for m in ("A alone", "B alone", "full fine-tuning of B")}
            out_rows.append({
                "pair": pair, "tuning": tuning,
                **{m: "-" if v is None else f"{v[0]:.3f}" for m, v in alone.items()},
                "best unconditioned": f"{_label(best_u)} @ {best_u['point']}",
                "acc (Δθ)": f"{best_u['accuracy']:.3f} ± {best_u['accuracy_std']:.3f} ({best_u['trainable_params']:.0f})",
                "best conditioned, Δθ ≤": "-" if best_cheap is None else _label(best_cheap),
                "its acc (Δθ)": "-" if best_cheap is None else
                f"{best_cheap['accuracy']:.3f} ± {best_cheap['accuracy_std']:.3f} ({best_cheap['trainable_params']:.0f})",
                "best conditioned, any Δθ": f"{_label(best_c)}: {best_c['accuracy']:.3f} ± {best_c['accuracy_std']:.3f} "
                                            f"({best_c['trainable_params']:.0f})",
                "paired gain": "-" if best_cheap is None else "{:+.3f} ± {:.3f}".format(*gain),
                "pays": best_cheap is not None and gain[0] > 2 * gain[1]})
    return out_rows


def _baseline_records(out: dict) -> dict:
    rows = {}
    for r in out["records"]:
        if r["axis"] == "baselines" and "layer_a" not in r:
            rows.setdefault((r["pair"], r["method"]), []).append(r)
    return rows


def _baselines(out: dict) -> dict:
    """{(pair, baseline): (mean, std) accuracy over seeds} of the model-level baselines."""
    return {k: _stats(r.get("accuracy") for r in rs) for k, rs in _baseline_records(out).items()
            if any(r.get("accuracy") is not None for r in rs)}


def baselines_table(out: dict) -> str:
    rows = _baseline_records(out)
    shown = []
    for (pair, method), rs in rows.items():
        acc = _stats(r.get("accuracy") for r in rs)
        shown.append({"pair": pair, "baseline": method, "accuracy": "-" if acc[0] != acc[0] else
                      f"{acc[0]:.3f} ± {acc[1]:.3f}", "Δθ": rs[0].get("trainable_params", "-"),
                      "note": rs[0].get("note", "")})
    return table(shown, ["pair", "baseline", "accuracy", "Δθ", "note"])


def cells_table(out: dict, pair: str | None = None) -> str:
    shown = []
    for r in sorted(cells(out), key=lambda r: (r["pair"], r["axis"])):
        if pair is not None and r["pair"] != pair:
            continue
        shown.append({"pair": r["pair"], "axis": r["axis"], "point": r["points"], "seeds": r["seeds"],
                      "stitch": _label(r), "tuning": r["tuning"],
                      "accuracy": f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}",
                      "Δθ": f"{r['trainable_params']:.0f}", "FLOPs/img": f"{r['stitch_flops']:.3g}",
                      "CKA before→after": f"{r['cka_before']:.2f}→{r['cka_after']:.2f}",
                      "RSA before→after": f"{r['rsa_before']:.2f}→{r['rsa_after']:.2f}",
                      "gate acc": f"{r['gate_accuracy']:.2f}"})
    cols = ["pair", "axis", "point", "seeds", "stitch", "tuning", "accuracy", "Δθ", "FLOPs/img", "CKA before→after",
            "RSA before→after", "gate acc"]
    return table(shown, cols)


def summary(out: dict) -> str:
    s = out["settings"]
    head = (f"{len(out['records'])} records, seeds {s['seeds']}, {out['seconds']:.0f} s on "
            f"{out['machine'].get('cpu')} ({out['machine'].get('cores')} cores)")
    verdicts = verdict(out)
    cols = list(verdicts[0]) if verdicts else ["pair"]
    return "\n\n".join([head, baselines_table(out), table(verdicts, cols), cells_table(out)])


def plot(out: dict, out_dir: str) -> list[str]:
    """ablation.png: per pair, accuracy against Δθ per method, CKA before and after, the stitch points, the
    tuning modes and (CNN->ViT) the condition types; means over seeds, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = cells(out)
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, axes = plt.subplots(len(pairs), 5, figsize=(22, 3.6 * len(pairs)), squeeze=False)
    for i, pair in enumerate(pairs):
        here = [r for r in rows if r["pair"] == pair]
        ax = axes[i][0]
        for method, marker in zip(("cca", "ot", "ridge", "procrustes"), "osD^"):
            for cond, color in ((True, "tab:red"), (False, "tab:blue")):
                pts = [r for r in here if r["method"] == method and conditioned(r) == cond and r["data"] == "original"]
                ax.scatter([r["trainable_params"] for r in pts], [r["accuracy"] for r in pts], marker=marker,
                           color=color, alpha=0.6, label=f"{method} {'class' if cond else 'none'}" if i == 0 else None)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short range
        ax.set_xlabel("Δθ (trainable parameters)")
        ax.set_ylabel(f"{pair}\naccuracy")
        ax.set_title("accuracy vs Δθ (red: conditioned)")
        ax = axes[i][1]
        meth = [r for r in here if r["axis"] == "method"]
        xs = range(len(meth))
        ax.bar([x - 0.2 for x in xs], [r["cka_before"] for r in meth], 0.4, label="before")
        ax.bar([x + 0.2 for x in xs], [r["cka_after"] for r in meth], 0.4, label="after")
        ax.set_xticks(list(xs), [f"{r['method']}\n{'class' if conditioned(r) else 'none'}" for r in meth], fontsize=6)
        ax.set_title("CKA at B's tap, before / after")
        ax.legend(fontsize=6)
        for j, (axis, key) in enumerate((("point", lambda r: r["point"].replace("->", "\n")),
                                         ("tuning", lambda r: r["tuning"]),
                                         ("conditions", _label)), start=2):
            ax = axes[i][j]
            sel = [r for r in here if r["axis"] == axis]
            if not sel:
                ax.text(0.5, 0.5, f"no {axis} axis for {pair}", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for x, r in enumerate(sel):
                ax.errorbar(x, r["accuracy"], r["accuracy_std"], fmt="o", ecolor="grey",
                            color="tab:red" if conditioned(r) else "tab:blue")
            ax.set_xticks(range(len(sel)), [key(r) for r in sel], fontsize=6, rotation=0 if axis == "tuning" else 60)
            ax.set_title(f"{axis} axis (red: conditioned)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out_dir, "ablation.png")
    save_figure(fig, path, dpi=80)
    plt.close(fig)
    return [path]


def readme_section(out: dict) -> str:
    """The README's generated part: the run, the baselines, the verdict and every cell, and the plot."""
    return "\n\n".join([summary(out), "![ablation](benchmarks/results/ablation/ablation.png)"])


def main(path: str = RESULT) -> None:
    """Splices the tables of ``path`` (default: the committed run) into README.md between the markers."""
    import json

    with open(path) as fh:
        out = json.load(fh)
    with open(README) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomically(README, head + BEGIN + "\n" + readme_section(out) + "\n" + END + tail)


if __name__ == "__main__":
    main()
