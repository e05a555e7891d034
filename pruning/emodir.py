"""EMO-DIR's steps as library functions, with their defaults: the Python API (`pruning.api.prune`) and the
pipeline's stages (tasks/) call these and nothing else, so both run the same method.

Every default of the method lives in the settings dataclasses below; `tasks/config.py` takes its defaults
from them and params.yaml repeats them (a test fails when the three disagree).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pruning.boundary import ADAPTER, Boundary, CandidateIO, build_candidate, pruned_head, pruned_head_cost, with_input_adapter
from pruning.channels import count_flops_params
from pruning.constrain import FeatureStream, train_front
from pruning.distill import Distiller, DynamicKDLoss, KDLoss
from pruning.divide import SubNetwork
from pruning.latency import LatencyCost
from pruning.methods import Metric, cost_of
from pruning.search import (
    Evaluation,
    ParetoFront,
    Scorer,
    SearchSpace,
    boundary_search_groups,
    check_min_keep,
    loader_images,
    recalibrate_bn,
    run_search,
    spread_indices,
)
from pruning.selectors import train_selector
from pruning.train import Precision, TrainConfig, fit, seed_everything

__all__ = [
    "ConstrainSettings",
    "FinetuneSettings",
    "RankSettings",
    "SearchSettings",
    "SelectorSettings",
    "candidate_cost",
    "candidate_cost_of",
    "candidate_module",
    "CandidateChoice",
    "choose_candidates",
    "extra_candidates",
    "constrain_subnetwork",
    "distiller",
    "finetune",
    "reestimate_bn",
    "require_searchable",
    "search_network",
    "searched_module",
    "train_selectors",
]


@dataclass(frozen=True)
class SelectorSettings:
    """One small classifier g_k per inner boundary, trained with Adam on the cached X_k."""

    epochs: int = 20
    lr: float = 0.003
    batch_size: int = 128


@dataclass(frozen=True)
class SearchSettings:
    """NSGA-II per sub-network: `levels` keep-ratio levels per channel group (or one bit per channel)."""

    pop_size: int = 16
    generations: int = 8
    levels: int = 10
    encoding: Literal["levels", "binary"] = "levels"
    error: Literal["ce", "acc"] = "ce"
    calib_samples: int = 256
    precision: Precision = "auto"  # of the scoring pass (BatchNorm re-estimation stays fp32); auto: bf16 where native
    channels_last: bool = True  # the scoring pass's layout (NHWC): 1.4x faster evaluations here (bench/notes/search_cost.md)
    # keep fractions a boundary feature X_k may take (its channels chosen by whole-network importance); (1.0,) freezes them
    boundary_widths: tuple[float, ...] = (1.0, 0.75, 0.5)
    # lowest keep fraction of an inner channel group (0: one level); like a per-layer cap on the pruning ratio
    min_keep: float = 0.0

    def __post_init__(self) -> None:
        check_min_keep(self.min_keep, self.encoding)  # before any work, as the API builds these first


@dataclass(frozen=True)
class ConstrainSettings:
    """Cross-network constrained training of `candidates` front members per sub-network (0 = all), on the
    cached features (`data="cache"`) or on features streamed from the whole augmented training set through
    the original network (`data="stream"`: each epoch is a pass over the training loader)."""

    candidates: int = 4
    epochs: int = 2
    lr: float = 0.01
    lam: float = 1.0
    batch_size: int = 128
    data: Literal["cache", "stream"] = "cache"
    # also train, beyond the `candidates`, one member for each boundary width no trained candidate writes or reads
    spread_outputs: bool = False


@dataclass(frozen=True)
class RankSettings:
    """GPIR: the `top_t` best knapsack combinations are verified jointly on the val features. Whatever the
    method, the chosen network's BatchNorm statistics are then re-estimated on `bn_samples` train images
    (0: keep the statistics the method left), so every method starts finetuning, and is measured before it,
    on statistics of its own pruned structure."""

    top_t: int = 10
    max_overshoot: float = 0.02
    bn_samples: int = 2048
    fill_back: bool = True  # give channels back down to the target (to GPIR's trained scheme with the base's weights)
    # EMO-DIR: a candidate narrowing a boundary is scored beside the least-pruned next candidate reading that width,
    # not beside the original next sub-network reading zeros (which overstates its loss)
    paired_boundaries: bool = False
    # EMO-DIR: among the verified combinations within one standard error of the best val accuracy, take the one
    # keeping the most parameters (at equal FLOPs, parameters kept predicted finetuned accuracy in bench/notes/r20.md)
    prefer_capacity: bool = False
    # with prefer_capacity: how many standard errors under the best val accuracy still tie
    capacity_window: float = 1.0


@dataclass(frozen=True)
class FinetuneSettings:
    """Finetuning of the pruned network, with distillation from the unpruned one unless `kd` is none."""

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    kd: Literal["none", "kd", "dynamickd"] = "kd"
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    precision: Precision = "auto"  # auto: bf16 autocast where the device has it natively, else fp32
    channels_last: bool | Literal["auto"] = "auto"  # auto: NHWC only where it trains faster (pruning/train.py: training_layout)


def train_selectors(
    subnetworks: Sequence[SubNetwork],
    head: nn.Module,
    features: Sequence,
    labels,
    num_classes: int,
    settings: SelectorSettings = SelectorSettings(),
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_trained: Callable[[int, float], None] | None = None,
) -> list[nn.Module]:
    """g_1..g_K: a frozen FeatureSelector on each inner boundary's cached train features (seeded `seed + k`),
    and the model's own head for the last boundary. `on_trained(k, seconds)` follows each one trained."""
    selectors: list[nn.Module] = []
    for sub in subnetworks[:-1]:
        start = time.perf_counter()
        selectors.append(
            train_selector(
                features[sub.index],
                labels,
                num_classes,
                epochs=settings.epochs,
                lr=settings.lr,
                batch_size=settings.batch_size,
                seed=seed + sub.index,
                device=device,
            )
        )
        if on_trained is not None:
            on_trained(sub.index, time.perf_counter() - start)
    return [*selectors, head]


