"""Latency targets: does a model pruned for `metric: latency` take the time asked for?

For each method and latency target: prune the converged ResNet-20 base (bench/bases/resnet20.pt; `--model
resnet56`: bench/bases/resnet56.pt, K=4; CIFAR-10 copy prepared in bench/work/cifar10-prepared) with the Python API, `metric="latency"` over the table in
latency/table.json (onnxruntime, batch 64, its default threads), then export the base and the pruned model
to ONNX and time both in alternating blocks (batch 64, 50 calls each). Recorded per unit: the predicted
and the measured time ratio (pruned / base) and the prediction error, FLOPs removed, accuracy before
finetuning (val and test; no finetuning here: the time is fixed by the structure), seconds. EMO-DIR runs
the r20 profile's search settings. global-magnitude runs with round_to 1 and 16 (channel counts in whole
16-channel blocks).

Each unit is written to bench/results/latency_targets.json when it ends; a rerun skips the units already
there with the same settings, so it carries on where it stopped. Run it alone: timing on a busy machine
measures the other work. bench/notes/latency_targets.md discusses the results.

    python bench/latency_targets.py                       # every method, targets 0.5 and 0.7
    python bench/latency_targets.py --methods uniform --targets 0.5
    python bench/latency_targets.py --batch-size 1 --threads 1   # batch 1 on one thread: its own table and units
    python bench/latency_targets.py --model resnet56      # the converged ResNet-56 (K=4, as the r56 profile): its own units
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from pruning.latency import CALIBRATION_WIDTHS, machine  # noqa: E402

OUT = REPO / "bench" / "results" / "latency_targets.json"
BASES = REPO / "bench" / "bases"
PREPARED = REPO / "bench" / "work" / "cifar10-prepared"
TABLE = REPO / "latency" / "table.json"
# (name, method, round_to): global-magnitude twice, the second with counts in whole 16-channel blocks
METHODS = [("uniform", "uniform", 1), ("global-magnitude", "global-magnitude", 1), ("global-magnitude-r16", "global-magnitude", 16),
           ("random", "random", 1), ("emo-dir", "emo-dir", 1), ("whole-emo", "whole-emo", 1)]
SETTINGS = {"batch_size": 64, "threads": 0, "table_repeats": 10, "timing_repeats": 50, "k": 3, "pop_size": 16, "generations": 8,
            "candidates": 4, "constrain_epochs": 2, "cache_train": 4000, "cache_val": 2000, "bn_samples": 2048, "seed": 0,
            "calibration_widths": list(CALIBRATION_WIDTHS)}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _digest(name: str, target: float) -> str:
    return hashlib.sha256(json.dumps({"settings": SETTINGS, "unit": [name, target]}, sort_keys=True).encode()).hexdigest()[:16]


# The CPU the first units were timed on: their keys name no machine. Every other CPU's units say which it is
# ("... on AMD EPYC [avx2]"): a table and its timings hold on one kind of CPU only (pruning.latency.machine).
HOME_CPU = "AMD EPYC [avx512+vnni]"


def _key(name: str, target: float, cpu: str) -> str:
    """ResNet-20's units at the default batch 64 on every core keep their plain keys; others say their model, batch
    and threads, and units timed on another CPU than HOME_CPU say which."""
    b, t = SETTINGS["batch_size"], SETTINGS["threads"]
    model = SETTINGS.get("model", "resnet20")  # units recorded before --model existed are ResNet-20's
    return (("" if model == "resnet20" else f"{model} ") + f"{name}@{target}" + ("" if (b, t) == (64, 0) else f" b{b} t{t or 'default'}")
            + ("" if cpu == HOME_CPU else f" on {cpu}"))


def run_unit(name: str, method: str, round_to: int, target: float) -> dict:
    from pruning.api import prune
    from pruning.latency import LatencyTable
    from pruning.onnx_export import export_onnx, latency_pair_ms, session
    from pruning.train import evaluate
    from tasks.checkpoints import load_model
    from tasks.datasets import split_batches

    s = SETTINGS
    base, meta = load_model(BASES / f"{s.get('model', 'resnet20')}.pt")
    x = torch.zeros(1, 3, meta["image_size"], meta["image_size"])
    train = split_batches(PREPARED, "train", 128, train=True, seed=s["seed"])
    val, test = split_batches(PREPARED, "val", 256), split_batches(PREPARED, "test", 256)
    table = LatencyTable(TABLE, batch_size=s["batch_size"], threads=s["threads"], repeats=s["table_repeats"])
    start = time.perf_counter()
    try:
        result = prune(base, x, train, val, target, method=method, metric="latency", latency=table, round_to=round_to, k=s["k"],
                       pop_size=s["pop_size"], generations=s["generations"], candidates=s["candidates"],
                       constrain_epochs=s["constrain_epochs"], cache_train=s["cache_train"], cache_val=s["cache_val"],
                       bn_samples=s["bn_samples"], seed=s["seed"])
    except ValueError as err:  # a target the method cannot reach: recorded, and the next unit runs
        return {"name": name, "method": method, "round_to": round_to, "target": target, "status": "refused", "model": s.get("model", "resnet20"),
                "batch_size": s["batch_size"], "threads": s["threads"],
                "error": str(err)[:500], "seconds": round(time.perf_counter() - start, 1)}
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "base.onnx", Path(tmp) / "pruned.onnx"]
        export_onnx(base, x, paths[0])
        export_onnx(result.model, x, paths[1])
        sessions = [session(p, s["threads"] or None) for p in paths]
    base_ms, pruned_ms = latency_pair_ms(sessions[0], sessions[1], x, s["batch_size"], s["timing_repeats"])
    assert pruned_ms is not None
    lat = result.info["latency"]
    device = torch.device("cpu")
    return {
        "name": name, "method": method, "round_to": round_to, "target": target, "status": "pruned", "model": s.get("model", "resnet20"),
        "batch_size": s["batch_size"], "threads": s["threads"],
        "predicted_ratio": round(lat["pruned"] / lat["base"], 4), "measured_ratio": round(pruned_ms / base_ms, 4),
        "prediction_error": round(lat["pruned"] / pruned_ms - 1.0, 4), "predicted_ms": round(lat["pruned"], 2),
        "measured_ms": round(pruned_ms, 2), "predicted_ms_base": round(lat["base"], 2), "measured_ms_base": round(base_ms, 2),
        "flops_reduction": round(result.flops_reduction, 4), "params_reduction": round(result.params_reduction, 4),
        "val_acc_before_finetune": round(evaluate(result.model, val, device)["acc"], 4),
        "test_acc_before_finetune": round(evaluate(result.model, test, device)["acc"], 4),
        "layers_measured": lat["layers_measured"], "calibration": lat["calibration"], "fallbacks": result.info.get("fallbacks", []),
        "seconds": round(seconds, 1),
        "kept": {group: len(channels) for group, channels in result.scheme.items()},  # to rebuild and re-time the model
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--batch-size", type=int, default=64, help="the batch whose time is the cost and is measured")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default, every core)")
    ap.add_argument("--model", choices=["resnet20", "resnet56"], default="resnet20",
                    help="the converged base in bench/bases (resnet56: K=4, as the r56 benchmark profile)")
    ap.add_argument("--again", action="store_true",
                    help="run the selected units again even if done (their earlier measurements are kept in `earlier`)")
    args = ap.parse_args()
    SETTINGS.update(batch_size=args.batch_size, threads=args.threads)
    if args.model != "resnet20":  # (ResNet-20's settings stay as they were: its recorded units stay current)
        SETTINGS.update(model=args.model, k=4)
    if not (BASES / f"{args.model}.pt").is_file():
        raise SystemExit(f"--model {args.model}: {BASES / (args.model + '.pt')} is not there; train it with python bench/bases.py {args.model}")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"units": {}}
    # the file's settings are ResNet-20's (every unit's digest covers its own settings)
    results.update({"settings" if args.model == "resnet20" else f"settings_{args.model}": SETTINGS},
                   machine={"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__})
    cpu = machine()["cpu"]
    for name, method, round_to in METHODS:
        if name not in args.methods:
            continue
        for target in args.targets:
            key, digest = _key(name, target, cpu), _digest(name, target)
            old = results["units"].get(key, {})
            if old.get("digest") == digest and not args.again:
                print(f"{key}: done before", flush=True)
                continue
            print(f"{key}: running", flush=True)
            row = run_unit(name, method, round_to, target)
            row.update(digest=digest, commit=_commit(), cpu=cpu)
            if "measured_ratio" in old:
                row["earlier"] = [*old.get("earlier", []), {k: old[k] for k in ("measured_ratio", "prediction_error", "commit")}]
            print(json.dumps(row), flush=True)
            results["units"][key] = row
            OUT.write_text(json.dumps(results, indent=1) + "\n")  # the unit is done: a rerun skips it


if __name__ == "__main__":
    main()
