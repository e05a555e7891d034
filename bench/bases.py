"""Train the benchmark's base models (ResNet-20, ResNet-56) on CIFAR-10 by one recipe, resumable epoch by epoch.

Every benchmark starts from these exact bytes: bench/bases/<model>.pt with bench/bases/<model>.json (recipe,
data fingerprint, accuracy, speed, commit). The recipe is the pipeline's own pretraining (the same data
preparation, loader and `fit`): the training split is the 45,000 CIFAR-10 training images that the
pipeline's prepare stage keeps at seed 0 (its 5,000 val images stay unseen, so validation decisions made
by the pruning methods stay honest); the test split is the 10,000 test images.

    python bench/bases.py resnet20            # about 40 min on 2 idle cores
    python bench/bases.py resnet56 resnet20   # both, one after the other

Progress is saved after every epoch to bench/bases/<model>.resume.pt (committed with the repo, so a later
session carries on where a stopped one ended); a rerun resumes there and ends bit-identical to an
uninterrupted run. The resume file is removed when the model is written.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
OUT = REPO / "bench" / "bases"
WORK = REPO / "bench" / "work"

# The recipe: SGD (Nesterov, momentum 0.9), cosine from lr 0.1 to 0 over all epochs, batch 128, weight decay
# 5e-4, random crop (4-pixel zero padding) and horizontal flip, bf16 autocast and channels_last.
RECIPE = {
    "resnet20": {"epochs": 80, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128},
    # 80 epochs: its `none` row gains 0.35 points [0.02, 0.71] with the benchmark's KD finetuning, but loses 0.17
    # finetuned without KD: converged; the gain is self-distillation's (bench/notes/bases.md, ninth session)
    "resnet56": {"epochs": 80, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128},
}
SEED = 0
PRECISION, CHANNELS_LAST = "bf16", True


def cifar_root() -> Path:
    """The CIFAR-10 JPEG copy unpacked (once) under bench/work/cifar10."""
    root = WORK / "cifar10"
    if not (root / "train").is_dir():
        if not SHARED_CIFAR.is_file():
            raise SystemExit(f"the CIFAR-10 copy {SHARED_CIFAR} is missing; see ../shared/data/README.md")
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_CIFAR) as tar:
            tar.extractall(root, filter="data")
    return root.resolve()


def prepared() -> Path:
    """The pipeline's prepare stage output for the whole CIFAR-10 copy at seed 0 (decoded once)."""
    from tasks.config import DataParams
    from tasks.datasets import prepare

    out = WORK / "cifar10-prepared"
    if not (out / "meta.json").is_file():
        prepare(DataParams(source="imagefolder", root=str(cifar_root())), SEED, out)
    return out


def train(name: str) -> dict:
    import torch

    from pruning.models import build_model
    from pruning.train import TrainConfig, evaluate, fit, resolve_device, seed_everything
    from tasks.datasets import read_meta, split_batches

    OUT.mkdir(parents=True, exist_ok=True)
    recipe = RECIPE[name]
    # what a resume must match: the recipe and every switch that changes the trained bytes
    full = {**recipe, "schedule": "cosine", "nesterov": True, "precision": PRECISION, "channels_last": CHANNELS_LAST, "seed": SEED}
    data = prepared()
    meta = read_meta(data)
    resume_file = OUT / f"{name}.resume.pt"
    device = resolve_device("auto")
    seed_everything(SEED)
    model = build_model(name, meta["num_classes"])
    loader = split_batches(data, "train", recipe["batch_size"], train=True, seed=SEED)
    cfg = TrainConfig(epochs=recipe["epochs"], lr=recipe["lr"], momentum=recipe["momentum"],
                      weight_decay=recipe["weight_decay"], precision=PRECISION, channels_last=CHANNELS_LAST)
    state = torch.load(resume_file, weights_only=True) if resume_file.is_file() else None
    if state and state.get("recipe") != full:
        saved = state.get("recipe", "unrecorded (saved before resume files recorded their recipe)")
        raise SystemExit(f"{resume_file} was saved under the recipe {saved}, not this one ({full}): delete it "
                         "to train by this recipe from the start")
    if state:
        print(f"{name}: resuming after epoch {state['epoch']} of {cfg.epochs}", flush=True)

    # seconds per epoch trained (its val pass included), kept beside the training state across sittings
    timings: list[float] = [float(t) for t in state.get("epoch_seconds", [])] if state else []
    clock = [time.perf_counter()]

    def save(s: dict) -> None:
        now = time.perf_counter()
        timings.append(now - clock[0])
        clock[0] = now
        tmp = resume_file.with_suffix(".tmp")
        torch.save({**s, "epoch_seconds": timings, "recipe": full}, tmp)
        tmp.replace(resume_file)

    def on_epoch(epoch: int, m: dict) -> None:
        print(f"{name} epoch {epoch + 1}/{cfg.epochs}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()), flush=True)

    history = fit(model, loader, cfg, device, val_loader=split_batches(data, "val", 512), on_epoch=on_epoch,
                  progress=False, description=name, resume=state, on_checkpoint=save)
    test = evaluate(model, split_batches(data, "test", 512), device)
    val = evaluate(model, split_batches(data, "val", 512), device)
    n_train = meta["counts"]["train"]
    record = {
        "model": name,
        "file": f"{name}.pt",
        "test_acc": test["acc"],
        "val_acc": val["acc"],
        "recipe": {**full, "augment": meta["augment"]},
        "data": {"source": "CIFAR-10 JPEG copy (../shared/data/cifar10-jpeg.tar.gz)", "counts": meta["counts"],
                 "fingerprint": meta["fingerprint"], "mean": meta["mean"], "std": meta["std"]},
        # the median epoch: an epoch's wall time also counts any pause of the process (a stopped sitting, a
        # machine shared with other work); it includes the val pass (5,000 images forward, about 3% of it)
        "train_images_per_s": n_train / statistics.median(timings),
        "median_epoch_seconds": statistics.median(timings),
        "epoch_seconds": timings,
        "history": history,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "command": "python bench/bases.py " + name,
    }
    from tasks.checkpoints import save_model

    save_model(model.cpu(), OUT / f"{name}.pt", name=name, num_classes=meta["num_classes"], image_size=meta["image_size"])
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    resume_file.unlink(missing_ok=True)
    print(f"{name}: test acc {test['acc']:.4f}, val acc {val['acc']:.4f}, "
          f"{record['train_images_per_s']:.0f} images/s", flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=sorted(RECIPE))
    ap.add_argument("--force", action="store_true", help="train again even if bench/bases/<model>.pt exists")
    args = ap.parse_args()
    for name in args.models:
        if (OUT / f"{name}.pt").is_file() and not args.force:
            print(f"{name}: bench/bases/{name}.pt exists (--force trains it again)")
            continue
        start = time.perf_counter()
        train(name)
        print(f"{name}: {time.perf_counter() - start:.0f} s in this sitting")


if __name__ == "__main__":
    main()
