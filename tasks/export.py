"""Stage export: ONNX files of the pruned and the unpruned model, checked, compared with PyTorch and timed."""

from __future__ import annotations

import mlflow

from pruning.onnx_export import compare_with_torch, export_onnx, latency_pair_ms, session
from tasks import paths
from tasks.checkpoints import load_model
from tasks.common import Data, log_metrics_flat
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
        first = p.latency_batch_sizes[0]
        out["latency_batch"] = first
        out["latency_ms_base"] = out[f"latency_ms_base_b{first}"]
        out["latency_ms_pruned"] = out[f"latency_ms_pruned_b{first}"]
        log_metrics_flat(out, "onnx.")
        mlflow.log_artifact(str(paths.PRUNED_ONNX), "models")
        atomic_json(out, paths.metrics_file("export"))
        return out
