"""`prune()`: EMO-DIR (or a baseline) on your own model and loaders, in memory, without DVC, Prefect or MLflow."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pruning.boundary import CandidateIO, plan_boundaries
from pruning.channels import count_flops_params, group_importance, pruned_copy
from pruning.counting import counting
from pruning.divide import boundary_features, divide
from pruning.emodir import (
    CandidateChoice,
    ConstrainSettings,
    FinetuneSettings,
    RankSettings,
    SearchSettings,
    SelectorSettings,
    candidate_cost_of,
    constrain_subnetwork,
    finetune,
    reestimate_bn,
    require_searchable,
    search_network,
    searched_module,
    train_selectors,
)
from pruning.exact import TOLERANCE, landed, landed_trained
from pruning.gpir import check_capacity_window, rank
from pruning.latency import DEFAULT_TABLE, LatencyCost, LatencyTable
from pruning.methods import PruningResult, Target, method_spec, model_cost, unused_switches
from pruning.search import check_boundary_widths, choose_for_target
from pruning.train import Precision, resolve_device, seed_everything

__all__ = ["PruneResult", "prune"]

logger = logging.getLogger(__name__)


def _landed(base: nn.Module, x: torch.Tensor, scheme: dict, target: float, info: dict, metric, round_to: int) -> tuple[dict, dict]:
    """`exact.landed`, with a landing below the target logged as the other fallbacks are (under the method's name)."""
    before = len(info.get("fallbacks", []))
    scheme, info = landed(base, x, scheme, target, info, metric, round_to)
    for note in info.get("fallbacks", [])[before:]:
        logger.warning("%s: %s", info.get("method", "prune"), note)
    return scheme, info


@dataclass
class PruneResult(PruningResult):
    """A PruningResult that also carries the physically pruned (and finetuned if asked) model."""

    model: nn.Module | None = None


_SEL, _SEARCH, _CON, _RANK, _FT = SelectorSettings(), SearchSettings(), ConstrainSettings(), RankSettings(), FinetuneSettings()


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    train_loader: Iterable,
    val_loader: Iterable,
    target: float,
    *,
    method: Literal["emo-dir", "whole-emo", "uniform", "global-magnitude", "random"] = "emo-dir",
    metric: Literal["flops", "params", "latency"] | LatencyCost = "flops",
    latency: LatencyTable | None = None,
    k: int = 3,
    cache_train: int = 2000,
    cache_val: int = 1000,
    selector_epochs: int = _SEL.epochs,
    selector_lr: float = _SEL.lr,
    pop_size: int = _SEARCH.pop_size,
    generations: int = _SEARCH.generations,
    levels: int = _SEARCH.levels,
    round_to: int = 1,
    encoding: Literal["levels", "binary"] = _SEARCH.encoding,
    calib_samples: int = _SEARCH.calib_samples,
    search_precision: Precision = _SEARCH.precision,
    boundary_widths: tuple[float, ...] = _SEARCH.boundary_widths,
    min_keep: float = _SEARCH.min_keep,
    candidates: int = _CON.candidates,
    constrain_epochs: int = _CON.epochs,
    constrain_lr: float = _CON.lr,
    lam: float = _CON.lam,
    constrain_data: Literal["cache", "stream"] = _CON.data,
    spread_outputs: bool = _CON.spread_outputs,
    top_t: int = _RANK.top_t,
    max_overshoot: float = _RANK.max_overshoot,
    bn_samples: int = _RANK.bn_samples,
    fill_back: bool = _RANK.fill_back,
    paired_boundaries: bool = _RANK.paired_boundaries,
    prefer_capacity: bool = _RANK.prefer_capacity,
    capacity_window: float = _RANK.capacity_window,
    finetune_epochs: int = 0,
    finetune_lr: float = _FT.lr,
    kd: Literal["none", "kd", "dynamickd"] = _FT.kd,
    kd_temperature: float = _FT.kd_temperature,
    kd_alpha: float = _FT.kd_alpha,
    seed: int = 0,
    device: str = "auto",
) -> PruneResult:
    """Prune `model` (left untouched) to remove `target` of its FLOPs (or parameters, or predicted latency).

    The loaders yield (images, labels) batches: train feeds the feature caches, selectors, constrained
    training and finetuning; val scores candidates and ranks schemes. Keep your test split out of both.
    Every step is the pipeline's own (pruning/emodir.py), with the same defaults as params.yaml;
    `finetune_epochs` is 0 here (params.yaml's finetune.epochs is the pipeline's). Whatever the method, the
    pruned network's BatchNorm statistics are re-estimated on the first `bn_samples` images of `train_loader`
    (shuffle it: a class-sorted loader gives class-biased statistics) before finetuning. `info["images"]` is
    what the method cost in images passed, finetuning aside (`images_forwarded`, `images_trained`).

    `metric="latency"` prunes for onnxruntime time on this machine: every cost is predicted from a per-layer
    table (`latency`, a `LatencyTable`: its batch size and threads; default .emoprune/latency.json at batch
    64 on every core), measured the first time a layer shape is needed and reused after, and calibrated on
    the whole model; `info["latency"]` holds the predicted times. A `LatencyCost` may be passed as the metric.

    Example (illustrative, not run)::

        result = prune(model, torch.zeros(1, 3, 32, 32), train_loader, val_loader, target=0.5)
        result.flops_reduction          # the fraction of FLOPs removed
        result.scheme["layer1.0.conv1"] # the channels kept in that layer's group
        result.model                    # the physically smaller network
    """
    Target(target, "flops" if metric == "latency" else metric)  # a bad target or metric fails here, before any work
    if latency is not None and metric != "latency":
        raise ValueError(f"a latency table is given but metric is {metric!r}; allowed: metric='latency' with it, or no table")
    spec = method_spec(method)  # and so does an unknown method
    if spec.search == "subnetworks":  # boundary genes are EMO-DIR's (whole-emo's genes are all inner ones)
        check_boundary_widths(boundary_widths, encoding)
    check_capacity_window(capacity_window)
    if note := unused_switches(
        method,
        paired_boundaries=paired_boundaries,
        prefer_capacity=prefer_capacity,
        capacity_window=capacity_window,
        spread_outputs=spread_outputs,
        default_window=_RANK.capacity_window,
    ):
        logger.warning("%s", note)
    dev = resolve_device(device)
    seed_everything(seed)
    base = copy.deepcopy(model).cpu().eval()
    x1 = example_input[:1].cpu()
    if metric == "latency":  # onnxruntime's time for one batch, predicted from the measured table (pruning/latency.py)
        metric = LatencyCost(latency if latency is not None else LatencyTable(DEFAULT_TABLE)).calibrate(base, x1)
    target_ = Target(target, metric)
    base_flops, base_params = count_flops_params(base, x1)
    info: dict = {"method": method}
    search = SearchSettings(
        pop_size=pop_size,
        generations=generations,
        levels=levels,
        encoding=encoding,
        calib_samples=calib_samples,
        precision=search_precision,
        boundary_widths=tuple(boundary_widths),
        min_keep=min_keep,
    )
    with counting() as images:  # the method's work, finetuning aside (pruning/counting.py)
        if spec.one_shot is not None:
            result = spec.one_shot(round_to=round_to, seed=seed)(base, x1, target_)
            scheme = result.scheme
            info.update(result.info)
            if fill_back:
                scheme, info = _landed(base, x1, scheme, target, info, metric, round_to)
            pruned = pruned_copy(base, x1, scheme)
        else:  # a search: over the whole network, or per sub-network then GPIR
            subs, head = divide(base, x1, k)
            tr, ytr = boundary_features(subs, train_loader, device=dev, max_samples=cache_train)
            va, yva = boundary_features(subs, val_loader, device=dev, max_samples=cache_val)
            num_classes = int(base(x1).shape[1])
            if spec.search == "network":
                front = require_searchable(
                    search_network(
                        base,
                        x1,
                        nn.Identity(),
                        tr[0],
                        va[0],
                        yva,
                        search,
                        generations=generations * k,
                        round_to=round_to,
                        metric=metric,
                        seed=seed,
                        device=dev,
                    ),
                    base,
                )
                index, fallback = choose_for_target(
                    [m.cost for m in front.members], [m.error for m in front.members], target, max_overshoot
                )
                best = front.members[index]
                if fallback:
                    info.setdefault("fallbacks", []).append(fallback)
                    logger.warning("whole-emo: %s", fallback)
                scheme = front.space.decode(best.genes, group_importance(base, x1))
                if fill_back:
                    scheme, info = _landed(base, x1, scheme, target, info, metric, round_to)
                pruned = pruned_copy(base, x1, scheme)
                info.update(evaluations=front.evaluations, search_error=best.error)
            else:
                selectors = train_selectors(
                    subs, head, tr, ytr, num_classes, SelectorSettings(epochs=selector_epochs, lr=selector_lr), seed=seed, device=dev
                )
                constrain = ConstrainSettings(candidates=candidates, epochs=constrain_epochs, lr=constrain_lr, lam=lam, data=constrain_data)
                cands, evaluations = [], 0
                previous: list[nn.Module] = []
                previous_ios: list[CandidateIO] = []
                plan = plan_boundaries(base, subs, x1, boundary_widths, round_to)
                choice = CandidateChoice(candidates, target, spread_outputs)
                for sub, selector in zip(subs, selectors):
                    ex = torch.zeros(1, *sub.in_shape)
                    reads, writes = (plan[sub.index - 2] if sub.index > 1 else None), plan[sub.index - 1]
                    front = search_network(
                        sub.module,
                        ex,
                        selector,
                        tr[sub.index - 1],
                        va[sub.index - 1],
                        yva,
                        search,
                        round_to=round_to,
                        metric=metric,
                        seed=seed,
                        device=dev,
                        reads=reads,
                        writes=writes,
                    )
                    evaluations += front.evaluations
                    if front.kept_whole is not None:
                        info.setdefault("kept_whole", {})[f"s{sub.index}"] = front.kept_whole
                        logger.warning("emo-dir s%d: kept whole: %s", sub.index, front.kept_whole)
                    importance = group_importance(searched_module(sub.module, ex, reads), ex)
                    picked, notes = choice.next(front.archive)
                    for note in notes:
                        logger.warning("emo-dir s%d: %s", sub.index, note)
                    chosen = [front.archive[i] for i in picked]
                    local = [front.space.decode(m.genes, importance) for m in chosen]
                    ios = [front.space.io(m.genes, sub.out_shape[0]) for m in chosen]
                    trained = constrain_subnetwork(
                        sub,
                        subs,
                        local,
                        tr,
                        ytr,
                        selector,
                        previous,
                        constrain,
                        seed=seed,
                        device=dev,
                        train_loader=train_loader,
                        ios=ios,
                        previous_ios=previous_ios,
                    )
                    last = head if sub.index == len(subs) else None
                    cands.append(
                        [(m, sch, candidate_cost_of(sub, m, sch, io, last, metric), io) for m, sch, io in zip(trained, local, ios)]
                    )
                    previous, previous_ios = trained, ios
                pruned, scheme, decided = rank(
                    base,
                    x1,
                    subs,
                    head,
                    cands,
                    [model_cost(s.module, torch.zeros(1, *s.in_shape), metric, (s.flops, s.params)) for s in subs],
                    model_cost(base, x1, metric, (base_flops, base_params)),
                    target,
                    top_t=top_t,
                    max_overshoot=max_overshoot,
                    features=va,
                    labels=yva,
                    device=dev,
                    paired_boundaries=paired_boundaries,
                    prefer_capacity=prefer_capacity,
                    capacity_window=capacity_window,
                    tolerance=TOLERANCE,
                )
                decided.pop("table")
                if fill_back:  # as the rank stage: channels given back come with the base's weights
                    pruned, scheme, decided = landed_trained(pruned, base, x1, scheme, target, decided, metric, round_to)
                for note in decided["fallbacks"]:
                    logger.warning("emo-dir: %s", note)
                info.update(evaluations=evaluations, **decided)
        info["bn_samples"] = reestimate_bn(pruned.to(dev), train_loader, bn_samples, dev)  # every method, as the rank stage
    info["images"] = images.as_metrics()
    if finetune_epochs > 0:
        settings = FinetuneSettings(epochs=finetune_epochs, lr=finetune_lr, kd=kd, kd_temperature=kd_temperature, kd_alpha=kd_alpha)
        finetune(pruned, base, train_loader, dev, settings, val_loader=val_loader, progress=False)
    pruned = pruned.cpu().eval()
    flops, params = count_flops_params(pruned, x1)
    if isinstance(metric, LatencyCost):
        info["latency"] = metric.record(base, pruned, x1)
    return PruneResult(scheme=scheme, base_flops=base_flops, base_params=base_params, flops=flops, params=params, info=info, model=pruned)
