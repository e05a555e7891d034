"""ONNX export of a (pruned) model and its verification: checker, onnxruntime agreement with PyTorch, latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = ["compare_with_torch", "export_onnx", "latency_ms", "latency_pair_ms", "session"]


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = 18) -> None:
    """Export with torch's dynamo exporter, batch dimension dynamic, then run onnx.checker on the file."""
    model = model.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=65536)
    x = example_input.expand(2, *example_input.shape[1:]).contiguous()  # batch 2: a size-1 dim would be specialised
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={next(iter(_forward_arg_names(model))): {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _forward_arg_names(model: nn.Module) -> list[str]:
    import inspect

    return [n for n in inspect.signature(model.forward).parameters if n != "self"]


def session(model: str | Path | bytes, threads: int | None = None, profile: str | Path | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session on a model file (or a serialized model), on `threads` threads (None, 0: its default);
    with `profile`, its profiler on, writing under that file prefix (`end_profiling()` returns the file)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])


def compare_with_torch(model: nn.Module, sess: ort.InferenceSession, loader: Iterable) -> dict[str, float]:
    """Max absolute logit difference and top-1 agreement of onnxruntime vs PyTorch (CPU) over `loader`."""
    model = model.eval().cpu()
    name = sess.get_inputs()[0].name
    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for x, _ in loader:
            ref = model(x).numpy()
            out = sess.run(None, {name: x.numpy()})[0]
            max_diff = max(max_diff, float(np.abs(out - ref).max()))
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            total += len(x)
    return {"max_abs_diff": max_diff, "top1_agreement": agree / total, "images": total}


def latency_ms(sess: ort.InferenceSession, example_input: torch.Tensor, batch_size: int, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time (ms) of one onnxruntime call on a batch of `batch_size`."""
    return latency_pair_ms(sess, None, example_input, batch_size, repeats, warmup)[0]


def latency_pair_ms(
    first: ort.InferenceSession,
    second: ort.InferenceSession | None,
    example_input: torch.Tensor,
    batch_size: int,
    repeats: int = 50,
    warmup: int = 5,
    blocks: int = 4,
) -> tuple[float, float | None]:
    """Median wall times (ms) of one call of each session on the same batch, timed in alternating blocks.

    The calls are split into `blocks` blocks per session, in the order first, second, second, first, ...,
    so a slow spell of a shared machine falls on both models alike and their ratio stays fair. Blocks,
    not single calls: onnxruntime's pool threads busy-wait a moment after a call, and calls alternated one
    by one run while the other session's threads still spin (2 cores: 43 instead of 24 ms a batch of 64).
    Each block starts with `warmup` untimed calls."""
    x = np.random.default_rng(0).standard_normal((batch_size, *example_input.shape[1:]), dtype=np.float32)
    sessions = [(s, {s.get_inputs()[0].name: x}) for s in (first, second) if s is not None]
    times: list[list[float]] = [[] for _ in sessions]
    per_block = [repeats // blocks + (b < repeats % blocks) for b in range(blocks)]
    for b, n in enumerate(per_block):
        order = list(enumerate(sessions))
        for k, (sess, feed) in order if b % 2 == 0 else order[::-1]:
            for i in range(warmup + n):
                t = time.perf_counter()
                sess.run(None, feed)
                if i >= warmup:
                    times[k].append((time.perf_counter() - t) * 1000)
    medians = [statistics.median(t) for t in times]
    return medians[0], medians[1] if second is not None else None
