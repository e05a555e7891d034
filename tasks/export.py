"""Stage export: ONNX files of the pruned and the unpruned model, checked, compared with PyTorch and timed."""

from __future__ import annotations

import shutil

import mlflow
import onnxruntime as ort

from pruning.cpu import u8s8_saturates
from pruning.latency import LatencyCost
from pruning.onnx_export import compare_with_torch, export_onnx, latency_pair_ms, session
from pruning.quantize import calibration_batches, check_int8_drop, evaluate_onnx, int8_format, int8_slower, quantize_int8
from tasks import paths
from tasks.checkpoints import load_model
from tasks.common import Data, cost_metric, log_metrics_flat
from tasks.config import Params
from tasks.io import atomic_json, atomic_path
from tasks.tracking import stage_run


def run(params: Params) -> dict:
    data = Data(params)
    pruned, _ = load_model(paths.PRUNED)
    base, _ = load_model(paths.BASE)
    p = params.export
    with stage_run(params, "export", ("export",)):
        for model, path in ((base, paths.BASE_ONNX), (pruned, paths.PRUNED_ONNX)):
            with atomic_path(path) as tmp:
                export_onnx(model, data.example, tmp, opset=p.opset)
        s_pruned, s_base = session(paths.PRUNED_ONNX), session(paths.BASE_ONNX)
        out = compare_with_torch(pruned, s_pruned, data.loader("test"))
        print(
            f"export: {paths.BASE_ONNX} and {paths.PRUNED_ONNX} written; onnxruntime agrees with torch on "
            f"{out['top1_agreement']:.2%} of the test images (max |diff| {out['max_abs_diff']:.1e})",
            flush=True,
        )
        for b in p.latency_batch_sizes:
            base_ms, pruned_ms = latency_pair_ms(s_base, s_pruned, data.example, b, p.latency_repeats)
            assert pruned_ms is not None  # two sessions timed, two times
            out[f"latency_ms_base_b{b}"] = base_ms
            out[f"latency_ms_pruned_b{b}"] = pruned_ms
            out[f"latency_ratio_b{b}"] = pruned_ms / base_ms
            print(
                f"export: batch {b}: {pruned_ms:.2f} ms pruned, {base_ms:.2f} ms base ({pruned_ms / base_ms:.2f} of the time)", flush=True
            )
        out.update(quantized(params, data, s_pruned))
        if params.prune.metric == "latency":  # after quantized: latency.precision int8 times its INT8 model
            out.update(predicted_against_measured(params, data, base, pruned))
        first = p.latency_batch_sizes[0]
        out["latency_batch"] = first
        out["latency_ms_base"] = out[f"latency_ms_base_b{first}"]
        out["latency_ms_pruned"] = out[f"latency_ms_pruned_b{first}"]
        log_metrics_flat(out, "onnx.")
        mlflow.log_artifact(str(paths.PRUNED_ONNX), "models")
        atomic_json(out, paths.metrics_file("export"))
        return out


def predicted_against_measured(params: Params, data: Data, base, pruned) -> dict:
    """prune.metric latency: both ONNX models timed at the latency section's batch size and threads (alternating
    blocks), beside the times the table predicts; `latency_prediction_error` is predicted / measured - 1. With
    latency.precision int8 the models timed are the INT8 ones: models/int8/pruned.onnx, and the base quantized
    the same way beside it (models/int8/base.onnx)."""
    lp = params.latency
    cost = cost_metric(params, base, data.example)
    assert isinstance(cost, LatencyCost)  # prune.metric is latency
    base_path, pruned_path = paths.BASE_ONNX, paths.PRUNED_ONNX
    if lp.precision == "int8":  # the config makes export.quantize int8 with it, so quantized() wrote the pruned one
        base_path, pruned_path = paths.INT8 / "base.onnx", paths.INT8 / "pruned.onnx"
        quantize_int8(paths.BASE_ONNX, base_path, calibration_batches(data.loader("val"), params.export.calibration_images))
    s_base, s_pruned = session(base_path, lp.threads), session(pruned_path, lp.threads)
    base_ms, pruned_ms = latency_pair_ms(s_base, s_pruned, data.example, lp.batch_size, params.export.latency_repeats)
    assert pruned_ms is not None  # two sessions timed, two times
    predicted_base, predicted = cost.predict_ms(base, data.example), cost.predict_ms(pruned, data.example)
    out = {
        "latency_precision": lp.precision,
        "latency_predicted_ms_base": predicted_base,
        "latency_predicted_ms_pruned": predicted,
        "latency_measured_ms_base": base_ms,
        "latency_measured_ms_pruned": pruned_ms,
        "latency_predicted_ratio": predicted / predicted_base,
        "latency_measured_ratio": pruned_ms / base_ms,
        "latency_prediction_error": predicted / pruned_ms - 1.0,
    }
    print(
        f"export: {lp.precision.upper()} latency at batch {lp.batch_size}: predicted {predicted:.2f} ms, measured {pruned_ms:.2f} ms "
        f"({100 * out['latency_prediction_error']:+.1f}%); {out['latency_measured_ratio']:.3f} of the base's measured time "
        f"(predicted {out['latency_predicted_ratio']:.3f})",
        flush=True,
    )
    return out


