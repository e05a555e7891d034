"""Render bench/results/*.json into docs/benchmarks.md and one accuracy-vs-FLOPs plot per profile."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = REPO / "docs"
EXTRA = {"latency_widths", "int8", "latency_targets", "zoo"}  # studies with their own sections or pages
ORDER = ["emo-dir", "global-magnitude", "uniform", "whole-emo", "random", "torch-pruning"]


def _metric(result: dict) -> str:
    """The cost a profile's (or variant's) targets are fractions of: flops, params or latency."""
    sets = dict(kv.split("=", 1) for kv in result.get("sets", []))
    return sets.get("prune.metric", (result["params"].get("prune") or {}).get("metric", "flops"))


def _latency_batch(result: dict) -> int:
    sets = dict(kv.split("=", 1) for kv in result.get("sets", []))
    return int(sets.get("latency.batch_size", (result["params"].get("latency") or {}).get("batch_size", 64)))


def _time_kept(onnx: dict, b: int) -> tuple[float | None, float | None]:
    """Measured time over the unpruned FP32 model's, of the FP32 and of the INT8 pruned model: the export stage's
    latency pair at the latency section's batch and threads (`latency_measured_ratio`, else its batch-`b` pair),
    and for INT8 that ratio over the INT8 speed-up (each timed in alternating blocks with its partner). A unit
    pruned for INT8 time (`latency_precision: int8`) measured INT8 over the INT8 base: its FP32 pair is the batch-`b` one."""
    int8_pair = onnx.get("latency_precision") == "int8"
    fp32 = onnx.get(f"latency_ratio_b{b}") if int8_pair else onnx.get("latency_measured_ratio", onnx.get(f"latency_ratio_b{b}"))
    speedup = onnx.get(f"int8_speedup_b{b}")
    return fp32, (fp32 / speedup if fp32 is not None and speedup else None)


def _plot_latency(result: dict, path: Path) -> None:
    """A latency variant: test accuracy against measured time kept, FP32 (filled) and INT8 (hollow) per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result["rows"] if "error" not in r and "onnx" in r]
    b = _latency_batch(result)
    if skipped := [f"{r['method']}@{r['target']}" for r in rows if _time_kept(r["onnx"], b)[0] is None]:
        print(f"report: {path.name}: no time measured at batch {b} for {', '.join(skipped)}: left out of the plot")
    for i, method in enumerate(ORDER):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target"])
        fp32 = [(_time_kept(r["onnx"], b)[0], r["test_acc"], r.get("test_acc_sd") or 0.0) for r in mine]
        int8 = [(_time_kept(r["onnx"], b)[1], r["onnx"].get("int8_test_acc")) for r in mine]
        fp32 = [p for p in fp32 if p[0] is not None]
        int8 = [p for p in int8 if p[0] is not None and p[1] is not None]
        if fp32:
            xs, ys, sds = zip(*fp32)
            ax.errorbar(xs, ys, yerr=sds if any(sds) else None, fmt="o-", color=color, capsize=3, label=f"{method} FP32",
                        lw=2 if method == "emo-dir" else 1)
        if int8:
            xs, ys = zip(*int8)
            ax.plot(xs, ys, "o--", color=color, mfc="none", label=f"{method} INT8", lw=1)
    if rows:
        ax.axhline(rows[0]["test_acc_base"], color="grey", lw=0.8, ls=":", label="unpruned FP32")
    ax.set_xlabel(f"measured onnxruntime time at batch {b}, of the unpruned FP32 model's (first seed's model)")
    ax.set_ylabel("test accuracy after finetuning")
    ax.set_title(f"{result['profile']}-{result.get('variant', '')}: {result['params']['model']['name']}, "
                 f"accuracy against measured latency (filled FP32, hollow INT8)", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_table(result: dict) -> list[str]:
    """A latency variant's rows: the time asked for against the time measured, the predictor's error, accuracy at
    that time (and its paired difference to EMO-DIR), and INT8 on top of each finetuned model."""
    b = _latency_batch(result)
    lines = [
        f"| method | target | seeds | time kept at b{b}, measured (/ asked)¹ | prediction error¹ | FLOPs removed "
        "| test acc after FT (sd) | vs emo-dir, points [95% interval] | INT8 test acc (drop)¹ "
        f"| INT8 time kept at b{b} (speed-up over FP32 pruned)¹ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["method"] == "none":
            continue
        o = r.get("onnx") or {}
        measured, int8 = _time_kept(o, b)
        asked = 1 - r["target"]
        sd = f" ({100 * r['test_acc_sd']:.2f})" if r.get("test_acc_sd") is not None else ""
        vs = r.get("vs_emo_dir")
        delta = _interval(vs) if vs else ""
        error = o.get("latency_prediction_error")
        int8_acc = o.get("int8_test_acc")
        speedup = o.get(f"int8_speedup_b{b}")
        drop = o.get("int8_drop_points")
        lines.append(
            f"| {r['method']} | {r['target']:g} | {len(r['seeds'])} "
            f"| {'' if measured is None else f'{measured:.3f} ({measured / asked:.2f})'} "
            f"| {'' if error is None else f'{100 * error:+.1f}%'} | {r['flops_reduction']:.1%} | {r['test_acc']:.2%}{sd} | {delta} "
            f"| {'' if int8_acc is None else f'{int8_acc:.2%} ({drop:+.2f})'} "
            f"| {'' if int8 is None or speedup is None else f'{int8:.3f} ({speedup:.2f}x)'} |"
        )
    return lines + ["", "¹ of the first seed's model (the time is fixed by the structure; accuracies are means over seeds)"]


def _failed(result: dict) -> list[str]:
    """Units that stopped with an error (a target out of reach is refused by name before any heavy work)."""
    out = []
    for u in (u for u in result.get("units", []) if "error" in u):
        lines = [ln.strip() for ln in u["error"].splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "reach" in ln or "refus" in ln), lines[-1] if lines else "?")
        out.append(f"- failed: {u['method']} @ {u['target']:g} seed {u['seed']}: {why[:300]}")
    return [*out, ""] if out else []


def _plot(result: dict, path: Path) -> None:
    if _metric(result) == "latency":
        _plot_latency(result, path)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result["rows"] if "error" not in r]
    seeded = any(len(r.get("seeds", [])) > 1 for r in rows)  # bars only where there are seeds to spread
    for method in ORDER:
        pts = sorted((r["flops_reduction"], r["test_acc"], r.get("test_acc_sd") or 0.0) for r in rows if r["method"] == method)
        if pts:
            xs, ys, sds = zip(*pts)
            style = dict(fmt="o-" if method == "emo-dir" else "s--", label=method, lw=2 if method == "emo-dir" else 1, capsize=3)
            # seeded profiles: the mean over seeds, bars one standard deviation across seeds (none with one seed)
            ax.errorbar(xs, ys, yerr=sds if seeded and any(sds) else None, **style)
    if rows:
        ax.axhline(rows[0]["test_acc_base"], color="grey", lw=0.8, ls=":", label="unpruned")
    ax.set_xlabel("FLOPs removed")
    ax.set_ylabel("test accuracy after finetuning" + (" (mean)" if seeded else ""))
    variant = f" ({', '.join(result['sets'])})" if "variant" in result else ""
    bars = "; bars: sd over seeds" if seeded else ""
    ax.set_title(f"{result['profile']}{variant}: {result['params']['model']['name']} on {result['params']['data']['source']}{bars}",
                 fontsize=9)
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


