"""Boundary channels as genes: the channels of a boundary feature X_j (between S_j and S_{j+1}, or S_K and
the head) are searched at a few nested width options, chosen once by whole-network group importance, so
every sub-network touching X_j agrees on which channels each option keeps.

A sub-network whose input boundary is searched is searched with an identity 1x1 convolution in front of
it (`with_input_adapter`): Torch-Pruning's dependency graph then sees one channel group for everything
that reads X_{k-1} (the first convolutions, a residual add of the input), rooted at the adapter. A pruned
candidate drops the adapter again and is wrapped in `BoundaryIO`, which reads the full-width X_{k-1}
(keeping the option's channels) and writes a full-width X_k (zeros in the dropped channels). Zeros in
dropped channels are what a consumer whose first layer is a convolution or a linear map (the selectors,
the heads, the next sub-network) computes with those input channels removed, so a wrapped candidate fits
the unpruned neighbours, the cached features and the selectors unchanged, and chained candidates that
agree on a boundary compute exactly what the merged, physically pruned network computes.

Example (illustrative, not run)::

    plan = plan_boundaries(model, subnetworks, x, widths=(1.0, 0.75, 0.5))
    plan[0].options[1]        # the channels of X_1 kept at width 0.75, most important first
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.channels import channel_groups_and_left_out, group_importance, keep_by_importance, pruned_copy
from pruning.divide import SubNetwork, block_module_names

__all__ = [
    "ADAPTER",
    "Boundary",
    "BoundaryIO",
    "CandidateIO",
    "build_candidate",
    "pruned_head_cost",
    "keep_count",
    "plan_boundaries",
    "with_input_adapter",
]

ADAPTER = "boundary_in"  # name of the identity convolution put in front of a sub-network whose input is searched


@dataclass(frozen=True)
class Boundary:
    """X_j: `options[o]` are the channels width option o keeps (option 0 keeps all), `group` the whole-network
    channel group that carries X_j; `frozen` says why X_j keeps every channel (then `options` is (all,))."""

    index: int
    channels: int
    options: tuple[tuple[int, ...], ...]
    group: str | None = None
    frozen: str | None = None

    @property
    def searchable(self) -> bool:
        return self.frozen is None and len(self.options) > 1


def keep_count(fraction: float, channels: int, round_to: int = 1) -> int:
    """Channels kept at `fraction` of `channels`: a multiple of `round_to` where the group is that wide, at least one."""
    r = round_to if channels >= round_to else 1
    return min(channels, max(r, int(round(fraction * channels / r)) * r))


def _part_of(path: str, subnetworks: Sequence[SubNetwork]) -> int:
    """1-based index of the sub-network holding module `path`; K + 1 for the head."""
    for sub in subnetworks:
        for block in sub.block_names:
            for name in block_module_names(block):
                if path == name or path.startswith(name + "."):
                    return sub.index
    return len(subnetworks) + 1


def plan_boundaries(
    model: nn.Module, subnetworks: Sequence[SubNetwork], example_input: torch.Tensor, widths: Sequence[float], round_to: int = 1
) -> list[Boundary]:
    """One `Boundary` per X_1..X_K of `model` divided into `subnetworks`.

    X_j is searched when exactly one channel group crosses it and that group has X_j's channels; each width w
    keeps the `keep_count(w)` channels of the largest L1 group magnitude (over the whole network), widths giving
    the same count once. Otherwise X_j is frozen, and `frozen` says why."""
    if not widths or any(not 0.0 < float(w) <= 1.0 for w in widths) or 1.0 not in [float(w) for w in widths]:
        raise ValueError(f"boundary widths must be fractions in (0, 1] including 1.0, got {list(widths)}")
    groups, left_out = channel_groups_and_left_out(model, example_input)
    importance = group_importance(model, example_input)
    parts = {g.name: [_part_of(layer, subnetworks) for layer in g.layers] for g in groups}
    plan = []
    for sub in subnetworks:
        j = sub.index
        channels = int(sub.out_shape[0]) if sub.out_shape else 0
        full = (tuple(range(channels)),)
        crossing = [g for g in groups if min(parts[g.name]) <= j < max(parts[g.name])]
        frozen = None
        if len(sub.out_shape) != 3:
            frozen = f"X_{j} is not a feature map (shape {tuple(sub.out_shape)})"
        elif not crossing:
            why = f" (left out: {', '.join(name for name, _ in left_out)})" if left_out else ""
            frozen = f"no prunable channel group carries X_{j}{why}"
        elif len(crossing) > 1:
            frozen = f"X_{j} joins {len(crossing)} channel groups ({', '.join(g.name for g in crossing)}); each would need its own gene"
        elif crossing[0].divisor > 1:
            frozen = f"group {crossing[0].name} goes in {crossing[0].divisor} slices of a grouped convolution; boundary widths are whole channels"
        elif crossing[0].channels != channels:
            frozen = f"group {crossing[0].name} has {crossing[0].channels} channels, X_{j} has {channels}"
        if frozen is not None:
            plan.append(Boundary(j, channels, full, crossing[0].name if len(crossing) == 1 else None, frozen))
            continue
        g = crossing[0]
        counts = sorted({keep_count(float(w), channels, round_to) for w in widths}, reverse=True)
        options = tuple(tuple(keep_by_importance({g.name: importance[g.name]}, {g.name: n})[g.name]) for n in counts)
        plan.append(Boundary(j, channels, options, g.name))
    return plan


class _Identity1x1(nn.Conv2d):
    """An identity 1x1 convolution: the handle by which the dependency graph prunes a module's input channels."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))


