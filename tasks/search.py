"""Stage search: NSGA-II per sub-network for `emo-dir` (one task each, mapped by the flow), over the whole
network for `whole-emo`; one-shot baselines have nothing to search. Fronts go to artifacts/search/."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence

import torch
from mlflow import MlflowClient
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from pruning.boundary import Boundary, plan_boundaries
from pruning.channels import group_importance
from pruning.emodir import SearchSettings, require_searchable, search_network, searched_module
from pruning.methods import Metric, method_spec
from pruning.search import Evaluation, ParetoFront
from pruning.selectors import FeatureSelector
from pruning.train import resolve_device, resolve_precision
from tasks import paths
from tasks.common import cost_metric, log_metrics_flat
from tasks.config import Params
from tasks.division import Division, load_division, load_feature, load_labels
from tasks.io import atomic_json, atomic_path
from tasks.tracking import stage_run

SEARCH_SCHEMA = 2  # 2: boundary genes, members' boundary options (inputs, outputs, io) and the per-state archive
# mapper(ks, run_id) -> one result dict per sub-network; the flow supplies a Prefect task map
Mapper = Callable[[Sequence[int], str], list[dict]]


def load_selector(division: Division, k: int) -> nn.Module:
    if k == division.k:
        return division.head
    state = torch.load(paths.SELECTORS, map_location="cpu", weights_only=True)[k]
    g = FeatureSelector(state["in_channels"], state["num_classes"])
    g.load_state_dict(state["state_dict"])
    for p in g.parameters():
        p.requires_grad_(False)
    return g.eval()


def _fingerprint(params: Params, tag: str) -> str:
    """What a checkpoint must match to be resumed: the model, the selectors, the search settings."""
    h = hashlib.sha256()
    for f in (paths.BASE, paths.SELECTORS):
        h.update(f.read_bytes() if f.is_file() else b"")
    h.update(
        json.dumps(
            [
                tag,
                params.seed,
                params.divide.model_dump(),
                params.search.model_dump(),
                params.prune.metric,
                params.prune.round_to,
                params.latency.model_dump() if params.prune.metric == "latency" else None,
            ],
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:16]


def _search(
    params: Params,
    tag: str,
    module: nn.Module,
    example: torch.Tensor,
    selector: nn.Module,
    train_inputs,
    val_inputs,
    val_labels,
    generations: int,
    run_id: str | None,
    device: torch.device,
    reads: Boundary | None = None,
    writes: Boundary | None = None,
    whole: bool = False,
    metric: Metric = "flops",
) -> dict:
    s = params.search
    ckpt = paths.CHECKPOINTS / f"search_{tag}_{_fingerprint(params, tag)}.pkl"
    state = ckpt.read_bytes() if ckpt.is_file() else None
    client = MlflowClient(tracking_uri=params.tracking.uri) if run_id else None

    # a bar on a terminal; in logs (under DVC, Prefect workers) one line per generation reads better
    progress = _PROGRESS if _PROGRESS is not None and _PROGRESS.console.is_terminal else None
    bar = progress.add_task(f"search {tag}", total=generations, status="") if progress is not None else None

    def on_generation(gen: int, metrics: dict[str, float], blob: bytes) -> None:
        with atomic_path(ckpt) as tmp:
            tmp.write_bytes(blob)
        status = f"hv={metrics['hypervolume']:.4f} front={metrics['front_size']} evals={metrics['evaluations']}"
        if progress is not None and bar is not None:
            progress.update(bar, completed=gen, status=status)
        else:
            print(f"search {tag}: generation {gen}/{generations}  {status}", flush=True)
        if client is not None and run_id is not None:
            ts = int(time.time() * 1000)
            from mlflow.entities import Metric

            client.log_batch(
                run_id, metrics=[Metric(f"search.{tag}.{k}", float(v), ts, gen) for k, v in metrics.items() if k != "generation"]
            )

    start = time.perf_counter()
    if state is not None:
        print(f"search {tag}: resuming from {ckpt}", flush=True)
    front = search_network(
        module,
        example,
        selector,
        train_inputs,
        val_inputs,
        val_labels,
        SearchSettings(**s.model_dump()),
        generations=generations,
        round_to=params.prune.round_to,
        metric=metric,
        seed=params.seed,
        device=device,
        state=state,
        on_generation=on_generation,
        reads=reads,
        writes=writes,
    )
    if whole:
        require_searchable(front, module)
    seconds = time.perf_counter() - start
    importance = group_importance(searched_module(module, example, reads), example)
    with torch.no_grad():
        out_channels = int(module.eval()(example).shape[1])
    doc = front_document(tag, front, importance, seconds, out_channels)
    atomic_json(doc, paths.SEARCH / f"front_{tag}.json")
    left_out = ", ".join(f"{name} ({why.split(':')[0]})" for name, why in front.space.excluded)
    widths = "; ".join(
        f"{'reads' if b.reads is not None else ''}{' and ' if b.reads is not None and b.writes is not None else ''}"
        f"{'writes' if b.writes is not None else ''} X_{b.reads if b.reads is not None else b.writes} "
        f"at {'/'.join(str(len(o)) for o in b.options)} channels"
        for b in front.space.boundary
    )
    if front.kept_whole is not None:
        print(f"search {tag}: nothing to search, the sub-network is kept whole: {front.kept_whole}", flush=True)
    else:
        print(
            f"search {tag}: {len(front.space.groups)} channel groups searched; boundaries: {widths or 'kept whole'}; "
            f"left out: {left_out or 'none'}",
            flush=True,
        )
    ckpt.unlink(missing_ok=True)  # the front is written: a later (forced) run searches afresh, as training does
    return {
        "tag": tag,
        "evaluations": front.evaluations,
        **front.images.as_metrics(),
        "front_size": len(front.members),
        "seconds": seconds,
        "hypervolume": front.history[-1]["hypervolume"] if front.history else None,
        "kept_whole": front.kept_whole,
        "resumed": state is not None,
    }


def front_document(tag: str, front: ParetoFront, importance: dict, seconds: float, out_channels: int = 0) -> dict:
    space = front.space

    def member(m: Evaluation) -> dict:
        return {
            "genes": list(m.genes),
            "cost": m.cost,
            "error": m.error,
            "flops": m.flops,
            "params": m.params,
            "inputs": m.inputs,
            "outputs": m.outputs,
            "scheme": space.decode(m.genes, importance),
            "io": space.io(m.genes, out_channels).to_json(),
        }

    return {
        "schema_version": SEARCH_SCHEMA,
        "tag": tag,
        "encoding": space.encoding,
        "levels": space.levels,
        "groups": [{"name": g.name, "channels": g.channels, "layers": list(g.layers)} for g in space.groups],
        "excluded_groups": [{"name": name, "reason": why} for name, why in space.excluded],
        "boundary_genes": [
            {"group": b.group, "reads": b.reads, "writes": b.writes, "whole_group": b.whole, "options": [len(o) for o in b.options]}
            for b in space.boundary
        ],
        "base_flops": front.base_flops,
        "base_params": front.base_params,
        "evaluations": front.evaluations,
        "seconds": seconds,
        "kept_whole": front.kept_whole,
        "members": [member(m) for m in front.members],
        # the front of each (inputs, outputs) boundary state: what constrain chooses from, so candidates chain
        "archive": [member(m) for m in front.archive],
        "history": front.history,
        "fronts": front.fronts,
    }


def search_subnetwork(params: Params, k: int, run_id: str | None = None) -> dict:
    """NSGA-II on sub-network k alone: scored by its selector on cached X_{k-1}, nothing else of the network runs."""
    device = subnetwork_device(params.device, k)
    division = load_division(params)  # a private copy: tasks may run in parallel threads
    sub = division.subnetworks[k - 1]
    xtr = load_feature("train", k - 1)
    xva, yva = load_feature("val", k - 1), load_labels("val")
    example = division.example(k)
    plan = boundary_plan(params, division)
    reads, writes = (plan[k - 2] if k > 1 else None), plan[k - 1]
    metric = cost_metric(params, division.model, division.example(1))
    return _search(
        params,
        f"s{k}",
        sub.module,
        example,
        load_selector(division, k),
        xtr,
        xva,
        yva,
        params.search.generations,
        run_id,
        device,
        reads=reads,
        writes=writes,
        metric=metric,
    )


def boundary_plan(params: Params, division: Division) -> list[Boundary]:
    """The width options of X_1..X_K (search.boundary_widths, prune.round_to), the same in every stage that asks."""
    return plan_boundaries(division.model, division.subnetworks, division.example(1), params.search.boundary_widths, params.prune.round_to)


def subnetwork_device(device: str, k: int) -> torch.device:
    """Sub-network k's device: with several GPUs and `device` auto or cuda (no index), GPU (k-1) mod their
    number, so K parallel searches spread over the GPUs; otherwise `device` as resolved."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return torch.device("cuda", (k - 1) % torch.cuda.device_count())
    return dev


