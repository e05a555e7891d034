"""The Python API: `from pruning import prune` on a user's own model and loaders, no pipeline around it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruning import prune
from pruning.channels import count_flops_params, prune_channels
from pruning.exact import TOLERANCE
from pruning.models import build_model
from tests.conftest import self_labelled


@pytest.fixture(scope="module")
def data():
    model, x, y = self_labelled(96)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    return model, x, train, val


@pytest.mark.parametrize("method", ["emo-dir", "whole-emo", "global-magnitude"])
def test_prune_returns_a_smaller_model_and_its_scheme(data, method):
    model, x, train, val = data
    before = [p.clone() for p in model.parameters()]
    result = prune(model, x[:1], train, val, target=0.4, method=method, k=3, pop_size=6, generations=2, candidates=2,
                   constrain_epochs=1, selector_epochs=1, finetune_epochs=1, kd="dynamickd")
    assert 0.4 <= result.flops_reduction <= 0.4 + TOLERANCE  # every method, EMO-DIR's trained scheme too, lands on it
    assert count_flops_params(result.model, x[:1])[0] == result.flops < result.base_flops
    assert result.model(x[:4]).shape == (4, 10)
    rebuilt = prune_channels(build_model("resnet20", 10), x[:1], result.scheme)  # the scheme alone rebuilds the shapes
    rebuilt.load_state_dict(result.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model is untouched
    if method == "emo-dir":
        assert result.info["evaluations"] > 0 and result.info["merged_val_acc"] == result.info["measured_val_acc"]
    images = result.info["images"]  # the method's work, finetuning aside
    if method == "global-magnitude":  # one-shot: BatchNorm re-estimation is all it forwards
        assert images == {"images_forwarded": result.info["bn_samples"], "images_trained": 0}
    elif method == "whole-emo":  # features cached once (64 train + 32 val); each evaluation re-estimates BN on the
        # 64 train images and scores the 32 val ones
        assert images == {"images_forwarded": result.info["evaluations"] * 96 + 96 + result.info["bn_samples"], "images_trained": 0}
    else:  # selectors g_1, g_2 one epoch each, and 2 candidates per sub-network, one epoch each, on the 64 cached images
        assert images["images_trained"] == 2 * 64 + 3 * 2 * 64 and images["images_forwarded"] > result.info["evaluations"] * 32


def test_finetuning_trains_every_layer_the_classifier_included(data):
    """GPIR builds the pruned model with the network's own head as the last selector, which constrained training
    freezes; the API's finetuning must train it anyway (it once did not)."""
    model, x, train, val = data
    kw = dict(target=0.4, method="emo-dir", k=3, pop_size=6, generations=2, candidates=2, constrain_epochs=1, selector_epochs=1)
    before = prune(model, x[:1], train, val, finetune_epochs=0, **kw).model
    after = prune(model, x[:1], train, val, finetune_epochs=1, **kw).model
    assert before.fc.weight.shape == after.fc.weight.shape
    changed = {n for (n, a), b in zip(before.named_parameters(), after.parameters()) if not torch.equal(a, b)}
    assert changed == {n for n, _ in before.named_parameters()}, f"untrained: {sorted(set(dict(before.named_parameters())) - changed)}"


