"""params.yaml as typed, validated settings: one section per stage, checked once at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pruning.emodir import ConstrainSettings, FinetuneSettings, RankSettings, SearchSettings, SelectorSettings
from pruning.methods import method_spec
from pruning.models import build_model
from pruning.search import check_boundary_widths, check_min_keep

SCHEMA_VERSION = 1
# EMO-DIR's defaults live in pruning/emodir.py (the Python API uses the same); the sections below take them
SELECTORS, SEARCH, CONSTRAIN, RANK, FINETUNE = SelectorSettings(), SearchSettings(), ConstrainSettings(), RankSettings(), FinetuneSettings()


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key, the bad value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # YAML's true/false would otherwise pass as 1/0 for a number
        if isinstance(v, bool) and info.field_name and cls.model_fields[info.field_name].annotation in (int, float, Optional[int]):
            raise ValueError("Input should be a number, not a boolean")
        return v


class TrackingParams(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = Field("emoprune", min_length=1)
    registered_model: str = Field("emoprune", min_length=1)


class DataParams(_Section):
    source: Literal["digits", "cifar10", "cifar100", "imagefolder"] = "digits"
    root: Optional[str] = None
    download: bool = False
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="digits only: it has no test split of its own")
    image_size: int = Field(32, ge=8, le=1024)
    augment: Literal["auto", "none", "crop", "crop-flip", "imagenet"] = "auto"
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    limit_train: Optional[int] = Field(None, ge=10, description="keep only this many training images (smoke runs)")
    materialize: Literal["auto", "yes", "no"] = "auto"
    split_seed: Optional[int] = Field(
        None, description="seed of the val (and digits test) split; null: `seed`. Fix it to vary `seed` over the same split"
    )

    @field_validator("root")
    @classmethod
    def _root_nonempty(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("must be a path or null")
        return v


class ModelParams(_Section):
    name: str = "resnet20"
    checkpoint: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        build_model(v, num_classes=2)  # raises ValueError naming what is allowed
        return v


class TrainParams(_Section):
    """Pretraining; FinetuneParams takes the same keys with its own defaults."""

    epochs: int = Field(25, ge=0)
    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, lt=1.0)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        FINETUNE.precision, description="bf16: bfloat16 autocast (fp32 weights); auto: bf16 where the device has it natively, else fp32"
    )
    channels_last: Literal[True, False, "auto"] = Field(
        FINETUNE.channels_last, description="NHWC layout while training; auto: where it trains faster (every conv's width a multiple of 16)"
    )


class DivideParams(_Section):
    k: int = Field(3, ge=1, le=64, description="number of sub-networks")
    cache_train: int = Field(2000, ge=16, description="train samples whose boundary features are cached")
    cache_val: int = Field(1000, ge=16, description="val samples whose boundary features are cached")


class SelectorParams(_Section):
    epochs: int = Field(SELECTORS.epochs, ge=1)
    lr: float = Field(SELECTORS.lr, gt=0.0, le=1.0)
    batch_size: int = Field(SELECTORS.batch_size, ge=1)


class SearchParams(_Section):
    pop_size: int = Field(SEARCH.pop_size, ge=4)
    generations: int = Field(SEARCH.generations, ge=1)
    levels: int = Field(SEARCH.levels, ge=2, le=100, description="keep-ratio levels per channel group")
    encoding: Literal["levels", "binary"] = SEARCH.encoding
    error: Literal["ce", "acc"] = SEARCH.error
    calib_samples: int = Field(SEARCH.calib_samples, ge=8, description="cached train samples that re-estimate BatchNorm statistics")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        SEARCH.precision, description="of the scoring pass: bf16 autocast or fp32; auto: bf16 where the device has it natively"
    )
    channels_last: bool = Field(SEARCH.channels_last, description="the scoring pass in NHWC layout")
    boundary_widths: list[float] = Field(
        default_factory=lambda: list(SEARCH.boundary_widths),
        min_length=1,
        description="emo-dir: keep fractions a boundary feature X_k may take (channels by whole-network importance); [1.0] freezes them",
    )
    min_keep: float = Field(
        SEARCH.min_keep,
        ge=0.0,
        lt=1.0,
        description="emo-dir, whole-emo: lowest keep fraction of an inner channel group (0: one level), a per-layer cap on pruning",
    )

    @field_validator("boundary_widths")
    @classmethod
    def _widths(cls, v: list[float], info: ValidationInfo) -> list[float]:
        return check_boundary_widths(v, info.data.get("encoding", "levels"))

    @field_validator("min_keep")
    @classmethod
    def _min_keep(cls, v: float, info: ValidationInfo) -> float:
        check_min_keep(v, info.data.get("encoding", "levels"))
        return v


class ConstrainParams(_Section):
    candidates: int = Field(
        CONSTRAIN.candidates,
        ge=0,
        description="front members trained per sub-network, by cost: half near prune.target, the rest over the front; 0 = all",
    )
    epochs: int = Field(CONSTRAIN.epochs, ge=0)
    lr: float = Field(CONSTRAIN.lr, gt=0.0, le=10.0)
    lam: float = Field(CONSTRAIN.lam, ge=0.0, description="weight of the selector cross-entropy against the feature loss")
    batch_size: int = Field(CONSTRAIN.batch_size, ge=1, description="for cached features; streamed ones come in data.batch_size")
    data: Literal["cache", "stream"] = Field(
        CONSTRAIN.data, description="cache: the cached features; stream: the whole augmented training set through the original network"
    )
    spread_outputs: bool = Field(
        CONSTRAIN.spread_outputs, description="emo-dir: also train one member per boundary width no trained candidate writes or reads"
    )


class RankParams(_Section):
    top_t: int = Field(RANK.top_t, ge=1, description="best knapsack combinations verified jointly")
    max_overshoot: float = Field(
        RANK.max_overshoot, ge=0.0, le=1.0, description="schemes removing more than target + this are passed over when others exist"
    )
    bn_samples: int = Field(RANK.bn_samples, ge=0, description="train images the chosen model's BatchNorm statistics are re-estimated on")
    fill_back: bool = Field(RANK.fill_back, description="give removed channels back while the reduction stays >= the target")
    paired_boundaries: bool = Field(
        RANK.paired_boundaries,
        description="emo-dir: score a candidate that narrows a boundary beside the least-pruned next candidate reading that width",
    )
    prefer_capacity: bool = Field(
        RANK.prefer_capacity,
        description="emo-dir: of the verified combinations within one standard error of the best val accuracy, keep the most parameters",
    )
    capacity_window: float = Field(
        RANK.capacity_window,
        gt=0.0,
        le=10.0,
        description="emo-dir with prefer_capacity: standard errors under the best val accuracy that still tie",
    )


class PruneParams(_Section):
    method: str = "emo-dir"
    target: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of FLOPs (or params, or predicted latency) removed")
    metric: Literal["flops", "params", "latency"] = "flops"
    round_to: int = Field(1, ge=1, le=64)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        method_spec(v)  # the registry: a ValueError names the methods there are
        return v


class FinetuneParams(TrainParams):
    epochs: int = Field(FINETUNE.epochs, ge=0)
    lr: float = Field(FINETUNE.lr, gt=0.0, le=10.0)
    momentum: float = Field(FINETUNE.momentum, ge=0.0, lt=1.0)
    weight_decay: float = Field(FINETUNE.weight_decay, ge=0.0, lt=1.0)
    kd: Literal["none", "kd", "dynamickd"] = FINETUNE.kd
    kd_temperature: float = Field(FINETUNE.kd_temperature, gt=0.0, le=100.0)
    kd_alpha: float = Field(FINETUNE.kd_alpha, ge=0.0, le=1.0)


class ExportParams(_Section):
    opset: int = Field(18, ge=13, le=23)
    latency_repeats: int = Field(50, ge=3)
    latency_batch_sizes: list[int] = Field(default_factory=lambda: [1, 64], min_length=1)
    quantize: Literal["none", "int8"] = Field("none", description="int8: also a static INT8 (QDQ) model, checked and timed")
    calibration_images: int = Field(512, ge=1, description="val images that calibrate the INT8 activation ranges")
    max_int8_drop: float = Field(1.0, ge=0.0, le=100.0, description="points of test accuracy INT8 may lose against FP32")

    @field_validator("latency_batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return v


class LatencyParams(_Section):
    """prune.metric latency: onnxruntime's time for one batch, predicted from a per-layer table (pruning/latency.py)."""

    table: str = Field("latency/table.json", description="the measured per-layer table: one per CPU, onnxruntime, threads, batch")
    batch_size: int = Field(64, ge=1, description="the batch whose time is the cost")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = its default (every core)")
    repeats: int = Field(10, ge=1, description="timed calls per layer shape (their median)")
    precision: Literal["fp32", "int8"] = Field("fp32", description="the model timed: FP32, or the static INT8 one (export.quantize int8)")


