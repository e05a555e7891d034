"""Checks run before any heavy work by `emoprune stage`, `emoprune run` and `emoprune check`: every input the
stages will need is there, readable and consistent with params.yaml, so a bad value fails in seconds, named
as `key = value: what is allowed`, instead of deep inside a stage. Nothing here trains or writes an output."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pruning.methods import method_spec, unused_switches
from tasks import paths
from tasks.config import RANK, ConfigError, Params
from tasks.io import atomic_json, read_json
from tasks.paths import STAGES

MODEL_STAGES = {"selectors", "search", "constrain", "rank"}  # these divide and prune the model
DATA_STAGES = {"pretrain", "selectors", "rank", "finetune", "export"}  # these read data/prepared
# model files a stage reads, and the stage that writes them: checked only when that stage is not part of this run
READS = {
    "selectors": [paths.BASE],
    "search": [paths.BASE, paths.SELECTORS],
    "constrain": [paths.BASE, paths.SELECTORS],
    "rank": [paths.BASE],
    "finetune": [paths.BASE, paths.PRUNED_INIT],
    "export": [paths.BASE, paths.PRUNED],
    "report": [paths.PRUNED],
}
WRITER = {paths.BASE: "pretrain", paths.SELECTORS: "selectors", paths.PRUNED_INIT: "rank", paths.PRUNED: "finetune"}
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
TIMEOUT_S = 3.0


class PreflightError(ConfigError):
    """Inputs that cannot work, found before any stage started (the CLI exits with code 2)."""


class _Report:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.notes: list[str] = []

    def fail(self, key: str, value: object, allowed: str) -> None:
        self.problems.append(f"{key} = {value!r}: {allowed}")


def preflight(params: Params, stages: Iterable[str] = STAGES, root: str | Path = ".") -> list[str]:
    """Check what `stages` will need in the project folder `root`. Raises PreflightError listing every problem;
    returns notes worth printing (such as the feature cache staying on disk)."""
    stages = set(stages)
    if unknown := stages - set(STAGES):
        raise ValueError(f"unknown stages {sorted(unknown)}; allowed: {', '.join(STAGES)}")
    root, r = Path(root), _Report()
    _device(r, params.device)
    _tracking(r, params.tracking.uri, root)
    if "prepare" in stages:
        _data_root(r, params, root)
    elif stages & DATA_STAGES:
        _prepared(r, root)
    _inputs(r, params, stages, root)
    nc = _num_classes(params, root)
    if "pretrain" in stages and params.model.checkpoint:
        _checkpoint(r, params, nc, root)
    if stages & MODEL_STAGES:
        _model(r, params, nc, root)
    if "rank" in stages:
        _unused_switches(r, params)
    if r.problems:
        n = len(r.problems)
        raise PreflightError(f"preflight found {n} problem{'s' * (n > 1)}, nothing was run:\n  " + "\n  ".join(r.problems))
    return r.notes


def _under(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _device(r: _Report, device: str) -> None:
    from pruning.train import resolve_device

    try:
        resolve_device(device)
    except (ValueError, RuntimeError) as err:
        r.fail("device", device, str(err))


def _tracking(r: _Report, uri: str, root: Path) -> None:
    key, allowed = (
        "tracking.uri",
        "allowed: sqlite:///path/to/mlflow.db in a writable folder, a local folder, or a reachable http(s):// server",
    )
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower().split("+")[0]
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            r.fail(key, uri, f"an SQLite URI names a file: sqlite:///relative.db or sqlite:////absolute.db; {allowed}")
            return
        _writable(r, key, uri, _under(root, uri[len("sqlite:///") :]), allowed, folder=False)
    elif scheme in ("", "file"):
        _writable(r, key, uri, _under(root, parsed.path if scheme == "file" else uri), allowed, folder=True)
    elif scheme in DEFAULT_PORTS:
        try:
            host, port = parsed.hostname, parsed.port or DEFAULT_PORTS[scheme]
        except ValueError as err:  # a port that is not a number
            r.fail(key, uri, f"{err}; {allowed}")
            return
        if not host:
            r.fail(key, uri, f"names no host; {allowed}")
            return
        try:
            socket.create_connection((host, port), timeout=TIMEOUT_S).close()
        except OSError as err:
            r.fail(key, uri, f"nothing answers at {host}:{port} within {TIMEOUT_S:g} s ({err.strerror or err}); {allowed}")
    # other schemes (databricks, ...) are MLflow's to check


def _writable(r: _Report, key: str, uri: str, path: Path, allowed: str, folder: bool) -> None:
    """`path` exists as what it should be and is writable, or the nearest existing folder above it takes a new file."""
    if path.exists():
        if path.is_dir() != folder:
            r.fail(key, uri, f"{path} is a {'file' if folder else 'folder'}; {allowed}")
        elif not os.access(path, os.R_OK | os.W_OK):
            r.fail(key, uri, f"{path} is not writable; {allowed}")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        r.fail(key, uri, f"{parent} is a file, so {path} cannot be created; {allowed}")
        return
    try:  # the honest test of "can be created": make a file there and remove it
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".emoprune-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        r.fail(key, uri, f"cannot create {path} ({err.strerror or err}); {allowed}")


def _data_root(r: _Report, params: Params, root: Path) -> None:
    p = params.data
    if p.source == "digits":
        return
    if p.root is None:
        r.fail("data.root", None, f"required for data.source = {p.source!r}: the folder holding the dataset")
        return
    path = _under(root, p.root)
    if p.source in ("cifar10", "cifar100"):
        from torchvision import datasets
        from torchvision.datasets.utils import check_integrity

        cls = datasets.CIFAR10 if p.source == "cifar10" else datasets.CIFAR100
        folder = path / cls.base_folder
        if not folder.is_dir():
            if not p.download:
                r.fail(
                    "data.root",
                    p.root,
                    f"holds no {cls.base_folder}/ folder; allowed: a folder holding torchvision's "
                    f"{p.source} copy, or data.download: true to fetch it",
                )
            return
        bad = [name for name, md5 in (*cls.train_list, *cls.test_list) if not check_integrity(str(folder / name), md5)]
        if bad:
            r.fail(
                "data.root",
                p.root,
                f"{cls.base_folder}/{', '.join(bad)} missing or corrupted (checksum mismatch); "
                f"allowed: an intact copy (delete the folder and set data.download: true to fetch it again)",
            )
        return
    _image_folder(r, p.root, path)


def _image_folder(r: _Report, value: str, path: Path) -> None:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    allowed = "allowed: a folder with train/ and val/ or test/, each holding one folder of images per class"
    if not path.is_dir():
        r.fail("data.root", value, f"no such folder; {allowed}")
        return
    test = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    if not (path / "train").is_dir() or test is None:
        r.fail("data.root", value, f"holds {sorted(x.name for x in path.iterdir())}; {allowed}")
        return
    classes = {}
    for split in (path / "train", test):
        try:
            classes[split.name], _ = find_classes(str(split))
        except FileNotFoundError:
            r.fail("data.root", value, f"{split.name}/ holds no class folders; {allowed}")
            return
        for c in classes[split.name]:
            images = sorted(f for f in (split / c).iterdir() if f.suffix.lower() in IMG_EXTENSIONS)
            if not images:
                r.fail("data.root", value, f"{split.name}/{c}/ holds no images ({', '.join(IMG_EXTENSIONS)}); {allowed}")
                return
            try:  # the first image of every class: a cheap test for a damaged copy
                with Image.open(images[0]) as im:
                    im.verify()
            except Exception as err:  # PIL raises many types for a damaged image
                r.fail("data.root", value, f"{images[0].relative_to(path)} is not a readable image ({type(err).__name__}); {allowed}")
                return
    if classes["train"] != classes[test.name]:
        r.fail("data.root", value, f"train/ has classes {classes['train']} but {test.name}/ has {classes[test.name]}; {allowed}")


def _prepared(r: _Report, root: Path) -> None:
    from tasks.datasets import DataError, read_meta

    prepared = root / paths.PREPARED
    try:
        meta = read_meta(prepared)
    except (DataError, ValueError) as err:  # ValueError: meta.json is not JSON
        r.problems.append(f"{paths.PREPARED}: {err}; rerun `emoprune stage prepare`")
        return
    splits = ("train", "val", "test") if meta.get("materialized") else ()
    for split in splits:
        try:
            torch.load(prepared / f"{split}.pt", mmap=True, weights_only=True)
        except Exception as err:  # torch raises many types for a damaged file
            r.problems.append(
                f"{paths.PREPARED / f'{split}.pt'} is missing or damaged ({type(err).__name__}); rerun `emoprune stage prepare`"
            )


def _inputs(r: _Report, params: Params, stages: set[str], root: Path) -> None:
    from tasks.checkpoints import CheckpointError, load_model

    spec = method_spec(params.prune.method)
    features = stages & spec.feature_stages  # artifacts/features (and models/selectors.pt if the method uses selectors)
    selectors = features and spec.selectors
    files = {f for s in stages for f in READS.get(s, []) if WRITER[f] not in stages and (f != paths.SELECTORS or selectors)}
    for f in sorted(files):
        try:
            if f == paths.SELECTORS:
                torch.load(root / f, map_location="cpu", weights_only=True)
            else:
                load_model(root / f)
        except CheckpointError as err:
            r.problems.append(f"{f}: {err}; rerun `emoprune stage {WRITER[f]}`")
        except Exception as err:  # a damaged selectors file
            r.problems.append(f"{f} is missing or damaged ({type(err).__name__}); rerun `emoprune stage {WRITER[f]}`")
    if features and "selectors" not in stages:
        import numpy as np

        from tasks.division import feature_path, label_path

        for split in ("train", "val"):
            for f in (*(feature_path(split, k) for k in range(params.divide.k + 1)), label_path(split)):
                try:
                    np.load(root / f, mmap_mode="r")
                except (OSError, ValueError) as err:
                    r.problems.append(f"{f} is missing or damaged ({type(err).__name__}); rerun `emoprune stage selectors`")
                    return


def _num_classes(params: Params, root: Path) -> int:
    try:
        meta = read_json(root / paths.PREPARED / "meta.json")
        if meta.get("source") == params.data.source and isinstance(meta.get("num_classes"), int):
            return meta["num_classes"]
    except (OSError, ValueError):
        pass
    if params.data.source == "imagefolder" and params.data.root and (_under(root, params.data.root) / "train").is_dir():
        return max(1, sum(d.is_dir() for d in (_under(root, params.data.root) / "train").iterdir()))
    return {"cifar100": 100}.get(params.data.source, 10)


def _checkpoint(r: _Report, params: Params, nc: int, root: Path) -> None:
    from tasks.checkpoints import CheckpointError, load_user_weights

    assert params.model.checkpoint is not None  # called only when one is set
    try:
        load_user_weights(_under(root, params.model.checkpoint), params.model.name, nc)
    except CheckpointError as err:
        r.fail("model.checkpoint", params.model.checkpoint, str(err))


def _model(r: _Report, params: Params, nc: int, root: Path) -> None:
    """Build the model from params (no training): layers, size, divisibility into divide.k parts, the target's reach, memory."""
    from pruning.channels import UnsupportedLayerError, channel_groups, check_supported
    from pruning.divide import blocks, divide
    from pruning.models import build_model
    from tasks.division import MB, Division, memory_plan

    name, s, k = params.model.name, params.data.image_size, params.divide.k
    model = build_model(name, nc).eval()
    try:
        check_supported(model)
    except UnsupportedLayerError as err:
        r.fail("model.name", name, str(err))
        return
    x = torch.zeros(1, 3, s, s)
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as err:
        r.fail(
            "data.image_size",
            s,
            f"model.name = {name!r} cannot run on {s}x{s} images ({str(err).splitlines()[0][:200]}); "
            f"allowed: a size its downsampling accepts, e.g. 32 for the CIFAR models, 224 for torchvision's",
        )
        return
    try:
        channel_groups(model, x)  # Torch-Pruning follows its channels
        blocks(model, x)
    except ValueError as err:
        r.fail("model.name", name, str(err))
        return
    try:
        subs, head = divide(model, x, k)
    except ValueError as err:
        r.fail("divide.k", k, str(err))
        return
    try:
        reach, what = _reach(params, nc, model, x, subs, head, root)
    except ValueError as err:  # prune.metric latency: an unreadable table, a layer it cannot time
        r.fail("latency.table" if params.prune.metric == "latency" else "prune.method", params.latency.table, str(err))
        return
    if params.prune.target > reach:
        metric = params.prune.metric + (" (INT8)" if params.prune.metric == "latency" and params.latency.precision == "int8" else "")
        if reach <= 0 and params.prune.metric == "latency":  # a machine where narrower layers are no faster
            r.fail(
                "prune.target",
                params.prune.target,
                f"out of reach: nothing {what} builds is predicted to take less {metric} than the base (the fastest "
                f"of them takes {1 - reach:.3f} of it); allowed: no target on this machine; prune for flops"
                + (", or for the FP32 model's time (latency.precision fp32)" if params.latency.precision == "int8" else ""),
            )
        else:
            r.fail(
                "prune.target",
                params.prune.target,
                f"out of reach: {what} removes at most {reach:.4f} of the {metric}; allowed: a target up to {reach:.4f}"
                + "".join(f", or {hint}" for hint in _reach_hints(params)),
            )
    plan = memory_plan(params, Division(model, {}, subs, head))
    budget = params.resources.memory_budget_mb
    if plan.floor > plan.budget:
        need = math.ceil(plan.floor / MB)
        r.fail(
            "resources.memory_budget_mb",
            budget,
            f"this run needs about {need:,} MB at once even with the feature cache on disk (caching one data batch: "
            f"{plan.caching / MB:,.0f} MB; {plan.searches} searches at once: {plan.search / MB:,.0f} MB); allowed: at least "
            f"{need:,}, or fewer searches at once (orchestration.workers) or a smaller data.batch_size",
        )
    elif not plan.in_memory:
        r.notes.append(
            f"the feature cache (about {plan.features / MB:,.0f} MB) does not fit resources.memory_budget_mb = "
            f"{budget:,} beside the work ({plan.floor / MB:,.0f} MB): it stays on disk, memory-mapped"
        )


