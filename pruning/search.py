"""NSGA-II channel-pruning search over one module (a sub-network, or the whole network for `whole-emo`), as a pymoo Problem.

Genes are keep-ratio levels, one per prunable channel group (residual-coupled channels share a gene);
a candidate keeps the most important channels of each group by L1 group magnitude, inherits the
original weights, has its BatchNorm statistics re-estimated on a few cached batches, and is scored by
a frozen selector on cached inputs. Objectives, both minimised: cost fraction (FLOPs, params or predicted
latency of the pruned module over the original's) and selector error. Nothing of pymoo leaves this module.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.indicators.hv import HV
from pymoo.operators.crossover.pntx import TwoPointCrossover
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from torch import nn

from pruning import stopping
from pruning.arrays import as_batch
from pruning.boundary import ADAPTER, Boundary, CandidateIO, build_candidate
from pruning.channels import (
    ChannelGroup,
    KeepScheme,
    channel_groups_and_left_out,
    count_flops_params,
    group_importance,
    keep_by_importance,
    pruned_copy,
)
from pruning.counting import ImageCount, count, counting
from pruning.methods import Metric, model_cost
from pruning.selectors import folded
from pruning.train import Precision, autocast, resolve_precision

__all__ = [
    "BoundaryGene",
    "Evaluation",
    "ParetoFront",
    "SearchSpace",
    "check_boundary_widths",
    "check_min_keep",
    "boundary_search_groups",
    "Scorer",
    "choose_for_target",
    "loader_images",
    "group_exclusions",
    "prunable_groups",
    "recalibrate_bn",
    "run_search",
    "spread_indices",
]


# the errors a forward pass raises when a tensor arrives with other channels than a layer or an add expects
_SHAPE_ERROR = re.compile(
    r"must match the size of tensor|expected input\S* to have \d+ channels|should contain \d+ elements"
    r"|shapes cannot be multiplied|size mismatch|Sizes of tensors must match|shape '\[[-\d, ]*\]' is invalid"
    r"|divisible by|normalized_shape|to have \d+ channels"
)


def prunable_groups(module: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None = None) -> list[ChannelGroup]:
    """Channel groups of `module` whose pruning leaves its input and output shapes unchanged: the boundary
    features X_{k-1} and X_k keep their channels so the neighbours and the feature constraint still fit.
    `group_exclusions` also says why each other group was left out."""
    return group_exclusions(module, example_input, ignored)[0]


def group_exclusions(
    module: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None = None
) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """(the groups `prunable_groups` returns, [(group name, why it is left out)] for the others).

    Each group is probed by removing its last channel: a group is left out when the module's output then has
    other channels, or when the forward pass fails on a channel-count mismatch (the group reaches the module's
    input, through a residual add of it). Any other error is a defect and is raised, not taken for a boundary."""
    inner, outputs, excluded = _classify_groups(module, example_input, ignored)
    excluded += [(g.name, "reaches the output: the boundary keeps its channels") for g in outputs]
    return inner, excluded


def _classify_groups(
    module: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None = None
) -> tuple[list[ChannelGroup], list[ChannelGroup], list[tuple[str, str]]]:
    """(groups inside the module, groups that reach its output, [(group, why it cannot be pruned)])."""
    module = module.eval()
    with torch.no_grad():
        out_shape = module(example_input).shape
    inner: list[ChannelGroup] = []
    outputs: list[ChannelGroup] = []
    groups, left_out = channel_groups_and_left_out(module, example_input, ignored)
    excluded: list[tuple[str, str]] = list(left_out)
    for g in groups:
        if g.channels < 2:
            excluded.append((g.name, "a single channel"))
            continue
        probe = pruned_copy(module, example_input, {g.name: list(range(g.channels - 1))})
        with torch.no_grad():
            try:
                shape = probe(example_input).shape
            except RuntimeError as e:
                if not _SHAPE_ERROR.search(str(e)):
                    raise
                # typically a residual add of the module's input, whose channels the boundary fixes
                excluded.append((g.name, f"breaks the forward pass with one channel fewer: {str(e).splitlines()[0][:120]}"))
                continue
        (inner if shape == out_shape else outputs).append(g)
    return inner, outputs, excluded


@dataclass(frozen=True)
class BoundaryGene:
    """A gene choosing the width option of the boundary channels a sub-network reads (`reads`: j of X_j) and/or
    writes (`writes`); `group` is the local channel group carrying them, `options[o]` the channels option o keeps
    (nested, fixed by whole-network importance: see pruning/boundary.py), `whole` the whole-network group."""

    group: str
    channels: int
    options: tuple[tuple[int, ...], ...]
    reads: int | None = None
    writes: int | None = None
    whole: str | None = None


def boundary_search_groups(
    module: nn.Module, example_input: torch.Tensor, reads: Boundary | None, writes: Boundary | None
) -> tuple[list[ChannelGroup], list[BoundaryGene], list[tuple[str, str]]]:
    """(inner groups, boundary genes, [(group, why left out)]) of a sub-network searched with its boundaries.

    `module` carries the input adapter (pruning/boundary.py) when `reads` is searchable. Its adapter's group
    reads X_{k-1}; a group reaching the output writes X_k and becomes a gene when `writes` is searchable
    (one group, X_k's channels); a group doing both (a residual chain through the whole sub-network) is one
    gene for both boundaries, which then share a whole-network group and options."""
    inner, outputs, excluded = _classify_groups(module, example_input)
    genes: list[BoundaryGene] = []
    reads = reads if reads is not None and reads.searchable else None
    writes = writes if writes is not None and writes.searchable else None
    adapter = [g for g in inner + outputs if g.name == ADAPTER]
    if reads is not None and not adapter:
        raise ValueError(f"X_{reads.index} is searched, but the module has no {ADAPTER!r} group: put it behind with_input_adapter")
    through = bool(adapter) and adapter[0] in outputs
    inner = [g for g in inner if g.name != ADAPTER]
    outputs = [g for g in outputs if g.name != ADAPTER]
    if adapter and reads is not None:
        if through and (writes is None or writes.group != reads.group or writes.options != reads.options):
            excluded.append((ADAPTER, f"carries X_{reads.index} through to the output, whose boundary is not searched alike"))
        else:
            genes.append(
                BoundaryGene(
                    ADAPTER,
                    reads.channels,
                    reads.options,
                    reads.index,
                    writes.index if through and writes is not None else None,
                    reads.group,
                )
            )
    if outputs:
        why: str | None = None
        if writes is None:
            why = "reaches the output: the boundary keeps its channels"
        elif through:
            why = "reaches the output beside the input's group"
        elif len(outputs) > 1:
            why = f"reaches the output with {len(outputs) - 1} other group(s)"
        elif outputs[0].channels != writes.channels:
            why = f"reaches the output with {outputs[0].channels} channels, X_{writes.index} has {writes.channels}"
        if why is None and writes is not None:
            genes.append(BoundaryGene(outputs[0].name, writes.channels, writes.options, None, writes.index, writes.group))
        else:
            excluded += [(g.name, why or "reaches the output") for g in outputs]
    return inner, genes, excluded


def check_boundary_widths(widths: Sequence[float], encoding: str) -> list[float]:
    """Boundary keep fractions the search can take, widest first, else a ValueError naming them."""
    if not widths or any(not 0.0 < w <= 1.0 for w in widths) or 1.0 not in widths:
        raise ValueError(f"boundary widths must be fractions in (0, 1] and include 1.0 (keep all), got {list(widths)}")
    if len(set(widths)) > 1 and encoding != "levels":
        raise ValueError(f"boundary widths {list(widths)} need encoding 'levels'; with encoding 'binary' use [1.0]")
    return sorted(set(widths), reverse=True)


def check_min_keep(min_keep: float, encoding: str) -> None:
    """A lowest keep fraction the search can honour, else a ValueError naming it."""
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep must be a fraction in [0, 1), got {min_keep}")
    if min_keep > 0 and encoding != "levels":
        raise ValueError(f"min_keep {min_keep} needs encoding 'levels'; with encoding 'binary' use 0")


@dataclass(frozen=True)
class SearchSpace:
    """How genes encode a keep-scheme over `groups` (and the `boundary` genes after them).

    `levels` (default): one integer gene in 1..levels per group; gene v keeps round(v / levels * channels)
    channels (at least one), the most important ones by L1 group magnitude.
    `binary`: one bit per channel; a group whose bits are all 0 keeps its most important channel.
    `round_to` (levels only) makes every kept count a multiple of it, where the group is that wide.
    `boundary` (levels only): one gene in 1..len(options) per `BoundaryGene`, gene v keeping options[v - 1].
    `min_keep` (levels only): no inner group keeps fewer than min_keep of its channels (rounded up, to a
    multiple of `round_to`); its genes start at the first level at or above it.

    Example (illustrative, not run)::

        space = SearchSpace(tuple(prunable_groups(sub, x)), levels=10)
        space.decode(space.uniform(0.5), importance)   # half of every group, largest L1 first
    """

    groups: tuple[ChannelGroup, ...]
    levels: int = 10
    encoding: Literal["levels", "binary"] = "levels"
    round_to: int = 1  # 'levels' only: kept channel counts are multiples of this (fast kernels want 8 or 16)
    excluded: tuple[tuple[str, str], ...] = ()  # (group, why) of the module's groups that are not genes
    boundary: tuple[BoundaryGene, ...] = ()
    min_keep: float = 0.0

    def __post_init__(self) -> None:
        if self.encoding not in ("levels", "binary"):
            raise ValueError(f"encoding must be 'levels' or 'binary', got {self.encoding!r}")
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        check_min_keep(self.min_keep, self.encoding)
        if self.boundary and self.encoding != "levels":
            raise ValueError("boundary genes need encoding 'levels'; with 'binary' keep every boundary channel (boundary widths [1.0])")

    @property
    def min_level(self) -> int:
        """The lowest level an inner gene takes: the first of 1..levels keeping at least `min_keep`."""
        return max(1, math.ceil(round(self.min_keep * self.levels, 9)))

    @property
    def n_var(self) -> int:
        inner = len(self.groups) if self.encoding == "levels" else sum(g.channels for g in self.groups)
        return inner + len(self.boundary)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bound of every gene."""
        lo, hi = (self.min_level, self.levels) if self.encoding == "levels" else (0, 1)
        inner = self.n_var - len(self.boundary)
        upper = [hi] * inner + [len(b.options) for b in self.boundary]
        return np.array([lo] * inner + [1] * len(self.boundary)), np.array(upper)

    def uniform(self, fraction: float) -> np.ndarray:
        """Genes keeping about `fraction` of every group (and the boundary option nearest it)."""

        def nearest_option(b: BoundaryGene) -> int:
            return 1 + min(range(len(b.options)), key=lambda o: (abs(len(b.options[o]) / b.channels - fraction), o))

        nearest = [nearest_option(b) for b in self.boundary]
        if self.encoding == "levels":
            level = max(self.min_level, min(self.levels, int(round(fraction * self.levels))))
            return np.array([level] * len(self.groups) + nearest, dtype=int)
        bits = []
        for g in self.groups:
            k = max(1, int(round(fraction * g.channels)))
            bits += [1] * k + [0] * (g.channels - k)  # leading positions: mapped to the most important channels
        return np.array(bits, dtype=int)

    def keep_counts(self, genes: Sequence[int]) -> dict[str, int]:
        if self.encoding != "levels":
            raise ValueError("keep_counts applies to the 'levels' encoding")
        out = {}
        for g, v in zip(self.groups, genes):
            k = int(v) / self.levels * g.channels
            r = self.round_to if g.channels >= self.round_to else 1
            floor = math.ceil(round(self.min_keep * g.channels, 9) / r) * r  # 0 unless min_keep
            out[g.name] = min(g.channels, max(r, floor, int(round(k / r)) * r))
        for b, v in zip(self.boundary, genes[len(self.groups) :]):
            out[b.group] = len(b.options[int(v) - 1])
        return out

    def network_key(self, genes: Sequence[int]) -> tuple[int, ...]:
        """What `genes` decode to, as a hashable key: the kept count of every group ('levels'), or the bits with
        an all-zero group read as keeping its most important channel ('binary'). Gene vectors with the same key
        decode to the same network (with `round_to` many levels share a count), so they are evaluated once."""
        if self.encoding == "levels":
            return tuple(self.keep_counts(genes).values())
        key, pos = [], 0
        for g in self.groups:
            bits = [int(b) for b in genes[pos : pos + g.channels]]
            pos += g.channels
            key += bits if any(bits) else [1] + [0] * (g.channels - 1)
        return tuple(key)

    def decode(self, genes: Sequence[int], importance: dict[str, torch.Tensor]) -> KeepScheme:
        if self.encoding == "levels":
            counts = self.keep_counts(genes)
            scheme = keep_by_importance({g.name: importance[g.name] for g in self.groups}, counts)
            for b, v in zip(self.boundary, genes[len(self.groups) :]):
                scheme[b.group] = list(b.options[int(v) - 1])
            return scheme
        scheme, pos = {}, 0
        for g in self.groups:
            bits = [int(b) for b in genes[pos : pos + g.channels]]
            pos += g.channels
            # bit i stands for the i-th most important channel, so 'uniform' seeds are magnitude pruning
            ranked = sorted(range(g.channels), key=lambda c: (-float(importance[g.name][c]), c))
            kept = [ranked[i] for i, b in enumerate(bits) if b] or ranked[:1]
            scheme[g.name] = sorted(kept)
        return scheme

    def io(self, genes: Sequence[int], out_channels: int = 0) -> CandidateIO:
        """The boundary options `genes` read and write, with their kept channels in whole-network terms."""
        inputs = outputs = 0
        in_group = out_group = None
        whole: dict[str, list[int]] = {}
        for b, v in zip(self.boundary, genes[len(self.groups) :]):
            option = int(v) - 1
            if b.reads is not None:
                inputs, in_group = option, b.group
            if b.writes is not None:
                outputs, out_group = option, b.group
            if b.whole is not None:
                whole[b.whole] = list(b.options[option])
        return CandidateIO(inputs, outputs, in_group, out_group, out_channels, whole)


class Scorer:
    """Selector error of a pruned module on cached inputs, after re-estimating its BatchNorm statistics.

    Example (illustrative, not run)::

        scorer = Scorer(selector, calib_inputs, val_inputs, val_labels)
        scorer(pruned_subnetwork)   # cross-entropy of selector(pruned(val_inputs))
    """

    def __init__(
        self,
        selector: nn.Module,
        calib_inputs: torch.Tensor,
        val_inputs: torch.Tensor,
        val_labels: torch.Tensor,
        error: Literal["ce", "acc"] = "ce",
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
        channels_last: bool = True,
    ) -> None:
        # channels_last: the layout pretrain and finetune train in by default. The selector is a copy (a model's
        # own head is shared with the model), with a FeatureSelector's BatchNorm folded into its convolution
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.selector = copy.deepcopy(folded(selector.eval())).to(device).to(memory_format=self.layout)
        self.calib, self.val_x, self.val_y = calib_inputs, val_inputs, val_labels
        self.error, self.batch_size, self.device = error, batch_size, torch.device(device)
        self.precision = resolve_precision(precision, self.device)  # auto: bf16 where the device has it natively

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> float:
        """The selector error of `module` (a throwaway candidate: its BatchNorm statistics and layout are changed)."""
        module = module.to(self.device).to(memory_format=self.layout)
        recalibrate_bn(module, self.calib, self.batch_size, self.device, self.layout)  # BatchNorm statistics in fp32
        logits = []
        # the val pass under `precision`: bf16 autocast made a whole evaluation 1.2-1.6x faster on this CPU (AVX512-BF16)
        with autocast(self.device, self.precision):
            for i in range(0, len(self.val_x), self.batch_size):
                stopping.check()
                x = _laid_out(as_batch(self.val_x[i : i + self.batch_size]).to(self.device), self.layout)
                logits.append(self.selector(module(x)).float().cpu())
                count(len(x))
        z, y = torch.cat(logits), as_batch(self.val_y)
        if self.error == "acc":
            return 1.0 - (z.argmax(1) == y).float().mean().item()
        return F.cross_entropy(z, y).item()


@torch.no_grad()
def recalibrate_bn(
    module: nn.Module, inputs: torch.Tensor, batch_size: int, device: torch.device, layout: torch.memory_format = torch.contiguous_format
) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over `inputs` (pruning shifts them);
    image batches are passed in `layout`."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(inputs) == 0:
        module.eval()
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration batches
    module.train()
    try:
        for i in range(0, len(inputs), batch_size):
            x = _laid_out(as_batch(inputs[i : i + batch_size]).to(device), layout)
            module(x)
            count(len(x))
    finally:  # training afterwards (finetuning in the same process) must see the usual running average again
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        module.eval()


def _laid_out(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """`x` in `layout` where it applies (batches of feature maps); other tensors as they are."""
    return x.contiguous(memory_format=layout) if x.dim() == 4 else x


def loader_images(loader: Iterable, samples: int) -> torch.Tensor:
    """The first `samples` images (fewer if the loader has fewer) of a loader of (images, labels) batches."""
    xs, n = [], 0
    for x, _ in loader:
        xs.append(x[: samples - n])
        n += len(xs[-1])
        if n >= samples:
            break
    return torch.cat(xs) if xs else torch.empty(0)


@dataclass
class Evaluation:
    genes: tuple[int, ...]
    cost: float  # pruned / original FLOPs (or params, or predicted latency) of the searched module
    error: float  # selector error
    flops: int
    params: int
    inputs: int = 0  # width option of the boundary read (0: all channels)
    outputs: int = 0  # width option of the boundary written


@dataclass
class ParetoFront:
    """The non-dominated archive of every candidate evaluated, sorted by cost, and the search's history."""

    space: SearchSpace
    base_flops: int
    base_params: int
    members: list[Evaluation]
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: int = 0
    fronts: list[list[tuple[float, float]]] = field(default_factory=list)  # (cost, error) of the front after each generation

    archive: list[Evaluation] = field(default_factory=list)  # non-dominated within each (inputs, outputs) boundary state
    kept_whole: str | None = None  # why nothing was searched (no prunable group, no searchable boundary): no member
    images: ImageCount = field(default_factory=ImageCount)  # passed by the evaluations (BatchNorm and scoring)

    def spread(self, m: int, target: float | None = None) -> list[Evaluation]:
        """Up to `m` pruned members spread by cost, denser near `target` (0 = all); see `spread_indices`."""
        return [self.members[i] for i in spread_indices([e.cost for e in self.members], m, target)]


NEAR_TARGET = 0.1  # half-width (in cost fraction) of the window around the target where candidates are denser


def spread_indices(costs: Sequence[float], m: int, target: float | None = None) -> list[int]:
    """Indices of up to `m` entries of a cost-sorted front, chosen by cost (0 = all); the unpruned end (cost 1)
    is left out: it is every sub-network's 'keep' option anyway.

    Without `target`: evenly spaced in cost from the cheapest to the dearest member. With `target` (the
    reduction asked for the whole network, so a cost of 1 - target): half of them (rounded down, at least one)
    evenly over cost 1 - target +- NEAR_TARGET, where GPIR most likely picks, the rest evenly over the whole
    front (both ends when two or more); each anchor takes the unused member nearest in cost, so a front with
    few members near the target still yields `m` distinct candidates."""
    pruned = [i for i, c in enumerate(costs) if c < 1.0 - 1e-9]
    if m == 0 or m >= len(pruned):
        return pruned
    lo, hi = costs[pruned[0]], costs[pruned[-1]]
    if target is None:
        anchors = list(np.linspace(lo, hi, m))
    else:
        n_near = max(1, m // 2)
        centre = min(max(1.0 - target, lo), hi)
        near = np.linspace(max(lo, centre - NEAR_TARGET), min(hi, centre + NEAR_TARGET), n_near + 2)[1:-1]
        anchors = [*np.linspace(lo, hi, m - n_near), *near]
    chosen: list[int] = []
    for a in anchors:
        free = [i for i in pruned if i not in chosen]
        chosen.append(min(free, key=lambda i: (abs(costs[i] - a), i)))
    return sorted(chosen)


def choose_for_target(costs: Sequence[float], errors: Sequence[float], target: float, max_overshoot: float) -> tuple[int, str | None]:
    """(index of the lowest-error front member whose cost fraction meets `target` (a reduction), preferring
    those within `max_overshoot` of it, at equal error the larger (closer to target) one; a note saying what
    was taken instead when no member lies within `max_overshoot`, else None)."""
    limit = 1.0 - target
    feasible = [i for i, c in enumerate(costs) if c <= limit + 1e-12]
    if not feasible:
        reach = 1.0 - min(costs)
        raise ValueError(
            f"target reduction {target} is beyond this front, which reaches at most {reach:.4f}; "
            f"allowed: a target up to {reach:.4f}, or a longer search"
        )
    near = [i for i in feasible if costs[i] >= limit - max_overshoot]
    if near:
        return min(near, key=lambda i: (errors[i], -costs[i], i)), None
    best = min(feasible, key=lambda i: (errors[i], -costs[i], i))
    return best, (
        f"no front member removes between {target} and {target + max_overshoot:.4f}; took the most accurate that "
        f"removes more ({1.0 - costs[best]:.4f})"
    )


class _PruningProblem(Problem):
    def __init__(self, space: SearchSpace, evaluate: Callable[[np.ndarray], tuple[float, float, int, int]]) -> None:
        lo, hi = space.bounds
        super().__init__(n_var=space.n_var, n_obj=2, xl=lo, xu=hi, vtype=int)
        self._evaluate_one = evaluate

    def _evaluate(self, X, out, *args, **kwargs):
        out["F"] = np.array([self._evaluate_one(np.asarray(x, dtype=int))[:2] for x in X], dtype=float)


class _Search:
    """Evaluation cache and archive around one module; pickled (minus the module) into checkpoints."""

    def __init__(
        self,
        module: nn.Module,
        example_input: torch.Tensor,
        space: SearchSpace,
        scorer: Callable[[nn.Module], float],
        metric: Metric,
    ) -> None:
        self.module, self.example, self.space, self.scorer, self.metric = module, example_input, space, scorer, metric
        self.importance = group_importance(module, example_input)
        self.importance = {g.name: self.importance[g.name] for g in space.groups}
        self.counts = count_flops_params(module, example_input)  # (FLOPs, params)
        self.base = model_cost(module, example_input, metric, self.counts)  # in the metric
        if isinstance(module, nn.Sequential) and ADAPTER in module._modules:  # not part of the sub-network: candidates drop it
            adapter = module.get_submodule(ADAPTER)
            counts = count_flops_params(adapter, example_input)
            self.counts = (self.counts[0] - counts[0], self.counts[1] - counts[1])
            self.base -= model_cost(adapter, example_input, metric, counts)
        with torch.no_grad():
            self.out_channels = int(module.eval()(example_input).shape[1])
        self.cache: dict[tuple[int, ...], Evaluation] = {}  # by decoded network (`SearchSpace.network_key`)
        self.evaluations = 0  # distinct networks evaluated

    def scheme(self, genes: Sequence[int]) -> KeepScheme:
        return self.space.decode(genes, self.importance)

    def candidate(self, genes: Sequence[int]) -> tuple[nn.Module, CandidateIO]:
        io = self.space.io(genes, self.out_channels)
        return build_candidate(self.module, self.example, self.scheme(genes), io), io

    def __call__(self, genes: np.ndarray) -> tuple[float, float, int, int]:
        first = tuple(int(v) for v in genes)  # the front lists the first gene vector seen for a network
        key = self.space.network_key(first)
        if key not in self.cache:
            pruned, io = self.candidate(first)
            flops, params = count_flops_params(pruned, self.example)
            cost = model_cost(pruned, self.example, self.metric, (flops, params)) / self.base
            self.cache[key] = Evaluation(first, cost, float(self.scorer(pruned)), flops, params, io.inputs, io.outputs)
            self.evaluations += 1
        e = self.cache[key]
        return e.cost, e.error, e.flops, e.params

    def archive(self) -> list[Evaluation]:
        """The front of each (inputs, outputs) boundary state, together, sorted by cost: candidates that chain
        with any neighbour's choice of boundary width."""
        states = sorted({(e.inputs, e.outputs) for e in self.cache.values()})
        members = [m for st in states for m in self.front([e for e in self.cache.values() if (e.inputs, e.outputs) == st])]
        return sorted(members, key=lambda e: (e.cost, e.error, e.genes))

    def front(self, evals: list[Evaluation] | None = None) -> list[Evaluation]:
        evals = list(self.cache.values()) if evals is None else evals
        if not evals:
            return []
        F_ = np.array([[e.cost, e.error] for e in evals])
        nd = NonDominatedSorting().do(F_, only_non_dominated_front=True)
        members = sorted((evals[i] for i in nd), key=lambda e: (e.cost, e.error, e.genes))
        # drop exact duplicates in objective space, keep the first by genes
        out, seen = [], set()
        for e in members:
            if (e.cost, e.error) not in seen:
                seen.add((e.cost, e.error))
                out.append(e)
        return out


def _initial_population(space: SearchSpace, pop_size: int, seed: int) -> np.ndarray:
    """The unpruned module and uniform keep fractions across the range (so the front starts wide), then random genes."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    for frac in np.linspace(1.0, 0.1, max(2, pop_size // 2)):
        row = space.uniform(float(frac))
        if row.tobytes() not in seen:
            seen.add(row.tobytes())
            rows.append(row)
    lo, hi = space.bounds
    while len(rows) < pop_size:
        if space.encoding == "binary":
            rows.append((rng.random(space.n_var) < rng.uniform(0.2, 1.0)).astype(int))
        else:
            rows.append(rng.integers(lo, hi + 1, size=space.n_var))
    return np.array(rows[:pop_size], dtype=int)


def _operators(space: SearchSpace) -> dict:
    if space.encoding == "binary":
        return {"crossover": TwoPointCrossover(), "mutation": BitflipMutation(prob=1.0, prob_var=min(0.5, 2.0 / space.n_var))}
    return {
        "crossover": SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        "mutation": PM(eta=20, vtype=float, repair=RoundingRepair()),
    }


def run_search(
    module: nn.Module,
    example_input: torch.Tensor,
    scorer: Callable[[nn.Module], float],
    *,
    space: SearchSpace,
    pop_size: int,
    generations: int,
    seed: int,
    metric: Metric = "flops",
    state: bytes | None = None,
    on_generation: Callable[[int, dict[str, float], bytes], None] | None = None,
) -> ParetoFront:
    """NSGA-II for `generations` generations; returns the non-dominated archive of all evaluations.

    After every generation `on_generation(gen, metrics, state)` receives a checkpoint (`state`, bytes);
    passing the latest one back as `state` resumes there, and with the same seed ends with the same front.

    Example (illustrative, not run)::

        space = SearchSpace(tuple(prunable_groups(sub, x)))
        front = run_search(sub, x, Scorer(selector, calib, val_x, val_y), space=space, pop_size=16, generations=8, seed=0)
        [(m.cost, m.error) for m in front.members][:2]
    """
    if not space.groups and not space.boundary:
        raise ValueError("the module has no prunable channel group and no searched boundary: nothing to search")
    if pop_size < 4 or generations < 1:
        raise ValueError(f"search needs pop_size >= 4 and generations >= 1, got {pop_size} and {generations}")
    search = _Search(module.eval(), example_input, space, scorer, metric)
    history: list[dict[str, float]] = []
    fronts: list[list[tuple[float, float]]] = []
    before = ImageCount()  # passed before a resumed checkpoint
    if state is not None:
        saved = pickle.loads(state)
        before = saved.get("images", before)
        algorithm, search.cache, search.evaluations, history, fronts, ref = (
            saved["algorithm"],
            saved["cache"],
            saved["evaluations"],
            saved["history"],
            saved["fronts"],
            saved["ref"],
        )
        algorithm.problem = _PruningProblem(space, search)
    else:
        algorithm = NSGA2(
            pop_size=pop_size,
            sampling=_initial_population(space, pop_size, seed),
            eliminate_duplicates=True,
            **_operators(space),
            seed=seed,
        )
        algorithm.setup(_PruningProblem(space, search), termination=("n_gen", generations), verbose=False)
        ref = None
    with counting(before) as images:
        _generations(algorithm, search, history, fronts, ref, images, on_generation)
    return ParetoFront(
        space,
        search.counts[0],
        search.counts[1],
        search.front(),
        history,
        search.evaluations,
        fronts,
        archive=search.archive(),
        images=images,
    )


def _generations(
    algorithm: NSGA2,
    search: _Search,
    history: list[dict[str, float]],
    fronts: list[list[tuple[float, float]]],
    ref: np.ndarray | None,
    images: ImageCount,
    on_generation: Callable[[int, dict[str, float], bytes], None] | None,
) -> None:
    """NSGA-II's remaining generations; after each, the history, the front and a checkpoint."""
    while algorithm.has_next():
        algorithm.next()
        front = search.front()
        F_ = np.array([[e.cost, e.error] for e in front])
        if ref is None:  # fixed after the first generation so hypervolumes compare across generations
            all_err = [e.error for e in search.cache.values()]
            ref = np.array([1.0 + 1e-9, max(all_err) * 1.1 + 1e-9])
        gen = int(algorithm.n_gen) - 1
        metrics = {
            "generation": gen,
            # the fraction of the reference box [0, 1] x [0, 1.1 x the worst error of generation 1] the front
            # dominates: in [0, 1], comparable across generations of one search
            "hypervolume": float(HV(ref_point=ref)(F_)) / float(ref[0] * ref[1]),
            "front_size": len(front),
            "evaluations": search.evaluations,
            "best_error": float(F_[:, 1].min()),
            "min_cost": float(F_[:, 0].min()),
        }
        history.append(metrics)
        fronts.append([(e.cost, e.error) for e in front])
        if on_generation is not None:
            problem, algorithm.problem = algorithm.problem, None
            try:
                blob = pickle.dumps(
                    {
                        "algorithm": algorithm,
                        "cache": search.cache,
                        "evaluations": search.evaluations,
                        "history": history,
                        "fronts": fronts,
                        "ref": ref,
                        "images": images,
                    }
                )
            finally:
                algorithm.problem = problem
            on_generation(gen, metrics, blob)
