"""Divide a CNN into K sequential sub-networks of about equal FLOPs at block boundaries, plus its classifier head.

Blocks come from per-family rules for the models this package builds (and torchvision's ResNet, MobileNetV2
and VGG), and from the traced graph for any other network: a block ends wherever one tensor carries everything
the rest of the network needs (`graph_blocks`)."""

from __future__ import annotations

import copy as copy_module
import itertools
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from .channels import count_flops_params
from .counting import count
from .models import MobileNetV2Cifar, ResNetCifar, VGGCifar

__all__ = [
    "SUPPORTED_MODELS",
    "SubNetwork",
    "assemble",
    "balanced_partition",
    "blocks",
    "boundary_features",
    "block_module_names",
    "divide",
    "graph_blocks",
    "replace",
    "source_name",
]

SUPPORTED_MODELS = (
    "ResNetCifar",
    "VGGCifar",
    "MobileNetV2Cifar",
    "torchvision ResNet (resnet18/34/50/101/152, resnext, wide_resnet)",
    "torchvision MobileNetV2",
    "torchvision VGG (vgg11..vgg19, with or without BN)",
    "any other network torch.fx can trace, cut where one 4-D feature map carries everything the rest needs",
)

# A block made of several of the model's modules (a stem, a VGG conv-bn-relu[-maxpool] unit) is an
# nn.Sequential of those modules, positionally keyed, and named by their qualified names joined with this.
_JOIN = "+"
# A block cut from the traced graph (a torch.fx GraphModule whose submodules keep the model's qualified names)
# is named by this prefix and the qualified names of the modules it calls, joined by _GRAPH_JOIN.
_GRAPH = "fx"
_GRAPH_JOIN = "|"

Block = tuple[str, nn.Module]


@dataclass
class SubNetwork:
    """Sub-network S_k (1-based `index`): `module` maps X_{k-1} to X_k.

    `module` is an nn.Sequential of the blocks named `block_names` (positionally keyed: child i is block
    `block_names[i]`); `flops`/`params` are count_flops_params' counts for one sample; `in_shape` and
    `out_shape` are the per-sample shapes of X_{k-1} and X_k (without the batch dimension).
    """

    index: int
    module: nn.Module
    block_names: list[str]
    flops: int
    params: int
    in_shape: tuple[int, ...] = field(default=())
    out_shape: tuple[int, ...] = field(default=())


def _sequential(*modules: nn.Module, names: Sequence[str] | None = None) -> nn.Sequential:
    """An nn.Sequential wrapping existing modules, in train mode only if they all are (a fresh Sequential
    is in train mode, and a later .train(was_training) on it would switch eval-mode children to train)."""
    seq = nn.Sequential(OrderedDict(zip(names, modules))) if names is not None else nn.Sequential(*modules)
    seq.training = all(m.training for m in modules)
    return seq


def _chain(model: nn.Module, names: Sequence[str]) -> Block:
    """One block from several modules of `model`, in order; a single module stays itself."""
    mods = [model.get_submodule(n) for n in names]
    if len(mods) == 1:
        return names[0], mods[0]
    return _JOIN.join(names), _sequential(*mods)


def _head(*modules: nn.Module) -> nn.Module:
    return _sequential(*modules)


def _conv_units(model: nn.Module, prefix: str, seq: nn.Sequential) -> list[Block]:
    """Group a plain feature Sequential into conv units: each Conv2d with the layers following it."""
    units: list[list[str]] = []
    for name, m in seq.named_children():
        if isinstance(m, nn.Conv2d) or not units:
            units.append([])
        units[-1].append(f"{prefix}.{name}")
    return [_chain(model, u) for u in units]


def block_module_names(block: str) -> list[str]:
    """The qualified names of the model's modules in block `block` (a name from `blocks()`).

    >>> block_module_names("conv1+bn1+relu"), block_module_names("fx|features.0.0|features.0.1")
    (['conv1', 'bn1', 'relu'], ['features.0.0', 'features.0.1'])
    """
    if block.startswith(_GRAPH + _GRAPH_JOIN):
        return block.split(_GRAPH_JOIN)[1:]
    return block.split(_JOIN)