def _seeded_table(result: dict) -> list[str]:
    """Results made of seeded units (bench/run.py since the converged profiles): means over seeds, the spread, and
    each method's paired difference to EMO-DIR with its bootstrap interval over test images and seeds."""
    lines = [
        "| method | target | seeds | FLOPs removed (gap) | test acc before FT | test acc after FT (sd) | vs emo-dir, points "
        "[95% interval] | method cost s (selectors/search/constrain/rank; mean over the seeds run alone) | method images passed (inference + training) "
        "| finetune images | ONNX latency b64 kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    against = [m for m in ORDER if any(m in (r.get("vs_profile") or {}) for r in result["rows"])]
    if against:  # a variant held against its profile's own units
        lines[0] += "".join(f" vs profile's {m} |" for m in against)
        lines[1] += "---|" * len(against)
    for r in result["rows"]:
        before = r.get("test_acc_before_finetune")
        sd = f" ({100 * r['test_acc_sd']:.2f})" if r.get("test_acc_sd") is not None else ""
        vs = r.get("vs_emo_dir")
        delta = _interval(vs) if vs else ""
        if r["method"] == "none":
            delta = f"finetuning alone: {r['finetune_gain_points']:+.2f} over the base"
        cost = r.get("method_seconds") or {}
        costs = "/".join(f"{cost[s]:.0f}" if s in cost else "-" for s in ("selectors", "search", "constrain", "rank"))
        if cost and r.get("timing_disturbed"):
            costs += " (disturbed)"  # every seed shared the cores or was paused: not a timing
        passed = r.get("method_images")
        passed_s = f"{passed['forwarded']:,.0f} + {passed['trained']:,.0f}" if passed else ""
        gap = f" ({100 * r['target_gap']:+.1f})" if r.get("target_gap") is not None else ""
        latency = r.get("onnx", {}).get("latency_ratio_b64")
        lines.append(
            f"| {r['method']} | {r['target']:g} | {len(r['seeds'])} | {r['flops_reduction']:.1%}{gap} "
            f"| {'' if before is None else f'{before:.2%}'} | {r['test_acc']:.2%}{sd} | {delta} | {costs} | {passed_s} "
            f"| {r.get('finetune_images') or ''} | {'' if latency is None else f'{latency:.2f}'} |"
            + "".join(f" {_interval(r['vs_profile'][m]) if m in r.get('vs_profile', {}) else ''} |" for m in against)
        )
    return lines


def _search_speed(result: dict) -> list[str]:
    """Per target where both ran: the search stage's wall time per evaluation (median over seeds; units whose
    search resumed left out), whole-emo's over EMO-DIR's: the same number of evaluations would take EMO-DIR that many times less time."""
    out = []
    for target in sorted({r["target"] for r in result["rows"]}):
        ms = {r["method"]: r for r in result["rows"] if r["target"] == target and r.get("search_ms_per_evaluation")}
        if "emo-dir" in ms and "whole-emo" in ms:
            e, w = ms["emo-dir"], ms["whole-emo"]
            ratio = w["search_ms_per_evaluation"] / e["search_ms_per_evaluation"]
            out.append(f"- Search time per evaluation at {target:g}: EMO-DIR {e['search_ms_per_evaluation']:.0f} ms "
                       f"(median over undisturbed seeds of {', '.join(map(str, e['seeds']))}; commits {', '.join(c[:7] for c in e['commits'])}), whole-emo "
                       f"{w['search_ms_per_evaluation']:.0f} ms (commits {', '.join(c[:7] for c in w['commits'])}): "
                       f"EMO-DIR's search stage takes {ratio:.2f}x less time per evaluation" if ratio >= 1 else
                       f"EMO-DIR's search stage takes {1 / ratio:.2f}x more time per evaluation")
            out[-1] += " (wall seconds, under whatever else ran: see the notes)."
    return out + [""] if out else []


def _interval(vs: dict) -> str:
    """A paired difference in points, its 95% interval, and * when the interval excludes zero."""
    return f"{vs['diff_points']:+.2f} [{vs['low']:+.2f}, {vs['high']:+.2f}]" + (" *" if vs["significant"] else "")


def _base_line(result: dict) -> list[str]:
    """The unpruned model's numbers, and how far a single test accuracy can move by chance alone."""
    r = next((r for r in result["rows"] if "error" not in r and "flops" in r), None)  # not the `none` row
    if r is None:
        return []
    acc, flops = r["test_acc_base"], r["flops"] / (1 - r["flops_reduction"])
    line = f"- unpruned: test accuracy {acc:.2%}, {flops / 1e6:.1f} MFLOPs (multiply-accumulates per image)"
    n = result.get("data_counts", {}).get("test")
    if n:
        se = 100 * math.sqrt(acc * (1 - acc) / n)
        line += (f"; on {n:,} test images one accuracy's binomial standard error is about {se:.2f} points (test "
                 f"sampling alone; another training seed adds its own spread), so between two single runs differences "
                 f"under about {2 * se:.1f} points are not told apart from chance (the paired intervals below say more)")
    return [line]


def _int8() -> list[str]:
    """INT8 on top of the benchmarks' models (bench/int8.py), if it has run: one row per model."""
    path = RESULTS / "int8.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    out = ["## INT8 (static QDQ, onnxruntime.quantization) on the benchmarks' models", "",
           f"- `python bench/int8.py`, per model (commit in bench/results/int8.json); onnxruntime {r['onnxruntime']}; "
           f"{r['machine']['cpus']} CPUs; activations calibrated on {r.get('calibration', 512)} val images; FP32 and INT8 "
           f"timed in alternating blocks, median of {r['repeats']} runs",
           "", "| model | FP32 test acc | INT8 test acc (drop, points) | agreement | size FP32 / INT8 KB "
           "| b1 ms FP32 / INT8 (speed-up) | b64 ms FP32 / INT8 (speed-up) |", "|---|---|---|---|---|---|---|"]
    for name, row in sorted(r["units"].items()):
        out.append(
            f"| {name} | {100 * row['fp32_test_acc']:.2f}% | {100 * row['int8_test_acc']:.2f}% "
            f"({row['int8_drop_points']:+.2f}) | {100 * row['top1_agreement']:.2f}% "
            f"| {row['fp32_bytes'] / 1e3:.0f} / {row['int8_bytes'] / 1e3:.0f} | "
            f"{row['fp32_ms_b1']:.2f} / {row['int8_ms_b1']:.2f} ({row['speedup_b1']:.2f}x) | "
            f"{row['fp32_ms_b64']:.1f} / {row['int8_ms_b64']:.1f} ({row['speedup_b64']:.2f}x) |")
    notes = REPO / "bench" / "notes" / "int8.md"
    return out + ([""] + [notes.read_text().strip()] if notes.is_file() else []) + [""]


