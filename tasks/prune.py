"""Stage prune: run the chosen `prune.method` on the base model, physically remove the channels, write the scheme."""
from __future__ import annotations

import time

import mlflow

from pruning.channels import channel_groups, pruned_copy
from pruning.methods import METHODS, Target
from pruning.train import resolve_device
from tasks import paths
from tasks.checkpoints import load_model, save_model
from tasks.common import Data, accuracy, log_metrics_flat
from tasks.config import Params
from tasks.io import atomic_json
from tasks.tracking import stage_run

SCHEME_SCHEMA = 1


def run(params: Params) -> dict:
    data = Data(params)
    device = resolve_device(params.device)
    base, base_meta = load_model(paths.BASE)
    p = params.prune
    with stage_run(params, "prune", ("prune",)):
        start = time.perf_counter()
        method = METHODS[p.method](round_to=p.round_to)
        result = method(base, data.example, Target(p.target, p.metric))
        seconds = time.perf_counter() - start
        pruned = pruned_copy(base, data.example, result.scheme)
        groups = channel_groups(base, data.example)
        out = {
            "method": p.method,
            "target": p.target,
            "metric": p.metric,
            "base_flops": result.base_flops,
            "base_params": result.base_params,
            "flops": result.flops,
            "params": result.params,
            "flops_reduction": result.flops_reduction,
            "params_reduction": result.params_reduction,
            "val_acc_before_finetune": accuracy(pruned.to(device), data.loader("val"), device),
            "search_seconds": seconds,
            **{f"info.{k}": v for k, v in result.info.items()},
        }
        scheme_doc = {
            "schema_version": SCHEME_SCHEMA,
            "model": base_meta["model"],
            "method": p.method,
            "target": {"reduction": p.target, "metric": p.metric},
            "flops": {"base": result.base_flops, "pruned": result.flops, "reduction": result.flops_reduction},
            "params": {"base": result.base_params, "pruned": result.params, "reduction": result.params_reduction},
            "groups": [
                {"name": g.name, "channels": g.channels, "kept": len(result.scheme[g.name]), "layers": list(g.layers)}
                for g in groups
            ],
            "keep": result.scheme,
            "info": result.info,
        }
        save_model(pruned.cpu(), paths.PRUNED_INIT, name=base_meta["model"], num_classes=base_meta["num_classes"],
                   image_size=base_meta["image_size"], scheme=result.scheme)
        atomic_json(scheme_doc, paths.SCHEME)
        log_metrics_flat(out, "prune.")
        mlflow.log_artifact(str(paths.SCHEME))
        atomic_json(out, paths.metrics_file("prune"))
        return out
