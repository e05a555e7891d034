"""Feature selectors: small frozen classifiers that score how well a (pruned) sub-network's output still serves the task."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pruning import stopping
from pruning.arrays import as_batch
from pruning.counting import count

__all__ = ["FeatureSelector", "folded", "selector_accuracy", "train_selector"]


class FeatureSelector(nn.Module):
    """1x1 conv - BN - ReLU - global average pool - linear, on a boundary feature X_k. A map wider than
    `MAX_SIDE` is average-pooled by a whole factor to at most `MAX_SIDE` a side first: on ResNet-20's 32x32
    stage-1 features the selector took three quarters of a search evaluation, and pooled 2x2 it classifies as
    well (47.1% against 46.0% val accuracy, 2 seeds, bench/notes/search_cost.md) at a quarter of the work.

    >>> g = FeatureSelector(in_channels=32, num_classes=10)
    >>> g(torch.randn(4, 32, 16, 16)).shape
    torch.Size([4, 10])
    """

    MAX_SIDE = 16

    def __init__(self, in_channels: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(64, in_channels)
        self.conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(hidden)  # nn.Identity once folded into the conv (`folded`)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = max(x.shape[-2:])
        if side > self.MAX_SIDE:  # by a whole factor, the same on both sides: 32x32 -> 16x16, 56x56 -> 14x14
            x = F.avg_pool2d(x, math.ceil(side / self.MAX_SIDE), ceil_mode=True)
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def folded(selector: nn.Module) -> nn.Module:
    """For scoring: a frozen FeatureSelector as a copy with its BatchNorm folded into the 1x1 convolution (the
    same outputs up to rounding, one pass over the widest feature map fewer); any other module unchanged."""
    if not isinstance(selector, FeatureSelector) or not isinstance(selector.bn, nn.BatchNorm2d) or selector.training:
        return selector
    out = copy.deepcopy(selector)
    out.conv = fuse_conv_bn_eval(out.conv, selector.bn)
    out.bn = nn.Identity()
    return out


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, batch_size):
        yield np.sort(order[i : i + batch_size])


def train_selector(
    features,
    labels,
    num_classes: int,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FeatureSelector:
    """Train a FeatureSelector on cached features (a tensor or a memory-mapped array), then freeze it."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = FeatureSelector(features.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(g.parameters(), lr=lr, weight_decay=1e-4)
    y_all = as_batch(labels)
    for _ in range(epochs):
        g.train()
        for idx in _batches(len(y_all), batch_size, rng):
            stopping.check()
            x = as_batch(features[idx]).to(device)
            loss = F.cross_entropy(g(x), y_all[idx].to(device))
            count(len(x), trained=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    g.eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return g


@torch.no_grad()
def selector_accuracy(selector: nn.Module, features, labels, batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    selector.eval()
    y = as_batch(labels)
    correct = 0
    for idx in _batches(len(y), batch_size, None):
        correct += (selector(as_batch(features[idx]).to(device)).argmax(1).cpu() == y[idx]).sum().item()
        count(len(idx))
    return correct / max(1, len(y))
