"""Stage report: gather every stage's metrics into metrics/summary.json, plot the channels kept, register the model."""

from __future__ import annotations

import matplotlib
import mlflow
import torch
from mlflow import MlflowClient

from pruning.methods import method_spec
from tasks import paths
from tasks.checkpoints import load_model
from tasks.common import log_metrics_flat
from tasks.config import Params
from tasks.io import atomic_json, atomic_path, read_json
from tasks.tracking import stage_run, trace_tags

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

SUMMARY_SCHEMA = 1


def summarize() -> dict:
    pre, ranked, fin, exp, search = (read_json(paths.metrics_file(s)) for s in ("pretrain", "rank", "finetune", "export", "search"))
    return {
        "schema_version": SUMMARY_SCHEMA,
        "method": ranked["method"],
        # achieved: the reduction of the target's metric the rank stage's model reaches (latency: predicted)
        "target": {"reduction": ranked["target"], "metric": ranked["metric"], "achieved": ranked["reduction"]},
        "base": {"test_acc": pre["test_acc"], "val_acc": pre["val_acc"], "flops": pre["flops"], "params": pre["params"]},
        "pruned": {
            "test_acc": fin["test_acc"],
            "val_acc": fin["val_acc"],
            "val_acc_before_finetune": ranked["val_acc_before_finetune"],
            "flops": ranked["flops"],
            "params": ranked["params"],
            "flops_reduction": ranked["flops_reduction"],
            "params_reduction": ranked["params_reduction"],
        },
        "onnx": {k: v for k, v in exp.items() if k.startswith(("max_abs", "top1", "latency", "quantize", "int8", "fp32"))},
        "search": {"evaluations": search["evaluations"], "seconds": search["seconds"]},
        "seconds": {"pretrain": pre["seconds"], "search": search["seconds"], "rank": ranked["rank_seconds"], "finetune": fin["seconds"]},
    }


def write_accuracy_vs_flops(summary: dict, path) -> None:
    """Two points, the base and the pruned model: `dvc plots diff` over experiments overlays them into
    one accuracy-vs-FLOPs chart of every method and target tried."""
    label = f"{summary['method']}@{summary['target']['reduction']:g}"
    rows = [
        ("model", "flops", "test_acc"),
        ("base", summary["base"]["flops"], summary["base"]["test_acc"]),
        (label, summary["pruned"]["flops"], summary["pruned"]["test_acc"]),
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(",".join(str(v) for v in row) + "\n" for row in rows))


def plot_channels(scheme: dict, path) -> None:
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
    _save(fig, path, dpi=120)


def _save(fig, path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _placeholder(path, text: str) -> bool:
    """A small image saying why a plot is empty: DVC declares every plot, whichever method ran."""
    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    _save(fig, path, dpi=80)
    return False


def plot_fronts(path) -> bool:
    """Each searched module's Pareto front after every generation (darker = later)."""
    docs = [read_json(f) for f in sorted(paths.SEARCH.glob("front_*.json"))]
    if not docs:
        return _placeholder(path, "this method runs no evolutionary search")
    fig, axes = plt.subplots(1, len(docs), figsize=(4 * len(docs), 3.4), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        n = len(doc["fronts"])
        for g, front in enumerate(doc["fronts"]):
            xs, ys = zip(*front)
            ax.plot(xs, ys, "o-", ms=3, lw=0.8, color=plt.cm.viridis(g / max(1, n - 1)), label=f"gen {g + 1}" if g in (0, n - 1) else None)
        if doc.get("kept_whole"):  # nothing was searched: say why instead of an empty axis
            ax.text(0.5, 0.5, "kept whole:\nnothing to search", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{doc['tag']}: {doc['evaluations']} evaluations")
        ax.set_xlabel("cost fraction kept")
        ax.set_ylabel("selector error")
        if n:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return True


def plot_joint_front(summary: dict, path) -> bool:
    """The joint front of whole-network schemes from GPIR, the chosen scheme marked."""
    if not method_spec(summary["method"]).gpir:
        return _placeholder(path, f"{summary['method']} has no joint front (it does not rank sub-network candidates by GPIR)")

    doc = read_json(paths.JOINT_FRONT)
    xs = [p["reduction"] for p in doc["front"]]
    ys = [p["predicted_acc"] for p in doc["front"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(xs, ys, "o-", ms=3, label="joint front (predicted val acc)")
    ax.axvline(summary["target"]["reduction"], color="grey", ls="--", lw=0.8, label="target")
    ax.plot([summary["target"]["achieved"]], [summary["pruned"]["val_acc_before_finetune"]], "r*", ms=12, label="chosen (measured)")
    ax.set_xlabel(f"{doc['metric']} reduction")
    ax.set_ylabel("val accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return True


def register(params: Params, summary: dict) -> dict:
    """Log the finetuned model to MLflow and register it under `tracking.registered_model` with alias `candidate`."""
    model, meta = load_model(paths.PRUNED)
    size = meta["image_size"]
    example = torch.zeros(1, 3, size, size)
    info = mlflow.pytorch.log_model(
        model,
        name="pruned_model",
        input_example=example.numpy(),
        pip_requirements=[],
        registered_model_name=params.tracking.registered_model,
    )
    client = MlflowClient()
    name, version = params.tracking.registered_model, info.registered_model_version
    client.set_registered_model_alias(name, "candidate", version)
    for key in ("val_acc", "test_acc", "flops", "flops_reduction"):
        client.set_model_version_tag(name, version, key, str(summary["pruned"][key]))
    for key, value in trace_tags(params).items():
        client.set_model_version_tag(name, version, key.removeprefix("mlflow.source.git.").replace("emoprune.", ""), value)
    aliases = ["candidate"]
    if beats_champion(client, name, summary["pruned"]["val_acc"], summary["pruned"]["flops"]):
        client.set_registered_model_alias(name, "champion", version)
        aliases.append("champion")
    return {"name": name, "version": int(version), "aliases": aliases}


def beats_champion(client: MlflowClient, name: str, val_acc: float, flops: int) -> bool:
    """The first model is champion; later ones take the title with higher validation accuracy at no more FLOPs.

    Validation, not test: the test split only reports, it never chooses (choosing on it would make the
    champion's reported test accuracy an optimistic estimate)."""
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return True
    return val_acc > float(champ.tags.get("val_acc", "-1")) and flops <= int(float(champ.tags.get("flops", "inf")))


def run(params: Params) -> dict:
    with stage_run(params, "report", ()):
        summary = summarize()
        scheme = read_json(paths.SCHEME)
        plot_channels(scheme, paths.PLOTS / "channels.png")
        plot_fronts(paths.PLOTS / "fronts.png")
        plot_joint_front(summary, paths.PLOTS / "joint_front.png")
        write_accuracy_vs_flops(summary, paths.ACCURACY_VS_FLOPS)
        plots = [paths.PLOTS / name for name in ("channels.png", "fronts.png", "joint_front.png")]
        log_metrics_flat(summary)
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        mlflow.log_dict(summary, "summary.json")
        summary["registered"] = register(params, summary)
        reg = summary["registered"]
        print(f"report: registered model {reg['name']!r} version {reg['version']} ({', '.join(reg['aliases'])})", flush=True)
        atomic_json(summary, paths.SUMMARY)
        return summary
