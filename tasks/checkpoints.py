"""Model files: the architecture name, its channel scheme and the weights, so a pruned model rebuilds without pickled code."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.channels import KeepScheme, prune_channels
from pruning.models import build_model
from tasks.io import atomic_torch_save

CKPT_SCHEMA = 1


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the mismatch."""


def save_model(model: nn.Module, path: str | Path, *, name: str, num_classes: int, image_size: int, scheme: KeepScheme | None = None, **extra: Any) -> None:
    atomic_torch_save(
        {
            "schema_version": CKPT_SCHEMA,
            "model": name,
            "num_classes": num_classes,
            "image_size": image_size,
            "scheme": scheme,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **extra,
        },
        path,
    )


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch file: {type(err).__name__}: {str(err)[:200]}") from None


def _load_weights(model: nn.Module, state: dict, path: Path, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            s for s in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {shapes[:3]}" if shapes else "",
            ) if s
        )
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit model {name!r}: {detail}")
    model.load_state_dict(state)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model` (pruned or not) and return it with the file's metadata."""
    path = Path(path)
    blob = _read(path)
    if not isinstance(blob, dict) or blob.get("schema_version") != CKPT_SCHEMA:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an emoprune model file of schema {CKPT_SCHEMA}")
    model = build_model(blob["model"], blob["num_classes"])
    if blob.get("scheme"):
        s = blob["image_size"]
        prune_channels(model, torch.zeros(1, 3, s, s), blob["scheme"])
    _load_weights(model, blob["state_dict"], path, blob["model"])
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta


def load_user_weights(path: str | Path, name: str, num_classes: int) -> nn.Module:
    """A user's trained weights for architecture `name`: an emoprune file, a bare state_dict, or {'state_dict': ...}."""
    path = Path(path)
    blob = _read(path)
    if isinstance(blob, dict) and blob.get("schema_version") == CKPT_SCHEMA:
        if blob.get("model") != name or blob.get("num_classes") != num_classes:
            raise CheckpointError(f"checkpoint {str(path)!r} holds {blob.get('model')!r} with {blob.get('num_classes')} classes, but params ask for {name!r} with {num_classes}")
        if blob.get("scheme"):
            raise CheckpointError(f"checkpoint {str(path)!r} is an already pruned model; model.checkpoint takes an unpruned one")
        state = blob["state_dict"]
    elif isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        state = blob["state_dict"]
    elif isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        state = blob
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} holds neither a state_dict nor an emoprune model file")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel prefixes
    model = build_model(name, num_classes)
    _load_weights(model, state, path, name)
    return model.eval()
