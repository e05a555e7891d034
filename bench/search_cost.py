"""Where a search evaluation's time goes, and what bf16 scoring saves: one evaluation (prune, count FLOPs,
re-estimate BatchNorm on 256 inputs, score 2,000 val inputs with the selector) of each ResNet-20 sub-network
(K=3) and of the whole network, at uniform keep 0.5 with round_to 8, fp32 and bf16 alternating, median of 5.
Needs bench/bases/resnet20.pt. Run alone (nothing else on the cores): python bench/search_cost.py
Inputs are random tensors: the time does not depend on the pixel values."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pruning.channels import count_flops_params, group_importance, pruned_copy  # noqa: E402
from pruning.divide import boundary_features, divide  # noqa: E402
from pruning.search import Scorer, SearchSpace, prunable_groups  # noqa: E402
from pruning.selectors import FeatureSelector  # noqa: E402
from tasks.checkpoints import load_model  # noqa: E402


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
        scorers = {p: Scorer(selector, inputs[:256], inputs[256:], y, precision=p) for p in ("fp32", "bf16")}
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(5):
            for precision, scorer in scorers.items():
                start = time.perf_counter()
                pruned = pruned_copy(module, ex, scheme)
                count_flops_params(pruned, ex)
                scorer(pruned)
                times[precision].append(time.perf_counter() - start)
        row = {"module": name, "groups": len(space.groups), **{f"{p}_ms": 1000 * statistics.median(v) for p, v in times.items()}}
        row["bf16_speedup"] = row["fp32_ms"] / row["bf16_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    subs_fp32 = statistics.mean(r["fp32_ms"] for r in rows[:3])
    subs_bf16 = statistics.mean(r["bf16_ms"] for r in rows[:3])
    summary = {
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "whole_over_mean_subnetwork_fp32": rows[3]["fp32_ms"] / subs_fp32,
        "whole_over_mean_subnetwork_bf16": rows[3]["bf16_ms"] / subs_bf16,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    (REPO / "bench" / "notes" / "search_cost.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
