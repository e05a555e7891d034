"""Stage prepare: read the data source, carve the fixed-seed val split, write data/prepared/."""

from __future__ import annotations

import mlflow

from tasks import paths
from tasks.common import log_metrics_flat
from tasks.config import Params
from tasks.datasets import prepare
from tasks.io import atomic_json
from tasks.tracking import stage_run


def run(params: Params) -> dict:
    with stage_run(params, "prepare", ("data",)):
        split_seed = params.seed if params.data.split_seed is None else params.data.split_seed
        meta = prepare(params.data, split_seed, paths.PREPARED)
        out = {"num_classes": meta["num_classes"], "counts": meta["counts"], "fingerprint": meta["fingerprint"]}
        mlflow.set_tag("data.fingerprint", meta["fingerprint"])
        log_metrics_flat(out)
        atomic_json(out, paths.metrics_file("prepare"))
        return out
