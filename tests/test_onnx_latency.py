"""ONNX latency timing (onnxruntime, CPU): two models timed in alternating blocks, on real exported files."""
from __future__ import annotations

import torch
from torch import nn

from pruning.onnx_export import export_onnx, latency_ms, latency_pair_ms, session


def _conv_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def test_pair_timing_orders_models_by_their_work_and_agrees_with_single_timing(tmp_path):
    x = torch.zeros(1, 3, 32, 32)
    paths = {}
    for width in (4, 96):  # the wide net does about 500x the multiply-accumulates of the narrow one
        paths[width] = tmp_path / f"w{width}.onnx"
        export_onnx(_conv_net(width), x, paths[width])
    narrow, wide = session(paths[4]), session(paths[96])

    narrow_ms, wide_ms = latency_pair_ms(narrow, wide, x, batch_size=8, repeats=10, warmup=2)
    assert 0 < narrow_ms < wide_ms
    # the order of the two sessions does not decide which one comes out slower
    wide_first, narrow_second = latency_pair_ms(wide, narrow, x, batch_size=8, repeats=10, warmup=2)
    assert 0 < narrow_second < wide_first

    # one session alone is timed by the same loop
    single = latency_ms(wide, x, batch_size=8, repeats=10, warmup=2)
    assert single > narrow_ms and latency_pair_ms(wide, None, x, 8, 3, 1)[1] is None
