"""Land on the target: give channels back to a scheme that removes more than asked.

A method's scheme meets the target from above, but often overshoots it: a bisection over one knob moves
whole channels of many groups at once, and a search front has gaps. Comparing methods at different costs
compares nothing, so every scheme built from the base model's weights is filled back here: the channels
the scheme removed are ranked by importance (divided by their group's mean importance, so groups of
different scale compete fairly) and given back, most important first and `round_to` at a time per group,
as many as keep the reduction at or above the target. The count is bisected: the cost grows monotonically
with every channel given back.

With coarse steps (`round_to` 8 or 16) the smallest unit can cost more than the target's tolerance, so that
no unit fits back above the target and the scheme stays more than half a point over it. Then the one unit
that lands closest to the target from below, within the tolerance, is given back, and the landing says so.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pruning.channels import KeepScheme, group_importance, pruned_copy
from pruning.methods import Metric, model_cost

__all__ = ["TOLERANCE", "Landing", "fill_trained", "land_on_target", "landed", "landed_trained", "transplant"]

TOLERANCE = 0.005  # a reduction further than this above the target is reported, never passed over in silence


@dataclass(frozen=True)
class Landing:
    scheme: KeepScheme
    reduction_before: float
    reduction: float
    channels_added: int
    below: str = ""  # why the landing is under the target (within TOLERANCE), "" when it is not

    def info(self, prior: Mapping | None = None) -> dict:
        """`prior` (a method's info) with the landing's entries; a landing below the target joins its fallbacks."""
        out = {**(prior or {}), "reduction_before_fill": self.reduction_before, "channels_filled_back": self.channels_added}
        if self.below:
            out["fallbacks"] = [*out.get("fallbacks", []), self.below]
        return out


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
    metric: Metric = "flops",
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
    base = model_cost(model, x, metric)
    names = sorted(scheme)
    known: dict[tuple[int, ...], float] = {}

    def reduction(s: KeepScheme) -> float:
        # a pruned copy and its count cost a trace each; the cost depends on how many channels each group keeps,
        # not which, so schemes with the same counts (a unit of the same size from the same group) are priced once
        counts = tuple(len(s[n]) for n in names)
        if counts not in known:
            known[counts] = 1.0 - model_cost(pruned_copy(model, x, s), x, metric) / base
        return known[counts]

    units = _units(scheme, importance, round_to)

    def filled(m: int) -> KeepScheme:
        return _add(scheme, units[:m])

    before = reduction(scheme)
    if before < target - TOLERANCE:
        raise ValueError(f"the scheme removes {before:.4f} of the {metric}, less than the target {target}: nothing to give back")
    if before < target:  # short by no more than the tolerance (GPIR's candidates fell just short): kept as it is
        below = (
            f"the scheme removes {before:.4f} of the {metric}, {100 * (before - target):+.2f} points from the target "
            f"{target} (within the tolerance of {100 * TOLERANCE:.1f}): nothing given back"
        )
        return Landing(scheme, before, before, 0, below)
    lo, hi, at_lo = 0, len(units), before  # invariant: filling lo units still meets the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        r = reduction(filled(mid))
        if r >= target:
            lo, at_lo = mid, r
        else:
            hi = mid - 1
    chosen, result = units[:lo], at_lo
    # FLOPs and parameters only grow as channels are given back, so a unit that did not fit never fits after more
    # were added: the rest of its group's units of its size are passed over (a latency table need not be monotone)
    monotone, too_big = metric in ("flops", "params"), set[tuple[str, int]]()
    for unit in units[lo + 1 : lo + 1 + tries]:  # units[lo] itself is known not to fit
        kind = (unit[1], len(unit[2]))
        if monotone and kind in too_big:
            continue
        r = reduction(_add(scheme, [*chosen, unit]))
        if r >= target:
            chosen, result = [*chosen, unit], r
        else:
            too_big.add(kind)
    below = ""
    if result - target > TOLERANCE:  # no unit fits above: the one that lands closest below, within the tolerance
        taken = {id(u) for u in chosen}
        under = [
            (r, -i)
            for i, u in enumerate(units[lo : lo + 1 + tries], lo)
            if id(u) not in taken
            for r in [reduction(_add(scheme, [*chosen, u]))]
            if target - TOLERANCE <= r < target
        ]
        if under:
            r, neg = max(under)  # the closest to the target; among equals the more important unit (earlier in `units`)
            unit = units[-neg]
            below = (
                f"no removed channel fits back above the target {target} ({result:.4f} of the {metric} removed, "
                f"{100 * (result - target):+.2f} points, {round_to}-channel steps); one more unit of `{unit[1]}` "
                f"lands {100 * (r - target):+.2f} points from it, within the tolerance of {100 * TOLERANCE:.1f}"
            )
            chosen, result = [*chosen, unit], r
    return Landing(_add(scheme, chosen), before, result, sum(len(u[2]) for u in chosen), below)


def landed(
    base: nn.Module,
    example_input: torch.Tensor,
    scheme: KeepScheme,
    target: float,
    info: Mapping,
    metric: Metric = "flops",
    round_to: int = 1,
) -> tuple[KeepScheme, dict]:
    """A scheme built from the base's weights landed on the target by the base's group importance, and `info`
    with the landing's entries. The one landing step of the one-shot methods and whole-emo, for the rank stage
    and the Python API alike; a landing below the target joins `info`'s fallbacks, which the callers report."""
    landing = land_on_target(base, example_input, scheme, target, group_importance(base, example_input), metric, round_to)
    return landing.scheme, landing.info(info)


@torch.no_grad()
def _surviving(model: nn.Module, example_input: torch.Tensor, scheme: KeepScheme, dim: int) -> dict[str, torch.Tensor]:
    """For every parameter and buffer with more than `dim` dimensions: the original indices along `dim` that
    pruning `model` to `scheme` keeps, traced by pruning a copy whose entries hold their own index."""
    marked = copy.deepcopy(model)
    for _, t in [*marked.named_parameters(), *marked.named_buffers()]:
        if t.dim() > dim and t.is_floating_point():
            shape = [1] * t.dim()
            shape[dim] = t.shape[dim]
            t.copy_(torch.arange(t.shape[dim], dtype=t.dtype).view(shape).expand_as(t))
    pruned = pruned_copy(marked, example_input, scheme)
    out = {}
    for name, t in [*pruned.named_parameters(), *pruned.named_buffers()]:
        if t.dim() > dim and t.is_floating_point():
            out[name] = t.movedim(dim, 0).reshape(t.shape[dim], -1)[:, 0].round().long()
    return out


@torch.no_grad()
def transplant(
    trained: nn.Module, base: nn.Module, example_input: torch.Tensor, trained_scheme: KeepScheme, scheme: KeepScheme
) -> nn.Module:
    """`base` pruned to `scheme` (which keeps every channel `trained_scheme` keeps, and maybe more), carrying the
    weights of `trained` (base pruned to `trained_scheme`, then trained) on the channels both keep; the channels
    only `scheme` keeps come with the base's weights."""
    x = example_input[:1]
    model = pruned_copy(base, x, scheme)
    kept = [_surviving(base, x, trained_scheme, d) for d in (0, 1)]
    wider = [_surviving(base, x, scheme, d) for d in (0, 1)]
    target = dict([*model.named_parameters(), *model.named_buffers()])
    for name, t in [*trained.named_parameters(), *trained.named_buffers()]:
        dest = target[name]
        if t.dim() == 0 or not t.is_floating_point():
            dest.copy_(t)
            continue
        index = []
        for d in range(min(t.dim(), 2)):
            where = {int(c): i for i, c in enumerate(wider[d][name])}
            missing = [int(c) for c in kept[d][name] if int(c) not in where]
            if missing:
                raise ValueError(f"{name}: channels {missing[:8]} kept by the trained scheme are not kept by the wider one")
            index.append(torch.tensor([where[int(c)] for c in kept[d][name]], dtype=torch.long))
        if len(index) == 1:
            dest[index[0]] = t
        else:
            dest[index[0][:, None], index[1][None, :]] = t
    return model.eval()


def fill_trained(
    trained: nn.Module,
    base: nn.Module,
    example_input: torch.Tensor,
    scheme: KeepScheme,
    target: float,
    importance: Mapping[str, torch.Tensor],
    metric: Metric = "flops",
    round_to: int = 1,
) -> tuple[nn.Module, Landing]:
    """`land_on_target` for a model whose kept weights were trained (EMO-DIR's merged candidates): the channels
    given back come with the base's weights, the trained ones keep theirs (`transplant`)."""
    landing = land_on_target(base, example_input, scheme, target, importance, metric, round_to)
    if landing.channels_added == 0:
        return trained, landing
    return transplant(trained, base, example_input, scheme, landing.scheme), landing


def landed_trained(
    trained: nn.Module,
    base: nn.Module,
    example_input: torch.Tensor,
    scheme: KeepScheme,
    target: float,
    info: Mapping,
    metric: Metric = "flops",
    round_to: int = 1,
) -> tuple[nn.Module, KeepScheme, dict]:
    """`landed` for EMO-DIR's merged candidates (`fill_trained`, by the base's group importance): the landed model,
    its scheme and `info` with the landing's entries. The one landing step of GPIR, for the rank stage and the
    Python API alike."""
    model, landing = fill_trained(trained, base, example_input, scheme, target, group_importance(base, example_input), metric, round_to)
    return model, landing.scheme, landing.info(info)
