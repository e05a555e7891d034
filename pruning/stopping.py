"""Stop requests (SIGTERM, Ctrl-C) that the long loops honour even when the signal's exception was lost.

Python runs a signal handler between two bytecodes of the main thread, wherever that thread is. When it is
inside a weakref callback or a `__del__` (a lazy `import torch._dynamo` runs such callbacks), the exception
the handler raises is printed as "Exception ignored" and dropped, and the work simply goes on: a stage told
to stop would finish and report success. So the handler also records the request, and every training,
evaluation and search loop calls `check()` once per batch, which raises again until the loop is left.
The flag lives in this process: search tasks in worker processes (`orchestration.task_runner`
processes or dask) are stopped by their pool shutting down, not by these checks.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_requested: int | None = None


def request(signum: int) -> None:
    """Record that the process was told to stop by `signum`."""
    global _requested
    _requested = signum


def requested() -> int | None:
    """The signal number of the stop request, or None."""
    return _requested


def clear() -> None:
    global _requested
    _requested = None


def check() -> None:
    """Raise KeyboardInterrupt when a stop was requested (one call per batch in every long loop)."""
    if _requested is not None:
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(_requested).name}")


@contextmanager
def recorded(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, each of `signals` is recorded by `request` and then handled as before (by the handler
    in place when the block began: Prefect's, which raises its TerminationSignal, or Python's KeyboardInterrupt).
    The previous handlers come back when the block ends. Only the main thread can set handlers: elsewhere this
    is a no-op."""
    previous: dict[int, object] = {}

    def restore() -> None:
        for s, h in reversed(previous.items()):
            signal.signal(s, h)  # type: ignore[arg-type]

    try:
        for s in dict.fromkeys(signals):  # each signal once
            current = signal.getsignal(s)
            previous[s] = signal.SIG_DFL if current is None else current  # None: set outside Python
            signal.signal(s, _chained(previous[s]))
    except ValueError:  # not the main thread
        restore()
        previous = {}
    try:
        yield
    finally:
        restore()


def _chained(handler):
    def on_signal(signum, frame):
        if handler == signal.SIG_IGN:
            return
        request(signum)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    return on_signal