def test_the_api_defaults_are_the_pipelines():
    """One place for defaults: prune()'s keyword defaults equal params.yaml's (and so tasks/config.py's)."""
    import inspect

    from tasks.config import load_params
    from tests.conftest import REPO

    p = load_params(REPO / "params.yaml")
    expected = {
        "k": p.divide.k, "cache_train": p.divide.cache_train, "cache_val": p.divide.cache_val,
        "selector_epochs": p.selectors.epochs, "selector_lr": p.selectors.lr, "pop_size": p.search.pop_size,
        "generations": p.search.generations, "levels": p.search.levels, "encoding": p.search.encoding,
        "calib_samples": p.search.calib_samples, "search_precision": p.search.precision, "candidates": p.constrain.candidates, "constrain_epochs": p.constrain.epochs,
        "constrain_lr": p.constrain.lr, "lam": p.constrain.lam, "constrain_data": p.constrain.data, "spread_outputs": p.constrain.spread_outputs, "top_t": p.rank.top_t, "max_overshoot": p.rank.max_overshoot,
        "bn_samples": p.rank.bn_samples, "fill_back": p.rank.fill_back, "paired_boundaries": p.rank.paired_boundaries,
        "prefer_capacity": p.rank.prefer_capacity, "capacity_window": p.rank.capacity_window,
        "finetune_lr": p.finetune.lr, "kd": p.finetune.kd, "kd_temperature": p.finetune.kd_temperature,
        "kd_alpha": p.finetune.kd_alpha, "round_to": p.prune.round_to, "metric": p.prune.metric, "method": p.prune.method,
        "seed": p.seed, "device": p.device, "boundary_widths": tuple(p.search.boundary_widths),
        "min_keep": p.search.min_keep,
    }
    signature = inspect.signature(prune).parameters
    assert {name: signature[name].default for name in expected} == expected


def test_bad_arguments_are_named(data):
    model, x, train, val = data
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        prune(model, x[:1], train, val, target=1.5)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        prune(model, x[:1], train, val, target=0.5, method="magic")

    class Untouched(list):  # a loader the check must fail before: no image is read for a bad setting
        def __iter__(self):
            raise AssertionError("the loader was read before a bad setting was refused")

    with pytest.raises(ValueError, match="min_keep must be a fraction"):
        prune(model, x[:1], Untouched(), Untouched(), target=0.5, min_keep=1.2)
    with pytest.raises(ValueError, match=r"capacity_window = -1\.0: allowed: a number of standard errors above 0"):
        prune(model, x[:1], Untouched(), Untouched(), target=0.5, prefer_capacity=True, capacity_window=-1.0)
    # boundary genes are levels: binary genes with EMO-DIR's default widths, or widths without 1.0, are named at once
    with pytest.raises(ValueError, match=r"boundary widths \[1\.0, 0\.75, 0\.5\] need encoding 'levels'"):
        prune(model, x[:1], Untouched(), Untouched(), target=0.5, encoding="binary")
    with pytest.raises(ValueError, match=r"include 1\.0 \(keep all\), got \[0\.5\]"):
        prune(model, x[:1], Untouched(), Untouched(), target=0.5, boundary_widths=(0.5,))



def test_switches_that_change_nothing_for_the_method_are_named_as_ignored(data, caplog):
    """The API warns as the pipeline's preflight does, in its own argument names: GPIR-only switches on for a
    one-shot method, and a capacity window moved while prefer_capacity is off."""
    model, x, train, val = data
    with caplog.at_level("WARNING", logger="pruning.api"):
        prune(model, x[:1], train, val, target=0.4, method="uniform", prefer_capacity=True, capacity_window=2.0, finetune_epochs=0)
    assert "prefer_capacity, capacity_window: on, but uniform does not rank sub-network candidates by GPIR; ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pruning.api"):
        prune(model, x[:1], train, val, target=0.4, method="uniform", finetune_epochs=0)
    assert "ignored" not in caplog.text

def test_a_method_is_added_by_registering_it_once(data, monkeypatch):
    """The stages and the API ask the registry what a method needs, never its name: one entry makes a new
    one-shot method valid in params.yaml and runnable through prune()."""
    from pruning.methods import REGISTRY, MethodSpec, Uniform
    from tasks.config import Params

    class Coarse(Uniform):
        name = "coarse-uniform"

    with pytest.raises(ValueError, match="unknown method 'coarse-uniform'; allowed: emo-dir, whole-emo, uniform"):
        Params.model_validate({"prune": {"method": "coarse-uniform"}})
    monkeypatch.setitem(REGISTRY, "coarse-uniform", MethodSpec("coarse-uniform", one_shot=Coarse))
    assert Params.model_validate({"prune": {"method": "coarse-uniform"}}).prune.method == "coarse-uniform"
    model, x, train, val = data
    result = prune(model, x[:1], train, val, target=0.4, method="coarse-uniform", round_to=4)
    assert result.flops_reduction >= 0.4 and result.info["method"] == "coarse-uniform"
    assert all(len(kept) % 4 == 0 for kept in result.scheme.values())