def _widths() -> list[str]:
    """The channel-width latency study (bench/latency_widths.py), if it has run."""
    path = RESULTS / "latency_widths.json"
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    m = result["machine"]
    out = ["## Latency against channel widths (ResNet-56, nothing else varied)", "",
           f"- command: `{result['command'].strip()}`; commit: `{result['commit']}`; machine: {m['cpus']} CPUs, "
           f"{m['platform']}; onnxruntime {result['onnxruntime']}; median of {result['repeats_b1']} runs at batch 1, "
           f"{result['repeats']} at batch 64", "",
           "Ratios are against the unpruned ResNet-56 (first row). \"MACs run\" counts what onnxruntime's convolutions "
           "compute, from the shapes in its profile; \"outside kernels\" is the part of a batch-1 call no kernel "
           "accounts for.", "",
           "| widths | kind | FLOPs kept | MACs run kept | latency b1, 2 / 1 threads | latency b64, 2 / 1 threads "
           "| b1 ms | b64 ms | b1 ms outside kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kind = ("inner channels of stages 1/2/3 (of 16/32/64)" if r["family"] == "inner"
                else "base width (stages width/2x/4x)")
        out.append(f"| {'/'.join(map(str, r['widths']))} | {kind} | {r['flops_ratio']:.2f} | {r['onnxruntime_macs_ratio']:.2f} "
                   f"| {r['latency_ratio_b1']:.2f} / {r['latency_ratio_b1_1thread']:.2f} "
                   f"| {r['latency_ratio_b64']:.2f} / {r['latency_ratio_b64_1thread']:.2f} "
                   f"| {r['latency_ms_b1']:.2f} | {r['latency_ms_b64']:.1f} | {r['op_ms_b1']['outside kernels']:.2f} |")
    notes = REPO / "bench" / "notes" / "latency_widths.md"
    return out + ["", notes.read_text().strip(), ""] if notes.is_file() else out + [""]


