"""`prune()`: EMO-DIR (or a baseline) on your own model and loaders, in memory, without DVC, Prefect or MLflow."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from pruning.channels import count_flops_params, group_importance, pruned_copy
from pruning.constrain import train_front
from pruning.distill import DynamicKDLoss, KDLoss
from pruning.divide import boundary_features, divide
from pruning.gpir import rank
from pruning.methods import METHODS, PruningResult, Target, cost_of
from pruning.search import Scorer, SearchSpace, choose_for_target, prunable_groups, run_search
from pruning.selectors import train_selector
from pruning.train import TrainConfig, fit, resolve_device, seed_everything

__all__ = ["PruneResult", "prune"]


@dataclass
class PruneResult(PruningResult):
    """A PruningResult that also carries the physically pruned (and finetuned if asked) model."""

    model: nn.Module | None = None


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    train_loader: Iterable,
    val_loader: Iterable,
    target: float,
    *,
    method: Literal["emo-dir", "whole-emo", "uniform", "global-magnitude", "random"] = "emo-dir",
    metric: Literal["flops", "params"] = "flops",
    k: int = 3,
    cache_train: int = 2000,
    cache_val: int = 1000,
    selector_epochs: int = 10,
    pop_size: int = 16,
    generations: int = 8,
    levels: int = 10,
    round_to: int = 1,
    encoding: Literal["levels", "binary"] = "levels",
    calib_samples: int = 256,
    candidates: int = 6,
    constrain_epochs: int = 3,
    constrain_lr: float = 0.01,
    lam: float = 1.0,
    top_t: int = 10,
    max_overshoot: float = 0.02,
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    kd: Literal["none", "kd", "dynamickd"] = "kd",
    seed: int = 0,
    device: str = "auto",
) -> PruneResult:
    """Prune `model` (left untouched) to remove `target` of its FLOPs (or parameters).

    The loaders yield (images, labels) batches: train feeds the feature caches, selectors, constrained
    training and finetuning; val scores candidates and ranks schemes. Keep your test split out of both.

    >>> result = prune(model, torch.zeros(1, 3, 32, 32), train_loader, val_loader, target=0.5)
    >>> result.flops_reduction, result.scheme["layer1.0.conv1"][:4]
    (0.503, [0, 2, 3, 5])
    """
    target_ = Target(target, metric)
    dev = resolve_device(device)
    seed_everything(seed)
    base = copy.deepcopy(model).cpu().eval()
    x1 = example_input[:1].cpu()
    base_flops, base_params = count_flops_params(base, x1)
    info: dict = {"method": method}
    if method in METHODS:
        result = METHODS[method](round_to=round_to, seed=seed)(base, x1, target_)
        pruned, scheme = pruned_copy(base, x1, result.scheme), result.scheme
        info.update(result.info)
    elif method in ("emo-dir", "whole-emo"):
        subs, head = divide(base, x1, k)
        tr, ytr = boundary_features(subs, train_loader, device=dev, max_samples=cache_train)
        va, yva = boundary_features(subs, val_loader, device=dev, max_samples=cache_val)
        num_classes = int(base(x1).shape[1])
        search = dict(pop_size=pop_size, seed=seed, metric=metric)
        if method == "whole-emo":
            scorer = Scorer(nn.Identity(), tr[0][:calib_samples], va[0], yva, device=dev)
            space = SearchSpace(tuple(prunable_groups(base, x1)), levels, encoding, round_to)
            front = run_search(base, x1, scorer, space=space, generations=generations * k, **search)
            best = front.members[choose_for_target([m.cost for m in front.members], [m.error for m in front.members], target, max_overshoot)]
            scheme = front.space.decode(best.genes, group_importance(base, x1))
            pruned = pruned_copy(base, x1, scheme)
            info.update(evaluations=front.evaluations, search_error=best.error)
        else:
            selectors = [train_selector(tr[s.index], ytr, num_classes, epochs=selector_epochs, seed=seed + s.index, device=dev)
                         for s in subs[:-1]] + [head]
            cands, evaluations = [], 0
            previous: list[nn.Module] = []
            for sub, selector in zip(subs, selectors):
                ex = torch.zeros(1, *sub.in_shape)
                scorer = Scorer(selector, tr[sub.index - 1][:calib_samples], va[sub.index - 1], yva, device=dev)
                space = SearchSpace(tuple(prunable_groups(sub.module, ex)), levels, encoding, round_to)
                front = run_search(sub.module, ex, scorer, space=space, generations=generations, **search)
                evaluations += front.evaluations
                importance = group_importance(sub.module, ex)
                local = [space.decode(m.genes, importance) for m in front.spread(candidates)]
                trained = train_front(sub.module, ex, local, tr[sub.index - 1], tr[sub.index], ytr, selector,
                                      predecessors=[subs[sub.index - 2].module, *previous] if sub.index > 1 else [],
                                      predecessor_inputs=tr[sub.index - 2] if sub.index > 1 else None, lam=lam,
                                      epochs=constrain_epochs, lr=constrain_lr, seed=seed + 100 * sub.index, device=dev)
                cands.append([(m, sch, cost_of(count_flops_params(m, ex), metric)) for m, sch in zip(trained, local)])
                previous = trained
            pruned, scheme, decided = rank(base, x1, subs, head, cands, [cost_of((s.flops, s.params), metric) for s in subs],
                                           cost_of((base_flops, base_params), metric), target, top_t=top_t,
                                           max_overshoot=max_overshoot, features=va, labels=yva, device=dev)
            decided.pop("table")
            info.update(evaluations=evaluations, **decided)
    else:
        raise ValueError(f"unknown method {method!r}; allowed: emo-dir, whole-emo, {', '.join(METHODS)}")
    if finetune_epochs > 0:
        loss = {"kd": KDLoss(), "dynamickd": DynamicKDLoss()}.get(kd)
        fit(pruned, train_loader, TrainConfig(epochs=finetune_epochs, lr=finetune_lr), dev, loss_fn=loss,
            teacher=base if loss is not None else None, val_loader=val_loader, progress=False)
    pruned = pruned.cpu().eval()
    flops, params = count_flops_params(pruned, x1)
    return PruneResult(scheme=scheme, base_flops=base_flops, base_params=base_params, flops=flops, params=params, info=info,
                       model=pruned)

