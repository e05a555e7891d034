"""INT8: onnxruntime's static QDQ quantization of an exported model, per-channel weights, checked against FP32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pruning.cpu import u8s8_saturates
from pruning.onnx_export import export_onnx, session
from pruning.quantize import check_int8_drop, evaluate_onnx, quantize_int8
from tests.conftest import self_labelled


def test_int8_model_is_qdq_with_per_channel_weights_and_follows_fp32(tmp_path):
    model, x, y = self_labelled(96, name="vgg16_bn")
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m8.onnx"
    export_onnx(model, x[:1], fp32)
    assert quantize_int8(fp32, int8, (x[i : i + 32].numpy() for i in range(0, 64, 32))) == 64
    graph = onnx.load(str(int8)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    # each convolution reads a weight dequantized with one scale per output channel
    producers = {n.output[0]: n for n in graph.node}
    scales = [inits[producers[w].input[1]] for w in conv_weights]
    assert scales and all(s.ndim == 1 and len(s) > 1 for s in scales)
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    fp32_eval = evaluate_onnx(session(fp32), loader)
    int8_eval = evaluate_onnx(session(int8), loader, reference=session(fp32))
    assert fp32_eval["accuracy"] == 1.0  # self-labelled: FP32 is right by definition
    assert int8_eval["top1_agreement"] == int8_eval["accuracy"] and int8_eval["accuracy"] >= 0.9
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size


def test_weights_take_7_bits_where_the_u8s8_kernels_saturate(tmp_path):
    """x86 without VNNI (VPMADDUBSW's 16-bit sums overflow with full int8 weights): onnxruntime's reduce_range."""
    info = "model name\t: AMD EPYC\nflags\t\t: sse2 avx avx2 fma{}\n"
    assert u8s8_saturates(info.format(""))  # AVX2 alone
    assert not u8s8_saturates(info.format(" avx512f avx512_vnni")) and not u8s8_saturates(info.format(" avx_vnni"))
    assert not u8s8_saturates("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # Arm: dot-product kernels
    model, x, _ = self_labelled(32, name="vgg16_bn")
    fp32 = tmp_path / "m.onnx"
    export_onnx(model, x[:1], fp32)
    widest = {}
    for reduce_range in (False, True):
        int8 = tmp_path / f"m8-{reduce_range}.onnx"
        quantize_int8(fp32, int8, [x.numpy()], reduce_range=reduce_range)
        weights = [numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
        widest[reduce_range] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert widest == {False: 127, True: 64}


def test_int8_that_loses_more_than_allowed_fails_naming_both_accuracies():
    assert check_int8_drop(0.91, 0.905, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"loses 2\.00 points .*0\.8900 vs 0\.9100.*max_int8_drop = 1\.0"):
        check_int8_drop(0.91, 0.89, 1.0)
    with pytest.raises(ValueError, match="calibration got no images"):
        quantize_int8("never-read.onnx", "never-written.onnx", iter(()))


def test_an_int8_model_slower_than_fp32_is_named_with_its_batches():
    from pruning.quantize import int8_slower

    assert int8_slower({1: 1.4, 64: 2.3}) is None
    warning = int8_slower({64: 0.84, 1: 1.23, 8: 0.99})
    assert warning is not None and "batch 8: 0.99x, batch 64: 0.84x" in warning and "batch 1" not in warning
    assert "prune.round_to" in warning
