"""Land on the target: give channels back to a scheme that removes more than asked.

A method's scheme meets the target from above, but often overshoots it: a bisection over one knob moves
whole channels of many groups at once, and a search front has gaps. Comparing methods at different costs
compares nothing, so every scheme built from the base model's weights is filled back here: the channels
the scheme removed are ranked by importance (divided by their group's mean importance, so groups of
different scale compete fairly) and given back, most important first and `round_to` at a time per group,
as many as keep the reduction at or above the target. The count is bisected: the cost grows monotonically
with every channel given back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pruning.channels import KeepScheme, count_flops_params, pruned_copy

__all__ = ["TOLERANCE", "Landing", "land_on_target"]

TOLERANCE = 0.005  # a reduction further than this above the target is reported, never passed over in silence


@dataclass(frozen=True)
class Landing:
    scheme: KeepScheme
    reduction_before: float
    reduction: float
    channels_added: int

    def info(self) -> dict:
        return {"reduction_before_fill": self.reduction_before, "channels_filled_back": self.channels_added}


def _units(scheme: KeepScheme, importance: Mapping[str, torch.Tensor], round_to: int) -> list[tuple[float, str, list[int]]]:
    """The removed channels as (score, group, channels) units of `round_to` channels, best first."""
    units = []
    for name, kept in scheme.items():
        scores = importance[name].float()
        scale = float(scores.mean()) or 1.0
        removed = sorted(set(range(len(scores))) - set(kept), key=lambda i: (-float(scores[i]), i))
        for start in range(0, len(removed) - round_to + 1, round_to):  # whole units only: counts stay multiples
            chunk = removed[start : start + round_to]
            units.append((float(scores[chunk].mean()) / scale, name, chunk))
    # within a group the units are already best first, and a stable sort by score keeps that order
    return sorted(units, key=lambda u: -u[0])


def _add(scheme: KeepScheme, units: list[tuple[float, str, list[int]]]) -> KeepScheme:
    out = {name: list(kept) for name, kept in scheme.items()}
    for _, name, chunk in units:
        out[name].extend(chunk)
    return {name: sorted(kept) for name, kept in out.items()}


def land_on_target(
    model: nn.Module,
    example_input: torch.Tensor,
    scheme: KeepScheme,
    target: float,
    importance: Mapping[str, torch.Tensor],
    metric: str = "flops",
    round_to: int = 1,
    tries: int = 32,
) -> Landing:
    """The scheme with as many removed channels given back as keep `metric`'s reduction >= `target`.

    After the bisection over the ranked units, the next `tries` units are tried one by one: a cheap unit
    further down the ranking may still fit where the next one in line did not.

    >>> from pruning.channels import group_importance
    >>> from pruning.methods import Target, Uniform
    >>> x = torch.zeros(1, 3, 32, 32)
    >>> coarse = Uniform(round_to=8)(model, x, Target(0.5))  # 8-channel steps overshoot the target
    >>> landing = land_on_target(model, x, coarse.scheme, 0.5, group_importance(model, x))
    >>> coarse.flops_reduction > landing.reduction >= 0.5
    True
    """
    x = example_input[:1]
    which = 0 if metric == "flops" else 1
    base = count_flops_params(model, x)[which]

    def reduction(s: KeepScheme) -> float:
        return 1.0 - count_flops_params(pruned_copy(model, x, s), x)[which] / base

    units = _units(scheme, importance, round_to)

    def filled(m: int) -> KeepScheme:
        return _add(scheme, units[:m])

    before = reduction(scheme)
    if before < target:
        raise ValueError(f"the scheme removes {before:.4f} of the {metric}, less than the target {target}: nothing to give back")
    lo, hi, at_lo = 0, len(units), before  # invariant: filling lo units still meets the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        r = reduction(filled(mid))
        if r >= target:
            lo, at_lo = mid, r
        else:
            hi = mid - 1
    chosen, result = units[:lo], at_lo
    for unit in units[lo + 1 : lo + 1 + tries]:  # units[lo] itself is known not to fit
        r = reduction(_add(scheme, [*chosen, unit]))
        if r >= target:
            chosen, result = [*chosen, unit], r
    return Landing(_add(scheme, chosen), before, result, sum(len(u[2]) for u in chosen))
