"""Pruning methods: each turns a trained model and a reduction target into a channel keep-scheme.

Every method is a small class with one call, `method(model, example_input, target) -> PruningResult`,
registered in `METHODS` under its `prune.method` name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from pruning.channels import (
    KeepScheme,
    channel_groups,
    check_supported,
    count_flops_params,
    group_importance,
    keep_by_importance,
    output_layers,
    pruned_copy,
)
from pruning.latency import LatencyCost

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "REGISTRY",
    "GlobalMagnitude",
    "MethodSpec",
    "PruningMethod",
    "PruningResult",
    "RandomRatios",
    "Metric",
    "Target",
    "Uniform",
    "check_metric",
    "cost_of",
    "method_spec",
    "model_cost",
    "reduction_of",
    "unused_switches",
]


Metric = Union[Literal["flops", "params"], LatencyCost]  # what a reduction target counts


@dataclass(frozen=True)
class Target:
    """Remove `reduction` (a fraction in (0, 1)) of the model's FLOPs, parameters or predicted latency (a
    `LatencyCost`: the measured table behind it)."""

    reduction: float
    metric: Metric = "flops"

    def __post_init__(self) -> None:
        if not 0.0 < self.reduction < 1.0:
            raise ValueError(f"target reduction must be in (0, 1), got {self.reduction}")
        check_metric(self.metric)


def check_metric(metric: object) -> None:
    """A ValueError naming `metric` unless it is 'flops', 'params' or a LatencyCost."""
    if isinstance(metric, LatencyCost) or metric in ("flops", "params"):
        return
    hint = " (the latency metric is a LatencyCost over a measured table: pruning.latency)" if metric == "latency" else ""
    raise ValueError(f"target metric must be 'flops', 'params' or a LatencyCost, got {metric!r}{hint}")


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


def cost_of(flops_params: tuple[int, int], metric: str) -> int:
    """The FLOPs or the parameters of a (FLOPs, params) pair, as `metric` ('flops' or 'params') asks."""
    if metric not in ("flops", "params"):
        raise ValueError(f"cost_of counts 'flops' or 'params', not {metric!r}: a latency cost is model_cost's")
    return flops_params[0] if metric == "flops" else flops_params[1]


def model_cost(module: nn.Module, example_input: torch.Tensor, metric: Metric, counted: tuple[int, int] | None = None) -> int:
    """What `module` costs in `metric`: its FLOPs or parameters (`counted`, when the caller has them), or its
    predicted latency in nanoseconds."""
    if isinstance(metric, LatencyCost):
        return metric(module, example_input)
    return cost_of(counted if counted is not None else count_flops_params(module, example_input), metric)


def reduction_of(
    model: nn.Module, example_input: torch.Tensor, scheme: KeepScheme, base_cost: int, metric: Metric
) -> tuple[float, int, int]:
    """(reduction of `metric` against `base_cost`, FLOPs, params) of `model` pruned to `scheme`."""
    pruned = pruned_copy(model, example_input, scheme)
    flops, params = count_flops_params(pruned, example_input)
    return 1 - model_cost(pruned, example_input, metric, (flops, params)) / base_cost, flops, params


class PruningMethod:
    """Base of the pruning strategies."""

    name = "base"

    def __init__(self, round_to: int = 1, seed: int = 0, **_: object) -> None:
        self.round_to, self.seed = round_to, seed

    def __call__(self, model: nn.Module, example_input: torch.Tensor, target: Target) -> PruningResult:
        raise NotImplementedError


def _round_keep(channels: int, ratio: float, round_to: int) -> int:
    k = int(round(channels * ratio / round_to)) * round_to
    return max(min(round_to, channels), min(channels, k))


def _largest_feasible(
    model: nn.Module, example_input: torch.Tensor, target: Target, scheme_at, hi: float = 1.0, tolerance: float = 1e-3
) -> tuple[float, KeepScheme, int, int]:
    """Bisection for the largest knob in [0, hi] whose scheme still reaches the target (reduction falls as the knob grows)."""
    base = model_cost(model, example_input, target.metric)
    smallest = scheme_at(0.0)
    achieved, flops, params = reduction_of(model, example_input, smallest, base, target.metric)
    if achieved < target.reduction:
        raise ValueError(
            f"target {target.metric} reduction {target.reduction} is out of reach: the smallest model this method "
            f"builds removes only {achieved:.4f}; allowed: a target below {achieved:.4f}"
        )
    best = (0.0, smallest, flops, params)
    lo = 0.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        scheme = scheme_at(mid)
        achieved, flops, params = reduction_of(model, example_input, scheme, base, target.metric)
        if achieved >= target.reduction:
            lo, best = mid, (mid, scheme, flops, params)
        else:
            hi = mid
    return best


class Uniform(PruningMethod):
    """One keep ratio in every channel group, channels ranked by L1 group magnitude; the ratio is the
    largest one that reaches the target (bisection: reduction falls monotonically as the ratio grows).

    >>> result = Uniform()(model, torch.zeros(1, 3, 32, 32), Target(0.5))
    >>> result.flops_reduction >= 0.5
    True
    """

    name = "uniform"

    def __init__(self, round_to: int = 1, p: int = 1, **_: object) -> None:
        self.round_to, self.p = round_to, p

    def __call__(self, model: nn.Module, example_input: torch.Tensor, target: Target) -> PruningResult:
        model = model.eval()
        groups = channel_groups(model, example_input)
        importance = group_importance(model, example_input, p=self.p)

        def scheme_at(ratio: float) -> KeepScheme:
            return keep_by_importance(importance, {g.name: _round_keep(g.channels, ratio, self.round_to) for g in groups})

        ratio, scheme, flops, params = _largest_feasible(model, example_input, target, scheme_at)
        base = count_flops_params(model, example_input)
        return PruningResult(scheme, base[0], base[1], flops, params, info={"keep_ratio": ratio})


class GlobalMagnitude(PruningMethod):
    """Torch-Pruning's global pruning with group magnitude (L2) importance: channels of all groups compete
    in one ranking, so layers lose different fractions; the global ratio is bisected to meet the target.

    >>> GlobalMagnitude()(model, torch.zeros(1, 3, 32, 32), Target(0.5)).flops_reduction >= 0.5
    True
    """

    name = "global-magnitude"

    def __init__(self, round_to: int = 1, p: int = 2, max_pruning_ratio: float = 0.95, **_: object) -> None:
        self.round_to, self.p, self.max_ratio = round_to, p, max_pruning_ratio

    def _scheme(self, model: nn.Module, example_input: torch.Tensor, groups, ratio: float) -> KeepScheme:
        if ratio <= 0:
            return {g.name: list(range(g.channels)) for g in groups}
        m = copy.deepcopy(model).eval()
        names = {mod: n for n, mod in m.named_modules()}
        pruner = tp.pruner.MetaPruner(
            m,
            example_input,
            importance=tp.importance.GroupMagnitudeImportance(p=self.p),
            global_pruning=True,
            pruning_ratio=ratio,
            max_pruning_ratio=self.max_ratio,
            ignored_layers=output_layers(m, example_input),
            unwrapped_parameters=check_supported(m),
        )
        dropped: dict[str, list[int]] = {}
        for group in pruner.step(interactive=True):
            by_layer = {
                names[dep.target.module]: list(idxs)
                for dep, idxs in group
                if dep.target.module in names and pruner.DG.is_out_channel_pruning_fn(dep.handler)
            }
            for g in groups:
                if g.name in by_layer:
                    dropped[g.name] = by_layer[g.name]
            group.prune()
        # a grouped convolution's slices drop the same positions: unit u is channel u of every slice
        return {g.name: sorted(set(range(g.channels)) - {i % g.channels for i in dropped.get(g.name, [])}) for g in groups}

    def __call__(self, model: nn.Module, example_input: torch.Tensor, target: Target) -> PruningResult:
        model = model.eval()
        groups = channel_groups(model, example_input)
        importance = group_importance(model, example_input, p=self.p) if self.round_to > 1 else {}

        def scheme_at(keep: float) -> KeepScheme:  # knob = 1 - global pruning ratio: the reduction falls as it grows
            scheme = self._scheme(model, example_input, groups, self.max_ratio * (1 - keep))
            if self.round_to == 1:
                return scheme
            # Torch-Pruning's own round_to prunes nothing globally on 16-channel groups; round each group's
            # count instead and keep the group's most important channels
            counts = {g.name: _round_keep(g.channels, len(scheme[g.name]) / g.channels, self.round_to) for g in groups}
            return keep_by_importance(importance, counts)

        knob, scheme, flops, params = _largest_feasible(model, example_input, target, scheme_at)
        base = count_flops_params(model, example_input)
        return PruningResult(scheme, base[0], base[1], flops, params, info={"global_ratio": self.max_ratio * (1 - knob)})


class RandomRatios(PruningMethod):
    """Random keep ratios per group (seeded), scaled together until the target is met; channels by L1.

    >>> RandomRatios(seed=0)(model, torch.zeros(1, 3, 32, 32), Target(0.5)).flops_reduction >= 0.5
    True
    """

    name = "random"

    def __init__(self, round_to: int = 1, seed: int = 0, **_: object) -> None:
        self.round_to, self.seed = round_to, seed

    def __call__(self, model: nn.Module, example_input: torch.Tensor, target: Target) -> PruningResult:
        model = model.eval()
        groups = channel_groups(model, example_input)
        importance = group_importance(model, example_input, p=1)
        rng = np.random.default_rng(self.seed)
        shape = {g.name: float(rng.uniform(0.1, 1.0)) for g in groups}
        top = 1.0 / min(shape.values())

        def scheme_at(scale: float) -> KeepScheme:
            return keep_by_importance(
                importance, {g.name: _round_keep(g.channels, min(1.0, scale * shape[g.name]), self.round_to) for g in groups}
            )

        scale, scheme, flops, params = _largest_feasible(model, example_input, target, scheme_at, hi=top)
        base = count_flops_params(model, example_input)
        return PruningResult(scheme, base[0], base[1], flops, params, info={"scale": scale, "shape": shape})


# One-shot methods that the rank stage runs directly; EMO-DIR and whole-emo go through search stages.
METHODS: dict[str, type[PruningMethod]] = {m.name: m for m in (Uniform, GlobalMagnitude, RandomRatios)}


@dataclass(frozen=True)
class MethodSpec:
    """What a `prune.method` needs from the pipeline and how far it reaches: the stages and the API ask this
    record, never the method's name.

    - `search`: None for a one-shot method (`one_shot` is its class, run by the rank stage); "subnetworks" for
      NSGA-II on each sub-network (one task each); "network" for NSGA-II over the whole network.
    - `selectors`: searches score candidates with trained selector networks g_k (on their cached features).
    - `candidates`: the constrain stage trains several schemes per sub-network under the feature constraint.
    - `gpir`: the rank stage combines the sub-networks' candidates by GPIR (and writes the joint front);
      otherwise a search method's scheme is the front member nearest the target.
    - reach (the smallest model the method can build, for the out-of-reach check): the groups a search covers
      at their lowest keep level (inside the sub-networks, boundary channels kept, or every group), or every
      group at a one-shot method's smallest width."""

    name: str
    search: Literal["subnetworks", "network"] | None = None
    selectors: bool = False
    candidates: bool = False
    gpir: bool = False
    one_shot: type[PruningMethod] | None = None

    @property
    def searches(self) -> bool:
        return self.search is not None

    @property
    def feature_stages(self) -> frozenset[str]:
        """The pipeline stages that read the cached sub-network features for this method."""
        if not self.searches:
            return frozenset()
        return frozenset({"search"} | ({"constrain"} if self.candidates else set()) | ({"rank"} if self.gpir else set()))


