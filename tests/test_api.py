"""The Python API: `from pruning import prune` on a user's own model and loaders, no pipeline around it."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pruning import prune
from pruning.channels import count_flops_params, prune_channels
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
    assert result.flops_reduction >= 0.4
    assert count_flops_params(result.model, x[:1])[0] == result.flops < result.base_flops
    assert result.model(x[:4]).shape == (4, 10)
    rebuilt = prune_channels(build_model("resnet20", 10), x[:1], result.scheme)  # the scheme alone rebuilds the shapes
    rebuilt.load_state_dict(result.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model is untouched
    if method == "emo-dir":
        assert result.info["evaluations"] > 0 and 0 <= result.info["measured_val_acc"] <= 1


def test_bad_arguments_are_named(data):
    model, x, train, val = data
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        prune(model, x[:1], train, val, target=1.5)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        prune(model, x[:1], train, val, target=0.5, method="magic")
