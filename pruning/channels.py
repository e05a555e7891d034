"""Channel groups from Torch-Pruning's dependency graph, and the two ways to remove channels: masking and physical pruning."""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

__all__ = [
    "ChannelGroup",
    "KeepScheme",
    "SUPPORTED_LAYERS",
    "UnsupportedLayerError",
    "check_supported",
    "channel_groups",
    "channel_groups_and_left_out",
    "left_out_groups",
    "output_layers",
    "count_flops_params",
    "group_importance",
    "keep_by_importance",
    "mask_channels",
    "prune_channels",
    "pruned_copy",
]

# group name (module path of the group's root layer) -> sorted indices of the output channels kept
KeepScheme = dict[str, list[int]]


@dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels must be pruned together (residual additions and depthwise convs couple them).

    `name` is the module path of the group's root layer, `channels` the number of units a scheme keeps or drops
    and `layers` every module path the group touches. A group feeding or leaving a grouped convolution with G
    groups (ResNeXt, RegNet) has `divisor` G: its C channels lie in G slices of C / G, every slice keeps the
    same positions, and unit u is channel u of every slice, so `channels` is C / G. Otherwise a unit is a channel.
    """

    name: str
    channels: int
    layers: tuple[str, ...]
    divisor: int = 1

    def expand(self, units: Sequence[int]) -> list[int]:
        """The channel indices of `units`: unit u is channel u + s * channels of every slice s."""
        return sorted(u + s * self.channels for s in range(self.divisor) for u in units)


class UnsupportedLayerError(ValueError):
    """A model holds a layer the channel-dependency graph cannot prune through."""


# Layers with parameters that Torch-Pruning's dependency graph knows how to prune; parameter-free layers
# (activations, pooling, dropout, flatten, identity) pass channels through and are always fine.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.Linear,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LSTM,
)


def check_supported(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """The per-channel parameters held outside the supported layers, as (parameter, channel dimension).

    A parameter of a custom layer with one dimension longer than 1 (ConvNeXt's layer scale, shape (C, 1, 1))
    scales or shifts channels, and is pruned along that dimension with them. Any other parameter outside
    the supported layers raises UnsupportedLayerError naming the module (path and type)."""
    unwrapped: list[tuple[nn.Parameter, int]] = []
    for path, module in model.named_modules():
        if isinstance(module, SUPPORTED_LAYERS):
            continue
        for name, param in module.named_parameters(recurse=False):
            long = [d for d, n in enumerate(param.shape) if n > 1]
            if len(long) != 1:
                raise UnsupportedLayerError(
                    f"layer {path or '(the model itself)'!r} ({type(module).__name__}) holds parameter {name!r} of shape "
                    f"{tuple(param.shape)} that channel pruning cannot follow; supported: the layers "
                    f"{', '.join(t.__name__.lstrip('_') for t in SUPPORTED_LAYERS)}, and elsewhere per-channel parameters "
                    f"(one dimension longer than 1, such as a layer scale); parameter-free layers are fine"
                )
            unwrapped.append((param, long[0]))
    return unwrapped


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The layer producing the model's output, when it outputs class scores: its channels are the classes and
    never pruned. That is the last convolution or linear layer run when the output is 2-D (N, classes), and it
    has as many outputs: a linear classifier, or SqueezeNet's final convolution before global pooling. A module
    with a 4-D output (a sub-network of a divided model) has none: its output channels are a boundary's."""
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or not ran:
        return []
    last = ran[-1]
    width = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    return [last] if width == out.shape[1] else []


def _dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    unwrapped = check_supported(model)
    was_training = model.training
    model.eval()
    # In-place activations (AlexNet's ReLU(inplace=True)) rewrite their input's autograd node, and a module
    # ending in one traces to no channel group at all; traced out of place, which computes the same.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        setattr(m, "inplace", False)  # noqa: B010 -- not every module declares it
    try:
        with torch.enable_grad():  # the graph is traced through autograd, even when a caller is in no_grad
            try:
                return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, unwrapped_parameters=unwrapped)
            except Exception as err:  # noqa: BLE001 -- whatever fails inside Torch-Pruning's tracing means the same to a user
                model(example_input)  # the model's own errors (a wrong input size) surface as they are
                from pruning.divide import channel_reshapes  # here: divide imports this module

                where = traceback.extract_tb(err.__traceback__)[-1]
                moves = channel_reshapes(model, example_input)
                cause = (
                    f"it reshapes channels into another axis at {'; '.join(moves[:3])}{' and more' if len(moves) > 3 else ''}"
                    if moves
                    else "a view or reshape that moves channels between axes, such as ShuffleNet's channel shuffle, is the usual cause"
                )
                raise UnsupportedLayerError(
                    f"Torch-Pruning cannot follow the channels of {type(model).__name__} ({type(err).__name__}: {err} in "
                    f"{where.name}); {cause}; models whose channels it follows: convolutions, normalisations, "
                    f"residual additions, concatenations, squeeze-and-excitation, flatten before a linear layer"
                ) from err
    finally:
        model.train(was_training)
        for m in inplace:
            setattr(m, "inplace", True)  # noqa: B010


