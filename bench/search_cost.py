"""Where a search evaluation's time goes, and what the scoring path saves: one evaluation (prune, count FLOPs,
re-estimate BatchNorm on 256 inputs, score 2,000 val inputs with the selector) of each ResNet-20 sub-network
(K=3) and of the whole network, at uniform keep 0.5 with round_to 8, median of 5, four scoring paths
alternating: fp32 and bf16, each as before (NCHW, the selector's BatchNorm apart, the selector on the full map)
and now (channels_last, BatchNorm folded, maps wider than 16 pooled to 16 before the selector).
With the r20 benchmark's cached features (bench/work/r20/artifacts/features) it also trains the stage-1
selector both ways (2 seeds, the pipeline's 20 epochs) and reports their val accuracy.
Needs bench/bases/resnet20.pt. Run alone (nothing else on the cores): python bench/search_cost.py
Inputs of the timing are random tensors: the time does not depend on the pixel values."""
from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pruning.search as search  # noqa: E402
from pruning.channels import count_flops_params, group_importance, pruned_copy  # noqa: E402
from pruning.divide import boundary_features, divide  # noqa: E402
from pruning.search import Scorer, SearchSpace, prunable_groups  # noqa: E402
from pruning.selectors import FeatureSelector, selector_accuracy, train_selector  # noqa: E402
from tasks.checkpoints import load_model  # noqa: E402

FEATURES = REPO / "bench" / "work" / "r20" / "artifacts" / "features"


@contextlib.contextmanager
def before(on: bool):
    """The scoring path as it was before commit 'search: channels_last scoring...': no folding, no pooling."""
    if not on:
        yield
        return
    fold, side = search.folded, FeatureSelector.MAX_SIDE
    search.folded, FeatureSelector.MAX_SIDE = (lambda s: s), 10**9
    try:
        yield
    finally:
        search.folded, FeatureSelector.MAX_SIDE = fold, side


def selector_check() -> dict | None:
    """Val accuracy of the stage-1 selector trained on the r20 benchmark's cached features, pooled and not."""
    if not (FEATURES / "train_x1.npy").exists():
        return None
    tx, ty = np.load(FEATURES / "train_x1.npy", mmap_mode="r"), np.load(FEATURES / "train_y.npy")
    vx, vy = np.load(FEATURES / "val_x1.npy", mmap_mode="r"), np.load(FEATURES / "val_y.npy")
    out = {"features": list(tx.shape), "val": int(len(vy))}
    for name, old in (("full_map", True), ("pooled", False)):
        with before(old):
            out[name] = [selector_accuracy(train_selector(tx, ty, 10, epochs=20, lr=0.003, seed=s), vx, vy) for s in (0, 1)]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    torch.manual_seed(0)
    model, _ = load_model(REPO / "bench" / "bases" / "resnet20.pt")
    model.eval()
    x = torch.randn(2256, 3, 32, 32)
    subs, _ = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    cases = [(f"s{k + 1}", subs[k].module, feats[k], FeatureSelector(feats[k + 1].shape[1], 10).eval()) for k in range(3)]
    cases.append(("whole", model, x, torch.nn.Identity()))
    y = torch.randint(0, 10, (2000,))
    rows = []
    for name, module, inputs, selector in cases:
        ex = inputs[:1]
        space = SearchSpace(tuple(prunable_groups(module, ex)), 10, round_to=8)
        scheme = space.decode(space.uniform(0.5), group_importance(module, ex))
        paths = [(p, old) for old in (True, False) for p in ("fp32", "bf16")]
        times: dict[str, list[float]] = {f"{p}_{'before' if old else 'now'}": [] for p, old in paths}
        for _ in range(5):
            for precision, old in paths:
                with before(old):
                    scorer = Scorer(selector, inputs[:256], inputs[256:], y, precision=precision, channels_last=not old)
                    start = time.perf_counter()
                    pruned = pruned_copy(module, ex, scheme)
                    count_flops_params(pruned, ex)
                    scorer(pruned)
                    times[f"{precision}_{'before' if old else 'now'}"].append(time.perf_counter() - start)
        row = {"module": name, "groups": len(space.groups), **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        # per evaluation, the whole network's time over the mean sub-network's: K (3) would make EMO-DIR's search
        # K times faster than whole-emo's for the same number of evaluations
        **{f"whole_over_mean_subnetwork_{k}": rows[3][f"{k}_ms"] / statistics.mean(r[f"{k}_ms"] for r in rows[:3])
           for k in ("fp32_before", "bf16_before", "fp32_now", "bf16_now")},
        "selector_accuracy": selector_check(),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    (REPO / "bench" / "notes" / "search_cost.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
