"""Render bench/results/*.json into docs/benchmarks.md and one accuracy-vs-FLOPs plot per profile."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
EXTRA = {"latency_widths"}
ORDER = ["emo-dir", "global-magnitude", "uniform", "whole-emo", "random"]


def _plot(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result["rows"] if "error" not in r]
    for method in ORDER:
        pts = sorted((r["flops_reduction"], r["test_acc"]) for r in rows if r["method"] == method)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if method == "emo-dir" else "s--", label=method, lw=2 if method == "emo-dir" else 1)
    if rows:
        ax.axhline(rows[0]["test_acc_base"], color="grey", lw=0.8, ls=":", label="unpruned")
    ax.set_xlabel("FLOPs removed")
    ax.set_ylabel("test accuracy after finetuning")
    ax.set_title(f"{result['profile']}: {result['params']['model']['name']} on {result['params']['data']['source']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(result: dict) -> list[str]:
    lines = [
        "| method | target | FLOPs removed | params removed | test acc before FT | test acc after FT | vs emo-dir (pts) "
        "| search s | evaluations | peak RSS MB | ONNX latency b1 / b64 (pruned / base) | FLOPs kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    ours = {r["target"]: r for r in rows if r["method"] == "emo-dir" and "error" not in r}
    for target in sorted({r["target"] for r in rows}):
        for method in ORDER:
            for r in (r for r in rows if r["method"] == method and r["target"] == target):
                if "error" in r:
                    lines.append(f"| {method} | {target:g} | failed: {r['error'][-120:]!r} |" + " |" * 9)
                    continue
                ref = ours.get(target)
                delta = "" if method == "emo-dir" or ref is None else f"{100 * (r['test_acc'] - ref['test_acc']):+.2f}"
                before = r.get("test_acc_before_finetune")
                o = r["onnx"]
                lines.append(
                    f"| {method} | {target:g} | {r['flops_reduction']:.1%} | {r['params_reduction']:.1%} "
                    f"| {'' if before is None else f'{before:.2%}'} | {r['test_acc']:.2%} | {delta} "
                    f"| {r['search_seconds']:.0f} | {r['evaluations']} | {r['peak_rss_mb']:.0f} "
                    f"| {o.get('latency_ratio_b1', float('nan')):.2f} / {o.get('latency_ratio_b64', float('nan')):.2f} "
                    f"| {1 - r['flops_reduction']:.2f} |"
                )
    return lines


def _widths() -> list[str]:
    """The channel-width latency study (bench/latency_widths.py), if it has run."""
    path = RESULTS / "latency_widths.json"
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    m = result["machine"]
    out = ["## Latency against channel widths (ResNet-56, nothing else varied)", "",
           f"- command: `{result['command']}`; commit: `{result['commit']}`; machine: {m['cpus']} CPUs, "
           f"{m['platform']}; median of {result['repeats']} runs", "",
           "| widths | kind | FLOPs kept | latency b1 | latency b64 | b1 ms | b64 ms |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kind = ("inner channels of stages 1/2/3 (of 16/32/64)" if r["family"] == "inner"
                else "base width (stages width/2x/4x)")
        out.append(f"| {'/'.join(map(str, r['widths']))} | {kind} | {r['flops_ratio']:.2f} | {r['latency_ratio_b1']:.2f} "
                   f"| {r['latency_ratio_b64']:.2f} | {r['latency_ms_b1']:.2f} | {r['latency_ms_b64']:.1f} |")
    notes = REPO / "bench" / "notes" / "latency_widths.md"
    return out + ["", notes.read_text().strip(), ""] if notes.is_file() else out + [""]


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    out = ["# Benchmarks", "",
           "Every method runs through the same pipeline (`dvc exp run -S prune.method=... -S prune.target=...`) on the",
           "same pretrained base model, with the same finetuning budget and seed. Accuracies are on the test split,",
           "which no method sees before the final report. \"vs emo-dir\" is the method's accuracy minus EMO-DIR's, in",
           "percentage points (negative: EMO-DIR is better). ONNX latency is onnxruntime on the CPU, median of",
           "repeated runs, pruned over unpruned; compare it with the FLOPs kept.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem in EXTRA or path.stem.endswith(".partial"):  # studies, and runs still in progress
            continue
        result = json.loads(path.read_text())
        plot = DOCS / f"benchmarks_{result['profile']}.png"
        _plot(result, plot)
        p = result["params"]
        m = result["machine"]
        out += [
            f"## Profile `{result['profile']}`", "",
            f"- command: `{result['command']}` (total {result['wall_seconds'] / 60:.0f} min)",
            f"- commit: `{result['commit']}`; machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}",
            f"- model `{p['model']['name']}`, data `{p['data']['source']}`; pretrain {p['pretrain']['epochs']} epochs; "
            f"finetune {p['finetune']['epochs']} epochs ({p['finetune']['kd']}); EMO-DIR K={p['divide']['k']}, "
            f"population {p['search']['pop_size']} x {p['search']['generations']} generations per sub-network, "
            f"{p['constrain']['candidates']} candidates x {p['constrain']['epochs']} constrained epochs", "",
            *([f"- ONNX latencies re-timed on the idle machine after the run: `{result['latency_remeasured']['command']}` "
                f"({result['latency_remeasured']['repeats']} repeats)"] if "latency_remeasured" in result else []), "",
            *_table(result), "",
            f"![accuracy vs FLOPs]({plot.name})", "",
        ]
        notes = REPO / "bench" / "notes" / f"{result['profile']}.md"
        if notes.is_file():
            out += [notes.read_text().strip(), ""]
    out += _widths()
    (DOCS / "benchmarks.md").write_text("\n".join(out) + "\n")
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
