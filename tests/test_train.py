"""The training loop learns: on a task an untrained network cannot do, `fit` must get it right (a loop whose
optimizer step does nothing fails here), in bf16 with channels_last and in fp32."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning import train
from pruning.train import TrainConfig, evaluate, fit, resolve_precision, training_layout


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
    with pytest.raises(ValueError, match="'fp8'.*auto, bf16, fp32"):
        TrainConfig(epochs=1, lr=0.1, precision="fp8")


def test_auto_precision_is_bf16_only_where_the_device_has_it_natively(monkeypatch, caplog):
    """Autocast emulates bf16 on a CPU without AVX512-BF16 or AMX (12x slower than fp32 on an AVX2 EPYC): `auto`,
    the default, takes fp32 there; bf16 asked for by name is taken, with one warning naming the cost and the fix."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    monkeypatch.setattr(train, "_warned", set())
    with caplog.at_level("WARNING", logger="pruning.train"):
        assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("fp32", cpu) == "fp32"
        assert not caplog.records  # nothing asked for that runs slowly
        assert resolve_precision("bf16", cpu) == resolve_precision("bf16", cpu) == "bf16"
    assert len(caplog.records) == 1 and "without native bfloat16" in caplog.text and "precision: auto takes fp32" in caplog.text


@pytest.mark.parametrize("native", [True, False])
def test_fit_under_auto_precision_autocasts_only_where_bf16_is_native(monkeypatch, native):
    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    dtypes = set()
    model[0].register_forward_hook(lambda m, inp, out: dtypes.add(out.dtype))
    fit(model, _task(64, 0), TrainConfig(epochs=1, lr=0.1), torch.device("cpu"), progress=False)
    assert dtypes == {torch.bfloat16 if native else torch.float32}


def test_fit_reports_each_epoch_when_not_on_a_terminal(capsys):
    """Under DVC or Prefect the output is a pipe, where a progress bar shows nothing until the end: one line per epoch."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    fit(model, _task(64, 0), TrainConfig(epochs=2, lr=0.1), torch.device("cpu"), val_loader=_task(32, 1), description="pretrain")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("pretrain: epoch")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"] and all("val_acc=" in ln for ln in lines)


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


def _layouts(model: nn.Module) -> list[bool]:
    """Records, for every training forward of `model`, whether its first convolution read NHWC."""
    seen: list[bool] = []
    model[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


def test_auto_layout_trains_whole_blocks_in_nhwc_and_other_widths_in_nchw():
    """channels_last "auto": NHWC only when every convolution's width is a whole number of 16-channel blocks
    (pruned odd widths train about 2x slower in NHWC on this CPU); the teacher in its own layout; true and false
    as asked; anything else is refused naming the allowed values."""
    torch.manual_seed(0)
    whole, odd, teacher = _net(32), _net(11), _net(16)
    assert training_layout(whole, "auto") == torch.channels_last and training_layout(odd, "auto") == torch.contiguous_format
    assert training_layout(odd, True) == torch.channels_last and training_layout(whole, False) == torch.contiguous_format
    data = _task(64, 0)
    for model, nhwc in ((whole, True), (odd, False)):
        seen = _layouts(model)
        fit(model, data, TrainConfig(epochs=1, lr=0.1, precision="fp32"), torch.device("cpu"), progress=False)
        assert len(seen) == 2 and all(s == nhwc for s in seen)
    student, taught = _net(11), []
    teacher[0].register_forward_hook(lambda m, inp, out: taught.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    # fit works on a copy of the teacher: the hook goes with it
    seen = _layouts(student)
    fit(student, data, TrainConfig(epochs=1, lr=0.1, precision="fp32"), torch.device("cpu"), teacher=teacher, progress=False)
    assert seen == [False, False] and taught == [True, True]
    with pytest.raises(ValueError, match="channels_last 'maybe'.*true, false, auto"):
        TrainConfig(epochs=1, lr=0.1, channels_last="maybe")