def _out_fn(module: nn.Module):
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    if _is_depthwise(module):
        return tp.prune_depthwise_conv_out_channels
    return tp.prune_conv_out_channels


def _groups(model: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None):
    dg, out, _ = _groups_and_left_out(model, example_input, ignored)
    return dg, out


def _is_grouped(m: nn.Module) -> bool:
    """A grouped convolution that is not plain depthwise (ResNeXt, RegNet, a depthwise one with a channel
    multiplier): its channels go in groups, which removing single channels would break."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m)


def _groups_and_left_out(model: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None):
    if ignored is None:  # a classifier's outputs are the classes; a headless sub-network has none to protect
        ignored = output_layers(model, example_input)
    dg = _dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    modules_by_name = {n: m for m, n in names.items()}
    order = {m: i for i, m in enumerate(names)}
    name_order = {n: i for i, n in enumerate(names.values())}
    out, left_out = [], []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
        producers = [
            d.target.module
            for d, _ in group
            if d.target.module in names
            and dg.is_out_channel_pruning_fn(d.handler)
            and isinstance(d.target.module, (nn.Conv2d, nn.Linear))
            and not _is_depthwise(d.target.module)
        ]
        if not producers:  # e.g. a depthwise conv's own group: it follows its producer's group
            continue
        # Named after its first producing layer in definition order, so names read like the model.
        first = min(producers, key=order.__getitem__)
        layers = tuple(sorted({names[d.target.module] for d, _ in group if d.target.module in names}, key=name_order.__getitem__))
        grouped = list(dict.fromkeys(names[d.target.module] for d, _ in group if d.target.module in names and _is_grouped(d.target.module)))
        channels, divisor = len(group[0].idxs), math.lcm(*(modules_by_name[n].groups for n in grouped)) if grouped else 1
        if channels % divisor or channels == divisor:  # left out, and said so, rather than a shape-valid but wrong grouped convolution
            convs = ", ".join(f"{n} (groups={modules_by_name[n].groups})" for n in grouped)
            left_out.append(
                (
                    names[first],
                    f"its {channels} channels cannot go in equal slices of more than one channel to grouped convolution(s) {convs}",
                )
            )
            continue
        out.append((ChannelGroup(names[first], channels // divisor, layers, divisor), group))
    out.sort(key=lambda item: name_order[item[0].name])
    left_out.sort(key=lambda item: name_order[item[0]])
    return dg, out, list(dict.fromkeys(left_out))


def _is_depthwise(m: nn.Module) -> bool:
    """One filter per channel, in == out == groups: what Torch-Pruning prunes as depthwise."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def channel_groups(model: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None = None) -> list[ChannelGroup]:
    """The prunable channel groups of `model`, in the dependency graph's (deterministic) order.

    >>> groups = channel_groups(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32))
    >>> groups[0].name, groups[0].channels
    ('conv1', 16)
    """
    return [g for g, _ in _groups(model, example_input, ignored)[1]]


def left_out_groups(model: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None = None) -> list[tuple[str, str]]:
    """(group name, why) for the channel groups `channel_groups` leaves out: those touching a grouped
    (not depthwise) convolution, whose channels must go a whole group at a time."""
    return _groups_and_left_out(model, example_input, ignored)[2]


def channel_groups_and_left_out(
    model: nn.Module, example_input: torch.Tensor, ignored: Sequence[nn.Module] | None = None
) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """`channel_groups` and `left_out_groups` from one dependency graph."""
    _, out, left_out = _groups_and_left_out(model, example_input, ignored)
    return [g for g, _ in out], left_out


