"""Images forwarded: the work a method does, counted the same on every machine (seconds are not).

Every loop that runs images through a network, a sub-network or a selector calls `count`; a stage (or the
API) wraps its work in `counting()` and reports the totals. An image counts once per pass, whatever it
passes through: the whole network, one sub-network with its selector, a selector alone. So the count is
passes, not FLOPs: a pass through one of K sub-networks costs about 1/K of a whole-network pass. Training
steps (forward and backward) are counted apart from inference passes (evaluation, feature caching,
BatchNorm re-estimation, a teacher's forward).

Counts are per thread: a context counts what its own thread runs. The search stage's sub-network searches
run in threads (or processes) and report their own counts.

Example::

    with counting() as images:
        evaluate(model, loader, device)
    images.forwarded  # the loader's image count
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_local = threading.local()


@dataclass
class ImageCount:
    forwarded: int = 0  # inference passes
    trained: int = 0  # training steps (forward and backward)

    def as_metrics(self) -> dict[str, int]:
        return {"images_forwarded": self.forwarded, "images_trained": self.trained}


def count(n: int, *, trained: bool = False) -> None:
    """Record `n` images passed (through a training step when `trained`) in every open context of this thread."""
    for c in getattr(_local, "open", ()):
        if trained:
            c.trained += n
        else:
            c.forwarded += n


@contextmanager
def counting(start: ImageCount | None = None) -> Iterator[ImageCount]:
    """The images this thread passes inside the block, on top of `start` (a resumed run's earlier count)."""
    c = ImageCount() if start is None else ImageCount(start.forwarded, start.trained)
    stack = _local.__dict__.setdefault("open", [])
    stack.append(c)
    try:
        yield c
    finally:
        stack.remove(c)