def quantized(params: Params, data: Data, fp32: ort.InferenceSession) -> dict:
    """export.quantize: int8: models/int8/pruned.onnx, calibrated on val images, its test accuracy, agreement,
    latency and size beside the FP32 model's; fails when it loses more than export.max_int8_drop points."""
    p = params.export
    if paths.INT8.exists():
        shutil.rmtree(paths.INT8)
    paths.INT8.mkdir(parents=True)
    if p.quantize == "none":
        (paths.INT8 / "NOTE.txt").write_text("export.quantize is none: no INT8 model was made\n")
        return {"quantize": "none"}
    target = paths.INT8 / "pruned.onnx"

    reduce_range = u8s8_saturates()  # x86 without VNNI: 7-bit weights, or the INT8 kernels saturate (pruning/cpu.py)
    if reduce_range:
        print(
            "export: this CPU has no VNNI: INT8 weights take 7 bits (onnxruntime's reduce_range), as full 8-bit weights "
            "saturate its U8S8 kernels here",
            flush=True,
        )
    images = quantize_int8(paths.PRUNED_ONNX, target, calibration_batches(data.loader("val"), p.calibration_images), reduce_range)
    int8 = session(target)
    fp32_eval = evaluate_onnx(fp32, data.loader("test"))
    int8_eval = evaluate_onnx(int8, data.loader("test"), reference=fp32)
    out: dict = {
        "quantize": "int8",
        "int8_calibration_images": images,
        "int8_format": int8_format(reduce_range),
        "int8_test_acc": int8_eval["accuracy"],
        "fp32_onnx_test_acc": fp32_eval["accuracy"],
        "int8_drop_points": 100.0 * (fp32_eval["accuracy"] - int8_eval["accuracy"]),
        "int8_top1_agreement": int8_eval["top1_agreement"],
        "int8_size_bytes": target.stat().st_size,
        "fp32_size_bytes": paths.PRUNED_ONNX.stat().st_size,
    }
    for b in p.latency_batch_sizes:
        fp32_ms, int8_ms = latency_pair_ms(fp32, int8, data.example, b, p.latency_repeats)
        assert int8_ms is not None
        out[f"int8_latency_ms_b{b}"] = int8_ms
        out[f"int8_speedup_b{b}"] = fp32_ms / int8_ms
        print(f"export: INT8 batch {b}: {int8_ms:.2f} ms, {fp32_ms / int8_ms:.2f}x the FP32 pruned model", flush=True)
    print(
        f"export: INT8 {target} ({out['int8_size_bytes'] / 1e6:.2f} MB, FP32 {out['fp32_size_bytes'] / 1e6:.2f} MB) "
        f"calibrated on {images} val images: test accuracy {int8_eval['accuracy']:.2%} (FP32 {fp32_eval['accuracy']:.2%}, "
        f"{out['int8_drop_points']:+.2f} points lost), agrees with FP32 on {int8_eval['top1_agreement']:.2%}",
        flush=True,
    )
    slower = int8_slower({b: out[f"int8_speedup_b{b}"] for b in p.latency_batch_sizes})
    out["int8_slower_batches"] = [b for b in p.latency_batch_sizes if out[f"int8_speedup_b{b}"] < 1.0]
    if slower:
        print(f"export: WARNING: {slower}", flush=True)
    check_int8_drop(fp32_eval["accuracy"], int8_eval["accuracy"], p.max_int8_drop)
    return out
