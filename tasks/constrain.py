"""Stage constrain: train the kept weights of front candidates of each sub-network under cross-network
feature constraints, k = 1..K in order (sub-network k learns from k-1's trained candidates)."""

from __future__ import annotations

import time

import mlflow
import torch
from torch import nn

from pruning.boundary import CandidateIO
from pruning.counting import counting
from pruning.emodir import CandidateChoice, ConstrainSettings, candidate_cost, candidate_module, constrain_subnetwork
from pruning.methods import method_spec
from pruning.search import Evaluation
from pruning.train import resolve_device
from tasks import paths
from tasks.common import Data, log_metrics_flat
from tasks.config import Params
from tasks.division import Division, load_division, load_feature, load_labels
from tasks.io import atomic_json, atomic_torch_save, read_json
from tasks.search import load_selector
from tasks.tracking import stage_run


def candidate_path(k: int, j: int):
    return paths.CANDIDATES / f"s{k}_c{j}.pt"


def load_candidate(division: Division, k: int, j: int) -> tuple[nn.Module, dict]:
    """Rebuild trained candidate j of sub-network k: prune a copy of S_k to its scheme (between its
    boundaries), load its weights; the metadata carries its CandidateIO as "io"."""
    blob = torch.load(candidate_path(k, j), map_location="cpu", weights_only=True)
    blob["io"] = CandidateIO.from_json(blob.get("io"))
    module = candidate_module(division.subnetworks[k - 1], blob["scheme"], blob["io"])
    module.load_state_dict(blob["state_dict"])
    return module.eval(), {key: v for key, v in blob.items() if key != "state_dict"}


def run(params: Params) -> dict:
    method = params.prune.method
    with stage_run(params, "constrain", ("constrain",)), counting() as images:
        paths.CANDIDATES.mkdir(parents=True, exist_ok=True)
        if not method_spec(method).candidates:
            out = {"method": method, "trained": 0, "note": f"{method} does not train sub-network candidates"}
            atomic_json(out, paths.CANDIDATES / "index.json")
            atomic_json(out, paths.metrics_file("constrain"))
            return out
        device = resolve_device(params.device)
        division = load_division(params)
        c = params.constrain
        start = time.perf_counter()
        ytr = load_labels("train")
        index: dict = {"method": method, "data": c.data, "subnetworks": []}
        previous: list[nn.Module] = []
        previous_ios: list[CandidateIO] = []
        train_features = [load_feature("train", k) for k in range(division.k + 1)]  # memory-mapped: read as used
        # constrain.data: stream feeds every epoch the whole augmented training set through the original network
        train_loader = Data(params).loader("train", train=True) if c.data == "stream" else None
        if train_loader is not None:
            index["streamed_batches_per_epoch"] = len(train_loader)
            print(f"constrain: features streamed from {len(train_loader)} training batches per epoch", flush=True)
        choice = CandidateChoice(c.candidates, params.prune.target, c.spread_outputs)
        for sub in division.subnetworks:
            k = sub.index
            front = read_json(paths.SEARCH / f"front_s{k}.json")
            archive = front.get("archive", front["members"])
            members = [Evaluation(tuple(m["genes"]), m["cost"], m["error"], 0, 0, m.get("inputs", 0), m.get("outputs", 0)) for m in archive]
            picked, notes = choice.next(members)
            if front.get("kept_whole"):
                notes = [f"nothing to train, kept whole: {front['kept_whole']}"]
            for note in notes:
                print(f"constrain s{k}: {note}", flush=True)
            chosen = [archive[i] for i in picked]
            ios = [CandidateIO.from_json(m.get("io")) for m in chosen]
            selector = load_selector(division, k)
            rows: list[dict] = []

            def keep(
                j: int, module: nn.Module, losses: dict[str, float], k: int = k, chosen: list = chosen, rows: list = rows, ios: list = ios
            ) -> None:
                member = chosen[j]
                sub = division.subnetworks[k - 1]
                flops, n_params = candidate_cost(sub, module, member["scheme"], ios[j], division.head if k == division.k else None)
                atomic_torch_save(
                    {
                        "scheme": member["scheme"],
                        "io": ios[j].to_json(),
                        "genes": member["genes"],
                        "flops": flops,
                        "params": n_params,
                        "search_error": member["error"],
                        "losses": losses,
                        "state_dict": {n: t.detach().cpu() for n, t in module.state_dict().items()},
                    },
                    candidate_path(k, j),
                )
                rows.append(
                    {
                        "candidate": j,
                        "flops": flops,
                        "params": n_params,
                        "cost": member["cost"],
                        "search_error": member["error"],
                        "inputs": ios[j].inputs,
                        "outputs": ios[j].outputs,
                        **losses,
                    }
                )
                mlflow.log_metrics(
                    {f"constrain.s{k}.feature_mse": losses["feature_mse"], f"constrain.s{k}.selector_ce": losses["selector_ce"]}, step=j
                )
                print(
                    f"constrain s{k}: candidate {j + 1}/{len(chosen)}  flops={flops:,}  mse={losses['feature_mse']:.4f}  "
                    f"ce={losses['selector_ce']:.4f}",
                    flush=True,
                )

            trained = constrain_subnetwork(
                sub,
                division.subnetworks,
                [m["scheme"] for m in chosen],
                train_features,
                ytr,
                selector,
                previous,
                ConstrainSettings(**c.model_dump()),
                seed=params.seed,
                device=device,
                on_trained=keep,
                train_loader=train_loader,
                ios=ios,
                previous_ios=previous_ios,
            )
            index["subnetworks"].append(
                {
                    "k": k,
                    "base_flops": sub.flops,
                    "base_params": sub.params,
                    "candidates": rows,
                    "notes": notes,
                    "kept_whole": front.get("kept_whole"),
                }
            )
            previous, previous_ios = trained, ios
        index["seconds"] = time.perf_counter() - start
        index["trained"] = sum(len(s["candidates"]) for s in index["subnetworks"])
        index.update(images.as_metrics())
        atomic_json(index, paths.CANDIDATES / "index.json")
        log_metrics_flat({"seconds": index["seconds"], "trained": index["trained"], **images.as_metrics()}, "constrain.")
        atomic_json(
            {"method": method, "data": c.data, "trained": index["trained"], "seconds": index["seconds"], **images.as_metrics()},
            paths.metrics_file("constrain"),
        )
        return index