def _latency_targets() -> list[str]:
    """Methods pruned for latency (bench/latency_targets.py), predicted against measured, if it has run."""
    path = RESULTS / "latency_targets.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    s = r["settings"]
    rows = sorted(r["units"].values(), key=lambda u: (u["cpu"], u.get("model", "resnet20"), u.get("batch_size", 64), u["target"], u["name"]))
    out = ["## Pruning for latency (`metric: latency`, converged bases: ResNet-20, and ResNet-56 where the row says)", "",
           f"- command: `python bench/latency_targets.py`; commits: `{', '.join(sorted({u['commit'][:8] for u in rows}))}`; "
           f"{r['machine']['platform']}; a table per batch size and thread count (median of {s['table_repeats']} calls per "
           f"layer shape); base and pruned ONNX models timed in alternating blocks at the row's batch and threads, median of "
           f"{s['timing_repeats']} calls; no finetuning (accuracy before finetuning)", "",
           "\"asked\" is 1 - target, the time ratio asked for; \"measured / asked\" within 0.90-1.10 meets the latency "
           "issue's ±10%. Prediction error: predicted / measured pruned time - 1.", "",
           "| CPU | batch, threads | method | target | predicted ratio | measured ratio | measured / asked | prediction error "
           "| FLOPs removed | val acc | test acc | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in rows:
        where = f"{u['cpu']} | " + ("ResNet-56, " if u.get("model") == "resnet56" else "") + f"{u.get('batch_size', 64)}, {u.get('threads') or 'all'}"
        if u.get("status") == "refused":
            out.append(f"| {where} | {u['name']} | {u['target']} | refused: {u['error'][:160]} | | | | | | | {u['seconds']:.0f} |")
            continue
        asked = 1 - u["target"]
        out.append(f"| {where} | {u['name']} | {u['target']} | {u['predicted_ratio']:.3f} | {u['measured_ratio']:.3f} | "
                   f"{u['measured_ratio'] / asked:.2f} | {100 * u['prediction_error']:+.1f}% | {u['flops_reduction']:.3f} | "
                   f"{100 * u['val_acc_before_finetune']:.2f}% | {100 * u['test_acc_before_finetune']:.2f}% | {u['seconds']:.0f} |")
    notes = REPO / "bench" / "notes" / "latency_targets.md"
    return out + ["", notes.read_text().strip(), ""] if notes.is_file() else out + [""]


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    out = ["# Benchmarks", "",
           "Every method runs through the same pipeline (`dvc exp run -S prune.method=... -S prune.target=...`) on the",
           "same pretrained base model, with the same finetuning budget and seed. Accuracies are on the test split,",
           "which no method sees before the final report. \"vs emo-dir\" is the method's accuracy minus EMO-DIR's, in",
           "percentage points (negative: EMO-DIR is better). ONNX latency is onnxruntime on the CPU, median of",
           "repeated runs, pruned over unpruned (timed in alternating blocks since commit 099566f; the `full` and",
           "`digits` profiles were timed before, one model after the other); compare it with the FLOPs kept.", ""]
    paths = [p for p in RESULTS.glob("*.json") if p.stem not in EXTRA | {"train_speed", "train_layout", "latency_calibration"} and not p.stem.endswith(".partial")
             and not p.stem.startswith("int8_weights-")]  # per instruction set, read in bench/notes/int8.md
    # (studies, and runs still in progress, are left out); a profile first, then its variants
    results = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: (r["profile"], r.get("variant", "")))
    for result in results:
        name = result["profile"] + (f"-{result['variant']}" if "variant" in result else "")
        plot = DOCS / f"benchmarks_{name}.png"
        _plot(result, plot)
        p = result["params"]
        m = result["machine"]
        out += [
            f"## Profile `{result['profile']}`" + (f", variant `{result['variant']}`: "
                                                   + ", ".join(f"`{kv}`" for kv in result["sets"])
                                                   if "variant" in result else ""), "",
            f"- command: `{result['command']}`"
            + (f" (total {result['wall_seconds'] / 60:.0f} min)" if "wall_seconds" in result else " (resumable units, see the unit files)"),
            f"- commit: `{', '.join(result.get('commits') or [result.get('commit', '?')])}`; machine: {m['cpus']} CPUs, "
            f"{m['platform']}, Python {m['python']}",
            f"- model `{p['model']['name']}`, data `{p['data']['source']}`; "
            + (f"base `{Path(p['model']['checkpoint']).name}` (bench/bases, converged); " if p["model"].get("checkpoint")
               else f"pretrain {p['pretrain']['epochs']} epochs; ")
            + f"finetune {p['finetune']['epochs']} epochs ({p['finetune']['kd']}); EMO-DIR K={p['divide']['k']}, "
            f"population {p['search']['pop_size']} x {p['search']['generations']} generations per sub-network, "
            f"{p['constrain']['candidates']} candidates x {p['constrain']['epochs']} constrained epochs", "",
            *_base_line(result),
            *([f"- ONNX latencies re-timed on the idle machine after the run: `{result['latency_remeasured']['command']}` "
                f"({result['latency_remeasured']['repeats']} repeats)"] if "latency_remeasured" in result else []), "",
            *(_latency_table(result) if _metric(result) == "latency"
              else _seeded_table(result) if "units" in result else _table(result)), "",
            *(_search_speed(result) if "units" in result else []),
            *_failed(result),
            f"![accuracy vs {'latency' if _metric(result) == 'latency' else 'FLOPs'}]({plot.name})", "",
        ]
        notes = REPO / "bench" / "notes" / f"{name}.md"
        if notes.is_file():
            out += [notes.read_text().strip(), ""]
    out += _latency_targets()
    out += _int8()
    out += _widths()
    (DOCS / "benchmarks.md").write_text("\n".join(out) + "\n")
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
