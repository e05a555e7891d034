"""Batches from cached features: tensors or (memory-mapped, read-only) numpy arrays, copied into a fresh tensor."""

from __future__ import annotations

import numpy as np
import torch


def as_batch(a) -> torch.Tensor:
    """A writable tensor from a slice of a tensor or a memory-mapped array (read-only pages are copied)."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(np.array(a, copy=True))