REGISTRY: dict[str, MethodSpec] = {
    "emo-dir": MethodSpec("emo-dir", search="subnetworks", selectors=True, candidates=True, gpir=True),
    "whole-emo": MethodSpec("whole-emo", search="network"),
    **{name: MethodSpec(name, one_shot=cls) for name, cls in METHODS.items()},
}
METHOD_NAMES = tuple(REGISTRY)


def method_spec(name: str) -> MethodSpec:
    """The registry entry of `name`; a ValueError names the methods there are."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def unused_switches(
    method: str,
    *,
    paired_boundaries: bool,
    prefer_capacity: bool,
    capacity_window: float,
    spread_outputs: bool,
    default_window: float,
    dotted: bool = False,
) -> str | None:
    """A note naming the switches that change nothing as set, or None. The GPIR-only ones (paired boundaries,
    capacity preference and window, spread outputs) when they are on for a method that does not rank sub-network
    candidates by GPIR; otherwise the capacity window moved from `default_window` while `prefer_capacity`, its only
    reader, is off. `dotted` names them as params.yaml does (`rank.prefer_capacity`), else as the API's arguments.
    The pipeline's preflight and the Python API both warn with it."""
    name = {
        "paired_boundaries": "rank.paired_boundaries",
        "prefer_capacity": "rank.prefer_capacity",
        "capacity_window": "rank.capacity_window",
        "spread_outputs": "constrain.spread_outputs",
    }
    switches = {
        "paired_boundaries": paired_boundaries,
        "prefer_capacity": prefer_capacity,
        "capacity_window": capacity_window != default_window,
        "spread_outputs": spread_outputs,
    }
    on = [name[k] if dotted else k for k, value in switches.items() if value]
    if on and not method_spec(method).gpir:
        return f"{', '.join(on)}: on, but {method} does not rank sub-network candidates by GPIR; ignored"
    if not prefer_capacity and capacity_window != default_window:
        return f"rank.capacity_window = {capacity_window:g}: read only with rank.prefer_capacity on, which is off; ignored"
    return None