def group_importance(
    model: nn.Module, example_input: torch.Tensor, p: int = 1, ignored: Sequence[nn.Module] | None = None
) -> dict[str, torch.Tensor]:
    """Per-channel Lp group magnitude of every channel group (Torch-Pruning's GroupMagnitudeImportance)."""
    imp = tp.importance.GroupMagnitudeImportance(p=p)
    # per unit: a grouped convolution's slices keep the same positions, so a unit scores the sum over its slices
    return {g.name: imp(group).detach().cpu().view(g.divisor, g.channels).sum(0) for g, group in _groups(model, example_input, ignored)[1]}


def keep_by_importance(importance: Mapping[str, torch.Tensor], keep_counts: Mapping[str, int]) -> KeepScheme:
    """Keep the `keep_counts[name]` most important channels of each group (ties broken by index)."""
    scheme: KeepScheme = {}
    for name, scores in importance.items():
        n = len(scores)
        k = int(keep_counts.get(name, n))
        if not 1 <= k <= n:
            raise ValueError(f"group {name!r}: cannot keep {k} of {n} channels (allowed: 1..{n})")
        order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        scheme[name] = sorted(order[:k])
    return scheme


def _check_scheme(groups: Mapping[str, ChannelGroup], scheme: Mapping[str, Sequence[int]]) -> None:
    for name, kept in scheme.items():
        if name not in groups:
            raise ValueError(f"scheme names group {name!r}, which the model does not have; groups: {', '.join(groups)}")
        n = groups[name].channels
        if not kept or min(kept) < 0 or max(kept) >= n or len(set(kept)) != len(kept):
            raise ValueError(f"group {name!r}: kept channels must be 1..{n} distinct indices in [0, {n}), got {list(kept)[:8]}...")


def prune_channels(
    model: nn.Module, example_input: torch.Tensor, scheme: Mapping[str, Sequence[int]], ignored: Sequence[nn.Module] | None = None
) -> nn.Module:
    """Physically remove every channel not in `scheme` from `model` (in place) and return it.

    >>> m = build_model("resnet20", 10); x = torch.zeros(1, 3, 32, 32)
    >>> prune_channels(m, x, {"conv1": list(range(8))}).conv1.out_channels
    8
    """
    dg, groups = _groups(model, example_input, ignored)
    by_name = {g.name: (g, group) for g, group in groups}
    _check_scheme({n: g for n, (g, _) in by_name.items()}, scheme)
    modules = dict(model.named_modules())
    for name, kept in scheme.items():
        g = by_name[name][0]
        drop = g.expand(sorted(set(range(g.channels)) - set(kept)))
        if drop:
            root = modules[name]
            dg.get_pruning_group(root, _out_fn(root), drop).prune()
    return model


def pruned_copy(
    model: nn.Module, example_input: torch.Tensor, scheme: Mapping[str, Sequence[int]], ignored: Sequence[nn.Module] | None = None
) -> nn.Module:
    """A physically pruned deep copy; `model` is left untouched."""
    clone = copy.deepcopy(model)
    if ignored is not None:  # the same layers, inside the copy
        names = {m: n for n, m in model.named_modules()}
        ignored = [clone.get_submodule(names[m]) for m in ignored]
    return prune_channels(clone, example_input, scheme, ignored)


def mask_channels(
    model: nn.Module, example_input: torch.Tensor, scheme: Mapping[str, Sequence[int]], ignored: Sequence[nn.Module] | None = None
) -> nn.Module:
    """Zero (in place) every parameter that produces a channel not in `scheme`: the same function as
    the physically pruned model with unchanged tensor shapes, which is what a search evaluates cheaply."""
    dg, groups = _groups(model, example_input, ignored)
    by_name = {g.name: (g, group) for g, group in groups}
    _check_scheme({n: g for n, (g, _) in by_name.items()}, scheme)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, kept in scheme.items():
            g = by_name[name][0]
            drop = g.expand(sorted(set(range(g.channels)) - set(kept)))
            if not drop:
                continue
            root = modules[name]
            for dep, idxs in dg.get_pruning_group(root, _out_fn(root), drop):
                if not dg.is_out_channel_pruning_fn(dep.handler):
                    continue
                layer = dep.target.module
                idx = torch.as_tensor(list(idxs), dtype=torch.long)
                for p in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
                    if isinstance(p, torch.Tensor) and p.dim() > 0:
                        p.index_fill_(0, idx, 0.0)
    return model


def count_flops_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """(FLOPs, parameters) for one example, counted by Torch-Pruning's op counter: one counter everywhere.

    FLOPs here are multiply-accumulates, as the CIFAR pruning papers report them.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops, params = tp.utils.count_ops_and_params(model, example_input[:1])
    finally:
        model.train(was_training)
    return int(flops), int(params)