class OrchestrationParams(_Section):
    """How the flows run. Never changes a result, so no DVC stage depends on this section."""

    task_runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(0, ge=0, description="sub-networks searched at once; 0 = one per sub-network")
    dask_address: Optional[str] = Field(None, description="an existing Dask scheduler (tcp://host:8786); null = a LocalCluster")
    retries: int = Field(1, ge=0, le=20, description="pipeline flow retries after a failure (stages already done are not rerun)")
    retry_delay_seconds: float = Field(60.0, ge=0.0, le=86400.0)

    @field_validator("dask_address")
    @classmethod
    def _address(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "://" not in v:
            raise ValueError("must be a scheduler address like tcp://host:8786, or null for a LocalCluster")
        return v


class ResourcesParams(_Section):
    memory_budget_mb: int = Field(
        8192, ge=16, description="RAM the feature caches and the search may use; beyond it features stay on disk (memory-mapped)"
    )


class Params(_Section):
    seed: int = Field(0, ge=0, le=2**31 - 1, description="numpy takes seeds below 2**32; stages add small offsets")
    device: str = "auto"
    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    pretrain: TrainParams = TrainParams()
    prune: PruneParams = PruneParams()
    divide: DivideParams = DivideParams()
    selectors: SelectorParams = SelectorParams()
    search: SearchParams = SearchParams()
    constrain: ConstrainParams = ConstrainParams()
    rank: RankParams = RankParams()
    finetune: FinetuneParams = FinetuneParams()
    export: ExportParams = ExportParams()
    latency: LatencyParams = LatencyParams()
    resources: ResourcesParams = ResourcesParams()
    orchestration: OrchestrationParams = OrchestrationParams()

    @field_validator("latency")
    @classmethod
    def _latency_precision(cls, v: LatencyParams, info: ValidationInfo) -> LatencyParams:
        export, prune = info.data.get("export"), info.data.get("prune")
        latency = prune is not None and prune.metric == "latency"  # otherwise the section is not read
        if latency and v.precision == "int8" and export is not None and export.quantize != "int8":
            raise ValueError(
                "precision 'int8' prices the static INT8 model, which the export stage makes and times only with "
                f"export.quantize: int8 (it is {export.quantize!r}); allowed: export.quantize int8, or latency.precision fp32"
            )
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"unknown device {v!r}; allowed: auto, cpu, cuda, cuda:N")
        return v


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {e['input']!r}); check the spelling against params.yaml's sections")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {key} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)


def parse_params(raw: Any, source: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; every problem raises ConfigError with the key and the allowed values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {err.start}: {err.object[err.start : err.start + 1]!r}); allowed: YAML text"
        ) from None
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err)[:500]}") from None
    return parse_params(raw, str(path))
