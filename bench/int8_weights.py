"""INT8 weight formats on this CPU: 8-bit signed weights (U8S8), 7-bit (onnxruntime's reduce_range) and unsigned
(U8U8), each static QDQ with per-channel weights as the export stage makes it, on the converged bases.

    python bench/int8_weights.py                 # ResNet-20 and ResNet-56, 3,000 test images
    python bench/int8_weights.py --test 10000    # the whole test split

Why: onnxruntime's U8S8 kernels saturate on x86 CPUs without VNNI (VPMADDUBSW adds pairs of uint8 x int8
products in 16 bits), so there the export stage quantizes with reduce_range (pruning/cpu.py: u8s8_saturates).
This measures what each format keeps: test accuracy and top-1 agreement with FP32 on the same images, and the
time of a batch of 64 against FP32 (the export stage's alternating blocks, `--repeats` calls each). Writes
bench/results/int8_weights-<isa>.json (one file per instruction set: a result holds only on CPUs like the one
that measured it). Needs the r20 or r56 work folder's prepared data (python bench/run.py sets it up). Run alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: E402
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402

from pruning.latency import machine  # noqa: E402
from pruning.onnx_export import export_onnx, latency_pair_ms, session  # noqa: E402
from pruning.quantize import _Batches, calibration_batches, evaluate_onnx  # noqa: E402
from tasks.checkpoints import load_model  # noqa: E402
from tasks.datasets import split_batches  # noqa: E402

FORMATS = {  # name: quantize_static's arguments beyond the export stage's
    "u8s8": {},
    "u8s8 reduce_range": {"reduce_range": True},
    "u8u8": {"weight_type": QuantType.QUInt8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--test", type=int, default=3000, help="test images (the first of the split)")
    ap.add_argument("--calibration", type=int, default=512, help="val images calibrating the activations")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    prepared = next((REPO / "bench" / "work" / p / "data" / "prepared" for p in ("r20", "r56")
                     if (REPO / "bench" / "work" / p / "data" / "prepared").is_dir()), None)
    if prepared is None:
        raise SystemExit("no prepared CIFAR-10 split in bench/work/r20 or bench/work/r56: run bench/run.py for a profile first")
    torch.set_num_threads(2)
    key = machine()
    rows = []
    for name in args.models:
        model, _ = load_model(REPO / "bench" / "bases" / f"{name}.pt")
        tmp = Path(tempfile.mkdtemp())
        fp32 = tmp / "fp32.onnx"
        export_onnx(model.eval(), torch.zeros(1, 3, 32, 32), fp32)
        quant_pre_process(str(fp32), str(tmp / "prepared.onnx"), skip_symbolic_shape=True)
        test = lambda: itertools.islice(split_batches(prepared, "test", 500), -(-args.test // 500))  # noqa: E731
        sessions = {"fp32": session(fp32)}
        for fmt, extra in FORMATS.items():
            out = tmp / f"{fmt.replace(' ', '-')}.onnx"
            calibration = calibration_batches(split_batches(prepared, "val", 128), args.calibration)
            quantize_static(str(tmp / "prepared.onnx"), str(out), _Batches(sessions["fp32"].get_inputs()[0].name, calibration),
                            **{"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                               "weight_type": QuantType.QInt8, "calibrate_method": CalibrationMethod.MinMax, **extra})
            sessions[fmt] = session(out)
        speed = {}  # each format against FP32 as the export stage times them: alternating blocks, one pair at a time
        for fmt in FORMATS:
            fp32_ms, int8_ms = latency_pair_ms(sessions["fp32"], sessions[fmt], torch.zeros(1, 3, 32, 32), 64, args.repeats)
            speed[fmt] = {"fp32_ms_b64": fp32_ms, "ms_b64": int8_ms, "speedup_b64": fp32_ms / int8_ms if int8_ms else None}
        base = evaluate_onnx(sessions["fp32"], test())
        row = {"model": name, "test_images": base["images"], "fp32_test_acc": base["accuracy"]}
        for fmt in FORMATS:
            e = evaluate_onnx(sessions[fmt], test(), reference=sessions["fp32"])
            row[fmt] = {"test_acc": e["accuracy"], "drop_points": 100 * (base["accuracy"] - e["accuracy"]),
                        "top1_agreement": e["top1_agreement"], **speed[fmt]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    isa = key["cpu"].rsplit("[", 1)[-1].rstrip("]")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = REPO / "bench" / "results" / f"int8_weights-{isa}.json"
    out.write_text(json.dumps({"command": "python bench/int8_weights.py " + " ".join(sys.argv[1:]), "commit": commit,
                               "machine": key, "onnxruntime": ort.__version__, "calibration": args.calibration,
                               "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
