"""Why ONNX latency falls less than FLOPs: time ResNet-56 at chosen channel widths, nothing else varied.

Every configuration is a freshly built ResNet-56 (random weights: latency does not depend on values),
exported by the pipeline's own `export_onnx` and timed by its own `latency_ms` (onnxruntime, CPU, median).
Two families:
- `inner`: only the channels inside each residual block shrink (what EMO-DIR prunes), per stage;
- `uniform`: every width scales (stem, residual chains and inner channels), what `uniform` prunes.
Odd and multiple-of-8 counts at similar FLOPs show what rounding channel counts is worth.
Each model is timed with onnxruntime's default thread pool (both cores) and with one thread, and
onnxruntime's own profiler splits a call's time by operator (convolutions, the residual adds, layout
reorders, ...) and the time outside any kernel: what part of the latency FLOPs do not count.

    python bench/latency_widths.py            # about 5 minutes on 2 idle cores
Writes bench/results/latency_widths.json; bench/report.py renders it into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pruning.channels import count_flops_params  # noqa: E402
from pruning.models import ResNetCifar  # noqa: E402
from pruning.onnx_export import export_onnx, latency_ms, session  # noqa: E402

# (family, widths): inner = kept channels inside the blocks of stages 1-3 (of 16/32/64);
# uniform = the network's base width (16 is the original; stages are width, 2x, 4x)
CONFIGS: list[tuple[str, tuple[int, ...]]] = [
    ("inner", (8, 16, 32)), ("inner", (7, 15, 31)),
    ("inner", (12, 12, 12)), ("inner", (11, 13, 13)),
    ("inner", (8, 8, 8)), ("inner", (5, 10, 20)), ("inner", (6, 12, 24)),
    ("inner", (4, 8, 8)), ("inner", (4, 4, 8)), ("inner", (3, 5, 7)),
    ("inner", (16, 16, 32)), ("inner", (16, 16, 16)), ("inner", (12, 24, 48)), ("inner", (4, 8, 16)),
    ("uniform", (12,)), ("uniform", (11,)), ("uniform", (8,)), ("uniform", (9,)),
]


def build(family: str, widths: tuple[int, ...]) -> nn.Module:
    if family == "uniform":
        return ResNetCifar(56, width=widths[0]).eval()
    model = ResNetCifar(56)
    for stage, m in zip((model.layer1, model.layer2, model.layer3), widths):
        for block in stage:
            c_in, c_out = block.conv1.in_channels, block.conv2.out_channels
            block.conv1 = nn.Conv2d(c_in, m, 3, block.conv1.stride, 1, bias=False)
            block.bn1 = nn.BatchNorm2d(m)
            block.conv2 = nn.Conv2d(m, c_out, 3, 1, 1, bias=False)
    return model.eval()


def op_shares(path: Path, x: torch.Tensor, batch: int, runs: int, prefix: Path) -> tuple[dict[str, float], float]:
    """Mean ms per call in each onnxruntime kernel type over `runs` profiled calls (after warm-up), with
    `outside kernels`: the call's wall time no kernel accounts for (scheduling, thread hand-offs); and the
    multiply-accumulates per image the convolutions onnxruntime runs really do, from the shapes it ran
    (its blocked NCHWc kernels pad channel counts up to their block, so these can exceed the model's FLOPs)."""
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.expand(batch, *x.shape[1:]).contiguous().numpy()}
    for _ in range(5 + runs):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    calls = [e for e in trace if e.get("name") == "model_run"][-runs:]
    last = calls[-1]
    totals: dict[str, float] = {}
    macs = 0
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(c["ts"] <= e["ts"] <= c["ts"] + c["dur"] for c in calls):
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1000 / runs
            if op == "Conv" and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]:
                (out_shape,) = e["args"]["output_type_shape"][0].values()
                (w_shape,) = e["args"]["input_type_shape"][1].values()
                macs += math.prod(out_shape) * math.prod(w_shape[1:]) // batch
    wall = sum(c["dur"] for c in calls) / 1000 / runs
    totals["outside kernels"] = max(wall - sum(totals.values()), 0.0)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])), macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per model at batch 64 (median reported)")
    ap.add_argument("--repeats-b1", type=int, default=200, help="timed runs per model at batch 1, about 1 ms each")
    args = ap.parse_args()
    x = torch.zeros(1, 3, 32, 32)
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, widths in [("uniform", (16,)), *CONFIGS]:
            model = build(family, widths)
            flops, params = count_flops_params(model, x)
            path = Path(tmp) / "m.onnx"
            export_onnx(model, x, path)
            repeats = {1: args.repeats_b1, 64: args.repeats}
            lat = {f"b{b}{t}": latency_ms(session(path, threads=n), x, b, repeats[b])
                   for t, n in (("", None), ("_1thread", 1)) for b in (1, 64)}
            if not base:
                base = {"flops": flops, **lat}
            op_ms_b1, _ = op_shares(path, x, 1, 100, Path(tmp) / "prof")
            op_ms_b64, macs = op_shares(path, x, 64, 10, Path(tmp) / "prof")
            base.setdefault("macs", macs)
            row = {"family": family, "widths": list(widths), "flops": flops, "flops_ratio": flops / base["flops"],
                   "onnxruntime_macs": macs, "onnxruntime_macs_ratio": macs / base["macs"],
                   **{f"latency_ms_{k}": v for k, v in lat.items()},
                   **{f"latency_ratio_{k}": v / base[k] for k, v in lat.items()},
                   "op_ms_b1": op_ms_b1, "op_ms_b64": op_ms_b64}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if not k.startswith("op_")}),
                  flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    out = REPO / "bench" / "results" / "latency_widths.json"
    out.write_text(json.dumps({
        "command": "python bench/latency_widths.py " + " ".join(sys.argv[1:]), "commit": commit,
        "repeats": args.repeats, "repeats_b1": args.repeats_b1,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "onnxruntime": ort.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
