"""A stop signal whose exception Python drops (it landed in a weakref callback) still stops training."""

from __future__ import annotations

import signal
import sys
import weakref

import pytest
import torch
from torch import nn

from pruning import stopping
from pruning.train import TrainConfig, fit


class _Anything:
    pass


def _signal_lost_in_a_weakref_callback(signum: int) -> list[BaseException]:
    """Deliver `signum` while the main thread runs a weakref callback: the handler's exception is printed as
    "Exception ignored" and dropped, as happened to a stage's SIGTERM during a lazy `import torch._dynamo`.
    Returns the exceptions Python dropped."""
    lost: list[BaseException] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: lost.append(u.exc_value)
    try:
        obj = _Anything()
        ref = weakref.ref(obj, lambda _: signal.raise_signal(signum))
        del obj  # the callback runs here; its exception does not reach us
        assert ref() is None
    finally:
        sys.unraisablehook = hook
    return lost


@pytest.fixture
def clean_request():
    stopping.clear()
    yield
    stopping.clear()


def test_a_lost_stop_exception_still_stops_the_next_training_batch(clean_request):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    loader = [(torch.randn(8, 3, 2, 2), torch.randint(0, 2, (8,))) for _ in range(4)]
    config = TrainConfig(epochs=1, lr=0.1, precision="fp32", channels_last=False)
    with stopping.recorded((signal.SIGUSR1,)):
        lost = _signal_lost_in_a_weakref_callback(signal.SIGUSR1)  # nothing raised here: the exception was lost
        assert [type(e) for e in lost] == [KeyboardInterrupt] and "SIGUSR1" in str(lost[0])
        assert stopping.requested() == signal.SIGUSR1
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
            fit(model, loader, config, torch.device("cpu"), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # stopped before the first step
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler in place before the block is back


def test_an_ignored_signal_is_not_a_stop_request(clean_request):
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with stopping.recorded((signal.SIGUSR2,)):
            signal.raise_signal(signal.SIGUSR2)
        assert stopping.requested() is None
        stopping.check()  # no request: nothing raised
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_recorded_restores_each_handler_once_and_treats_a_foreign_handler_as_default(clean_request):
    before = signal.getsignal(signal.SIGUSR1)
    with stopping.recorded((signal.SIGUSR1, signal.SIGUSR1)):  # listed twice: wrapped once
        assert signal.getsignal(signal.SIGUSR1) is not before
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_command_told_to_stop_never_exits_0(monkeypatch, clean_request):
    """The work went on to the end (the stop's exception was lost and no loop saw it): the CLI still exits
    128 + signal, so DVC does not record the stage as done."""
    from flows import cli

    def finished_anyway():
        stopping.request(signal.SIGTERM)  # recorded by a stage's flow while the exception was dropped
        raise SystemExit(0)

    monkeypatch.setattr(cli, "app", finished_anyway)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert done.value.code == 128 + signal.SIGTERM