def search_network(
    module: nn.Module,
    example_input: torch.Tensor,
    selector: nn.Module,
    train_inputs,
    val_inputs,
    val_labels,
    settings: SearchSettings = SearchSettings(),
    *,
    generations: int | None = None,
    round_to: int = 1,
    metric: Metric = "flops",
    seed: int = 0,
    device: torch.device | str = "cpu",
    state: bytes | None = None,
    on_generation: Callable[[int, dict[str, float], bytes], None] | None = None,
    reads: Boundary | None = None,
    writes: Boundary | None = None,
) -> ParetoFront:
    """NSGA-II over the channel groups of `module` (a sub-network, or the whole network for whole-emo), scored
    by `selector` on the module's cached val inputs; BatchNorm re-estimated on `calib_samples` train inputs.

    `reads` and `writes` (from `plan_boundaries`) make the width options of the boundary features X_{k-1} and
    X_k genes too, where they are searchable; the front's members then say which options they read and write.
    A module with nothing to search (every group left out, both boundaries kept) is kept whole: the front has
    no member and `kept_whole` says why. Whole-network callers refuse such a model (`require_searchable`)."""
    searched = searched_module(module, example_input, reads)
    groups, genes, excluded = boundary_search_groups(searched, example_input, reads, writes)
    space = SearchSpace(tuple(groups), settings.levels, settings.encoding, round_to, tuple(excluded), tuple(genes), settings.min_keep)
    if not space.groups and not space.boundary:  # nothing to search: kept whole, and the front says why
        why = "; ".join(f"{name}: {reason}" for name, reason in excluded) or "it has no channel group"
        flops, params = count_flops_params(searched, example_input)
        return ParetoFront(space, flops, params, [], kept_whole=f"no prunable channel group ({why})")
    scorer = Scorer(
        selector,
        train_inputs[: settings.calib_samples],
        val_inputs,
        val_labels,
        error=settings.error,
        device=device,
        precision=settings.precision,
        channels_last=settings.channels_last,
    )
    return run_search(
        searched,
        example_input,
        scorer,
        space=space,
        pop_size=settings.pop_size,
        generations=generations or settings.generations,
        seed=seed,
        metric=metric,
        state=state,
        on_generation=on_generation,
    )


