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

from pruning.constrain import FeatureStream, train_front
from pruning.distill import Distiller, DynamicKDLoss, KDLoss
from pruning.divide import SubNetwork
from pruning.search import ParetoFront, Scorer, SearchSpace, group_exclusions, loader_images, recalibrate_bn, run_search
from pruning.selectors import train_selector
from pruning.train import TrainConfig, fit, seed_everything

__all__ = [
    "ConstrainSettings",
    "FinetuneSettings",
    "RankSettings",
    "SearchSettings",
    "SelectorSettings",
    "constrain_subnetwork",
    "distiller",
    "finetune",
    "reestimate_bn",
    "search_network",
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
    precision: Literal["bf16", "fp32"] = "bf16"  # of the scoring pass (BatchNorm re-estimation stays fp32)


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


@dataclass(frozen=True)
class RankSettings:
    """GPIR: the `top_t` best knapsack combinations are verified jointly on the val features. Whatever the
    method, the chosen network's BatchNorm statistics are then re-estimated on `bn_samples` train images
    (0: keep the statistics the method left), so every method starts finetuning, and is measured before it,
    on statistics of its own pruned structure."""

    top_t: int = 10
    max_overshoot: float = 0.02
    bn_samples: int = 2048
    fill_back: bool = True  # schemes built from the base weights (not GPIR's): give channels back down to the target


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
    precision: Literal["bf16", "fp32"] = "bf16"
    channels_last: bool = True


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
    metric: Literal["flops", "params"] = "flops",
    seed: int = 0,
    device: torch.device | str = "cpu",
    state: bytes | None = None,
    on_generation: Callable[[int, dict[str, float], bytes], None] | None = None,
) -> ParetoFront:
    """NSGA-II over the channel groups of `module` (a sub-network, or the whole network for whole-emo), scored
    by `selector` on the module's cached val inputs; BatchNorm re-estimated on `calib_samples` train inputs."""
    groups, excluded = group_exclusions(module, example_input)
    space = SearchSpace(tuple(groups), settings.levels, settings.encoding, round_to, tuple(excluded))
    if not space.groups:
        why = "; ".join(f"{name}: {reason}" for name, reason in excluded) or "it has no channel group"
        raise ValueError(f"{type(module).__name__} has no prunable channel group ({why})")
    scorer = Scorer(
        selector,
        train_inputs[: settings.calib_samples],
        val_inputs,
        val_labels,
        error=settings.error,
        device=device,
        precision=settings.precision,
    )
    return run_search(
        module,
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
) -> list[nn.Module]:
    """Train sub-network k's candidates (`schemes`) under the cross-network constraint: their input is, per batch,
    the original S_{k-1} or one of its trained candidates `previous` applied to X_{k-2}; their output must match
    X_k and keep g_k right. Seeded `seed + k` (and `seed + 100 k + j` per candidate) whatever ran before.
    With `settings.data == "stream"` the features come from `train_loader` (augmented images) through the
    original network instead of the cache."""
    k = sub.index
    seed_everything(seed + k)
    predecessors = [subnetworks[k - 2].module, *previous] if k > 1 else []
    stream = None
    if settings.data == "stream":
        if train_loader is None:
            raise ValueError("constrain data 'stream' needs the training loader (train_loader); allowed without it: 'cache'")
        stream = FeatureStream([s.module for s in subnetworks], k, train_loader, device)
    return train_front(
        sub.module,
        torch.zeros(1, *sub.in_shape),
        schemes,
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
