"""INT8 on top of a benchmark's models: quantize FP32 models statically, measure accuracy, agreement, size and time.

    python bench/int8.py                                   # the r20 work folder's base and kept pruned models
    python bench/int8.py --models bench/bases/resnet56.pt bench/work/r20/onnx/emo-dir-0.5-s0.onnx
    python bench/int8.py --models bench/bases/resnet56.pt --again   # measure a done unit again

A model is an ONNX file, or an emoprune model file (`.pt`: exported to ONNX first, as the export stage does).
Uses the export stage's own functions (pruning/quantize.py, pruning/onnx_export.py): static QDQ INT8,
per-channel weights, activations calibrated on 512 val images; test accuracy and top-1 agreement with FP32 on
the test split of `--work` (the CIFAR-10 copy every converged profile uses); FP32 and INT8 timed in
alternating blocks at batch 1 and 64. Each model is one unit, written to bench/results/int8.json when it
ends; a rerun skips the units done (unless --again). Run it alone: other work on the 2 cores distorts the
times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pruning.onnx_export import export_onnx, latency_pair_ms, session  # noqa: E402
from pruning.quantize import calibration_batches, evaluate_onnx, quantize_int8  # noqa: E402

OUT = REPO / "bench" / "results" / "int8.json"


def unit_name(path: Path) -> str:
    """bench/bases/resnet56.pt -> resnet56; bench/work/r20/onnx/emo-dir-0.5-s0.onnx -> r20/emo-dir-0.5-s0."""
    if path.suffix == ".pt":
        return path.stem
    profile = path.parent.parent.name if path.parent.name in ("onnx", "models") else path.parent.name
    return f"{profile}/{path.stem}"


def run_unit(path: Path, data, calibration: int, repeats: int) -> dict:
    import torch

    from tasks.checkpoints import load_model

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        meta: dict = {}
        if path.suffix == ".pt":
            model, meta = load_model(path)
            export_onnx(model, torch.zeros(1, 3, meta["image_size"], meta["image_size"]), fp32_path)
        else:
            fp32_path.write_bytes(path.read_bytes())
        start = time.perf_counter()
        images = quantize_int8(fp32_path, int8_path, calibration_batches(data.loader("val"), calibration))
        seconds = time.perf_counter() - start
        fp32, int8 = session(fp32_path), session(int8_path)
        f, q = evaluate_onnx(fp32, data.loader("test")), evaluate_onnx(int8, data.loader("test"), reference=fp32)
        row = {
            "model": unit_name(path),
            "source": os.path.relpath(path, REPO),
            "fp32_test_acc": f["accuracy"],
            "int8_test_acc": q["accuracy"],
            "int8_drop_points": 100 * (f["accuracy"] - q["accuracy"]),
            "top1_agreement": q["top1_agreement"],
            "fp32_bytes": fp32_path.stat().st_size,
            "int8_bytes": int8_path.stat().st_size,
            "calibration_images": images,
            "quantize_seconds": seconds,
        }
        if meta.get("scheme"):
            row["pruned"] = True
        for b in (1, 64):
            fp32_ms, int8_ms = latency_pair_ms(fp32, int8, data.example, b, repeats)
            row[f"fp32_ms_b{b}"], row[f"int8_ms_b{b}"] = fp32_ms, int8_ms
            row[f"speedup_b{b}"] = fp32_ms / int8_ms if int8_ms else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "r20", help="a profile's work folder: its data")
    ap.add_argument("--models", nargs="+", type=Path, default=None,
                    help="ONNX or .pt model files (default: the work folder's onnx/*.onnx)")
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--again", action="store_true", help="measure the given models again even if done")
    args = ap.parse_args()
    work = args.work.resolve()
    models = [p.resolve() for p in (args.models or sorted((work / "onnx").glob("*.onnx")))]
    missing = [str(p) for p in models if not p.is_file()]
    if missing:
        sys.exit(f"int8: no such model file: {', '.join(missing)}")
    os.chdir(work)
    from tasks.common import Data
    from tasks.config import load_params

    data = Data(load_params(work / "params.yaml"))
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results = results if "units" in results else {"units": {}}  # the single-run format before units
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    results.update(calibration=args.calibration, repeats=args.repeats, onnxruntime=ort.__version__,
                   machine={"cpus": os.cpu_count(), "platform": platform.platform()})
    for path in models:
        name = unit_name(path)
        if name in results["units"] and not args.again:
            print(f"{name}: done before", flush=True)
            continue
        print(f"{name}: quantizing", flush=True)
        row = run_unit(path, data, args.calibration, args.repeats)
        row.update(commit=commit, command="python bench/int8.py " + " ".join(sys.argv[1:]))
        print(json.dumps(row), flush=True)
        results["units"][name] = row
        OUT.write_text(json.dumps(results, indent=1) + "\n")  # the unit is done: a rerun skips it


if __name__ == "__main__":
    main()