def require_searchable(front: ParetoFront, model: nn.Module) -> ParetoFront:
    """`front`, unless its search found nothing to prune in the whole `model`: then a ValueError saying why."""
    if front.kept_whole is not None:
        raise ValueError(f"{type(model).__name__} has {front.kept_whole}: there is nothing to prune")
    return front


def searched_module(module: nn.Module, example_input: torch.Tensor, reads: Boundary | None) -> nn.Module:
    """What the search prunes: `module`, behind an input adapter when its input boundary `reads` is searchable."""
    if reads is not None and reads.searchable:
        return with_input_adapter(module, int(example_input.shape[1]))
    return module


def candidate_module(sub: SubNetwork, scheme: dict[str, list[int]], io: CandidateIO) -> nn.Module:
    """Sub-network `sub` pruned to a front member's `scheme` (weights inherited), between its boundaries `io`."""
    example = torch.zeros(1, *sub.in_shape)
    searched = with_input_adapter(sub.module, sub.in_shape[0]) if io.in_group == ADAPTER else sub.module
    return build_candidate(searched, example, scheme, io)


def candidate_cost(
    sub: SubNetwork, module: nn.Module, scheme: dict[str, list[int]], io: CandidateIO, head: nn.Module | None = None
) -> tuple[int, int]:
    """(FLOPs, params) the network spends in candidate `module` of `sub`: its own, and for the last
    sub-network (pass the `head`) the head's change when the candidate prunes X_K, which the head reads."""
    example = torch.zeros(1, *sub.in_shape)
    flops, params = count_flops_params(module, example)
    if head is not None and io.out_group is not None and io.outputs != 0:
        keep = scheme[io.out_group]
        full = count_flops_params(head, torch.zeros(1, *sub.out_shape))
        cut = pruned_head_cost(head, torch.zeros(1, *sub.out_shape), keep)
        flops, params = flops - (full[0] - cut[0]), params - (full[1] - cut[1])
    return flops, params


def candidate_cost_of(
    sub: SubNetwork, module: nn.Module, scheme: dict[str, list[int]], io: CandidateIO, head: nn.Module | None, metric: Metric
) -> int:
    """`candidate_cost` in `metric`: FLOPs, params, or predicted latency (the head's change included alike)."""
    if not isinstance(metric, LatencyCost):
        return cost_of(candidate_cost(sub, module, scheme, io, head), metric)
    # latency only: a cost priced afresh from the table, so candidates and base costs come from the same one
    cost = metric(module, torch.zeros(1, *sub.in_shape))
    if head is not None and io.out_group is not None and io.outputs != 0:
        x = torch.zeros(1, *sub.out_shape)
        cost -= metric(head, x) - metric(*pruned_head(head, x, scheme[io.out_group]))
    return cost


CANDIDATE_WINDOW = 0.3  # candidates are trained within this distance (in cost fraction) of the target's cost, when enough lie there


