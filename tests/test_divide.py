"""Tests for pruning.divide: block lists, balanced cuts, exact reassembly, boundary features, replacement."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from torch import nn

from pruning.channels import channel_groups, count_flops_params
from pruning.divide import (
    SubNetwork,
    assemble,
    balanced_partition,
    blocks,
    boundary_features,
    divide,
    replace,
    source_name,
)
from pruning.models import build_model

MODELS = ["resnet20", "resnet56", "vgg16_bn", "mobilenetv2", "torchvision:resnet18", "torchvision:mobilenet_v2"]


def _randomised(name: str, seed: int = 0) -> nn.Module:
    """A model in eval mode with random BN affine parameters and running statistics."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny inputs: one intra-op thread is faster than fighting over a shared machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return _randomised("resnet20")


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("name", MODELS)
def test_assemble_reproduces_model_and_flops_add_up(name: str, x: torch.Tensor) -> None:
    model = _randomised(name)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total_flops, total_params = count_flops_params(model, x)
    n_blocks = len(blocks(model)[0])
    for k in (1, 2, 3, 4):
        subs, head = divide(model, x, k)
        assert [s.index for s in subs] == list(range(1, k + 1))
        assert sum(len(s.block_names) for s in subs) == n_blocks
        assert all(s.block_names for s in subs)
        assembled = assemble(subs, head)
        with torch.no_grad():
            got = assembled(x)
        assert torch.allclose(got, expected, atol=1e-5), f"{name} K={k}: max diff {(got - expected).abs().max()}"
        head_flops, head_params = count_flops_params(head, torch.zeros(1, *subs[-1].out_shape))
        backbone = total_flops - head_flops
        assert abs(sum(s.flops for s in subs) - backbone) <= 1e-3 * total_flops
        assert sum(s.params for s in subs) + head_params == total_params
        # Each part's FLOPs is what the counter says for that part on its own input.
        assert subs[-1].flops == count_flops_params(subs[-1].module, torch.zeros(1, *subs[-1].in_shape))[0]
    # Dividing neither changed the weights nor the BN statistics nor the mode.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_resnet56_three_parts_are_balanced(x: torch.Tensor) -> None:
    subs, _ = divide(_randomised("resnet56"), x, 3)
    flops = [s.flops for s in subs]
    assert max(flops) / min(flops) < 1.5
    assert subs[0].block_names[0] == "conv1+bn1+relu"


def test_stem_is_its_own_block_in_the_first_part(resnet20: nn.Module, x: torch.Tensor) -> None:
    bl, head = blocks(resnet20)
    names = [n for n, _ in bl]
    assert names == ["conv1+bn1+relu"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert list(bl[0][1]) == [resnet20.conv1, resnet20.bn1, resnet20.relu]
    assert bl[1][1] is resnet20.layer1[0] and head[-1] is resnet20.fc
    # Even with the most parts, the stem is not a sub-network alone.
    subs, _ = divide(resnet20, x, len(bl) - 1)
    assert subs[0].block_names == ["conv1+bn1+relu", "layer1.0"]
    assert all(len(s.block_names) == 1 for s in subs[1:])


def test_vgg_blocks_are_conv_units_with_their_maxpool() -> None:
    model = _randomised("vgg16_bn")
    bl, _ = blocks(model)
    assert len(bl) == 13
    assert bl[0][0] == "features.0+features.1+features.2"
    assert bl[1][0] == "features.3+features.4+features.5+features.6"
    assert isinstance(list(bl[1][1])[-1], nn.MaxPool2d)


def test_cut_is_minimax_optimal_against_brute_force(resnet20: nn.Module, x: torch.Tensor) -> None:
    bl, _ = blocks(resnet20)
    flops, h = [], x
    with torch.no_grad():
        for _, b in bl:
            flops.append(count_flops_params(b, h)[0])
            h = b(h)
    units = [flops[0] + flops[1], *flops[2:]]  # the stem stays with the first block
    best = min(
        max(sum(units[a:b]) for a, b in zip((0, *cuts), (*cuts, len(units))))
        for cuts in itertools.combinations(range(1, len(units)), 2)
    )
    subs, _ = divide(resnet20, x, 3)
    assert max(s.flops for s in subs) == best
    assert divide(resnet20, x, 3)[0][1].block_names == subs[1].block_names  # deterministic


def test_balanced_partition_matches_brute_force_on_random_costs() -> None:
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 9)
        costs = [rng.randint(1, 20) for _ in range(n)]
        k = rng.randint(1, n)
        parts = balanced_partition(costs, k)
        assert len(parts) == k and parts[0][0] == 0 and parts[-1][1] == n
        assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
        sums = [sum(costs[a:b]) for a, b in parts]
        candidates = []
        for cuts in itertools.combinations(range(1, n), k - 1):
            s = [sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n))]
            candidates.append((max(s), sum(v * v for v in s)))
        assert (max(sums), sum(v * v for v in sums)) == min(candidates)