# Layers whose output is not a place to cut: the normalisation after a convolution stays with it.
_NO_CUT_AFTER = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def _module_of(gm: nn.Module, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


_IDENTITY = (0, 1, 2, 3)
_RESHAPES = ("view", "reshape", "flatten", "unflatten")


def _op_name(node: torch.fx.Node) -> str | None:
    target = node.target if node.op in ("call_method", "call_function") else None
    return target if isinstance(target, str) or target is None else getattr(target, "__name__", None)


def _layouts(gm: nn.Module, nodes: Sequence[torch.fx.Node]) -> dict:
    """Each 4-D value's axis order relative to the input's (N, C, H, W), None where unknown.

    Convolutions and pooling modules produce (N, C, H, W); permute and transpose reorder the axes
    (ConvNeXt's blocks run in (N, H, W, C)); a reshape back to the shape of the value it started from
    (ShuffleNet's channel shuffle) restores that value's order, any other reshape makes the order unknown;
    everything else keeps the order its 4-D arguments agree on."""
    order: dict = {}
    for n in nodes:
        shape = getattr(n.meta.get("tensor_meta"), "shape", None)
        ins = [a for a in n.all_input_nodes if order.get(a) is not None or _rank(a) == 4]  # 4-D inputs (not weights)
        first = order.get(ins[0]) if ins else None
        mod = _module_of(gm, n)
        name = _op_name(n)
        got: tuple[int, ...] | None
        if n.op == "placeholder" or isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            got = _IDENTITY
        elif name == "permute" and first is not None:
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            got = tuple(first[int(d)] for d in dims) if len(dims) == len(first) else None  # type: ignore[arg-type]
        elif name == "transpose" and first is not None:
            a, b = (int(d) % len(first) for d in n.args[1:3])  # type: ignore[arg-type]
            swapped = list(first)
            swapped[a], swapped[b] = swapped[b], swapped[a]
            got = tuple(swapped)
        elif name in _RESHAPES:  # back to the shape of the last value of known order: that order again
            src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
            while src is not None and order.get(src) is None and _op_name(src) in (*_RESHAPES, "transpose", "permute", "contiguous"):
                src = src.args[0] if isinstance(src.args[0], torch.fx.Node) else None
            before = getattr(src.meta.get("tensor_meta"), "shape", None) if src is not None else None
            got = order.get(src) if shape is not None and before == shape else None
        elif ins and all(order.get(a) == first for a in ins):
            got = first
        else:
            got = None
        # a 4-D value keeps its order; so does a tuple of them (chunk, split), for the getitem reading it
        order[n] = got if (shape is not None and len(shape) == 4) or isinstance(n.meta.get("tensor_meta"), tuple) else None
    return order


def _rank(node: torch.fx.Node) -> int:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return -1 if shape is None else len(shape)


def _spatial(node: torch.fx.Node) -> int:
    shape = node.meta["tensor_meta"].shape
    return int(shape[2]) * int(shape[3])


def _traced(model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    """`model`'s torch.fx graph, traced in eval mode, every node's output shape in its meta (ShapeProp)."""
    from torch.fx.passes.shape_prop import ShapeProp

    flags = _training_flags(model)
    model.eval()
    try:
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as err:  # noqa: BLE001 -- any tracing failure means the same thing to the user
            raise _TraceError(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err
        with torch.no_grad():  # the model's own errors (a wrong input size) surface as they are
            ShapeProp(gm).propagate(example_input[:1])
    finally:
        _restore_flags(flags)
    return gm


class _TraceError(Exception):
    """torch.fx cannot trace a model (data-dependent control flow, ...)."""


def channel_reshapes(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Where `model` reshapes a (N, C, H, W) feature map so that its channels move to or mix with another axis
    (ShuffleNet's channel shuffle), as 'module (Type): view (1, 48, 16, 16) -> (1, 2, 24, 16, 16)'. Flattening
    (N, C, H, W) to (N, C*H*W) or (N, C), or to (N, C, H*W), is not such a reshape. Empty when the model
    cannot be traced."""
    try:
        gm = _traced(model, example_input)
    except Exception:  # noqa: BLE001 -- only a better error message depends on it
        return []
    found = []
    for n in gm.graph.nodes:
        shape = getattr(n.meta.get("tensor_meta"), "shape", None)
        src = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        before = getattr(src.meta.get("tensor_meta"), "shape", None) if src is not None else None
        if _op_name(n) not in _RESHAPES or shape is None or before is None or len(before) != 4:
            continue
        if len(shape) <= 2 or shape[1] == before[1]:
            continue  # a flatten for a linear layer, or the channels left on their axis ((N, C, H*W): attention)
        stack = list((n.meta.get("nn_module_stack") or {}).values())
        where = f"{stack[-1][0]} ({stack[-1][1].__name__})" if stack else f"{type(model).__name__}.forward"
        found.append(f"{where}: {_op_name(n)} {tuple(before)} -> {tuple(shape)}")
    return found


def graph_blocks(model: nn.Module, example_input: torch.Tensor) -> tuple[list[Block], nn.Module]:
    """The model's blocks and head cut from its torch.fx graph, for networks no family rule knows.

    The graph is traced in eval mode. A cut is a point of the node order where exactly one value is still
    needed later, that value is a 4-D feature map in (N, C, H, W) order, it does not come straight out of a
    convolution or linear layer, and the output layer (the last convolution or
    linear layer) comes after it. Of cuts with no layer between them one is kept: the later (after the
    activation), unless it is spatially smaller (after a pooling). Consecutive cuts bound a block; the head
    is everything after the last cut (global pooling, flatten, classifier). Each block is a GraphModule holding
    the model's own modules under their qualified names, so pruning the model prunes its blocks.
    Functional calls that read `self.training` (stochastic depth) are traced with the eval-mode value.

    >>> bl, head = graph_blocks(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32))
    >>> len(bl), bl[1][0]
    (10, 'fx|layer1.0.conv1|layer1.0.bn1|layer1.0.relu|layer1.0.conv2|layer1.0.bn2|layer1.0.shortcut')
    """
    try:
        gm = _traced(model, example_input)
    except _TraceError as err:
        raise ValueError(
            f"cannot divide a {type(model).__name__} into blocks: torch.fx cannot trace it ({err}); "
            f"supported models: {', '.join(SUPPORTED_MODELS)}"
        ) from err
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    cuts: list[tuple[int, torch.fx.Node]] = []  # (position after which to cut, the value carried over)
    layout = _layouts(gm, nodes)
    live: set = set()
    for i, n in enumerate(nodes):
        if n.op not in ("get_attr", "output"):
            live.add(n)
        live = {v for v in live if last_use[v] > i}
        if len(live) != 1 or n.op == "output":
            continue
        (v,) = live
        if v.op == "placeholder" or _rank(v) != 4 or layout[v] != _IDENTITY or (cuts and cuts[-1][1] is v):
            continue
        if isinstance(_module_of(gm, v), _NO_CUT_AFTER):
            continue
        cuts.append((i, v))
    # The output layer (the last convolution or linear layer) stays in the head: no cut after it.
    layers = [pos[n] for n in nodes if isinstance(_module_of(gm, n), _NO_CUT_AFTER)]
    cuts = [c for c in cuts if layers and c[0] < layers[-1]]
    # Cuts with no layer between them bound a block of nothing: keep one. A pooling between them belongs
    # to the next block (the head starts before global pooling); an activation to the earlier one.
    kept: list[tuple[int, torch.fx.Node]] = []
    for c in cuts:
        if kept and not any(kept[-1][0] < q <= c[0] for q in layers):
            if _spatial(c[1]) < _spatial(kept[-1][1]):
                continue
            kept.pop()
        kept.append(c)
    cuts = kept
    if len(cuts) < 2:
        raise ValueError(
            f"cannot divide a {type(model).__name__} into blocks: its traced graph has {len(cuts)} place(s) where one "
            f"feature map carries everything the rest needs (at least 2 are needed); supported models: {', '.join(SUPPORTED_MODELS)}"
        )
    bounds = [(-1, nodes[0]), *cuts]
    segments = [(bounds[j][0] + 1, bounds[j + 1][0] + 1, bounds[j][1], bounds[j + 1][1]) for j in range(len(cuts))]
    segments.append((cuts[-1][0] + 1, len(nodes), cuts[-1][1], None))
    out: list[Block] = []
    for lo, hi, src, dst in segments:
        g = torch.fx.Graph()
        env: dict = {src: g.placeholder("x")}

        def arg(node: torch.fx.Node, env: dict = env, g: torch.fx.Graph = g) -> torch.fx.Node:
            if node not in env:  # a parameter or buffer read by this block (get_attr nodes are not carried over cuts)
                if node.op != "get_attr":
                    raise AssertionError(f"block reads {node.name} from before its cut")
                env[node] = g.node_copy(node)
            return env[node]

        for n in nodes[lo:hi]:
            if n.op == "get_attr" or n is src:
                continue
            if n.op == "output":
                g.output(torch.fx.map_arg(n.args[0], arg))
                continue
            env[n] = g.node_copy(n, arg)
        if dst is not None:
            g.output(env[dst])
        names = list(dict.fromkeys(str(n.target) for n in nodes[lo:hi] if n.op == "call_module"))  # a module called twice once
        block = torch.fx.GraphModule(gm, g, class_name="GraphBlock")
        block.training = False
        out.append((_GRAPH_JOIN.join([_GRAPH, *names]), block))
    *body, (_, head) = out
    return body, head


def _split(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[list[Block], nn.Module, int]:
    """(blocks, head, number of leading stem blocks that must stay with the next block).

    Family rules first; any other model is cut from its traced graph, which needs `example_input`."""
    # A torchvision model can only exist once torchvision.models is loaded; importing it just to learn that a
    # CIFAR model is not one of its classes costs every stage process 1.5 s.
    tvm = sys.modules.get("torchvision.models")
    if isinstance(model, ResNetCifar):
        stem = _chain(model, ["conv1", "bn1", "relu"])
        body = [(f"{layer}.{i}", b) for layer in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(model, layer))]
        return [stem, *body], _head(model.pool, nn.Flatten(1), model.fc), 1
    if tvm is not None and isinstance(model, tvm.ResNet):
        stem = _chain(model, ["conv1", "bn1", "relu", "maxpool"])
        layers = ("layer1", "layer2", "layer3", "layer4")
        body = [(f"{layer}.{i}", b) for layer in layers for i, b in enumerate(getattr(model, layer))]
        return [stem, *body], _head(model.avgpool, nn.Flatten(1), model.fc), 1
    if isinstance(model, MobileNetV2Cifar) or (tvm is not None and isinstance(model, tvm.MobileNetV2)):
        # features.0 is the stem, then the inverted residual blocks, then the last 1x1 conv.
        feats = [(f"features.{i}", m) for i, m in enumerate(model.features)]
        pool = model.pool if isinstance(model, MobileNetV2Cifar) else nn.AdaptiveAvgPool2d((1, 1))
        return feats, _head(pool, nn.Flatten(1), model.classifier), 1
    if isinstance(model, VGGCifar):
        return _conv_units(model, "features", model.features), _head(model.pool, nn.Flatten(1), model.classifier), 0
    if tvm is not None and isinstance(model, tvm.VGG):
        return _conv_units(model, "features", model.features), _head(model.avgpool, nn.Flatten(1), model.classifier), 0
    if example_input is None:
        raise ValueError(
            f"cannot divide a {type(model).__name__} into blocks without an example input (it has no family rule; its graph is traced)"
        )
    bl, head = graph_blocks(model, example_input)
    return bl, head, 1


def blocks(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """The model's ordered atomic blocks (qualified name, module) and its head (pool, flatten, classifier).

    Applying the blocks in order and then the head computes model(x). The modules are the model's own;
    a block made of several modules (the stem, a VGG conv unit) is an nn.Sequential of them named by
    their qualified names joined with "+". Models without a family rule are cut from their traced graph
    (`graph_blocks`, which needs `example_input`).

    >>> bl, head = blocks(build_model("resnet20", 10))
    >>> [n for n, _ in bl][:3]
    ['conv1+bn1+relu', 'layer1.0', 'layer1.1']
    """
    bl, head, _ = _split(model, example_input)
    return bl, head


def _part_sum(prefix: list[int], a: int, b: int) -> int:
    return prefix[b] - prefix[a]


def balanced_partition(costs: Sequence[int], k: int) -> list[tuple[int, int]]:
    """Cut `costs` into `k` non-empty contiguous parts, as (start, stop) index ranges, minimising the
    largest part sum; among those, the sum of squared part sums (exact DP, ties to the earliest cut).

    >>> balanced_partition([1, 1, 1, 3], 2)
    [(0, 3), (3, 4)]
    """
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} items into k={k} non-empty parts (allowed: 1..{n})")
    prefix = [0, *itertools.accumulate(int(c) for c in costs)]
    inf = float("inf")
    # Phase 1: the smallest achievable maximum part sum.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            best[j][i] = min(max(best[j - 1][p], _part_sum(prefix, p, i)) for p in range(j - 1, i))
    bound = best[k][n]
    # Phase 2: among partitions whose every part is <= bound, the smallest sum of squares.
    sq = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[-1] * (n + 1) for _ in range(k + 1)]
    sq[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for p in range(j - 1, i):
                s = _part_sum(prefix, p, i)
                if s <= bound and sq[j - 1][p] + s * s < sq[j][i]:
                    sq[j][i], arg[j][i] = sq[j - 1][p] + s * s, p
    parts, i = [], n
    for j in range(k, 0, -1):
        p = arg[j][i]
        parts.append((p, i))
        i = p
    return parts[::-1]


def _training_flags(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def _restore_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, t in flags:
        m.training = t


def divide(model: nn.Module, example_input: torch.Tensor, k: int, copy: bool = False) -> tuple[list[SubNetwork], nn.Module]:
    """Cut `model` into `k` sub-networks of about equal FLOPs at block boundaries, and return them with the head.

    The stem always stays with the block after it, so k ranges over 1..(number of blocks - 1) for
    models with a stem (ResNets, MobileNetV2) and 1..(number of blocks) for VGG. The sub-networks
    share the model's modules unless `copy=True`, which divides a deep copy (head included).

    >>> subs, head = divide(build_model("resnet56", 10), torch.zeros(1, 3, 32, 32), k=3)
    >>> [s.block_names[0] for s in subs]
    ['conv1+bn1+relu', 'layer2.0', 'layer3.0']
    """
    if copy:
        model = copy_module.deepcopy(model)
    bl, head, n_stem = _split(model, example_input)
    n_units = len(bl) - n_stem if len(bl) > n_stem else len(bl)
    if not isinstance(k, int) or not 1 <= k <= n_units:
        stem_note = " (the stem stays with the first block)" if n_stem else ""
        raise ValueError(
            f"k={k} sub-networks requested, but {type(model).__name__} has {len(bl)} blocks, so k must be in 1..{n_units}{stem_note}"
        )
    # Eval mode (BN statistics untouched) for the model and the new wrappers, restored afterwards.
    flags = [f for mod in (model, head, *(b for _, b in bl)) for f in _training_flags(mod)]
    for mod in (model, head, *(b for _, b in bl)):
        mod.eval()
    try:
        x = example_input[:1]
        flops, params, shapes = [], [], [tuple(x.shape[1:])]
        with torch.no_grad():
            for _, b in bl:
                f, p = count_flops_params(b, x)
                x = b(x)
                flops.append(f)
                params.append(p)
                shapes.append(tuple(x.shape[1:]))
    finally:
        _restore_flags(flags)
    # Cut over units: the stem block is merged with the block after it.
    m = min(n_stem, len(bl) - 1)
    unit_flops = [sum(flops[: m + 1]), *flops[m + 1 :]]
    subs = []
    for idx, (first, last) in enumerate(balanced_partition(unit_flops, k), start=1):
        lo, hi = (first + m if first > 0 else 0), last + m
        names = [n for n, _ in bl[lo:hi]]
        module = _sequential(*(mod for _, mod in bl[lo:hi]))
        subs.append(SubNetwork(idx, module, names, sum(flops[lo:hi]), sum(params[lo:hi]), shapes[lo], shapes[hi]))
    return subs, head


def _check_order(subnetworks: Sequence[SubNetwork]) -> None:
    got = [s.index for s in subnetworks]
    if not got or got != list(range(1, len(got) + 1)):
        raise ValueError(f"sub-networks must be S_1..S_K in order, got indices {got}")


def assemble(subnetworks: Sequence[SubNetwork], head: nn.Module) -> nn.Module:
    """A Sequential applying S_1..S_K then the head (children "s1".."sK", "head"): model(x) again.

    >>> model, x = build_model("resnet20", 10).eval(), torch.randn(2, 3, 32, 32)
    >>> subs, head = divide(model, x, k=2)
    >>> torch.allclose(assemble(subs, head)(x), model(x))
    True
    """
    _check_order(subnetworks)
    parts = [(f"s{s.index}", s.module) for s in subnetworks]
    return _sequential(*(mod for _, mod in parts), head, names=[*(n for n, _ in parts), "head"])


def replace(subnetworks: Sequence[SubNetwork], head: nn.Module, k: int, new_module: nn.Module) -> nn.Module:
    """assemble() with sub-network `k` (1-based) replaced by `new_module` (e.g. its pruned version).

    >>> subs, head = divide(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32), k=3)
    >>> pruned_s2 = copy.deepcopy(subs[1].module)
    >>> pruned = replace(subs, head, 2, pruned_s2)
    >>> pruned.s2 is pruned_s2
    True
    """
    _check_order(subnetworks)
    if not 1 <= k <= len(subnetworks):
        raise ValueError(f"k={k} is not a sub-network index; allowed: 1..{len(subnetworks)}")
    swapped = [
        s if s.index != k else SubNetwork(k, new_module, s.block_names, s.flops, s.params, s.in_shape, s.out_shape) for s in subnetworks
    ]
    return assemble(swapped, head)


def source_name(subnetwork: SubNetwork, local_name: str) -> str:
    """The qualified name in the original model of module `local_name` of `subnetwork.module`.

    >>> subs, head = divide(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32), k=3)
    >>> source_name(subs[0], "0.0"), source_name(subs[0], "1.conv1")
    ('conv1', 'layer1.0.conv1')
    """
    head, _, rest = local_name.partition(".")
    if not head.isdigit() or int(head) >= len(subnetwork.block_names):
        raise ValueError(f"{local_name!r} is not a module path inside sub-network {subnetwork.index}")
    block = subnetwork.block_names[int(head)]
    if block.startswith(_GRAPH + _GRAPH_JOIN):  # a traced block keeps the model's qualified names
        if not rest:
            raise ValueError(f"{local_name!r} names a whole traced block of sub-network {subnetwork.index}, not a module in it")
        return rest
    if _JOIN in block:
        if not rest:
            return block
        part, _, rest = rest.partition(".")
        block = block.split(_JOIN)[int(part)]
    return f"{block}.{rest}" if rest else block


class _Store:
    """Rows of one feature tensor: preallocated when the row count is bounded, else gathered and concatenated."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity, self.n = capacity, 0
        self.buf: torch.Tensor | None = None
        self.chunks: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> None:
        t = t.detach().cpu()
        if self.capacity is None:
            self.chunks.append(t)
        else:
            if self.buf is None:
                self.buf = torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype)
            self.buf[self.n : self.n + len(t)] = t
        self.n += len(t)

    def result(self) -> torch.Tensor:
        if self.capacity is None:
            return torch.cat(self.chunks)
        assert self.buf is not None
        return self.buf if self.n == self.capacity else self.buf[: self.n].clone()


def _device_of(module: nn.Module) -> torch.device | None:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return None


def boundary_features(
    subnetworks: Sequence[SubNetwork],
    batches: torch.Tensor | Iterable,
    device: str | torch.device = "cpu",
    max_samples: int | None = None,
    batch_size: int = 256,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run S_1..S_K once (eval mode, no grad) and return ([X_0, X_1, ..., X_K], labels) as CPU tensors.

    `batches` is a tensor of inputs (cut into `batch_size` chunks; labels None) or an iterable of
    (x, y) batches (or bare x); at most `max_samples` inputs are used (all when None). X_0 is the input.
    The sub-networks are moved to `device` for the run and back afterwards.

    >>> subs, head = divide(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32), k=3)
    >>> feats, labels = boundary_features(subs, torch.randn(8, 3, 32, 32), max_samples=4)
    >>> len(feats) == len(subs) + 1, feats[0].shape[0], labels
    (True, 4, None)
    """
    _check_order(subnetworks)
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if isinstance(batches, torch.Tensor):
        data = batches if max_samples is None else batches[:max_samples]
        items: Iterable = ((chunk, None) for chunk in data.split(batch_size))
        capacity: int | None = len(data)
    else:
        items = ((item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None) for item in batches)
        capacity = max_samples
    device = torch.device(device)
    modules = [s.module for s in subnetworks]
    homes = [_device_of(m) for m in modules]
    flags = [f for m in modules for f in _training_flags(m)]
    stores = [_Store(capacity) for _ in range(len(modules) + 1)]
    labels = _Store(capacity)
    has_labels, seen = False, 0
    try:
        for m in modules:
            m.eval()
            m.to(device)
        with torch.no_grad():
            for x, y in items:
                if max_samples is not None:
                    x = x[: max_samples - seen]
                    y = None if y is None else y[: max_samples - seen]
                if len(x) == 0:
                    break
                stores[0].add(x)
                if y is not None:
                    labels.add(torch.as_tensor(y))
                    has_labels = True
                h = x.to(device)
                for store, m in zip(stores[1:], modules):
                    h = m(h)
                    store.add(h)
                seen += len(x)
                count(len(x))
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        for m, home in zip(modules, homes):
            if home is not None:
                m.to(home)
        _restore_flags(flags)
    if seen == 0:
        raise ValueError("boundary_features got no inputs")
    return [s.result() for s in stores], (labels.result() if has_labels else None)