def choose_candidates(
    members: Sequence[Evaluation], m: int, target: float | None, reads_from: set[int] | None = None
) -> tuple[list[int], list[str]]:
    """(indices of up to `m` cost-sorted front `members` to train (0 = all), notes on what could not be chained).

    Only members reading a width option that a trained predecessor writes (`reads_from`; option 0 always: the
    unpruned predecessor) can join a scheme. The `m` are shared out over those options (each gets at least one
    while `m` allows, the predecessor's pruned options first) and spread by cost within each (`spread_indices`,
    denser near `target`, and within CANDIDATE_WINDOW of the target's cost when enough members lie there), so
    every link the predecessor offers can be continued."""
    allowed = sorted({0} | (reads_from or set()), key=lambda o: (o == 0, o))
    by_option = {o: [i for i, e in enumerate(members) if e.inputs == o and e.cost < 1.0 - 1e-9] for o in allowed}
    notes = [
        f"no front member reads boundary width option {o}: the predecessor's candidates writing it cannot be chained"
        for o in allowed
        if o != 0 and not by_option[o]
    ]
    options = [o for o in allowed if by_option[o]]
    if m == 0:
        return sorted(i for o in options for i in by_option[o]), notes
    quota = {o: 0 for o in options}
    left = m
    while left > 0 and any(quota[o] < len(by_option[o]) for o in options):
        for o in options:
            if left > 0 and quota[o] < len(by_option[o]):
                quota[o] += 1
                left -= 1
    chosen = []
    for o in options:
        if quota[o]:
            idx = by_option[o]
            if target is not None:  # the far ends of a front rarely join a scheme for this target: spend no training there
                near = [i for i in idx if abs(members[i].cost - (1.0 - target)) <= CANDIDATE_WINDOW]
                idx = near if len(near) >= quota[o] else idx
            chosen += [idx[i] for i in spread_indices([members[i].cost for i in idx], quota[o], target)]
    return sorted(chosen), notes


def extra_candidates(members: Sequence[Evaluation], picked: Sequence[int], target: float | None, reads_from: set[int]) -> list[int]:
    """`constrain.spread_outputs`: members to train beyond `picked` (what `choose_candidates` chose), so GPIR can
    choose every boundary width the front holds. One for each width a trained predecessor writes (`reads_from`,
    extras included) that no picked member reads, then one for each width no member chosen so far writes; each
    the member nearest the target's cost among those reading a width on offer. `picked` stays as it is, so the
    trained set is a superset of the default's: GPIR's reach and its best predicted scheme can only gain."""
    offered = {0} | reads_from
    pool = [i for i, e in enumerate(members) if e.inputs in offered and e.cost < 1.0 - 1e-9]

    def nearest(idx: list[int]) -> int:
        return min(idx, key=lambda i: (abs(members[i].cost - (1.0 - target)) if target is not None else 0.0, i))

    chosen, extras = set(picked), []
    for side, widths in (("inputs", sorted(offered)), ("outputs", sorted({members[i].outputs for i in pool}))):
        for w in widths:
            if any(getattr(members[i], side) == w for i in chosen):
                continue
            idx = [i for i in pool if getattr(members[i], side) == w]
            if idx:
                extras.append(nearest(idx))
                chosen.add(extras[-1])
    return extras


class CandidateChoice:
    """Which front members each sub-network trains, in chain order. The default's choice (`choose_candidates`:
    `m` members reading the widths its predecessor's choice writes) and, with `spread_outputs`, the extras
    (`extra_candidates`), which may also read what the predecessor's extras write.

    Example (illustrative, not run)::

        choice = CandidateChoice(4, 0.5, spread_outputs=True)
        for front in fronts:                         # sub-network 1, 2, ... in order
            picked, notes = choice.next(front.archive)
    """

    def __init__(self, m: int, target: float | None, spread_outputs: bool = False) -> None:
        self.m, self.target, self.spread_outputs = m, target, spread_outputs
        self.writes: set[int] = set()  # widths the default's candidates of the previous sub-network write
        self.all_writes: set[int] = set()  # and its extras

    def next(self, members: Sequence[Evaluation]) -> tuple[list[int], list[str]]:
        picked, notes = choose_candidates(members, self.m, self.target, self.writes)
        extras = extra_candidates(members, picked, self.target, self.all_writes) if self.spread_outputs else []
        self.writes = {members[i].outputs for i in picked}
        self.all_writes = self.writes | {members[i].outputs for i in extras}
        return sorted([*picked, *extras]), notes


