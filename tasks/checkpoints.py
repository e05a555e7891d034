"""Model files (the architecture name, its channel scheme and the weights, so a pruned model rebuilds without
pickled code) and the resume checkpoints that training stages write after every epoch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.channels import KeepScheme, prune_channels
from pruning.models import build_model
from tasks import paths
from tasks.io import atomic_torch_save

CKPT_SCHEMA = 1
RESUME_SCHEMA = 2  # 2: the digest covers the whole state, not the model weights alone
# what a damaged file can make model building or loading raise, besides our own errors
_DAMAGE = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError)


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the mismatch."""


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state_dict's names and tensor bytes: torch.load does not notice flipped bits in tensor data."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digest(obj: Any) -> str:
    """SHA-256 of a whole training state (nested dicts, lists and tuples of tensors, numbers and strings): every
    byte of a resume checkpoint is covered, the optimizer's momentum and the random states included."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def _verify(state: Any, expected: Any, path: Path) -> None:
    if expected is None:  # files from before checksums
        return
    try:
        ok = isinstance(state, dict) and digest(state) == expected
    except _DAMAGE:  # not tensors at all
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its weights do not match the checksum saved with them")


def save_model(
    model: nn.Module, path: str | Path, *, name: str, num_classes: int, image_size: int, scheme: KeepScheme | None = None, **extra: Any
) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {
            "schema_version": CKPT_SCHEMA,
            "model": name,
            "num_classes": num_classes,
            "image_size": image_size,
            "scheme": scheme,
            "state_dict": state,
            "digest": digest(state),
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
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            s
            for s in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {shapes[:3]}" if shapes else "",
            )
            if s
        )
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit model {name!r}: {detail}")
    model.load_state_dict(state)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_model` (pruned or not) and return it with the file's metadata."""
    path = Path(path)
    blob = _read(path)
    if not isinstance(blob, dict) or blob.get("schema_version") != CKPT_SCHEMA:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an emoprune model file of schema {CKPT_SCHEMA}")
    fields = {"model": str, "num_classes": int, "image_size": int, "state_dict": dict}
    bad = [k for k, t in fields.items() if not isinstance(blob.get(k), t)]
    if bad or not 1 <= blob["num_classes"] <= 1_000_000 or not 1 <= blob["image_size"] <= 8192:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: fields {bad or ['num_classes', 'image_size']} hold no usable value")
    try:
        _verify(blob["state_dict"], blob.get("digest"), path)
        model = build_model(blob["model"], blob["num_classes"])
        if blob.get("scheme"):
            s = blob["image_size"]
            prune_channels(model, torch.zeros(1, 3, s, s), blob["scheme"])
        _load_weights(model, blob["state_dict"], path, blob["model"])
    except CheckpointError:
        raise
    except _DAMAGE as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: cannot rebuild {blob['model']!r} from it ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta


def load_user_weights(path: str | Path, name: str, num_classes: int) -> nn.Module:
    """A user's trained weights for architecture `name`: an emoprune file, a bare state_dict, or {'state_dict': ...}."""
    path = Path(path)
    blob = _read(path)
    if isinstance(blob, dict) and blob.get("schema_version") == CKPT_SCHEMA:
        if blob.get("model") != name or blob.get("num_classes") != num_classes:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds {blob.get('model')!r} with {blob.get('num_classes')} classes, but params ask for {name!r} with {num_classes}"
            )
        if blob.get("scheme"):
            raise CheckpointError(f"checkpoint {str(path)!r} is an already pruned model; model.checkpoint takes an unpruned one")
        state = blob["state_dict"]
        _verify(state, blob.get("digest"), path)
    elif isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        state = blob["state_dict"]
    elif isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        state = blob
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} holds neither a state_dict nor an emoprune model file")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its state_dict must map parameter names to tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel prefixes
    model = build_model(name, num_classes)
    try:
        _load_weights(model, state, path, name)
    except CheckpointError:
        raise
    except _DAMAGE as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {type(err).__name__}: {str(err)[:200]}") from None
    return model.eval()


def resume_path(stage: str, params: Any, sections: Sequence[str], inputs: Sequence[str | Path]) -> Path:
    """Where `stage` keeps its resume checkpoint: keyed by the params sections and the input files that decide
    its result, so a checkpoint is only ever resumed by the run it belongs to."""
    dump = params.model_dump()
    h = hashlib.sha256(json.dumps([RESUME_SCHEMA, stage, {s: dump[s] for s in sections}], sort_keys=True).encode())
    for f in inputs:
        h.update(Path(f).read_bytes() if Path(f).is_file() else b"")
    return paths.CHECKPOINTS / f"{stage}_{h.hexdigest()[:16]}.pt"


def save_resume(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save({"schema_version": RESUME_SCHEMA, **state, "digest": state_digest(state)}, path)


def load_resume(path: str | Path) -> dict[str, Any] | None:
    """The training state saved at `path`, or None when there is none; a damaged file is named, never guessed at."""
    path = Path(path)
    if not path.is_file():
        return None
    blob = _read(path)
    keys = {"epoch", "model", "loss_fn", "optimizer", "scheduler", "history", "rng"}
    if (
        not isinstance(blob, dict)
        or blob.get("schema_version") != RESUME_SCHEMA
        or not keys <= blob.keys()
        or not isinstance(blob["epoch"], int)
        or not isinstance(blob["history"], list)
        or blob["epoch"] != len(blob["history"])
    ):
        raise CheckpointError(f"resume checkpoint {str(path)!r} is damaged or from another version; delete it to start the stage over")
    try:
        ok = state_digest({k: v for k, v in blob.items() if k not in ("schema_version", "digest")}) == blob.get("digest")
    except _DAMAGE:
        ok = False
    if not ok:
        raise CheckpointError(
            f"resume checkpoint {str(path)!r} is damaged: its state does not match the checksum saved with it; "
            "delete it to start the stage over"
        )
    return blob
