"""Latency calibration: which fit of measured = a * (sum of the table) + b predicts pruned models' time best?

The latency cost (pruning/latency.py) sums a per-layer table and calibrates the sum against the whole network
timed at a few uniform widths. A pruned model outside the calibrated span is extrapolated: ResNet-56 pruned to 0.3
of the time at batch 64 keeps 3-7% of the FLOPs, about width 0.15-0.25, below the narrowest calibration width
(0.3), and the one-shot methods overshot their latency target there by 15-20% (bench/notes/latency_targets.md).

This study times each of these models against the base in alternating blocks (as the export stage and
bench/latency_targets.py measure a pruned model), three times, and keeps the median ratio: the calibration
widths (`WIDTHS`), test models the pruning methods build (uniform, global-magnitude and random at several FLOPs
targets; no training, the structure alone sets the time), models whose residual chains stay whole and whose inner
convolutions are thinned (the shape EMO-DIR without boundary genes leaves), and the models bench/latency_targets.py
pruned for latency on this CPU. For each way of calibrating (as built; which widths, ordinary or relative least
squares, fitted on the paired ratios) it reports the error of the predicted time ratio (pruned over base) against
the measured one: a pruner aiming at a ratio r lands at about r / (1 + error).

    python bench/latency_calibration.py --model resnet56      # batch 64, every core
    python bench/latency_calibration.py --model resnet20 --batch-size 1 --threads 1

Results: bench/results/latency_calibration.json (one entry per model, batch, threads and CPU); run alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "results" / "latency_calibration.json"
BASES = REPO / "bench" / "bases"
TABLE = REPO / "latency" / "table.json"
WIDTHS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.15)
# (name, widths it fits on, relative least squares), each fitted on the paired ratios measured here; "as built" beside
# them is the calibration pruning/latency.py stores (timed apart until commit d8f245e, paired and relative since)
SCHEMES = [
    ("ols 1-0.3", (1.0, 0.7, 0.5, 0.3), False),
    ("rel 1-0.3", (1.0, 0.7, 0.5, 0.3), True),
    ("ols 1-0.15", WIDTHS, False),
    ("rel 1-0.15", WIDTHS, True),
    ("rel 1-0.2", (1.0, 0.7, 0.5, 0.3, 0.2), True),
]
FLOPS_TARGETS = {"resnet20": (0.3, 0.5, 0.7, 0.85, 0.92), "resnet56": (0.5, 0.75, 0.88, 0.94, 0.97)}
INNER_WIDTHS = (0.5, 0.25, 0.1)


def fit(points: list[tuple[float, float]], relative: bool) -> tuple[float, float]:
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    a, b = np.polyfit(xs, ys, 1, w=1 / ys if relative else None)
    return float(a), float(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["resnet20", "resnet56"], default="resnet56")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default, every core)")
    ap.add_argument("--rounds", type=int, default=3, help="times each model is timed against the base (its ratio: the median)")
    ap.add_argument("--repeats", type=int, default=40, help="calls per model and per base in one paired timing")
    args = ap.parse_args()

    from pruning.api import prune
    from pruning.channels import channel_groups, pruned_copy
    from pruning.latency import CALIBRATION_WIDTHS, LatencyCost, LatencyTable, at_width, machine
    from pruning.onnx_export import export_onnx, latency_pair_ms, session
    from tasks.checkpoints import load_model

    base, meta = load_model(BASES / f"{args.model}.pt")
    x = torch.zeros(1, 3, meta["image_size"], meta["image_size"])
    cost = LatencyCost(LatencyTable(TABLE, batch_size=args.batch_size, threads=args.threads, repeats=10))
    groups = channel_groups(base, x)
    chains = {g.name for g in groups if len(g.layers) > 3}  # an inner group is conv, BN, next conv; a chain couples more

    models: dict[str, torch.nn.Module] = {}
    for w in WIDTHS:
        models[f"width {w}"] = base if w == 1.0 else at_width(base, x, w, groups)
    for w in INNER_WIDTHS:  # chains whole, inner convolutions thinned
        models[f"inner {w}"] = pruned_copy(
            base, x, {g.name: list(range(g.channels if g.name in chains else max(1, round(w * g.channels)))) for g in groups}
        )
    noise = [(torch.randn(64, *x.shape[1:]), torch.zeros(64, dtype=torch.long))]  # BatchNorm values do not change the time
    for method in ("uniform", "global-magnitude", "random"):
        for t in FLOPS_TARGETS[args.model]:
            models[f"{method} flops {t}"] = prune(base, x, noise, noise, t, method=method, seed=0, bn_samples=64).model

    cpu = machine()["cpu"]
    units = json.loads((REPO / "bench" / "results" / "latency_targets.json").read_text())["units"]
    for u in units.values():  # what bench/latency_targets.py pruned for latency on this CPU: the counts set the time
        if (
            u.get("cpu") == cpu
            and u.get("model", "resnet20") == args.model
            and u["status"] == "pruned"
            and u["batch_size"] == args.batch_size
        ):
            models[f"{u['name']} latency {u['target']}"] = pruned_copy(base, x, {g: list(range(n)) for g, n in u["kept"].items()})
    start = time.perf_counter()
    sums = {name: cost.layers_ms(m, x)[0] for name, m in models.items()}  # measures the table's missing shapes first
    table_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for i, (name, m) in enumerate(models.items()):
            path = Path(tmp) / f"m{i}.onnx"
            export_onnx(m, x, path)
            sessions[name] = session(path, args.threads or None)
    # every model timed against the base in alternating blocks (latency_pair_ms, as the export stage and
    # bench/latency_targets.py measure a pruned model), `rounds` times; its ratio is the median over rounds
    ratios: dict[str, list[float]] = {name: [] for name in models}
    base_ms: list[float] = []
    start = time.perf_counter()
    for _ in range(args.rounds):
        for name, sess in sessions.items():
            b, m = latency_pair_ms(sessions["width 1.0"], sess, x, args.batch_size, args.repeats)
            ratios[name].append(m / b)
            base_ms.append(b)
    timing_seconds = time.perf_counter() - start
    ratio = {name: float(np.median(r)) for name, r in ratios.items()}
    base = float(np.median(base_ms))
    measured = {name: ratio[name] * base for name in models}  # each model's time on the base's median scale

    rows, summary = {}, {}
    built = cost.calibrate(models["width 1.0"], x)  # what pruning/latency.py fits (saved in the table: measured once)
    fitted = [("as built: " + "/".join(map(str, CALIBRATION_WIDTHS)), (built.scale, built.offset_ms))]
    fitted += [
        (scheme, fit([(sums[f"width {w}"], measured[f"width {w}"]) for w in widths], relative)) for scheme, widths, relative in SCHEMES
    ]
    for scheme, (a, b) in fitted:
        errors = {}
        for name in models:
            predicted = (a * sums[name] + b) / (a * sums["width 1.0"] + b)
            errors[name] = round(predicted / ratio[name] - 1, 4)
        rows[scheme] = {"scale": a, "offset_ms": b, "ratio_errors": errors}
        tests = [abs(e) for n, e in errors.items() if not n.startswith("width")]
        summary[scheme] = {
            "max_abs": round(max(tests), 4),
            "mean_abs": round(float(np.mean(tests)), 4),
            "within_10pct": f"{sum(e <= 0.1 for e in tests)}/{len(tests)}",
        }
    key = f"{args.model} b{args.batch_size} t{args.threads or 'default'} on {cpu}"
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results[key] = {
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "machine": {"cpu": cpu, "platform": platform.platform(), "torch": torch.__version__},
        "settings": vars(args) | {"widths": WIDTHS, "flops_targets": FLOPS_TARGETS[args.model], "inner_widths": INNER_WIDTHS},
        "table_seconds": round(table_seconds, 1),
        "timing_seconds": round(timing_seconds, 1),
        "layers_sum_ms": {k: round(v, 3) for k, v in sums.items()},
        "measured_ratio": {k: round(v, 4) for k, v in ratio.items()},
        "ratio_rounds": {k: [round(r, 4) for r in v] for k, v in ratios.items()},
        "measured_ms": {k: round(v, 3) for k, v in measured.items()},
        "base_ms_median": round(base, 3),
        "schemes": rows,
        "summary": summary,
    }
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{key}: layer sums and measured ms")
    for name in models:
        print(
            f"  {name:28s} sum {sums[name]:8.2f}  measured {measured[name]:8.2f}  ratio {measured[name] / measured['width 1.0']:.3f}  "
            + "  ".join(f"{s.split(':')[0]}: {100 * rows[s]['ratio_errors'][name]:+5.1f}%" for s in rows)
        )
    for s, v in summary.items():
        print(
            f"  {s:12s} a {rows[s]['scale']:.3f} b {rows[s]['offset_ms']:+.2f} ms | test models: max |error| {100 * v['max_abs']:.1f}%, "
            f"mean {100 * v['mean_abs']:.1f}%, within 10%: {v['within_10pct']}"
        )


if __name__ == "__main__":
    main()
