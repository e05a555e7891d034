"""Static INT8 quantization of an exported ONNX model with onnxruntime.quantization, and its evaluation.

QDQ format, int8 weights per output channel, uint8 activations calibrated on a few hundred images
(the U8S8 pair that x86 VNNI kernels run), after onnxruntime's own pre-processing (shape inference,
graph optimisation). Everything here is onnxruntime's; this module only feeds it and measures the result.

Example (illustrative, not run)::

    quantize_int8("models/pruned.onnx", "models/pruned-int8.onnx", calibration_batches)
    evaluate_onnx(session("models/pruned-int8.onnx"), test_loader, reference=session("models/pruned.onnx"))
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from pruning.cpu import u8s8_saturates

__all__ = ["INT8_FORMAT", "calibration_batches", "check_int8_drop", "evaluate_onnx", "int8_format", "int8_slower", "quantize_int8"]

# how `quantize_int8` quantizes, named in the key of an INT8 latency table (a change here must not reuse old timings)
INT8_FORMAT = "qdq u8s8 per-channel minmax"


def int8_format(reduce_range: bool) -> str:
    """`INT8_FORMAT`, and the 7-bit weights `quantize_int8` takes where U8S8 kernels saturate."""
    return INT8_FORMAT + (" reduce-range" if reduce_range else "")


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, batches: Iterable[np.ndarray]) -> None:
        self.name = name
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: np.ascontiguousarray(batch, dtype=np.float32)}


def calibration_batches(loader: Iterable, images: int) -> Iterator[np.ndarray]:
    """The first `images` images of a loader of (images, labels) batches, as numpy batches."""
    n = 0
    for x, _ in loader:
        if n >= images:
            return
        yield x[: images - n].numpy()
        n += len(x)


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[np.ndarray], reduce_range: bool | None = None) -> int:
    """Write the static INT8 (QDQ) version of the ONNX model at `fp32_path` to `int8_path`, its activation ranges
    calibrated (min-max) on `calibration` batches of inputs; returns how many images calibrated it. `reduce_range`:
    7-bit weights, onnxruntime's remedy where its U8S8 kernels saturate (None: there, `u8s8_saturates`)."""
    if reduce_range is None:
        reduce_range = u8s8_saturates()
    batches = iter(calibration)
    first = next(batches, None)
    if first is None or len(first) == 0:
        raise ValueError("INT8 calibration got no images: the calibration data is empty; allowed: export.calibration_images >= 1")
    counted: list[int] = []

    def count() -> Iterator[np.ndarray]:
        for b in itertools.chain([first], batches):
            counted.append(len(b))
            yield b

    sess = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            _Batches(name, count()),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )
    return sum(counted)


def evaluate_onnx(sess: ort.InferenceSession, loader: Iterable, reference: ort.InferenceSession | None = None) -> dict[str, float]:
    """Top-1 accuracy of an onnxruntime session over (images, labels) batches, and with `reference` its top-1
    agreement with that session (e.g. INT8 against FP32) on the same images."""
    name = sess.get_inputs()[0].name
    ref_name = reference.get_inputs()[0].name if reference is not None else ""
    correct = agree = total = 0
    for x, y in loader:
        xs = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        pred = sess.run(None, {name: xs})[0].argmax(1)
        correct += int((pred == np.asarray(y)).sum())
        if reference is not None:
            agree += int((pred == reference.run(None, {ref_name: xs})[0].argmax(1)).sum())
        total += len(xs)
    if total == 0:
        raise ValueError("no images to evaluate: the loader is empty")
    out = {"accuracy": correct / total, "images": total}
    if reference is not None:
        out["top1_agreement"] = agree / total
    return out


def check_int8_drop(fp32_acc: float, int8_acc: float, max_drop: float) -> float:
    """The points of accuracy INT8 loses against FP32; a ValueError naming both when that is above `max_drop`."""
    drop = 100.0 * (fp32_acc - int8_acc)
    if drop > max_drop:
        raise ValueError(
            f"INT8 loses {drop:.2f} points of test accuracy against FP32 ({int8_acc:.4f} vs {fp32_acc:.4f}), more than "
            f"export.max_int8_drop = {max_drop}; allowed: raise max_int8_drop, calibrate on more images "
            "(export.calibration_images), or export.quantize: none"
        )
    return drop


def int8_slower(speedups: dict[int, float]) -> str | None:
    """A warning when the INT8 model measured slower than its FP32 model at some batch size (`speedups`: batch ->
    FP32 time over INT8 time), else None. Quantizing is then no gain at that batch, and the user should hear so."""
    slow = {b: r for b, r in sorted(speedups.items()) if r < 1.0}
    if not slow:
        return None
    where = ", ".join(f"batch {b}: {r:.2f}x" for b, r in slow.items())
    return (
        f"the INT8 model is slower than the FP32 one ({where} the FP32 speed); onnxruntime's INT8 convolutions on this "
        "CPU have been measured slower than FP32 for channel counts that are not whole blocks (bench/notes/int8.md): "
        "prune with prune.round_to: 16 or prune.metric: latency, or deploy the FP32 model"
    )
