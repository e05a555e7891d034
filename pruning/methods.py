"""Pruning methods: each turns a trained model and a reduction target into a channel keep-scheme.

Every method is a small class with one call, `method(model, example_input, target) -> PruningResult`,
registered in `METHODS` under its `prune.method` name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from pruning.channels import KeepScheme, channel_groups, count_flops_params, group_importance, keep_by_importance, pruned_copy

__all__ = ["METHODS", "PruningMethod", "PruningResult", "Target", "Uniform", "reduction_of"]


@dataclass(frozen=True)
class Target:
    """Remove `reduction` (a fraction in (0, 1)) of the model's FLOPs or parameters."""

    reduction: float
    metric: Literal["flops", "params"] = "flops"

    def __post_init__(self) -> None:
        if not 0.0 < self.reduction < 1.0:
            raise ValueError(f"target reduction must be in (0, 1), got {self.reduction}")
        if self.metric not in ("flops", "params"):
            raise ValueError(f"target metric must be 'flops' or 'params', got {self.metric!r}")


@dataclass
class PruningResult:
    scheme: KeepScheme
    base_flops: int
    base_params: int
    flops: int
    params: int
    info: dict = field(default_factory=dict)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops / self.base_flops

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params / self.base_params


def reduction_of(model: nn.Module, example_input: torch.Tensor, scheme: KeepScheme, base: tuple[int, int], metric: str) -> tuple[float, int, int]:
    flops, params = count_flops_params(pruned_copy(model, example_input, scheme), example_input)
    achieved = 1 - (flops / base[0] if metric == "flops" else params / base[1])
    return achieved, flops, params


class PruningMethod:
    """Base of the pruning strategies."""

    name = "base"

    def __call__(self, model: nn.Module, example_input: torch.Tensor, target: Target) -> PruningResult:
        raise NotImplementedError


def _round_keep(channels: int, ratio: float, round_to: int) -> int:
    k = int(round(channels * ratio / round_to)) * round_to
    return max(min(round_to, channels), min(channels, k))


class Uniform(PruningMethod):
    """One keep ratio in every channel group, channels ranked by L1 group magnitude; the ratio is the
    largest one that reaches the target (bisection: reduction falls monotonically as the ratio grows).

    >>> result = Uniform()(model, torch.zeros(1, 3, 32, 32), Target(0.5))
    >>> result.flops_reduction >= 0.5
    True
    """

    name = "uniform"

    def __init__(self, round_to: int = 1, p: int = 1, tolerance: float = 1e-3) -> None:
        self.round_to, self.p, self.tolerance = round_to, p, tolerance

    def __call__(self, model: nn.Module, example_input: torch.Tensor, target: Target) -> PruningResult:
        model = model.eval()
        groups = channel_groups(model, example_input)
        importance = group_importance(model, example_input, p=self.p)
        base = count_flops_params(model, example_input)

        def scheme_at(ratio: float) -> KeepScheme:
            return keep_by_importance(importance, {g.name: _round_keep(g.channels, ratio, self.round_to) for g in groups})

        lo, hi = 0.0, 1.0  # reduction(lo) >= target is the invariant once a feasible ratio is found
        best: tuple[float, KeepScheme, int, int] | None = None
        smallest = scheme_at(0.0)
        achieved, flops, params = reduction_of(model, example_input, smallest, base, target.metric)
        if achieved < target.reduction:
            raise ValueError(
                f"target {target.metric} reduction {target.reduction} is out of reach: keeping one channel per group "
                f"removes only {achieved:.4f}; allowed: a target below {achieved:.4f}"
            )
        best = (0.0, smallest, flops, params)
        while hi - lo > self.tolerance:
            mid = (lo + hi) / 2
            scheme = scheme_at(mid)
            achieved, flops, params = reduction_of(model, example_input, scheme, base, target.metric)
            if achieved >= target.reduction:
                lo, best = mid, (mid, scheme, flops, params)
            else:
                hi = mid
        ratio, scheme, flops, params = best
        return PruningResult(scheme, base[0], base[1], flops, params, info={"keep_ratio": ratio})


METHODS: dict[str, type[PruningMethod]] = {Uniform.name: Uniform}
