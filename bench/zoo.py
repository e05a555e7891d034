"""The zoo: which torchvision classification models each method prunes, as a new user would try them (`pruning.prune`).

For every model and method: prune an untrained model (num_classes=10) to `--target` of its FLOPs on 64x64
random images labelled by the model itself, with a small search, then export the pruned model to ONNX and
run it in onnxruntime. This measures what the code can do with a network, not accuracy. Each model is one
unit, written to bench/results/zoo.json when it ends; a rerun skips the units already there with the
same settings, so it carries on where it stopped. docs/zoo.md renders the table.

    python bench/zoo.py                       # every model, emo-dir and global-magnitude
    python bench/zoo.py --models alexnet --methods emo-dir
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "results" / "zoo.json"
NOTES = REPO / "docs" / "zoo.md"
# One model (the smallest) of every torchvision 0.29 classification family.
MODELS = [
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "densenet121", "mnasnet0_5",
    "squeezenet1_0", "googlenet", "inception_v3", "convnext_tiny", "alexnet",
]
IMAGE_SIZE = {"inception_v3": 96}  # its stem needs at least 75 pixels
METHODS = ["emo-dir", "global-magnitude"]
SETTINGS = {"image_size": 64, "images": 64, "k": 3, "pop_size": 8, "generations": 3, "candidates": 4, "cache": 64,
            "selector_epochs": 1, "constrain_epochs": 1, "top_t": 4, "bn_samples": 32}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _digest(model: str, method: str, target: float) -> str:
    blob = json.dumps({"settings": SETTINGS, "size": IMAGE_SIZE.get(model), "unit": [model, method, target]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_unit(name: str, method: str, target: float) -> dict:
    import onnxruntime as ort
    import torchvision.models as tvm

    from pruning.api import prune
    from pruning.onnx_export import export_onnx

    s = SETTINGS
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = getattr(tvm, name)(num_classes=10, **kw).eval()
    size = IMAGE_SIZE.get(name, s["image_size"])
    x = torch.randn(s["images"], 3, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    row: dict = {"model": name, "method": method, "target": target, "image_size": size}
    start = time.perf_counter()
    try:
        result = prune(model, x[:1], loader, loader, target, method=method, k=s["k"], cache_train=s["cache"], cache_val=s["cache"],
                       selector_epochs=s["selector_epochs"], pop_size=s["pop_size"], generations=s["generations"],
                       candidates=s["candidates"], constrain_epochs=s["constrain_epochs"], top_t=s["top_t"], bn_samples=s["bn_samples"])
    except Exception as err:  # noqa: BLE001 -- the unit records whatever stops the method
        where = traceback.extract_tb(err.__traceback__)[-1]
        row.update(status="refused" if isinstance(err, ValueError) else "crashed", error=f"{type(err).__name__}: {str(err)[:600]}",
                   where=f"{Path(where.filename).name}:{where.lineno}", seconds=round(time.perf_counter() - start, 1))
        return row
    row.update(status="pruned", flops_reduction=round(result.flops_reduction, 4), params_reduction=round(result.params_reduction, 4),
               seconds=round(time.perf_counter() - start, 1), fallbacks=result.info.get("fallbacks", []))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(result.model, x[:1], path)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x[:4].numpy()})[0]
            with torch.no_grad():
                want = result.model(x[:4]).numpy()
        diff = float(abs(got - want).max())
        row.update(onnx="ok" if got.shape == (4, 10) and diff < 1e-3 else "differs", onnx_max_diff=diff)
    except Exception as err:  # noqa: BLE001
        row.update(onnx=f"failed: {type(err).__name__}: {str(err)[:300]}")
    return row


def render(results: dict) -> str:
    rows = sorted(results["units"].values(), key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99, r["method"]))
    lines = [
        "# The zoo: which torchvision models each method prunes",
        "",
        f"`python bench/zoo.py` (commit {', '.join(sorted({r['commit'][:8] for r in rows}))}): untrained models, 10 classes, "
        f"{SETTINGS['image_size']}x{SETTINGS['image_size']} random images labelled by the model itself, target "
        f"{rows[0]['target'] if rows else '-'} of the FLOPs, a small search (pop {SETTINGS['pop_size']}, {SETTINGS['generations']} "
        f"generations, {SETTINGS['candidates']} candidates per sub-network, K={SETTINGS['k']}). What the code can do with a network; "
        "no accuracy is measured. ONNX: exported, run in onnxruntime, largest absolute difference from PyTorch on 4 images "
        "(parity: below 1e-3). Times are wall seconds on 2 cores, not a benchmark of speed.",
        "",
        "| model | image | method | result | FLOPs removed | params removed | ONNX (max diff) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = r["status"] if r["status"] == "pruned" else f"{r['status']}: {r['error'][:330]} ({r['where']})"
        onnx = f"{r['onnx']} ({r['onnx_max_diff']:.1e})" if "onnx_max_diff" in r else r.get("onnx", "-")
        lines.append(f"| {r['model']} | {r['image_size']} | {r['method']} | {what.replace('|', '/')} | {r.get('flops_reduction', '-')} | "
                     f"{r.get('params_reduction', '-')} | {onnx} | {r['seconds']} |")
    pruned = {m: sum(r["status"] == "pruned" and abs(r["flops_reduction"] - r["target"]) <= 0.02 and r.get("onnx") == "ok"
                     for r in rows if r["method"] == m) for m in METHODS}
    total = {m: sum(r["method"] == m for r in rows) for m in METHODS}
    lines += ["", "Pruned to within 2 points of the target with ONNX parity: " + "; ".join(
        f"{m} {pruned[m]} of {total[m]}" for m in METHODS if total[m]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--target", type=float, default=0.5)
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"units": {}}
    results.update(settings=SETTINGS, machine={"platform": platform.platform(), "python": platform.python_version(),
                                               "torch": torch.__version__})
    for name in args.models:
        for method in args.methods:
            key, digest = f"{name}/{method}@{args.target}", _digest(name, method, args.target)
            if results["units"].get(key, {}).get("digest") == digest:
                print(f"{key}: done before", flush=True)
                continue
            row = run_unit(name, method, args.target)
            row.update(digest=digest, commit=_commit())
            print(json.dumps(row), flush=True)
            results["units"][key] = row
            OUT.write_text(json.dumps(results, indent=1) + "\n")  # the unit is done: a rerun skips it
            NOTES.write_text(render(results))
    NOTES.write_text(render(results))  # the table as this version renders it, when every unit was done before


if __name__ == "__main__":
    main()
