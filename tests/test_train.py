"""The training loop learns: on a task an untrained network cannot do, `fit` must get it right (a loop whose
optimizer step does nothing fails here), in bf16 with channels_last and in fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning.train import TrainConfig, evaluate, fit


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()  # separable by a 1x1 convolution and the pool
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


@pytest.mark.parametrize("precision, channels_last", [("bf16", True), ("fp32", False)])
def test_fit_learns_a_task_the_untrained_network_cannot(precision, channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    train, val = _task(512, 0), _task(256, 1)
    untrained = evaluate(model, val, torch.device("cpu"))["acc"]
    assert untrained < 0.7  # the precondition: chance level, not already solved
    cfg = TrainConfig(epochs=8, lr=0.1, precision=precision, channels_last=channels_last)
    history = fit(model, train, cfg, torch.device("cpu"), val_loader=val, progress=False)
    assert evaluate(model, val, torch.device("cpu"))["acc"] >= 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert model[0].weight.is_contiguous()  # handed back in the layout the pruning code expects


def test_a_bad_precision_is_named():
    with pytest.raises(ValueError, match="'fp8'.*bf16, fp32"):
        TrainConfig(epochs=1, lr=0.1, precision="fp8")


def test_fit_reports_each_epoch_when_not_on_a_terminal(capsys):
    """Under DVC or Prefect the output is a pipe, where a progress bar shows nothing until the end: one line per epoch."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    fit(model, _task(64, 0), TrainConfig(epochs=2, lr=0.1), torch.device("cpu"), val_loader=_task(32, 1), description="pretrain")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("pretrain: epoch")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"] and all("val_acc=" in ln for ln in lines)
