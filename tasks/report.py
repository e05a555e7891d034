"""Stage report: gather every stage's metrics into metrics/summary.json, plot the channels kept, register the model."""
from __future__ import annotations

import mlflow
import torch
from mlflow import MlflowClient

from tasks import paths
from tasks.checkpoints import load_model
from tasks.common import log_metrics_flat
from tasks.config import Params
from tasks.io import atomic_json, atomic_path, read_json
from tasks.tracking import stage_run

SUMMARY_SCHEMA = 1


def summarize() -> dict:
    pre, prune, fin, exp = (read_json(paths.metrics_file(s)) for s in ("pretrain", "prune", "finetune", "export"))
    return {
        "schema_version": SUMMARY_SCHEMA,
        "method": prune["method"],
        "target": {"reduction": prune["target"], "metric": prune["metric"]},
        "base": {"test_acc": pre["test_acc"], "val_acc": pre["val_acc"], "flops": pre["flops"], "params": pre["params"]},
        "pruned": {
            "test_acc": fin["test_acc"],
            "val_acc": fin["val_acc"],
            "val_acc_before_finetune": prune["val_acc_before_finetune"],
            "flops": prune["flops"],
            "params": prune["params"],
            "flops_reduction": prune["flops_reduction"],
            "params_reduction": prune["params_reduction"],
        },
        "onnx": {k: v for k, v in exp.items() if k.startswith(("max_abs", "top1", "latency"))},
        "seconds": {"pretrain": pre["seconds"], "prune": prune["search_seconds"], "finetune": fin["seconds"]},
    }


def plot_channels(scheme: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = scheme["groups"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(groups)), 4))
    xs = range(len(groups))
    ax.bar(xs, [g["channels"] for g in groups], color="#d0d0d0", label="original")
    ax.bar(xs, [g["kept"] for g in groups], color="#3b6ea8", label="kept")
    ax.set_xticks(list(xs), [g["name"] for g in groups], rotation=75, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(f"{scheme['model']} {scheme['method']}: {scheme['flops']['reduction']:.1%} FLOPs removed")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def register(params: Params, summary: dict) -> dict:
    """Log the finetuned model to MLflow and register it under `tracking.registered_model` with alias `candidate`."""
    model, meta = load_model(paths.PRUNED)
    size = meta["image_size"]
    example = torch.zeros(1, 3, size, size)
    info = mlflow.pytorch.log_model(model, name="pruned_model", input_example=example.numpy(), pip_requirements=[],
                                    registered_model_name=params.tracking.registered_model)
    client = MlflowClient()
    version = info.registered_model_version
    client.set_registered_model_alias(params.tracking.registered_model, "candidate", version)
    for key in ("test_acc", "flops", "flops_reduction"):
        client.set_model_version_tag(params.tracking.registered_model, version, key, str(summary["pruned"][key]))
    return {"name": params.tracking.registered_model, "version": int(version), "alias": "candidate"}


def run(params: Params) -> dict:
    with stage_run(params, "report", ()):
        summary = summarize()
        scheme = read_json(paths.SCHEME)
        plot_channels(scheme, paths.PLOTS / "channels.png")
        log_metrics_flat(summary)
        mlflow.log_artifact(str(paths.PLOTS / "channels.png"), "plots")
        mlflow.log_dict(summary, "summary.json")
        summary["registered"] = register(params, summary)
        atomic_json(summary, paths.SUMMARY)
        return summary
