"""Cross-network constrained training: a pruned sub-network learns to reproduce the original boundary feature
from the features that pruned predecessors hand it, while its selector still classifies the result."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruning import stopping
from pruning.arrays import as_batch
from pruning.search import recalibrate_bn

__all__ = ["train_constrained", "train_front"]


def train_constrained(
    candidate: nn.Module,
    inputs,  # X_{k-1} of the original network (N, ...), tensor or memory-mapped array
    targets,  # X_k of the original network
    labels,
    selector: nn.Module,
    *,
    predecessors: Sequence[nn.Module] = (),
    predecessor_inputs=None,  # X_{k-2}: what the predecessors read
    lam: float = 1.0,
    epochs: int = 2,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train `candidate` in place with loss = MSE(S'_k(X~), X_k) / E[X_k^2] + lam * CE(g_k(S'_k(X~)), y).

    X~ is, per batch, the output of one module drawn from `predecessors` (the previous sub-network's
    trained candidates, the original included by the caller if wanted) applied to `predecessor_inputs`;
    with no predecessors X~ is `inputs` itself (k = 1). Returns the last epoch's mean losses (the
    feature term as reported is the relative MSE).
    """
    if predecessors and predecessor_inputs is None:
        raise ValueError("predecessors given without predecessor_inputs (X_{k-2})")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    candidate.to(device)
    selector.to(device).eval()
    for p in selector.parameters():
        p.requires_grad_(False)
    preds = [p.to(device).eval() for p in predecessors]
    opt = torch.optim.SGD(candidate.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    n = len(labels)
    steps = max(1, epochs * ((n + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    y_all = as_batch(labels)
    stats = {"feature_mse": 0.0, "selector_ce": 0.0}
    # BatchNorm statistics are re-estimated once for the pruned structure and then held: the targets X_k
    # are eval-mode features, and batch statistics of small cached batches would chase noise instead
    recalibrate_bn(candidate, inputs[: min(n, 1024)], batch_size, torch.device(device))
    # the feature loss is relative to the boundary's energy, so lam means the same at every depth
    scale = float(as_batch(targets[: min(n, 1024)]).float().pow(2).mean().clamp_min(1e-8))
    for _ in range(epochs):
        candidate.eval()
        sums, count = {"feature_mse": 0.0, "selector_ce": 0.0}, 0
        perm = rng.permutation(n)
        for start in range(0, n, batch_size):
            stopping.check()
            idx = np.sort(perm[start : start + batch_size])
            if preds:
                with torch.no_grad():
                    prev = preds[int(rng.integers(len(preds)))]
                    x = prev(as_batch(predecessor_inputs[idx]).to(device))
            else:
                x = as_batch(inputs[idx]).to(device)
            target = as_batch(targets[idx]).to(device)
            out = candidate(x)
            mse = F.mse_loss(out, target) / scale
            ce = F.cross_entropy(selector(out), y_all[idx].to(device))
            loss = mse + lam * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(candidate.parameters(), 5.0)
            opt.step()
            sched.step()
            sums["feature_mse"] += mse.item() * len(idx)
            sums["selector_ce"] += ce.item() * len(idx)
            count += len(idx)
        stats = {k: v / count for k, v in sums.items()}
    return stats


def train_front(
    subnetwork: nn.Module,
    example_input: torch.Tensor,
    schemes: Sequence[dict[str, list[int]]],
    inputs,
    targets,
    labels,
    selector: nn.Module,
    *,
    predecessors: Sequence[nn.Module] = (),
    predecessor_inputs=None,
    seed: int = 0,
    on_trained: Callable[[int, nn.Module, dict[str, float]], None] | None = None,
    **train_kwargs,
) -> list[nn.Module]:
    """Physically prune `subnetwork` to each keep-scheme (weights inherited) and train each with
    `train_constrained`; `on_trained(j, module, losses)` sees every result as it is done.

    Example (illustrative, not run)::

        trained = train_front(sub.module, x, [front_scheme_a, front_scheme_b], X_km1, X_k, y, selector)
    """
    from pruning.channels import pruned_copy

    trained = []
    for j, scheme in enumerate(schemes):
        module = pruned_copy(subnetwork, example_input, scheme)
        losses = train_constrained(
            module,
            inputs,
            targets,
            labels,
            selector,
            predecessors=predecessors,
            predecessor_inputs=predecessor_inputs,
            seed=seed + j,
            **train_kwargs,
        )
        module = module.cpu().eval()
        if on_trained is not None:
            on_trained(j, module, losses)
        trained.append(module)
    return trained