def _unused_switches(r: _Report, params: Params) -> None:
    """A note when a GPIR-only switch is on for a method that does not rank by GPIR: it changes nothing."""
    c, k = params.constrain, params.rank
    if note := unused_switches(
        params.prune.method,
        paired_boundaries=k.paired_boundaries,
        prefer_capacity=k.prefer_capacity,
        capacity_window=k.capacity_window,
        spread_outputs=c.spread_outputs,
        default_window=RANK.capacity_window,
        dotted=True,
    ):
        r.notes.append(note)


LATENCY_REACH_WIDTHS = (0.25, 0.5, 0.75)  # prune.metric latency: uniform widths whose time the reach also takes


def _reach_hints(params: Params) -> list[str]:
    """The settings that bound a method's reach, as the user could loosen them."""
    p, s = params.prune, params.search
    spec = method_spec(p.method)
    hints = []
    if spec.search == "subnetworks" and min(s.boundary_widths) > 0.25:
        hints.append(f"narrower boundaries (search.boundary_widths {list(s.boundary_widths)}: add 0.25)")
    if spec.search is not None and s.min_keep > 0:
        hints.append(f"a lower search.min_keep (now {s.min_keep})")
    if p.round_to > 1:
        hints.append(f"a smaller prune.round_to (now {p.round_to})")
    return hints