@pytest.mark.parametrize("k", [0, -1, 10, 11, 100])
def test_bad_k_raises_naming_k(resnet20: nn.Module, x: torch.Tensor, k: int) -> None:
    # resnet20 has 10 blocks; the stem stays with layer1.0, so at most 9 parts.
    with pytest.raises(ValueError, match=rf"k={k}\b.*10 blocks"):
        divide(resnet20, x, k)


def test_unsupported_model_raises_naming_class(x: torch.Tensor) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="Sequential.*without an example input"):
        blocks(model)
    with pytest.raises(ValueError, match=r"Sequential into blocks: its traced graph has 0 place\(s\)"):
        divide(model, x, 1)


class _Shuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class _AnyNet(nn.Module):
    """No family rule knows it: a residual block, a block run in (N, H, W, C) as ConvNeXt does, two branches
    concatenated and shuffled as in ShuffleNet, and a convolution as the output layer as in SqueezeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.res = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shuffle = _Shuffle()
        self.pool = nn.MaxPool2d(2)
        self.out = nn.Conv2d(16, 5, 1)  # the output layer: a convolution, then ReLU and global pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        x = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.shuffle(torch.cat([self.pool(self.left(x)), self.right(x)], 1))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.out(x)), 1), 1)


def test_any_network_is_cut_from_its_traced_graph(x: torch.Tensor) -> None:
    model = _AnyNet().eval()
    bl, head = blocks(model, x)
    # A cut after each residual join and after the concatenation; none between a convolution and its norm,
    # none inside the (N, H, W, C) part, none after the output layer. The stem's pooling goes with the next
    # block, the shuffle with the block after the concatenation. Blocks name the modules they call.
    assert [n for n, _ in bl] == [
        "fx|stem.0|stem.1|stem.2",
        "fx|stem.3|res.0|res.1|res.2|res.3|res.4",
        "fx|dw|norm|mlp",
        "fx|left|pool|right",
    ]
    assert [str(n.target) for n in head.graph.nodes if n.op == "call_module"] == ["out"]
    subs, head = divide(model, x, 3)
    assert [s.block_names for s in subs] == [[n for n, _ in bl[:2]], [bl[2][0]], [bl[3][0]]]  # the stem stays with the next block
    assert torch.allclose(assemble(subs, head)(x), model(x), atol=1e-6)
    assert subs[2].module[0].get_submodule("left") is model.left  # the model's own modules: pruning it prunes them
    assert source_name(subs[0], "1.res.3") == "res.3"
    assert "permute" in subs[1].module[0].code and subs[2].module[0].code.count(".view(") == 2  # what the blocks hold
    assert sum(s.flops for s in subs) + count_flops_params(head, boundary_features(subs, x)[0][-1])[0] == count_flops_params(model, x)[0]


def test_boundary_features_from_tensor(resnet20: nn.Module) -> None:
    torch.manual_seed(2)
    inputs = torch.randn(10, 3, 32, 32)
    subs, head = divide(resnet20, inputs, 3)
    feats, labels = boundary_features(subs, inputs, max_samples=6, batch_size=4)
    assert labels is None and len(feats) == 4
    assert torch.equal(feats[0], inputs[:6])
    for s, a, b in zip(subs, feats, feats[1:]):
        assert tuple(a.shape) == (6, *s.in_shape) and tuple(b.shape) == (6, *s.out_shape)
    assert feats[1].shape == (6, 16, 32, 32) and feats[3].shape == (6, 64, 8, 8)
    with torch.no_grad():
        assert torch.allclose(head(feats[-1]), resnet20(inputs[:6]), atol=1e-5)
        assert torch.allclose(subs[1].module(feats[1]), feats[2], atol=1e-5)


def test_boundary_features_from_loader_keeps_labels_and_modes(resnet20: nn.Module) -> None:
    torch.manual_seed(3)
    xs, ys = torch.randn(7, 3, 32, 32), torch.arange(7)
    loader = [(xs[i : i + 3], ys[i : i + 3]) for i in range(0, 7, 3)]
    subs, head = divide(resnet20, xs, 2)
    resnet20.train()
    state = {k: v.clone() for k, v in resnet20.state_dict().items()}
    try:
        feats, labels = boundary_features(subs, loader, device="cpu", max_samples=5)
        assert all(m.training for m in resnet20.modules())  # mode restored
    finally:
        resnet20.eval()
    assert all(torch.equal(v, state[k]) for k, v in resnet20.state_dict().items())  # BN stats untouched
    assert torch.equal(labels, ys[:5]) and torch.equal(feats[0], xs[:5])
    with torch.no_grad():
        assert torch.allclose(head(feats[-1]), resnet20(xs[:5]), atol=1e-5)
    all_feats, all_labels = boundary_features(subs, loader)  # no bound: every sample
    assert all_feats[-1].shape[0] == 7 and torch.equal(all_labels, ys)


def test_replace_subnetwork(resnet20: nn.Module, x: torch.Tensor) -> None:
    subs, head = divide(resnet20, x, 3)
    with torch.no_grad():
        expected = resnet20(x)
        same = replace(subs, head, 2, copy.deepcopy(subs[1].module))
        assert same.s2 is not subs[1].module and same.s1 is subs[0].module
        assert torch.allclose(same(x), expected, atol=1e-5)

        class Zero(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, h: torch.Tensor) -> torch.Tensor:
                return torch.zeros_like(self.inner(h))

        zeroed = replace(subs, head, 2, Zero(subs[1].module))
        out = zeroed(x)
        assert not torch.allclose(out, expected, atol=1e-3)
        # With S_2's output zeroed the logits no longer depend on the input.
        assert torch.allclose(zeroed(torch.randn(1, 3, 32, 32)), out, atol=1e-6)
    with pytest.raises(ValueError, match="k=4"):
        replace(subs, head, 4, nn.Identity())


def test_copy_flag_and_source_names(resnet20: nn.Module, x: torch.Tensor) -> None:
    shared, _ = divide(resnet20, x, 2)
    copied, head = divide(resnet20, x, 2, copy=True)
    assert shared[0].module[1] is resnet20.layer1[0]
    assert copied[0].module[1] is not resnet20.layer1[0] and head[-1] is not resnet20.fc
    with torch.no_grad():
        assert torch.allclose(assemble(copied, head)(x), resnet20(x), atol=1e-5)
    # Channel groups found inside a sub-network map back to the original model's modules.
    original = dict(resnet20.named_modules())
    assert source_name(shared[0], "0.0") == "conv1"
    for sub in shared:
        example = torch.zeros(1, *sub.in_shape)
        for g in channel_groups(sub.module, example, ignored=[]):
            assert original[source_name(sub, g.name)] is sub.module.get_submodule(g.name)


def test_subnetwork_is_a_dataclass_with_the_listed_fields(resnet20: nn.Module, x: torch.Tensor) -> None:
    sub = divide(resnet20, x, 1)[0][0]
    assert isinstance(sub, SubNetwork) and sub.index == 1
    assert sub.flops > 0 and sub.params == sum(p.numel() for p in sub.module.parameters())
