"""Stage rank: choose the pruning scheme for `prune.target` and build the physically pruned model.

emo-dir: global performance impairment ranking over the trained sub-network candidates (exact
multiple-choice knapsack, top-T verified jointly); whole-emo: the most accurate member of its whole-network
front that meets the target; one-shot baselines (uniform, global-magnitude, random): the method itself."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import torch

from pruning.channels import KeepScheme, channel_groups, count_flops_params, pruned_copy
from pruning.counting import counting
from pruning.emodir import candidate_cost_of, reestimate_bn
from pruning.exact import TOLERANCE, landed, landed_trained
from pruning.gpir import no_choice_note
from pruning.gpir import rank as gpir_rank
from pruning.latency import LatencyCost
from pruning.methods import METHOD_NAMES, Metric, Target, method_spec, model_cost
from pruning.search import choose_for_target
from pruning.train import resolve_device
from tasks import paths
from tasks.checkpoints import load_model, save_model
from tasks.common import Data, accuracy, cost_metric, log_metrics_flat
from tasks.config import Params
from tasks.constrain import load_candidate
from tasks.division import Division, load_division, load_features
from tasks.io import atomic_json, read_json
from tasks.tracking import stage_run

SCHEME_SCHEMA = 2


def rank_emo_dir(
    params: Params, division: Division, example: torch.Tensor, metric: Metric, write_tables: bool = True
) -> tuple[torch.nn.Module, dict, dict]:
    device = resolve_device(params.device)
    index = read_json(paths.CANDIDATES / "index.json")
    if "subnetworks" not in index:
        raise ValueError(
            f"this workspace holds no EMO-DIR search: its last search and constrain stages ran for prune.method="
            f"{index.get('method')!r}; run the pipeline with prune.method: emo-dir first "
            "(dvc exp run -S prune.method=emo-dir, or emoprune run)"
        )
    cands = []
    for entry in index["subnetworks"]:
        loaded = [load_candidate(division, entry["k"], row["candidate"]) for row in entry["candidates"]]
        # FLOPs and params as constrain counted them; a latency priced now, from the table the base costs come from
        sub, head = division.subnetworks[entry["k"] - 1], division.head if entry["k"] == division.k else None
        costs = [
            meta[metric] if isinstance(metric, str) else candidate_cost_of(sub, m, meta["scheme"], meta["io"], head, metric)
            for m, meta in loaded
        ]
        cands.append([(m, meta["scheme"], c, meta["io"]) for (m, meta), c in zip(loaded, costs)])
    feats, labels = load_features("val", division.k)
    base_costs = [model_cost(s.module, torch.zeros(1, *s.in_shape), metric, (s.flops, s.params)) for s in division.subnetworks]
    total = model_cost(division.model, example, metric)
    pruned, full_scheme, info = gpir_rank(
        division.model,
        example,
        division.subnetworks,
        division.head,
        cands,
        base_costs,
        total,
        params.prune.target,
        top_t=params.rank.top_t,
        max_overshoot=params.rank.max_overshoot,
        features=feats,
        labels=labels,
        device=device,
        paired_boundaries=params.rank.paired_boundaries,
        tolerance=TOLERANCE,
        prefer_capacity=params.rank.prefer_capacity,
        capacity_window=params.rank.capacity_window,
    )
    table, front = info.pop("table"), info.pop("joint_front")
    kept = {f"s{e['k']}": e["kept_whole"] for e in index["subnetworks"] if e.get("kept_whole")}
    if kept:
        info["kept_whole"] = kept
    if write_tables:
        base_acc = info["val_cache_acc_base"]
        atomic_json({"metric": str(metric), "base_cost": total, "base_acc": base_acc, "table": table}, paths.GPIR_TABLE)
        atomic_json(
            {"metric": str(metric), "base_cost": total, "base_acc": base_acc, "chosen": [c["row"] for c in info["choice"]], "front": front},
            paths.JOINT_FRONT,
        )
    return pruned, full_scheme, info


def rank_whole_emo(params: Params, division: Division, example: torch.Tensor) -> tuple[torch.nn.Module, dict, dict]:
    members = read_json(paths.SEARCH / "front_whole.json")["members"]
    # as for emo-dir: near the target when the front allows it, not a much smaller model that ties on error
    index, fallback = choose_for_target(
        [m["cost"] for m in members], [m["error"] for m in members], params.prune.target, params.rank.max_overshoot
    )
    best = members[index]
    scheme = best["scheme"]
    info = {"search_error": best["error"], "genes": best["genes"], "fallbacks": [fallback] if fallback else []}
    return pruned_copy(division.model, example, scheme), scheme, info


def choose(
    params: Params, example: torch.Tensor, write_tables: bool = True
) -> tuple[torch.nn.Module, dict, torch.nn.Module, KeepScheme, dict]:
    """(base model, its metadata, pruned model, keep-scheme, method info) for `prune.method` at `prune.target`."""
    p = params.prune
    spec = method_spec(p.method)
    if spec.one_shot is not None:
        base, base_meta = load_model(paths.BASE)
        metric = cost_metric(params, base, example)
        result = spec.one_shot(round_to=p.round_to, seed=params.seed)(base, example, Target(p.target, metric))
        scheme, info = _landed(params, base, example, result.scheme, result.info, metric)
        pruned = pruned_copy(base, example, scheme)
        return base, base_meta, pruned, scheme, _with_latency(info, metric, base, pruned, example)
    division = load_division(params)
    metric = cost_metric(params, division.model, example)
    if spec.gpir:
        pruned, scheme, info = rank_emo_dir(params, division, example, metric, write_tables=write_tables)
        if params.rank.fill_back:  # the trained channels keep their weights, the ones given back come from the base
            pruned, scheme, info = landed_trained(pruned, division.model, example, scheme, p.target, info, metric, p.round_to)
    else:
        _, scheme, info = rank_whole_emo(params, division, example)
        scheme, info = _landed(params, division.model, example, scheme, info, metric)
        pruned = pruned_copy(division.model, example, scheme)
    return division.model, division.meta, pruned, scheme, _with_latency(info, metric, division.model, pruned, example)


def _with_latency(info: dict, metric: Metric, base: torch.nn.Module, pruned: torch.nn.Module, example: torch.Tensor) -> dict:
    """prune.metric latency: the predicted times go into the scheme document (its `latency` entry)."""
    if not isinstance(metric, LatencyCost):
        return info
    return {**info, "latency": metric.record(base, pruned, example)}


def _landed(
    params: Params, base: torch.nn.Module, example: torch.Tensor, scheme: KeepScheme, info: dict, metric: Metric
) -> tuple[KeepScheme, dict]:
    """`rank.fill_back`: a scheme built from the base weights given channels back down to the target."""
    if not params.rank.fill_back:
        return scheme, info
    return landed(base, example, scheme, params.prune.target, info, metric, params.prune.round_to)


def scheme_document(params: Params, base, base_meta: dict, pruned, scheme: KeepScheme, info: dict, example: torch.Tensor) -> dict:
    base_flops, base_params = count_flops_params(base, example)
    flops, n_params = count_flops_params(pruned, example)
    kept = {name: len(idx) for name, idx in scheme.items()}
    return {
        "schema_version": SCHEME_SCHEMA,
        "model": base_meta["model"],
        "method": params.prune.method,
        "target": {"reduction": params.prune.target, "metric": params.prune.metric},
        "flops": {"base": base_flops, "pruned": flops, "reduction": 1 - flops / base_flops},
        "params": {"base": base_params, "pruned": n_params, "reduction": 1 - n_params / base_params},
        **({"latency": info["latency"]} if "latency" in info else {}),
        "groups": [
            {"name": g.name, "channels": g.channels, "kept": kept.get(g.name, g.channels), "layers": list(g.layers)}
            for g in channel_groups(base, example)
        ],
        "keep": scheme,
        "info": {k: v for k, v in info.items() if k != "latency"},
    }


def run(params: Params) -> dict:
    data = Data(params)
    device = resolve_device(params.device)
    p = params.prune
    with stage_run(params, "rank", ("prune", "rank")):
        start = time.perf_counter()
        if not method_spec(p.method).gpir:  # GPIR's tables exist for GPIR methods only; the stage's outputs always exist
            for path in (paths.GPIR_TABLE, paths.JOINT_FRONT):
                atomic_json({"method": p.method, "note": f"{p.method} does not rank sub-network candidates by GPIR"}, path)
        with counting() as images:  # the method's work; the accuracies below are only reported
            base, base_meta, pruned, scheme, info = choose(params, data.example)
            bn_samples = reestimate_bn(pruned.to(device), data.loader("train", train=True), params.rank.bn_samples, device)
        seconds = time.perf_counter() - start
        doc = scheme_document(params, base, base_meta, pruned, scheme, info, data.example)
        out = {
            "method": p.method,
            "target": p.target,
            "metric": p.metric,
            "base_flops": doc["flops"]["base"],
            "base_params": doc["params"]["base"],
            "flops": doc["flops"]["pruned"],
            "params": doc["params"]["pruned"],
            "flops_reduction": doc["flops"]["reduction"],
            "params_reduction": doc["params"]["reduction"],
            "val_acc_before_finetune": accuracy(pruned.to(device), data.loader("val"), device),
            "test_acc_before_finetune": accuracy(pruned, data.loader("test"), device),  # reported only, never used to choose
            "rank_seconds": seconds,
            **images.as_metrics(),
            "bn_samples": bn_samples,
            "reduction": doc[p.metric]["reduction"],  # of the target's metric (latency: predicted)
            "target_gap": doc[p.metric]["reduction"] - p.target,
            # what was done instead of what was asked, in words ("" when nothing was), with where it ended
            "fallback": "; ".join(info.get("fallbacks", []))
            + (f"; the final model removes {doc[p.metric]['reduction']:.4f} of the {p.metric}" if info.get("fallbacks") else ""),
        }
        if out["fallback"]:
            print(f"rank: fallback: {out['fallback']}", flush=True)
            mlflow.set_tag("emoprune.fallback", out["fallback"][:5000])
        if method_spec(p.method).gpir:
            out["chosen_by"] = info.get("chosen_by", "")
            if out["chosen_by"]:
                print(f"rank: {out['chosen_by']}", flush=True)
            out["no_choice"] = no_choice_note(info, params.rank.top_t)
            if out["no_choice"]:
                print(f"rank: warning: {out['no_choice']}", flush=True)
                mlflow.set_tag("emoprune.no_choice", out["no_choice"])
        print(
            f"rank: {p.method} removes {doc['flops']['reduction']:.1%} of the FLOPs and {doc['params']['reduction']:.1%} of the "
            f"params (target {p.target} of the {p.metric}); val accuracy before finetuning {out['val_acc_before_finetune']:.2%}",
            flush=True,
        )
        if out["target_gap"] > TOLERANCE:
            why = "rank.fill_back is off" if not params.rank.fill_back else "no removed channel fits back within the target"
            print(
                f"rank: {p.method} removes {doc[p.metric]['reduction']:.4f} of the {p.metric} for target {p.target} "
                f"({100 * out['target_gap']:+.1f} points): {why}",
                flush=True,
            )
        save_model(
            pruned.cpu(),
            paths.PRUNED_INIT,
            name=base_meta["model"],
            num_classes=base_meta["num_classes"],
            image_size=base_meta["image_size"],
            scheme=scheme,
        )
        atomic_json(doc, paths.SCHEME)
        log_metrics_flat(out, "rank.")
        mlflow.log_artifact(str(paths.SCHEME))
        atomic_json(out, paths.metrics_file("rank"))
        return out


def scheme_for_target(params: Params, target: float) -> tuple[dict, Path, Path]:
    """Another target from the same search: rank again (no search, no constrained training) and write
    artifacts/schemes/target-<t>.json and models/pruned_init-target-<t>.pt; the pipeline's outputs stay as they are."""
    params = params.model_copy(update={"prune": params.prune.model_copy(update={"target": target})})
    if not method_spec(params.prune.method).searches:
        searching = ", ".join(m for m in METHOD_NAMES if method_spec(m).searches)
        raise ValueError(
            f"prune.method={params.prune.method!r} keeps no front to rank again; allowed: {searching} "
            f"(for one-shot baselines, rerun the rank stage with another prune.target)"
        )
    data = Data(params)
    base, base_meta, pruned, scheme, info = choose(params, data.example, write_tables=False)
    device = resolve_device(params.device)
    reestimate_bn(pruned.to(device), data.loader("train", train=True), params.rank.bn_samples, device)
    doc = scheme_document(params, base, base_meta, pruned, scheme, info, data.example)
    tag = f"target-{target:g}"
    doc_path, model_path = paths.SCHEMES / f"{tag}.json", paths.PRUNED_INIT.with_name(f"pruned_init-{tag}.pt")
    save_model(
        pruned.cpu(),
        model_path,
        name=base_meta["model"],
        num_classes=base_meta["num_classes"],
        image_size=base_meta["image_size"],
        scheme=scheme,
    )
    atomic_json(doc, doc_path)
    return doc, doc_path, model_path
