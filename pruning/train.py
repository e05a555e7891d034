"""Training and evaluation loops shared by pretraining and finetuning: SGD with a cosine schedule, optional distillation."""

from __future__ import annotations

import copy
import logging
import platform
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from pruning import stopping
from pruning.counting import count
from pruning.distill import Distiller

__all__ = [
    "PRECISIONS",
    "Precision",
    "ResumeError",
    "TrainConfig",
    "autocast",
    "evaluate",
    "fit",
    "get_rng_state",
    "layout_name",
    "native_bf16",
    "resolve_precision",
    "training_layout",
    "predict",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
]


logger = logging.getLogger(__name__)

# auto: bf16 autocast where the device computes bfloat16 natively, fp32 elsewhere (resolve_precision)
Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")
_warned: set[str] = set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU with bf16; an x86 CPU with AVX512-BF16 or AMX; an
    Arm CPU with BF16 (as oneDNN reports it). Elsewhere autocast emulates bf16 in software: on a 2-core AVX2 EPYC
    a ResNet-20 training step at batch 128 ran 12x slower under it than in fp32 (22 against 264 images/s)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run computes in: `auto` is bf16 where `device` has it natively and fp32 elsewhere; bf16
    and fp32 are taken as asked, bf16 on a CPU without it with a warning (emulated, many times slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device) and "cpu" not in _warned:
        _warned.add("cpu")
        logger.warning(
            "precision bf16 asked for on a CPU without native bfloat16 (no AVX512-BF16 or AMX; torch reports %s): autocast "
            "emulates it, about 12x slower than fp32 in training here; precision: auto takes fp32 on this CPU",
            torch.backends.cpu.get_cpu_capability(),
        )
    return precision


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cpu`, `cuda` and `cuda:N` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumeError(ValueError):
    """A resume state that does not fit this training run (another model, a damaged file)."""


def get_rng_state(loader: Iterable | None = None) -> dict[str, Any]:
    """Every random state a training epoch draws from (python, numpy, torch, CUDA, the loader's shuffling
    generator), as plain tensors and ints so `torch.load(weights_only=True)` reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader: Iterable | None = None) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(loader, "generator", None)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def training_layout(model: nn.Module, channels_last: bool | Literal["auto"]) -> torch.memory_format:
    """The memory layout `fit` trains `model` in: NHWC (channels_last) or NCHW, as asked; `"auto"` takes NHWC
    when every convolution's output channels are a whole number of 16-channel blocks, NCHW otherwise.

    Measured on this CPU (oneDNN, bf16 autocast, a ResNet-20 training step at batch 128, bench/notes/train_layout.md):
    NHWC trains the full-width network 1.30x faster than NCHW, but pruned widths that are not whole blocks train
    1.1-3x slower in NHWC (global-magnitude's widths at 0.5: 0.33x; uniform 11/23/45: 0.49x; multiples of 4: 0.46x;
    of 8 with 8-wide groups: 0.94x).
    Inference is faster in NHWC at every width (the search scores in it)."""
    if channels_last != "auto":
        return torch.channels_last if channels_last else torch.contiguous_format
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    whole = bool(convs) and all(m.out_channels % 16 == 0 for m in convs)
    return torch.channels_last if whole else torch.contiguous_format


def layout_name(layout: torch.memory_format) -> str:
    """How metrics name a layout: channels_last (NHWC) or contiguous (NCHW)."""
    return "channels_last" if layout == torch.channels_last else "contiguous"


@dataclass(frozen=True)
class TrainConfig:
    """SGD with a cosine schedule. `precision="bf16"` runs forward and backward under bfloat16 autocast (the
    weights and the optimizer stay fp32; `"auto"`, the default: bf16 where the device has it natively, else fp32,
    `resolve_precision`); `channels_last` trains in NHWC layout (`"auto"`: where it is the faster one,
    `training_layout`). Both are the faster path on CPUs with AVX512-BF16 and on GPUs (see docs/benchmarks.md for
    the measured speed-up)."""

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    precision: str = "auto"
    channels_last: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
        if self.channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last {self.channels_last!r} is not supported; allowed: true, false, auto")


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` on `device`: bf16, or nothing for fp32 (`resolve_precision` first: it
    runs once per loop, not per batch)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"autocast takes a resolved precision, bf16 or fp32 (resolve_precision), not {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16' asked for, but {torch.cuda.get_device_name(device)} has no bfloat16; use precision: fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
        transient=False,
    )


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` over `loader`, on the CPU."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        stopping.check()
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
        count(len(x))
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy."""
    logits, labels = predict(model, loader, device)
    return {"acc": (logits.argmax(1) == labels).float().mean().item(), "loss": F.cross_entropy(logits, labels).item()}


def fit(
    model: nn.Module,
    train_loader: Iterable,
    config: TrainConfig,
    device: torch.device,
    *,
    loss_fn: Distiller | None = None,
    teacher: nn.Module | None = None,
    val_loader: Iterable | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    description: str = "train",
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place for `config.epochs` epochs; returns the per-epoch metrics.

    With `teacher`, its logits on each batch go to `loss_fn` (a Distiller); the teacher stays frozen.
    The model with the best validation accuracy is NOT substituted: the last epoch's model is the result,
    so the test split never influences it and the val split stays honest for later stages.

    After every epoch `on_checkpoint(state)` receives the whole training state (model, optimizer, schedule,
    loss, history, every random state); passing the latest one back as `resume` continues from there, and
    on the CPU ends bit-identical to an uninterrupted run. `on_epoch` is called for restored epochs too.
    """
    loss_fn = (loss_fn or Distiller()).to(device)
    precision = resolve_precision(config.precision, device)
    layout = training_layout(model, config.channels_last)
    model.to(device).to(memory_format=layout)
    teacher_layout = layout
    if teacher is not None:
        teacher_layout = training_layout(teacher, config.channels_last)  # the unpruned teacher: its own widths
        teacher = copy.deepcopy(teacher).to(device).to(memory_format=teacher_layout).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:  # e.g. DynamicKD's entropy controller: learnt, never decayed towards 0
        groups.append({"params": loss_params, "weight_decay": 0.0})
    opt = torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0
    )
    steps = max(1, config.epochs * len(train_loader))  # type: ignore[arg-type]  # loaders and batch lists have a length
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history: list[dict[str, float]] = []
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            loss_fn.load_state_dict(resume["loss_fn"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            history = [dict(m) for m in resume["history"]]
            set_rng_state(resume["rng"], train_loader)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            raise ResumeError(f"the resume state does not fit this training run: {type(err).__name__}: {str(err)[:300]}") from None
        if not 0 <= len(history) <= config.epochs or resume.get("epoch") != len(history):
            raise ResumeError(
                f"the resume state is at epoch {resume.get('epoch')!r} with {len(history)} epochs of history; allowed: 0..{config.epochs}"
            )
        if on_epoch is not None:
            for epoch, past in enumerate(history):
                on_epoch(epoch, past)
    with _progress(progress) as bar:
        task = bar.add_task(description, total=config.epochs, completed=len(history), status="")
        for epoch in range(len(history), config.epochs):
            model.train()
            total, correct, loss_sum = 0, 0, 0.0
            for x, y in train_loader:
                stopping.check()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=layout)
                with autocast(device, precision):
                    out = model(x)
                    t_out = None
                    if teacher is not None:
                        with torch.no_grad():
                            t_out = teacher(x.contiguous(memory_format=teacher_layout) if x.dim() == 4 else x)
                        count(len(x))
                count(len(x), trained=True)
                out = out.float()  # the loss (and DynamicKD's controller) in fp32
                loss = loss_fn(out, None if t_out is None else t_out.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(y)
                correct += (out.argmax(1) == y).sum().item()
                total += len(y)
            metrics: dict[str, float] = {"train_loss": loss_sum / total, "train_acc": correct / total, "lr": float(sched.get_last_lr()[0])}
            metrics.update(_extra_metrics(loss_fn))
            if val_loader is not None:
                val = evaluate(model, val_loader, device)
                metrics.update(val_acc=val["acc"], val_loss=val["loss"])
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if on_checkpoint is not None:
                on_checkpoint(
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "loss_fn": loss_fn.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "history": history,
                        "rng": get_rng_state(train_loader),
                    }
                )
            status = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("train_loss", "train_acc", "val_acc"))
            bar.update(task, advance=1, status=status)
            if progress and not bar.console.is_terminal:  # logs (DVC, Prefect): a line per epoch, not a silent bar
                print(f"{description}: epoch {epoch + 1}/{config.epochs}  {status}", flush=True)
    model.to(memory_format=torch.contiguous_format)  # what the pruning and export code expects
    return history


def _extra_metrics(loss_fn: nn.Module) -> dict[str, float]:
    report = getattr(loss_fn, "metrics", None)
    return report() if callable(report) else {}
