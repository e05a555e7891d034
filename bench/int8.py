"""INT8 on top of a benchmark's models: quantize the FP32 ONNX files a profile's work folder holds, measure.

    python bench/int8.py --work bench/work/r20    # its models/base.onnx and models/pruned.onnx (the last unit's)

Uses the export stage's own functions (pruning/quantize.py, pruning/onnx_export.py): static QDQ INT8,
per-channel weights, activations calibrated on 512 val images; test accuracy and top-1 agreement with FP32
on the work folder's test split; FP32 and INT8 timed in alternating blocks at batch 1 and 64. Run it alone:
other work on the 2 cores distorts the times. Writes bench/results/int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pruning.onnx_export import latency_pair_ms, session  # noqa: E402
from pruning.quantize import calibration_batches, evaluate_onnx, quantize_int8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "r20")
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    work = args.work.resolve()
    os.chdir(work)
    from tasks.common import Data
    from tasks.config import load_params

    params = load_params(work / "params.yaml")
    data = Data(params)
    unit = json.loads((work / "metrics" / "rank.json").read_text())
    rows = []
    for name in ("base", "pruned"):
        fp32_path, int8_path = work / "models" / f"{name}.onnx", Path("/tmp") / f"int8-{name}.onnx"

        start = time.perf_counter()
        images = quantize_int8(fp32_path, int8_path, calibration_batches(data.loader("val"), args.calibration))
        seconds = time.perf_counter() - start
        fp32, int8 = session(fp32_path), session(int8_path)
        f, q = evaluate_onnx(fp32, data.loader("test")), evaluate_onnx(int8, data.loader("test"), reference=fp32)
        row = {
            "model": name,
            "fp32_test_acc": f["accuracy"],
            "int8_test_acc": q["accuracy"],
            "top1_agreement": q["top1_agreement"],
            "fp32_bytes": fp32_path.stat().st_size,
            "int8_bytes": int8_path.stat().st_size,
            "calibration_images": images,
            "quantize_seconds": seconds,
        }
        for b in (1, 64):
            fp32_ms, int8_ms = latency_pair_ms(fp32, int8, data.example, b, args.repeats)
            row[f"fp32_ms_b{b}"], row[f"int8_ms_b{b}"] = fp32_ms, int8_ms
            row[f"speedup_b{b}"] = fp32_ms / int8_ms if int8_ms else None
        print(json.dumps(row), flush=True)
        rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc = {
        "command": "python bench/int8.py --work " + os.path.relpath(work, REPO),
        "commit": commit,
        "work": str(work),
        "pruned_method": unit.get("method"),
        "pruned_target": unit.get("target"),
        "flops_reduction": unit.get("flops_reduction"),
        "onnxruntime": ort.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "repeats": args.repeats,
        "rows": rows,
    }
    (REPO / "bench" / "results" / "int8.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote bench/results/int8.json")


if __name__ == "__main__":
    main()
