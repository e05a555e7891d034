"""Cross-network constrained training: a pruned sub-network learns to reproduce the original boundary feature
from the features that pruned predecessors hand it, while its selector still classifies the result."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pruning import counting, stopping
from pruning.arrays import as_batch
from pruning.boundary import BoundaryIO
from pruning.search import recalibrate_bn

__all__ = ["FeatureStream", "train_constrained", "train_front"]


class FeatureStream:
    """Boundary features for sub-network k computed on the fly: every batch of `loader` (augmented training
    images, labels) runs through the original S_1..S_k (eval mode, no gradient) and yields
    (X_{k-2} or None for k = 1, X_{k-1}, X_k, labels). One pass is one epoch; `len` is its batch count.

    Example (illustrative, not run)::

        stream = FeatureStream([s.module for s in subnetworks], k, train_loader)
        train_constrained(candidate, None, None, None, selector, stream=stream)
    """

    def __init__(self, originals: Sequence[nn.Module], k: int, loader, device: torch.device | str = "cpu") -> None:
        if not 1 <= k <= len(originals):
            raise ValueError(f"k={k} is not a sub-network; allowed: 1..{len(originals)}")
        self.k, self.loader, self.device = k, loader, torch.device(device)
        # copies on the device, moved once: the caller's sub-networks stay where they are (a GPU run prunes
        # and merges them afterwards with CPU examples)
        self.originals = [copy.deepcopy(m).eval().to(self.device) for m in originals[:k]]

    def __len__(self) -> int:
        return len(self.loader)

    def reseed(self, seed: int) -> None:
        """Restart the loader's shuffling and augmentation draws from `seed` (when it has a generator), so a
        candidate sees the same images whatever was trained before it."""
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)

    def __iter__(self):
        for images, labels in self.loader:
            with torch.no_grad():
                h = images.to(self.device)
                feats = [h]
                for module in self.originals:
                    h = module(h)
                    feats.append(h)
                counting.count(len(images))  # the original prefix S_1..S_k, one pass
            yield (feats[self.k - 2] if self.k >= 2 else None), feats[self.k - 1], feats[self.k], labels

    def head(self, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_{k-1}, X_k) of the first `samples` streamed images: what BatchNorm and the loss scale are set on."""
        xs, ts, n = [], [], 0
        for _, x, t, _ in self:
            xs.append(x)
            ts.append(t)
            n += len(x)
            if n >= samples:
                break
        return torch.cat(xs)[:samples], torch.cat(ts)[:samples]


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
    stream: FeatureStream | None = None,
) -> dict[str, float]:
    """Train `candidate` in place with loss = MSE(S'_k(X~), X_k) / E[X_k^2] + lam * CE(g_k(S'_k(X~)), y).

    A candidate that prunes its output boundary (BoundaryIO) is held to the channels of X_k it keeps.

    X~ is, per batch, the output of one module drawn from `predecessors` (the previous sub-network's
    trained candidates, the original included by the caller if wanted) applied to `predecessor_inputs`;
    with no predecessors X~ is `inputs` itself (k = 1). With `stream` the batches (X_{k-2}, X_{k-1}, X_k, y)
    come from it, computed from augmented training images, instead of the cached `inputs`, `targets`,
    `labels` and `predecessor_inputs` (pass None for those). Returns the last epoch's mean losses (the
    feature term as reported is the relative MSE).
    """
    if predecessors and predecessor_inputs is None and stream is None:
        raise ValueError("predecessors given without predecessor_inputs (X_{k-2})")
    if predecessors and stream is not None and stream.k < 2:
        raise ValueError("predecessors given for sub-network 1, which reads the images: it has none")
    if stream is not None:
        stream.reseed(seed)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    candidate.to(device)
    selector.to(device).eval()
    for p in selector.parameters():
        p.requires_grad_(False)
    preds = [p.to(device).eval() for p in predecessors]
    opt = torch.optim.SGD(candidate.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    if stream is not None:
        per_epoch = len(stream)
        calib, calib_targets = stream.head(1024)
    else:
        n = len(labels)
        per_epoch = (n + batch_size - 1) // batch_size
        calib, calib_targets = inputs[: min(n, 1024)], targets[: min(n, 1024)]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * per_epoch))

    def batches():
        """(X_{k-2} or None, X_{k-1} or None, X_k, y) per batch: streamed, or drawn from the cache in a new order."""
        if stream is not None:
            yield from stream
            return
        y_all = as_batch(labels)
        perm = rng.permutation(len(y_all))
        for start in range(0, len(y_all), batch_size):
            idx = np.sort(perm[start : start + batch_size])
            before = as_batch(predecessor_inputs[idx]) if preds else None
            yield before, (None if preds else as_batch(inputs[idx])), as_batch(targets[idx]), y_all[idx]

    stats = {"feature_mse": 0.0, "selector_ce": 0.0}
    # BatchNorm statistics are re-estimated once for the pruned structure and then held: the targets X_k
    # are eval-mode features, and batch statistics of small batches would chase noise instead
    recalibrate_bn(candidate, calib, batch_size, torch.device(device))
    # the feature loss is relative to the boundary's energy, so lam means the same at every depth
    kept = candidate.kept_output if isinstance(candidate, BoundaryIO) else (lambda t: t)
    scale = float(kept(as_batch(calib_targets)).float().pow(2).mean().clamp_min(1e-8))
    for _ in range(epochs):
        candidate.eval()
        sums, count = {"feature_mse": 0.0, "selector_ce": 0.0}, 0
        for before, inputs_b, target, y in batches():
            stopping.check()
            if preds:
                with torch.no_grad():
                    prev = preds[int(rng.integers(len(preds)))]
                    x = prev(before.to(device))
                counting.count(len(x))
            else:
                x = inputs_b.to(device)
            out = candidate(x)
            mse = F.mse_loss(kept(out), kept(target.to(device))) / scale
            ce = F.cross_entropy(selector(out), y.to(device))
            loss = mse + lam * ce
            counting.count(len(y), trained=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(candidate.parameters(), 5.0)
            opt.step()
            sched.step()
            sums["feature_mse"] += mse.item() * len(y)
            sums["selector_ce"] += ce.item() * len(y)
            count += len(y)
        if count == 0:
            raise ValueError("constrained training got no batch: the training data (or its loader) is empty")
        stats = {k: v / count for k, v in sums.items()}
    return stats


def train_front(
    candidates: Sequence[nn.Module],
    inputs,
    targets,
    labels,
    selector: nn.Module,
    *,
    predecessors: Sequence[Sequence[nn.Module]] | None = None,
    predecessor_inputs=None,
    seed: int = 0,
    on_trained: Callable[[int, nn.Module, dict[str, float]], None] | None = None,
    **train_kwargs,
) -> list[nn.Module]:
    """Train each pruned candidate (in place) with `train_constrained`, candidate j mixing `predecessors[j]`;
    `on_trained(j, module, losses)` sees every result as it is done.

    Example (illustrative, not run)::

        trained = train_front([pruned_a, pruned_b], X_km1, X_k, y, selector)
    """
    trained = []
    for j, module in enumerate(candidates):
        losses = train_constrained(
            module,
            inputs,
            targets,
            labels,
            selector,
            predecessors=predecessors[j] if predecessors is not None else (),
            predecessor_inputs=predecessor_inputs,
            seed=seed + j,
            **train_kwargs,
        )
        module = module.cpu().eval()
        if on_trained is not None:
            on_trained(j, module, losses)
        trained.append(module)
    return trained
