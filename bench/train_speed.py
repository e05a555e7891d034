"""Training speed on this machine: images/s of `fit` on real CIFAR-10 batches, the old path against the new one.

    old: fp32, contiguous (NCHW) layout, a DataLoader applying torchvision's per-image transforms
    new: bf16 autocast, channels_last, `TensorBatches` augmenting and normalising a whole batch at once
    (and each switch alone, to see what each is worth)

    python bench/train_speed.py                    # ResNet-20 and ResNet-56, results in bench/results/train_speed.json

Run it alone on the machine: anything else running distorts every number. Each configuration trains
`--batches` batches of 128 after `--warmup` untimed ones; the configurations run in turn, twice
(A B C D A B C D), and the median of the two is reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CONFIGS = {  # name: (precision, channels_last, batch-level loader)
    "old: fp32, NCHW, per-image transforms": ("fp32", False, False),
    "fp32, NCHW, batch augmentation": ("fp32", False, True),
    "bf16, NCHW, batch augmentation": ("bf16", False, True),
    "fp32, channels_last, batch augmentation": ("fp32", True, True),
    "new: bf16, channels_last, batch augmentation": ("bf16", True, True),
}


class _Take:
    """The first `n` batches of a loader, with a length (what `fit` asks for)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch


def images_per_s(name: str, config: tuple[str, bool, bool], data: Path, batches: int, warmup: int) -> float:
    import torch

    from pruning.models import build_model
    from pruning.train import TrainConfig, fit
    from tasks.datasets import load_split, make_loader, split_batches

    precision, channels_last, batch_level = config
    torch.manual_seed(0)
    model = build_model(name, 10)
    if batch_level:
        loader = split_batches(data, "train", 128, train=True, seed=0)
    else:
        loader = make_loader(load_split(data, "train", train=True), 128, shuffle=True, seed=0)
    cfg = TrainConfig(epochs=1, lr=0.05, precision=precision, channels_last=channels_last)
    fit(model, _Take(loader, warmup), cfg, torch.device("cpu"), progress=False)
    start = time.perf_counter()
    fit(model, _Take(loader, batches), cfg, torch.device("cpu"), progress=False)
    return batches * 128 / (time.perf_counter() - start)


def main() -> None:
    import statistics

    import torch
    from bases import prepared

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    data = prepared()
    rows = []
    for name in args.models:
        runs: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for _ in range(2):
            for label, config in CONFIGS.items():
                runs[label].append(images_per_s(name, config, data, args.batches, args.warmup))
                print(f"{name} {label}: {runs[label][-1]:.0f} images/s", flush=True)
        old = statistics.median(runs[next(iter(CONFIGS))])
        for label, values in runs.items():
            med = statistics.median(values)
            rows.append({"model": name, "config": label, "images_per_s": med, "runs": values, "speedup": med / old})
    out = {
        "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("model name")), "?")},
        "batch_size": 128, "batches": args.batches, "warmup": args.warmup,
        "rows": rows,
    }
    path = REPO / "bench" / "results" / "train_speed.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{r['model']:9} {r['config']:48} {r['images_per_s']:7.0f} images/s  {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