def constrain_subnetwork(
    sub: SubNetwork,
    subnetworks: Sequence[SubNetwork],
    schemes: Sequence[dict[str, list[int]]],
    features: Sequence,
    labels,
    selector: nn.Module,
    previous: Sequence[nn.Module],
    settings: ConstrainSettings = ConstrainSettings(),
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_trained: Callable[[int, nn.Module, dict[str, float]], None] | None = None,
    train_loader: Iterable | None = None,
    ios: Sequence[CandidateIO] | None = None,
    previous_ios: Sequence[CandidateIO] | None = None,
) -> list[nn.Module]:
    """Train sub-network k's candidates (`schemes`, meeting their boundaries as `ios` say) under the
    cross-network constraint: their input is, per batch, the original S_{k-1} or one of its trained candidates
    `previous` that writes the boundary width the candidate reads, applied to X_{k-2}; their output must match
    (the kept channels of) X_k and keep g_k right. Seeded `seed + k` (and `seed + 100 k + j` per candidate)
    whatever ran before. With `settings.data == "stream"` the features come from `train_loader` (augmented
    images) through the original network instead of the cache."""
    k = sub.index
    seed_everything(seed + k)
    ios = list(ios) if ios is not None else [CandidateIO()] * len(schemes)
    previous_ios = list(previous_ios) if previous_ios is not None else [CandidateIO()] * len(previous)
    if len(ios) != len(schemes) or len(previous_ios) != len(previous):
        raise ValueError("one CandidateIO per scheme (ios) and per previous candidate (previous_ios)")
    candidates = [candidate_module(sub, scheme, io) for scheme, io in zip(schemes, ios)]
    predecessors = [
        ([subnetworks[k - 2].module, *(p for p, pio in zip(previous, previous_ios) if pio.outputs == io.inputs)] if k > 1 else [])
        for io in ios
    ]
    stream = None
    if settings.data == "stream":
        if train_loader is None:
            raise ValueError("constrain data 'stream' needs the training loader (train_loader); allowed without it: 'cache'")
        stream = FeatureStream([s.module for s in subnetworks], k, train_loader, device)
    return train_front(
        candidates,
        features[k - 1],
        features[k],
        labels,
        selector,
        predecessors=predecessors,
        predecessor_inputs=features[k - 2] if k > 1 else None,
        lam=settings.lam,
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        seed=seed + 100 * k,
        device=device,
        on_trained=on_trained,
        stream=stream,
    )


def reestimate_bn(model: nn.Module, train_loader: Iterable, samples: int, device: torch.device | str = "cpu") -> int:
    """Re-estimate `model`'s BatchNorm statistics on the first `samples` images of `train_loader` (every
    method's last step before finetuning, see RankSettings); returns how many images were used."""
    if samples <= 0:
        return 0
    images = loader_images(train_loader, samples)
    recalibrate_bn(model, images, 256, torch.device(device))
    return len(images)


def distiller(settings: FinetuneSettings) -> Distiller:
    """The finetuning loss `settings.kd` names, with its temperature and alpha."""
    if settings.kd == "kd":
        return KDLoss(settings.kd_temperature, settings.kd_alpha)
    if settings.kd == "dynamickd":
        return DynamicKDLoss(settings.kd_temperature, settings.kd_alpha)
    return Distiller()


def finetune(
    pruned: nn.Module,
    teacher: nn.Module | None,
    train_loader: Iterable,
    device: torch.device,
    settings: FinetuneSettings = FinetuneSettings(),
    **fit_kwargs: Any,
) -> list[dict[str, float]]:
    """Train every parameter of `pruned` in place (CE, plus distillation from `teacher` unless kd is none).

    Every parameter: GPIR builds the pruned model with the network's own head as the last selector, which
    the constrained training froze."""
    for p in pruned.parameters():
        p.requires_grad_(True)
    cfg = TrainConfig(
        epochs=settings.epochs,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        precision=settings.precision,
        channels_last=settings.channels_last,
    )
    return fit(
        pruned, train_loader, cfg, device, loss_fn=distiller(settings), teacher=teacher if settings.kd != "none" else None, **fit_kwargs
    )
