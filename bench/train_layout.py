"""Which memory layout trains a pruned network faster: NCHW or channels_last (NHWC), under bf16 autocast.

A ResNet-20 (the converged base, bench/bases) pruned to the widths the benchmarks' methods build, one training
step (forward, backward, SGD) on a synthetic batch of 128, median of 10 steps after 3 warm-up steps; the two
layouts alternate per model. This is what `channels_last: auto` (pruning/train.py: training_layout) rests on.
Run it alone on the machine: python bench/train_layout.py (results in bench/results/train_layout.json)."""
from __future__ import annotations

import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pruning.channels import channel_groups, pruned_copy  # noqa: E402
from pruning.train import training_layout  # noqa: E402
from tasks.checkpoints import load_model  # noqa: E402

# channels kept per group, in channel_groups order: conv1 (stage-1 chain), layer1.0-2.conv1, layer2.0.conv1,
# layer2.0.conv2 (stage-2 chain), layer2.1-2.conv1, layer3.0.conv1, layer3.0.conv2 (stage-3 chain), layer3.1-2.conv1
WIDTHS = {
    "base (16/32/64)": None,
    "emo-dir 0.5 seed 0 (chains 16/24/48, inner odd)": [16, 13, 3, 6, 10, 24, 29, 22, 21, 48, 58, 45],
    "global-magnitude 0.5 (chains 7/27/54)": [7, 8, 8, 10, 25, 27, 25, 23, 54, 54, 55, 44],
    "uniform 0.5 (11/22-23/45-46)": [11, 11, 11, 11, 23, 23, 23, 23, 45, 45, 46, 45],
    "multiples of 16 (16/32/48)": [16, 16, 16, 16, 32, 32, 32, 32, 48, 48, 48, 48],
    "multiples of 8 (8/16/24/48)": [16, 8, 8, 8, 16, 24, 24, 24, 32, 48, 48, 48],
    "multiples of 4 (12/20/44)": [12, 12, 12, 12, 20, 20, 20, 20, 44, 44, 44, 44],
}


def step_speed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, layout: torch.memory_format, steps: int = 10) -> float:
    m = copy.deepcopy(model).train().to(memory_format=layout)
    xb = x.contiguous(memory_format=layout)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(xb).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    base, _ = load_model(REPO / "bench" / "bases" / "resnet20.pt")
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    names = [g.name for g in channel_groups(base, x[:1])]
    rows = []
    for name, widths in WIDTHS.items():
        model = base if widths is None else pruned_copy(base, x[:1], {g: list(range(c)) for g, c in zip(names, widths)})
        nchw, nhwc = step_speed(model, x, y, torch.contiguous_format), step_speed(model, x, y, torch.channels_last)
        auto = "channels_last" if training_layout(model, "auto") == torch.channels_last else "contiguous"
        rows.append({"model": name, "widths": widths, "nchw_images_per_s": nchw, "nhwc_images_per_s": nhwc,
                     "nhwc_over_nchw": nhwc / nchw, "auto_picks": auto,
                     "auto_picks_faster": (auto == "channels_last") == (nhwc > nchw)})
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "command": "python bench/train_layout.py",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "batch_size": 128, "precision": "bf16", "rows": rows,
    }
    (REPO / "bench" / "results" / "train_layout.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