def _emo_dir_on_own_labels(model, size: int, k: int, target: float = 0.4, **options):
    """EMO-DIR at `target` with a small search on 96 random images labelled by `model` itself (64 train, 32 val);
    returns (images, result)."""
    x = torch.randn(96, 3, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32)
    result = prune(model, x[:1], train, val, target=target, method="emo-dir", k=k, pop_size=8, generations=2, candidates=3,
                   constrain_epochs=1, selector_epochs=1, **options)
    return x, result


def _conv_chain():
    """A plain conv chain with in-place ReLUs and max-pools (AlexNet's shape), seeded."""
    from torch import nn

    torch.manual_seed(0)

    def unit(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(*unit(3, 16), nn.MaxPool2d(2), *unit(16, 24), *unit(24, 32), nn.MaxPool2d(2), *unit(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_emo_dir_prunes_a_network_no_family_rule_knows():
    """A conv chain divided from its traced graph into sub-networks of one or two convolutions whose only genes
    are the boundaries they read and write."""
    model = _conv_chain()
    x, result = _emo_dir_on_own_labels(model, 32, k=3)
    # one channel here is 1.5 to 2 points of the FLOPs: no step fits back above the target within TOLERANCE, so
    # the one landing closest below it, within TOLERANCE, is taken, and said
    assert 0.4 - TOLERANCE <= result.flops_reduction < 0.4, result.info
    assert any("lands" in f and "within the tolerance" in f for f in result.info["fallbacks"]), result.info["fallbacks"]
    assert result.model(x[:4]).shape == (4, 10)
    kept = {name: len(channels) for name, channels in result.scheme.items()}  # groups named by their first conv
    assert kept["7"] < 32 and kept["4"] < 24  # the boundaries X_2 (written by conv 7) and X_1 (conv 4) were pruned too


def test_emo_dir_keeps_a_sub_network_with_nothing_to_search_whole():
    """With every boundary kept, the conv chain's one-convolution sub-networks have no gene: they stay whole and
    the result says why, and the first sub-network alone reaches the target."""
    x, result = _emo_dir_on_own_labels(_conv_chain(), 32, k=3, target=0.2, boundary_widths=(1.0,))
    assert sorted(result.info["kept_whole"]) == ["s2", "s3"], result.info
    assert "no prunable channel group" in result.info["kept_whole"]["s2"]
    assert set(result.scheme) == {"0"} and 0.2 <= result.flops_reduction <= 0.22


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _MobileSE(nn.Module):
    """Depthwise convolutions and squeeze-and-excitation (MobileNetV3, EfficientNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.se = _SqueezeExcite(32)
        self.project = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.last = nn.Sequential(nn.Conv2d(24, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.se(self.dw(self.expand(self.stem(x)))))
        return self.fc(self.last(x).mean((2, 3)))


class _Dense(nn.Module):
    """Concatenation (DenseNet, GoogLeNet): each layer reads every earlier map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.transition = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(), nn.AvgPool2d(2))
        self.c = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, self.a(x)], 1)
        x = self.transition(torch.cat([x, self.b(x)], 1))
        return self.fc(self.c(x).mean((2, 3)))


@pytest.mark.parametrize("make", [_MobileSE, _Dense], ids=["depthwise-se", "concat"])
def test_emo_dir_prunes_the_hard_layer_kinds(make):
    """One small model per hard layer kind the zoo meets, divided from its graph and pruned by EMO-DIR to the target
    (grouped convolutions, layer scale and the channel shuffle are in test_channels)."""
    torch.manual_seed(0)
    model = make().eval()
    x, result = _emo_dir_on_own_labels(model, 16, k=2)
    assert 0.4 <= result.flops_reduction <= 0.42, result.info
    assert result.model(x[:4]).shape == (4, 10)
    assert count_flops_params(result.model, x[:1])[0] == result.flops
    # the scheme alone rebuilds the pruned shapes on a fresh copy of the model
    prune_channels(copy.deepcopy(model), x[:1], result.scheme).load_state_dict(result.model.state_dict())