def search_whole(params: Params, run_id: str | None = None) -> dict:
    """The whole-emo baseline: NSGA-II over every channel group of the whole network, scored on the whole
    network's val logits, with K times the generations so it gets EMO-DIR's number of evaluations."""
    device = resolve_device(params.device)
    division = load_division(params)
    model = division.model
    xtr = load_feature("train", 0)
    xva, yva = load_feature("val", 0), load_labels("val")
    return _search(
        params,
        "whole",
        model,
        division.example(1),
        nn.Identity(),
        xtr,
        xva,
        yva,
        params.search.generations * division.k,
        run_id,
        device,
        whole=True,
        metric=cost_metric(params, model, division.example(1)),
    )


def sequential(params: Params) -> Mapper:
    return lambda ks, run_id: [search_subnetwork(params, k, run_id) for k in ks]


# One progress display for all sub-networks searched in this process (rich allows one live display at a time).
_PROGRESS: Progress | None = None


def run(params: Params, mapper: Mapper | None = None) -> dict:
    global _PROGRESS
    method = params.prune.method
    with stage_run(params, "search", ("divide", "search")) as active, _progress() as progress:
        _PROGRESS = progress
        run_id = active.info.run_id
        start = time.perf_counter()
        paths.SEARCH.mkdir(parents=True, exist_ok=True)
        search = method_spec(method).search
        if search == "subnetworks":
            k = params.divide.k
            if params.prune.metric == "latency" and mapper is not None:
                # layer shapes are timed the first time a search needs them: on an otherwise idle machine, so
                # the sub-networks are searched one after another, in this process
                print("search: prune.metric latency: the sub-networks are searched one at a time (layers are timed as needed)", flush=True)
                mapper = None
            results = (mapper or sequential(params))(list(range(1, k + 1)), run_id)
        elif search == "network":
            results = [search_whole(params, run_id)]
        else:
            results = []
        out = {
            "method": method,
            "searched": bool(results),
            "seconds": time.perf_counter() - start,
            "evaluations": int(sum(r["evaluations"] for r in results)),
            # what the method costs in work, on any machine (pruning/counting.py); each search counts its own
            "images_forwarded": int(sum(r["images_forwarded"] for r in results)),
            "images_trained": 0,
            # the scoring pass's precision, `search.precision` with auto resolved (bf16 where the device has it natively)
            "precision": resolve_precision(params.search.precision, resolve_device(params.device)),
            "subnetworks": results,
        }
        fresh = {f"front_{r['tag']}.json" for r in results}
        for stale in paths.SEARCH.glob("front_*.json"):  # another method's fronts must not leak into this run's plots;
            if stale.name not in fresh:  # removed only now, so a failed search leaves the last good ones in place
                stale.unlink()
        log_metrics_flat({k: out[k] for k in ("seconds", "evaluations", "images_forwarded")}, "search.")
        atomic_json(out, paths.metrics_file("search"))
        atomic_json(out, paths.SEARCH / "summary.json")
        _PROGRESS = None
        return out


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("generations"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