def with_input_adapter(module: nn.Module, channels: int) -> nn.Sequential:
    """`module` (an nn.Sequential of blocks, shared, not copied) behind an identity 1x1 convolution named ADAPTER;
    the blocks keep their names, so the adapter's channel group is every layer that reads the input."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"an input adapter goes in front of an nn.Sequential of blocks, got {type(module).__name__}")
    seq = nn.Sequential(OrderedDict([(ADAPTER, _Identity1x1(channels)), *module.named_children()]))
    seq.train(module.training)
    return seq


class BoundaryIO(nn.Module):
    """A pruned sub-network between full-width boundaries: reads the `in_keep` channels of its input, writes its
    output into the `out_keep` channels of a zero tensor of `out_channels` channels (None: all, as is)."""

    _in: torch.Tensor
    _out: torch.Tensor

    def __init__(
        self, module: nn.Module, in_keep: Sequence[int] | None = None, out_keep: Sequence[int] | None = None, out_channels: int = 0
    ) -> None:
        super().__init__()
        self.module = module
        self.in_keep = None if in_keep is None else [int(i) for i in in_keep]
        self.out_keep = None if out_keep is None else [int(i) for i in out_keep]
        self.out_channels = out_channels
        if self.out_keep is not None and (not self.out_keep or max(self.out_keep) >= out_channels):
            raise ValueError(f"out_keep must be indices below out_channels={out_channels}, got {self.out_keep[:8]}")
        self.register_buffer("_in", torch.tensor(self.in_keep or [], dtype=torch.long), persistent=False)
        self.register_buffer("_out", torch.tensor(self.out_keep or [], dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_keep is not None:
            x = x.index_select(1, self._in)
        y = self.module(x)
        if self.out_keep is None:
            return y
        return y.new_zeros((y.shape[0], self.out_channels, *y.shape[2:])).index_copy(1, self._out, y)

    def kept_output(self, y: torch.Tensor) -> torch.Tensor:
        """The channels of a full-width output (or target) this candidate really computes."""
        return y if self.out_keep is None else y.index_select(1, self._out.to(y.device))


@dataclass(frozen=True)
class CandidateIO:
    """How a sub-network candidate meets its boundaries: the width options it reads (`inputs`) and writes
    (`outputs`), the local groups that carry them in its keep-scheme (`in_group` is ADAPTER when the input is
    searched, `out_group` the group writing X_k), and `whole`: the kept channels of the whole-network boundary
    groups, which the merged network takes instead of the local names."""

    inputs: int = 0
    outputs: int = 0
    in_group: str | None = None
    out_group: str | None = None
    out_channels: int = 0
    whole: Mapping[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "in_group": self.in_group,
            "out_group": self.out_group,
            "out_channels": self.out_channels,
            "whole": {k: list(v) for k, v in self.whole.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping | None) -> CandidateIO:
        if not doc:
            return cls()
        return cls(
            int(doc["inputs"]),
            int(doc["outputs"]),
            doc.get("in_group"),
            doc.get("out_group"),
            int(doc.get("out_channels", 0)),
            {k: [int(i) for i in v] for k, v in doc.get("whole", {}).items()},
        )

    @property
    def local_names(self) -> set[str]:
        """The scheme entries that stand for boundary groups (translated through `whole`, not by name)."""
        return {n for n in (self.in_group, self.out_group) if n is not None}


def build_candidate(module: nn.Module, example_input: torch.Tensor, scheme: Mapping[str, Sequence[int]], io: CandidateIO) -> nn.Module:
    """The physically pruned candidate of `module` (the searched module: with the input adapter when `io.in_group`)
    for `scheme`; wrapped in BoundaryIO when a boundary is pruned, else the plain pruned copy."""
    pruned = pruned_copy(module, example_input, scheme)
    if isinstance(pruned, nn.Sequential) and ADAPTER in pruned._modules:  # never part of a candidate, even unused
        stripped = nn.Sequential(OrderedDict((n, m) for n, m in pruned.named_children() if n != ADAPTER))
        stripped.train(pruned.training)
        pruned = stripped
    if io.in_group is None and io.out_group is None:
        return pruned
    in_keep = list(scheme[io.in_group]) if io.in_group is not None and io.in_group in scheme else None
    out_keep = list(scheme[io.out_group]) if io.out_group is not None and io.out_group in scheme else None
    full_in = in_keep is not None and len(in_keep) == int(example_input.shape[1])
    full_out = out_keep is not None and len(out_keep) == io.out_channels
    return BoundaryIO(pruned, None if full_in else in_keep, None if full_out else out_keep, io.out_channels)


def pruned_head(head: nn.Module, example_input: torch.Tensor, keep: Sequence[int]) -> tuple[nn.Module, torch.Tensor]:
    """A copy of `head` reading only the `keep` channels of its input (the last boundary pruned), and its input."""
    adapted = with_input_adapter(nn.Sequential(OrderedDict([("head", copy.deepcopy(head))])), int(example_input.shape[1]))
    pruned = pruned_copy(adapted, example_input, {ADAPTER: list(keep)}, ignored=[])
    return pruned.get_submodule("head"), example_input[:, list(keep)]


def pruned_head_cost(head: nn.Module, example_input: torch.Tensor, keep: Sequence[int]) -> tuple[int, int]:
    """(FLOPs, params) of `head` reading only the `keep` channels of its input (the last boundary pruned)."""
    from pruning.channels import count_flops_params

    return count_flops_params(*pruned_head(head, example_input, keep))
