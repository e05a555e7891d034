"""ONNX Runtime latency as a pruning cost: a per-layer table measured on this machine, and the cost built on it.

FLOPs are not time: ONNX Runtime's CPU convolutions compute channels in blocks of 16 (AVX-512) or 8 (AVX2)
and fall back to a slower kernel for other counts (bench/notes/latency_widths.md). So the cost of a
network is predicted from what its layers take when run:

- `LatencyTable` holds, per machine (CPU model, onnxruntime version, threads, batch size), the time of
  every convolution and linear layer shape asked for so far: the layer alone in an ONNX model (the
  convolution with the ReLU ONNX Runtime fuses into it; its BatchNorm is folded at export), run in
  onnxruntime with its profiler on. A shape is measured once, the first time a cost needs it, and the
  table is saved at once; later runs on the same machine read it and measure nothing.
- Layouts. ONNX Runtime runs most convolutions in a blocked layout (NCHWc: channels in blocks of 16 on
  AVX-512, 8 on AVX2) and converts between it and the plain layout with reorder operations. A layer alone
  pays a reorder on its way in and out; inside a network, a chain of blocked layers does not, but a
  channel count that is not a multiple of the block (padded to the next one) does. So the table keeps a
  layer's convolution time and its two reorders apart, and a layer costs its convolution plus the reorder
  of each side whose channel count is not a whole number of blocks. Summing whole single-layer times
  instead was 19% over the network's time at full width and 5-13% under it at odd widths (ResNet-20,
  batch 64, 2 threads); with the reorders counted this way, within 6% before calibration.
- `LatencyCost` is the metric: a module costs the sum of its layers' table times (in nanoseconds, an int,
  as the exact knapsack and GPIR's sums need). A whole network also runs work pruning does not shrink
  (residual additions and pooling on full-width tensors, layout reorders, the call itself), so
  `LatencyCost.calibrate` fits measured = a * (sum of the table) + b on the whole network at a few widths,
  and the cost of a module that outputs class scores (the whole network, or the head that ends it) adds
  b / a. Sub-network costs add along the chain; the constant cancels in every difference. Each width is timed
  against the unpruned network in alternating blocks, as the export stage times a pruned model, and the line
  is fitted in relative terms (bench/notes/latency_targets.md: timed apart, a shared machine's slow spells
  fell on the widths unevenly, and the fit priced ResNet-56's narrowest models 11-22% too slow).
- INT8 (`precision="int8"`): the same, for the static INT8 model the export stage makes (pruning/quantize.py).
  A layer is quantized alone the same way (QDQ, per-channel weights) and its INT8 convolution timed; alone it
  also quantizes its input, dequantizes its output and transposes to and from the NHWC layout onnxruntime's
  INT8 kernels run in, which inside an INT8 network happen once at its ends, so they are left out and the
  calibration's constant carries them. The whole network is calibrated as INT8 models. INT8 convolutions
  are faster than FP32 ones only on whole blocks of channels (a 13-channel layer took twice a 16-channel
  one's time here), so pruning for INT8 deployment needs its own table.

Example (illustrative, not run)::

    table = LatencyTable("latency.json", batch_size=64)
    cost = LatencyCost(table).calibrate(model, torch.zeros(1, 3, 32, 32))
    cost(model, torch.zeros(1, 3, 32, 32))   # predicted nanoseconds of one batch of 64
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pruning.cpu import cpu_info, isa, u8s8_saturates
from pruning.onnx_export import export_onnx, latency_pair_ms, session
from pruning.quantize import int8_format, quantize_int8

__all__ = ["DEFAULT_TABLE", "PRECISIONS", "LatencyCost", "LatencyTable", "LayerShape", "at_width", "layer_shapes", "machine"]

TABLE_SCHEMA = 2  # 2: each layer is [convolution, reorder in, reorder out] (ms)
DEFAULT_TABLE = Path(".emoprune/latency.json")  # the Python API's, in the folder it runs in
# The whole network is timed at these widths of every prunable group to fit measured = a * sum + b: the fit
# must span the widths pruning reaches (0.25: a 0.7 latency target), or it extrapolates.
CALIBRATION_WIDTHS = (1.0, 0.7, 0.5, 0.3)
# 2: each width timed against the unpruned network in alternating blocks, the median ratio of CALIBRATION_ROUNDS,
# and the line fitted by relative least squares (1: widths timed apart, fastest round, ordinary least squares)
CALIBRATION_METHOD = 2
CALIBRATION_ROUNDS = 3
MEASURE_ROUNDS = 3  # a layer is timed in this many rounds over the missing shapes, the fastest kept
PRECISIONS = ("fp32", "int8")  # the model whose time a table holds: the FP32 ONNX model, or its static INT8 one
# onnxruntime's INT8 convolutions compute channels in blocks of 16 on the AVX512-VNNI machines here: narrower
# counts ran slower than the whole block (bench/notes/r20-lat.md)
INT8_BLOCK = 16
# an INT8 layer alone also runs these at its edges; inside an INT8 network they run once, at the network's ends
INT8_EDGES = ("QuantizeLinear", "DequantizeLinear", "Transpose")
MISFIT_WARNING = 0.1  # a calibration point further than this (relative) from the fitted line is reported
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """A convolution or linear layer as it runs: its input size and every attribute its time depends on."""

    kind: str  # "conv" | "linear"
    c_in: int
    c_out: int
    h: int = 1
    w: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    rows: int = 1  # linear: rows per sample (a Linear on (N, H, W, C) runs on N * H * W rows: ConvNeXt's MLPs)

    @property
    def key(self) -> str:
        if self.kind == "linear":
            return f"linear {self.c_in}>{self.c_out}" + (f" x{self.rows}" if self.rows > 1 else "")
        k, s, p, d = ("x".join(map(str, t)) for t in (self.kernel, self.stride, self.padding, self.dilation))
        return f"conv {self.c_in}>{self.c_out} {self.h}x{self.w} k{k} s{s} p{p} d{d} g{self.groups}"


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def layer_shapes(module: nn.Module, example_input: torch.Tensor) -> tuple[list[LayerShape], bool]:
    """The convolution and linear layers `module` runs on `example_input`, in order, and whether its output
    is class scores (2-D): then it ends a network."""
    shapes: list[LayerShape] = []

    def hook(m: nn.Module, inputs, _out) -> None:
        x = inputs[0]
        if isinstance(m, nn.Linear):
            shapes.append(LayerShape("linear", m.in_features, m.out_features, rows=int(x[0].numel()) // m.in_features))
        elif isinstance(m, nn.Conv2d):
            k, d = _pair(m.kernel_size), _pair(m.dilation)
            # 'valid' pads nothing; 'same' pads about half the receptive field (onnxruntime's SAME_UPPER adds the odd one)
            pad = (
                (0, 0)
                if m.padding == "valid"
                else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
                if m.padding == "same"
                else _pair(m.padding)
            )
            shapes.append(
                LayerShape(
                    "conv", m.in_channels, m.out_channels, int(x.shape[2]), int(x.shape[3]), k, _pair(m.stride), pad, d, int(m.groups)
                )
            )

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            out = module(example_input[:1])
    finally:
        for m, flag in flags.items():
            m.training = flag
        for h in hooks:
            h.remove()
    return shapes, isinstance(out, torch.Tensor) and out.dim() == 2


def machine(cpuinfo: str | None = None) -> dict[str, str]:
    """What a latency table is only valid on: the CPU model, the vector instructions onnxruntime's kernels
    dispatch on, and the onnxruntime version. A virtual machine names its CPU "AMD EPYC" with AVX-512 and
    without it, and the two time the same layer differently (16- or 8-channel blocks, VNNI INT8 kernels or not).
    `cpuinfo`: the text of /proc/cpuinfo (read from there when None)."""
    return {"cpu": f"{cpu_info(cpuinfo)[0]} [{isa(cpuinfo)}]", "onnxruntime": ort.__version__}


def at_width(model: nn.Module, example_input: torch.Tensor, width: float, groups: Sequence | None = None) -> nn.Module:
    """A copy of `model` with every prunable channel group keeping its first `width` of its channels (at least one):
    the networks the calibration times. `groups`: `channel_groups(model, example_input)`, when the caller has them."""
    from pruning.channels import channel_groups, pruned_copy

    groups = channel_groups(model, example_input) if groups is None else groups
    return pruned_copy(model, example_input, {g.name: list(range(max(1, round(width * g.channels)))) for g in groups})


def _layer_model(shape: LayerShape, batch: int) -> bytes:
    """One layer as an ONNX model (random weights: time does not depend on values)."""
    rng = np.random.default_rng(0)
    if shape.kind == "linear":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch * shape.rows, shape.c_in])
        w = numpy_helper.from_array(rng.standard_normal((shape.c_out, shape.c_in), dtype=np.float32), "w")
        b = numpy_helper.from_array(np.zeros(shape.c_out, np.float32), "b")
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch * shape.rows, shape.c_out])
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, shape.c_in, shape.h, shape.w])
        weight = rng.standard_normal((shape.c_out, shape.c_in // shape.groups, *shape.kernel), dtype=np.float32)
        w, b = numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(shape.c_out, np.float32), "b")
        conv = helper.make_node(
            "Conv", ["x", "w", "b"], ["c"], kernel_shape=list(shape.kernel), strides=list(shape.stride),
            pads=[shape.padding[0], shape.padding[1], shape.padding[0], shape.padding[1]], dilations=list(shape.dilation),
            group=shape.groups,
        )  # fmt: skip
        nodes = [conv, helper.make_node("Relu", ["c"], ["y"])]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _int8(model: bytes, calibration: np.ndarray) -> bytes:
    """`model` as the export stage quantizes it (static QDQ INT8), calibrated on one `calibration` batch (values
    do not change integer arithmetic's time). A layer model's input has a fixed batch; a whole network's is calibrated on two
    images (the calibration keeps every activation of what it reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        fp32.write_bytes(model)
        quantize_int8(fp32, int8, [calibration])
        return int8.read_bytes()


Parts = tuple[float, float, float]  # a layer alone: convolution (or linear), reorder in, reorder out (ms)
REORDERS = ("ReorderInput", "ReorderOutput")


def _profile(model: bytes, feeds: dict[str, np.ndarray], threads: int, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median time (ms) of each operator type in one call of `model`, from onnxruntime's profiler (nodes of one
    type summed; the first `warmup` calls left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, threads, profile=Path(tmp) / "profile")
        for _ in range(warmup + repeats):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"], []).append(e["dur"] / 1000.0)
            op_of[e["name"]] = e["args"]["op_name"]
    times: dict[str, float] = {}
    for node, durations in per_node.items():
        times[op_of[node]] = times.get(op_of[node], 0.0) + float(np.median(durations[warmup:] or durations))
    return times


def _feeds(shape: LayerShape, batch: int) -> dict[str, np.ndarray]:
    size = (batch * shape.rows, shape.c_in) if shape.kind == "linear" else (batch, shape.c_in, shape.h, shape.w)
    return {"x": np.random.default_rng(0).standard_normal(size, dtype=np.float32)}


class LatencyTable:
    """Per-layer onnxruntime times (ms) on this machine at one batch size and thread count, saved to `path`
    (None: kept in memory). The file holds one table per (CPU, onnxruntime, threads, batch); `measured` counts
    the shapes this object had to time."""

    def __init__(
        self,
        path: str | Path | None,
        batch_size: int = 64,
        threads: int = 0,
        repeats: int = 10,
        timer: Callable[[LayerShape, int], float | Parts] | None = None,
        block: int | None = None,
        precision: str = "fp32",
    ) -> None:
        """`timer(shape, batch_size)` replaces onnxruntime's timing of a layer (ms, or its three parts), and names
        the table it fills ("timer <name>" in place of the machine): for code that must not depend on how busy
        the machine is. `block` is the blocked layout's channel block (None: onnxruntime's, found once on this
        machine; 0 with a timer: no reorders). `precision` "int8" times the static INT8 model instead of the FP32
        one (a table of its own, keyed `| int8` and the quantization format, `int8_format`)."""
        if batch_size < 1 or threads < 0 or repeats < 1 or (block is not None and block < 0) or precision not in PRECISIONS:
            raise ValueError(
                f"latency table: batch_size {batch_size}, threads {threads}, repeats {repeats}, block {block}, precision "
                f"{precision!r}; allowed: batch_size >= 1, threads >= 0 (0: onnxruntime's default, every core), repeats >= 1, "
                f"block >= 0, precision one of {', '.join(PRECISIONS)}"
            )
        self.precision = precision
        self.path = Path(path) if path is not None else None
        self.batch_size, self.threads, self.repeats = batch_size, threads, repeats
        m = machine() if timer is None else {"cpu": f"timer {getattr(timer, '__name__', 'custom')}", "onnxruntime": "-"}
        self.key = f"{m['cpu']} | onnxruntime {m['onnxruntime']} | threads {threads or 'default'} | batch {batch_size}"
        # the FP32 tables keep the keys they were saved under; an INT8 table names how its layers are quantized
        self.key += f" | int8 {int8_format(u8s8_saturates())}" if precision == "int8" else ""
        self.timer = timer
        self.measured = 0
        self._lock = threading.Lock()
        doc = self._read()
        entry = doc["tables"].get(self.key, {})
        self.layers: dict[str, list[float]] = {k: list(v) for k, v in entry.get("layers", {}).items()}
        self.calibrations: dict[str, dict] = dict(entry.get("calibrations", {}))
        self._block = block if block is not None else (0 if timer is not None else entry.get("block"))

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {"schema": TABLE_SCHEMA, "tables": {}}
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"latency table {str(self.path)!r} is not readable JSON ({err}); delete it to measure again") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
            raise ValueError(f"latency table {str(self.path)!r} is not a latency table; delete it to measure again")
        if doc.get("schema") != TABLE_SCHEMA:
            raise ValueError(
                f"latency table {str(self.path)!r} has schema {doc.get('schema')!r}, this version reads schema {TABLE_SCHEMA} "
                "(schema 2 keeps each layer's reorders apart); delete the file to measure again"
            )
        return doc

    def save(self) -> None:
        """Write this machine's table into the file, beside the other machines' (read again: another process may
        have added to it), atomically."""
        if self.path is None:
            return
        doc = self._read()
        entry = doc["tables"].setdefault(self.key, {})
        entry["layers"] = {**entry.get("layers", {}), **self.layers}
        entry["calibrations"] = {**entry.get("calibrations", {}), **self.calibrations}
        if self._block is not None and self.timer is None:
            entry["block"] = self._block
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    @property
    def block(self) -> int:
        """The channel block of onnxruntime's blocked layout here: the narrowest convolution whose input it
        reorders into blocks (16 on AVX-512, 8 on AVX2; 0 when it never does). Found once, saved."""
        if self._block is None:
            with self._lock:
                found = 0
                for c in (4, 8, 16, 32):
                    probe = LayerShape("conv", c, c, 8, 8, (3, 3), (1, 1), (1, 1))
                    if "ReorderInput" in _profile(_layer_model(probe, 1), _feeds(probe, 1), self.threads, 1, warmup=0):
                        found = c
                        break
                self._block = found
                self.save()
        return self._block

    def parts(self, shapes: Sequence[LayerShape]) -> list[list[float]]:
        """Each layer alone: [convolution, reorder in, reorder out] (ms), measuring (and saving) the missing ones."""
        with self._lock:  # one measurement at a time, whoever asks
            missing = list(dict.fromkeys(s for s in shapes if s.key not in self.layers))
            if self.timer is not None:
                for s in missing:
                    t = self.timer(s, self.batch_size)
                    self.layers[s.key] = [float(v) for v in t] if isinstance(t, tuple) else [float(t), 0.0, 0.0]
            else:
                # rounds over all the missing shapes, the fastest round of each kept: at batch 1 a layer's calls
                # take a fraction of a millisecond together, so one slow spell of a shared machine would cover
                # all of them (a 5-channel layer read 15 instead of 11 us); spread over rounds, it covers one
                models = {s.key: self.layer_model(s) for s in missing}
                for _ in range(MEASURE_ROUNDS):
                    for s in missing:
                        ops = _profile(models[s.key], _feeds(s, self.batch_size), self.threads, self.repeats)
                        if self.precision == "int8":  # no blocked-layout reorders: INT8 runs NHWC between its ends
                            now = [sum(ms for op, ms in ops.items() if op not in INT8_EDGES), 0.0, 0.0]
                        else:
                            conv = sum(ms for op, ms in ops.items() if op not in REORDERS)
                            now = [conv, ops.get("ReorderInput", 0.0), ops.get("ReorderOutput", 0.0)]
                        self.layers[s.key] = [min(a, b) for a, b in zip(self.layers.get(s.key, now), now)]
            self.measured += len(missing)
            if missing:
                self.save()
            return [self.layers[s.key] for s in shapes]

    def layer_model(self, shape: LayerShape) -> bytes:
        """The ONNX model a layer shape is timed in: the layer alone, quantized as the export stage does for INT8."""
        model = _layer_model(shape, self.batch_size)
        return _int8(model, _feeds(shape, self.batch_size)["x"]) if self.precision == "int8" else model

    def ms(self, shapes: Sequence[LayerShape]) -> list[float]:
        """Each layer's time inside a network: its convolution, plus the reorder of each side whose channel count
        is not a whole number of blocks (a blocked chain passes whole blocks on without reordering)."""
        block = self.block if self.precision == "fp32" else 0
        padded = (lambda c: c % block != 0) if block > 1 else (lambda c: False)
        return [
            conv + (r_in if padded(s.c_in) else 0.0) + (r_out if padded(s.c_out) else 0.0)
            for s, (conv, r_in, r_out) in zip(shapes, self.parts(shapes))
        ]


class LatencyCost:
    """The `latency` metric: predicted onnxruntime time of a module, in integer nanoseconds (see the module doc).

    Without `calibrate` the constant is 0 and the cost is the sum of the layer times."""

    name = "latency"

    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self.scale, self.offset_ms = 1.0, 0.0  # measured = scale * sum of the table + offset (ms)
        self.calibration: dict | None = None

    def __str__(self) -> str:
        return "latency"

    def __repr__(self) -> str:
        return f"LatencyCost({self.table.key!r})"

    def layers_ms(self, module: nn.Module, example_input: torch.Tensor) -> tuple[float, bool]:
        shapes, ends = layer_shapes(module, example_input)
        return float(sum(self.table.ms(shapes))), ends

    def __call__(self, module: nn.Module, example_input: torch.Tensor) -> int:
        # every layer and the constant rounded to whole ns before they are added: the parts of a network
        # (sub-networks, head) then add up to the whole exactly, as FLOPs do
        shapes, ends = layer_shapes(module, example_input)
        layers = sum(round(ms * 1e6) for ms in self.table.ms(shapes))
        return layers + (round(self.offset_ms / self.scale * 1e6) if ends else 0)

    def predict_ms(self, model: nn.Module, example_input: torch.Tensor) -> float:
        """The predicted time of one batch of the whole `model` (it must end a network), in ms."""
        total, ends = self.layers_ms(model, example_input)
        if not ends:
            raise ValueError(f"predict_ms takes a whole network (class scores out); a {type(model).__name__} outputs feature maps")
        predicted = self.scale * total + self.offset_ms
        if predicted <= 0:
            raise ValueError(
                f"latency: {type(model).__name__} is predicted to take {predicted:.4f} ms, below what calibration measured: "
                f"its layers are far smaller than the calibration's narrowest model (widths {min(CALIBRATION_WIDTHS)})"
            )
        return predicted

    def record(self, base: nn.Module, pruned: nn.Module, example_input: torch.Tensor) -> dict:
        """What a run reports of its latency: both models' predicted times (ms), the reduction, the table."""
        before, after = self.predict_ms(base, example_input), self.predict_ms(pruned, example_input)
        return {
            "base": before,
            "pruned": after,
            "reduction": 1.0 - after / before,
            "unit": f"predicted ms for a batch of {self.table.batch_size}",
            "table": self.table.key,
            "layers_measured": self.table.measured,
            "calibration": {"scale": self.scale, "offset_ms": self.offset_ms},
        }

    def calibrate(self, model: nn.Module, example_input: torch.Tensor, widths: Sequence[float] = CALIBRATION_WIDTHS) -> LatencyCost:
        """Fit measured = scale * (sum of the table) + offset on `model` and copies of it with every prunable
        channel group kept at `widths` of its channels: each exported to ONNX and timed whole against `model`
        in alternating blocks (`_time_paired`), the line fitted by relative least squares (a target is a ratio:
        the narrowest model's error counts as much as the widest's). Saved in the table under the method, the
        widths and the model's layer shapes, so a rerun times nothing."""
        from pruning.channels import channel_groups

        shapes, ends = layer_shapes(model, example_input)
        if not ends:
            raise ValueError(f"calibrate takes a whole network (class scores out); a {type(model).__name__} outputs feature maps")
        ident = f"{type(model).__name__} at widths {'/'.join(map(str, widths))}, method {CALIBRATION_METHOD}: " + ";".join(
            s.key for s in shapes
        )
        if ident not in self.table.calibrations:
            groups = channel_groups(model, example_input)
            variants = [at_width(model, example_input, width, groups) for width in widths]
            # the table's layers first: timed right after other sessions ran, a model shares the cores with their
            # pool threads, which busy-wait a moment after a call (a 0.7-width ResNet-20 read 13 instead of 12 ms)
            totals = [self.layers_ms(v, example_input)[0] for v in variants]
            with tempfile.TemporaryDirectory() as tmp:
                sessions = []
                for i, v in enumerate([model, *variants]):  # the unpruned model first: every width is timed against it
                    path = Path(tmp) / f"model{i}.onnx"
                    export_onnx(v, example_input, path)
                    if self.table.precision == "int8":
                        batch = np.random.default_rng(0).standard_normal((2, *example_input.shape[1:]), dtype=np.float32)
                        path.write_bytes(_int8(path.read_bytes(), batch))
                    sessions.append(session(path, self.table.threads))
            same = [i for i, width in enumerate(widths) if width == 1.0]
            points = list(zip(totals, self._time_paired(sessions[0], sessions[1:], example_input, same)))
            del sessions
            xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
            if xs.min() <= 0:
                raise ValueError(f"latency: {type(model).__name__} runs no convolution or linear layer to time")
            scale, offset = (float(v) for v in np.polyfit(xs, ys, 1, w=1 / ys)) if len(set(xs.tolist())) > 1 else (0.0, 0.0)
            # the offset may be negative: a layer timed alone pays a call's overhead it does not pay inside the
            # network (batch 1 on one thread: -0.04 of 0.39 ms on this machine's ResNet-20)
            if scale <= 0 or scale * xs.min() + offset <= 0:  # noise beat the fit: proportions only
                logger.warning(
                    "latency: calibration of %s: the whole model's time does not rise with its layers' summed time (fitted "
                    "scale %.3g, offset %.3g ms; points %s): predictions use the proportion %.3g alone, with no offset",
                    type(model).__name__, scale, offset, [(round(x, 3), round(y, 3)) for x, y in points], float(ys.sum() / xs.sum()),
                )  # fmt: skip
                scale, offset = float(ys.sum() / xs.sum()), 0.0
            misfit = float(np.max(np.abs((scale * xs + offset) / ys - 1.0)))
            if misfit > MISFIT_WARNING:
                logger.warning(
                    "latency: calibration of %s: a width's measured time is %.0f%% off the line fitted through them: the "
                    "machine may have been busy (every later run on this table uses it; delete its calibration to time again)",
                    type(model).__name__, 100 * misfit,
                )  # fmt: skip
            with self.table._lock:
                self.table.calibrations[ident] = {
                    "scale": scale, "offset_ms": offset, "misfit": misfit, "points": [list(p) for p in points]
                }  # fmt: skip
                self.table.save()
        self.calibration = self.table.calibrations[ident]
        self.scale, self.offset_ms = self.calibration["scale"], self.calibration["offset_ms"]
        return self

    def _time_paired(
        self,
        reference: ort.InferenceSession,
        sessions: Sequence[ort.InferenceSession],
        example_input: torch.Tensor,
        same: Collection[int] = (),
    ) -> list[float]:
        """Each session's time (ms), as its median ratio to `reference` over CALIBRATION_ROUNDS timings in
        alternating blocks (latency_pair_ms), times the reference's median; a session in `same` (a width of
        1.0: the reference's own network) is not timed, its ratio is 1. A slow spell of a shared machine
        falls on both models of a pair alike: timed apart (fastest of three rounds each), one ResNet-56 width
        read 38 ms in one run and 54 in another, and the same network 106 and 120 ms in one run."""
        batch, repeats = self.table.batch_size, 4 * self.table.repeats
        ratios: list[list[float]] = [[1.0] if i in same else [] for i in range(len(sessions))]
        ref_ms: list[float] = []
        for _ in range(CALIBRATION_ROUNDS):
            for i, sess in enumerate(sessions):
                if i in same:
                    continue
                ref, ms = latency_pair_ms(reference, sess, example_input, batch, repeats, warmup=2)
                assert ms is not None
                ratios[i].append(ms / ref)
                ref_ms.append(ref)
        base = float(np.median(ref_ms))
        return [float(np.median(r)) * base for r in ratios]