def _reach(params: Params, nc: int, model: nn.Module, x: torch.Tensor, subs, head, root: Path) -> tuple[float, str]:
    """The largest fraction of FLOPs (or params, or predicted latency) the method's search space can remove:
    every gene at its lowest level. Cached under .emoprune/preflight/ by architecture, search space and the pruning code it depends on."""
    import pruning
    from pruning.latency import machine

    p, s = params.prune, params.search
    key = hashlib.sha256(
        json.dumps(
            [
                params.model.name,
                nc,
                params.data.image_size,
                p.method,
                p.metric,
                p.round_to,
                params.divide.k,
                s.levels,
                s.encoding,
                s.boundary_widths,
                s.min_keep,
                [params.latency.model_dump(), machine()] if p.metric == "latency" else None,
            ]
        ).encode()
    )
    for f in ("channels.py", "divide.py", "search.py", "methods.py", "boundary.py", "emodir.py", "latency.py", "quantize.py"):
        key.update((Path(pruning.__file__).parent / f).read_bytes())
    key.update(Path(__file__).read_bytes())  # how the reach is computed
    cache = root / ".emoprune" / "preflight" / f"reach_{key.hexdigest()[:16]}.json"
    try:
        doc = read_json(cache)
        return float(doc["reach"]), str(doc["what"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    reach, what = _compute_reach(params, model, x, subs, head, root)
    atomic_json({"reach": reach, "what": what}, cache)
    return reach, what


def _compute_reach(params: Params, model: nn.Module, x: torch.Tensor, subs, head, root: Path) -> tuple[float, str]:
    from pruning.boundary import plan_boundaries
    from pruning.channels import channel_groups, pruned_copy
    from pruning.divide import source_name
    from pruning.emodir import searched_module
    from pruning.latency import INT8_BLOCK, LatencyCost
    from pruning.methods import model_cost
    from pruning.search import SearchSpace, boundary_search_groups, prunable_groups
    from tasks.common import cost_metric

    p, s = params.prune, params.search

    def lowest(space: SearchSpace) -> list[int]:
        return [int(v) for v in space.bounds[0]]

    def smallest(module: nn.Module, example: torch.Tensor) -> dict[str, list[int]]:
        groups = tuple(prunable_groups(module, example))
        if not groups:
            return {}
        space = SearchSpace(groups, s.levels, s.encoding, p.round_to, min_keep=s.min_keep)
        return space.decode(lowest(space), {g.name: torch.zeros(g.channels) for g in groups})

    spec = method_spec(p.method)
    # the floor the user set is part of a search's reach: say so
    floor = f"; search.min_keep {s.min_keep} keeps at least that fraction of every inner group" if s.min_keep > 0 else ""
    if spec.search == "subnetworks":
        # every gene at its lowest level, boundaries at their narrowest width: one whole-network scheme
        plan = plan_boundaries(model, subs, x, s.boundary_widths, p.round_to)
        scheme: dict[str, list[int]] = {}
        for sub in subs:
            ex = torch.zeros(1, *sub.in_shape)
            reads, writes = (plan[sub.index - 2] if sub.index > 1 else None), plan[sub.index - 1]
            groups, genes, _ = boundary_search_groups(searched_module(sub.module, ex, reads), ex, reads, writes)
            space = SearchSpace(tuple(groups), s.levels, s.encoding, p.round_to, (), tuple(genes), s.min_keep)
            for name, kept in space.decode(lowest(space), {g.name: torch.zeros(g.channels) for g in groups}).items():
                if name not in {b.group for b in genes}:
                    scheme[source_name(sub, name)] = kept
        for b in plan:
            if b.searchable and b.group is not None:
                scheme[b.group] = list(b.options[-1])
        searched = sum(b.searchable for b in plan)
        what = (
            f"the {p.method} search space (every prunable channel group inside the {len(subs)} sub-networks at its lowest "
            f"keep level, {searched} of {len(plan)} boundaries at their narrowest width {min(s.boundary_widths)}{floor})"
        )
    elif spec.search == "network":
        scheme, what = smallest(model, x), f"the {p.method} search space (every channel group at its lowest keep level{floor})"
    else:
        assert spec.one_shot is not None  # neither search kind: a one-shot method
        ratio = getattr(spec.one_shot(), "max_ratio", 1.0)  # global-magnitude prunes at most this fraction of a layer

        def keep(c: int) -> int:
            return max(min(p.round_to, c), c - math.floor(ratio * c), 1)

        scheme = {g.name: list(range(keep(g.channels))) for g in channel_groups(model, x)}
        what = f"{p.method} (every channel group at its smallest width)"
    metric = cost_metric(params, model, x, root)  # latency: the measured table, calibrated on the model (once per machine)
    base = model_cost(model, x, metric)
    reach = 1.0 - model_cost(pruned_copy(model, x, scheme), x, metric) / base
    if isinstance(metric, LatencyCost) and spec.search is not None:
        # time need not fall with width (narrow INT8 layers ran slower than whole 16-channel blocks): the smallest
        # model is not always the fastest, so a search's reach also prices uniform widths, plain and in whole blocks,
        # each group no narrower than in the smallest model. An estimate from above (emo-dir's boundaries may not
        # take every such width); GPIR names the exact reach of the trained candidates. The one-shot methods
        # bisect one knob down from their smallest model, so for them the smallest model's cost is the reach.
        block = metric.table.block if metric.table.precision == "fp32" and metric.table.block > 1 else INT8_BLOCK
        groups = channel_groups(model, x)
        least = {g.name: len(scheme.get(g.name, range(g.channels))) for g in groups}
        for f in LATENCY_REACH_WIDTHS:
            for blocked in (False, True):
                widths = {g.name: round(f * g.channels) for g in groups}
                if blocked:
                    widths = {g.name: (widths[g.name] // block) * block or min(block, g.channels) for g in groups}
                variant = {g.name: list(range(max(least[g.name], widths[g.name], 1))) for g in groups}
                reach = max(reach, 1.0 - model_cost(pruned_copy(model, x, variant), x, metric) / base)
        what += f" or a uniform width of {', '.join(map(str, LATENCY_REACH_WIDTHS))} (plain or in {block}-channel blocks)"
    return reach, what
