"""Why ONNX latency falls less than FLOPs: time ResNet-56 at chosen channel widths, nothing else varied.

Every configuration is a freshly built ResNet-56 (random weights: latency does not depend on values),
exported by the pipeline's own `export_onnx` and timed by its own `latency_ms` (onnxruntime, CPU, median).
Two families:
- `inner`: only the channels inside each residual block shrink (what EMO-DIR prunes), per stage;
- `uniform`: every width scales (stem, residual chains and inner channels), what `uniform` prunes.
Odd and multiple-of-8 counts at similar FLOPs show what rounding channel counts is worth.

    python bench/latency_widths.py            # about 2 minutes on 2 idle cores
Writes bench/results/latency_widths.json; bench/report.py renders it into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per model and batch size (median reported)")
    args = ap.parse_args()
    x = torch.zeros(1, 3, 32, 32)
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, widths in [("uniform", (16,)), *CONFIGS]:
            model = build(family, widths)
            flops, params = count_flops_params(model, x)
            path = Path(tmp) / "m.onnx"
            export_onnx(model, x, path)
            sess = session(path)
            lat = {b: latency_ms(sess, x, b, args.repeats) for b in (1, 64)}
            if not base:
                base = {"flops": flops, **{f"b{b}": v for b, v in lat.items()}}
            row = {"family": family, "widths": list(widths), "flops_ratio": flops / base["flops"],
                   "latency_ms_b1": lat[1], "latency_ms_b64": lat[64],
                   "latency_ratio_b1": lat[1] / base["b1"], "latency_ratio_b64": lat[64] / base["b64"]}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    out = REPO / "bench" / "results" / "latency_widths.json"
    out.write_text(json.dumps({
        "command": "python bench/latency_widths.py " + " ".join(sys.argv[1:]), "commit": commit, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "onnxruntime_threads": "default", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
