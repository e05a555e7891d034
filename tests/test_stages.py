"""Each stage as a real Prefect flow on tiny settings, logging to a tmp SQLite MLflow store."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from flows.stages import STAGES, stage_flow
from pruning.channels import count_flops_params
from pruning.cpu import u8s8_saturates
from pruning.exact import TOLERANCE
from pruning.quantize import int8_format
from pruning.train import native_bf16
from tasks import paths
from tasks.checkpoints import load_model
from tasks.io import read_json
from tests.conftest import tiny_params, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    """A project folder where every stage has run once, in order, as Prefect flows."""
    root = tmp_path_factory.mktemp("project")
    params = tiny_params(root)
    params["export"].update(quantize="int8", calibration_images=40)  # the INT8 path too, on a few val images
    params_path = write_params(root / "params.yaml", params)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    parent_client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = parent_client.create_experiment("emoprune")
    parent = parent_client.create_run(exp, run_name="pipeline")
    mp.setenv("EMOPRUNE_PARENT_RUN_ID", parent.info.run_id)
    results = {name: stage_flow(name, str(params_path)) for name in STAGES}
    results["scheme.json"] = read_json(root / paths.SCHEME)  # as the first run left it (a later test ranks again)
    yield root, results, parent.info.run_id
    mp.undo()


def _test_accuracy(root, model) -> float:
    from pruning.train import evaluate
    from tasks.datasets import split_batches

    return evaluate(model, split_batches(root / paths.PREPARED, "test", 64), torch.device("cpu"))["acc"]


def _project_results(project) -> dict:
    return project[1]


def test_prepare_writes_splits(project):
    root, results, _ = project
    meta = read_json(root / paths.PREPARED / "meta.json")
    assert meta["counts"]["train"] == 150 and results["prepare"]["counts"] == meta["counts"]


def test_pretrain_writes_a_usable_base_model(project):
    root, results, _ = project
    model, meta = load_model(root / paths.BASE)
    assert meta["scheme"] is None and meta["model"] == "resnet20"
    out = results["pretrain"]
    assert out["epochs"] == 2
    assert out["test_acc"] == pytest.approx(_test_accuracy(root, model))  # the reported number is the saved model's
    assert out["flops"] == count_flops_params(model, torch.zeros(1, 3, 32, 32))[0]
    assert len((root / paths.history_file("pretrain")).read_text().splitlines()) == 3  # header + 2 epochs


def test_selectors_cache_features_and_score_them(project):
    root, results, _ = project
    out = results["selectors"]
    assert out["k"] == 3 and out["cached"] == {"train": 128, "val": 96}
    assert sum(s["flops"] for s in out["subnetworks"]) < results["pretrain"]["flops"]
    # the last selector is the model's own head: on the cached X_K it scores what the whole network scores
    assert out["subnetworks"][-1]["selector_val_acc"] == pytest.approx(results["scheme.json"]["info"]["val_cache_acc_base"])
    x1 = np.load(root / "artifacts/features/val_x1.npy", mmap_mode="r")
    assert x1.shape == (96, *out["subnetworks"][0]["out_shape"])


def test_search_writes_one_nondominated_front_per_subnetwork(project):
    root, results, _ = project
    out = results["search"]
    assert [r["tag"] for r in out["subnetworks"]] == ["s1", "s2", "s3"]
    for k in (1, 2, 3):
        doc = read_json(root / paths.SEARCH / f"front_s{k}.json")
        pts = [(m["cost"], m["error"]) for m in doc["members"]]
        assert pts and all(0 < c <= 1 for c, _ in pts)
        for a in pts:  # no member dominates another
            assert not any(b != a and b[0] <= a[0] and b[1] <= a[1] for b in pts)
        assert len(doc["history"]) == 2 and doc["history"][-1]["hypervolume"] > 0
        # the residual chains the sub-network reads and writes are genes at search.boundary_widths: none left out
        assert not doc["excluded_groups"]
        expected = [("0.0", None, 1)] if k == 1 else [("boundary_in", k - 1, None), ("0.conv2", None, k)]
        assert [(b["group"], b["reads"], b["writes"]) for b in doc["boundary_genes"]] == expected
        assert {(m["inputs"], m["io"]["inputs"]) for m in doc["archive"]} <= {(o, o) for o in range(3)}
    # the work done, in images: each evaluation re-estimates BatchNorm on search.calib_samples (64) cached train
    # images and scores every cached val image
    cached = results["selectors"]["cached"]
    for r in out["subnetworks"]:
        assert r["images_forwarded"] == r["evaluations"] * (min(64, cached["train"]) + cached["val"])
    assert out["images_forwarded"] == sum(r["images_forwarded"] for r in out["subnetworks"]) > 0


def test_constrain_trains_candidates_along_each_front(project):
    root, results, _ = project
    index = read_json(root / paths.CANDIDATES / "index.json")
    assert [s["k"] for s in index["subnetworks"]] == [1, 2, 3]
    assert all(1 <= len(s["candidates"]) <= 2 for s in index["subnetworks"])  # fewer when a front holds fewer
    assert all(np.isfinite(c["feature_mse"]) for s in index["subnetworks"] for c in s["candidates"])
    # one epoch (constrain.epochs) per candidate over the cached training features
    trained = sum(len(s["candidates"]) for s in index["subnetworks"]) * results["selectors"]["cached"]["train"]
    assert index["images_trained"] == results["constrain"]["images_trained"] == trained


def test_rank_meets_the_target_and_the_model_has_the_predicted_flops(project):
    root, results, _ = project
    out = results["rank"]
    # GPIR's trained scheme was given channels back (with the base's weights) down to the target
    assert 0.5 <= out["flops_reduction"] <= 0.5 + TOLERANCE and out["target_gap"] <= TOLERANCE
    pruned, meta = load_model(root / paths.PRUNED_INIT)
    flops = count_flops_params(pruned, torch.zeros(1, 3, 32, 32))[0]
    assert flops == out["flops"]
    scheme = read_json(root / paths.SCHEME)
    assert scheme["keep"] == meta["scheme"]
    # GPIR's prediction is exact for FLOPs: it is what its merged scheme removed before channels were given back
    info = scheme["info"]
    assert info["predicted_saving"] / out["base_flops"] == pytest.approx(info["reduction_before_fill"], abs=1e-12)
    assert info["channels_filled_back"] > 0 or flops == out["base_flops"] - info["predicted_saving"]
    front = read_json(root / paths.JOINT_FRONT)["front"]
    assert front == sorted(front, key=lambda p: p["reduction"])


def test_rank_leaves_batchnorm_statistics_of_the_pruned_structure(project):
    """Whatever the method, the saved model's BatchNorm statistics are the ones re-estimated on the train images
    (the seeded, shuffled train loader's first `rank.bn_samples`): estimating them again gives the same numbers."""
    import copy

    from pruning.emodir import reestimate_bn
    from tasks.datasets import split_batches

    root, results, _ = project
    params = tiny_params(root)
    assert results["rank"]["bn_samples"] == 150 == params["data"]["limit_train"]  # all of them: fewer than 2048
    pruned, _ = load_model(root / paths.PRUNED_INIT)
    again = copy.deepcopy(pruned)
    loader = split_batches(root / paths.PREPARED, "train", params["data"]["batch_size"], train=True, seed=params["seed"])
    assert reestimate_bn(again, loader, params["rank"]["bn_samples"], "cpu") == 150
    saved, fresh = pruned.state_dict(), again.state_dict()
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(saved[k], fresh[k], atol=1e-5) for k in stats)


def test_finetune_and_export(project):
    root, results, _ = project
    pruned, _ = load_model(root / paths.PRUNED)
    assert results["finetune"]["test_acc"] == pytest.approx(_test_accuracy(root, pruned))
    # finetune.channels_last auto: NHWC only if every pruned convolution keeps whole 16-channel blocks
    whole = all(m.out_channels % 16 == 0 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
    assert results["finetune"]["layout"] == ("channels_last" if whole else "contiguous")
    # finetune.precision auto: bf16 autocast only where the CPU has bfloat16 natively, and the metrics say which ran
    assert results["finetune"]["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    onnx = results["export"]
    assert onnx["top1_agreement"] >= 0.999 and onnx["max_abs_diff"] < 1e-3
    assert onnx["latency_ms_base_b8"] > 0 and onnx["latency_ms_pruned_b8"] > 0
    assert (root / paths.PRUNED_ONNX).stat().st_size < (root / paths.BASE_ONNX).stat().st_size
    # export.quantize: int8: calibrated on the asked val images, measured on the test split against FP32
    int8 = root / paths.INT8 / "pruned.onnx"
    assert onnx["quantize"] == "int8" and onnx["int8_calibration_images"] == 40 and int8.is_file()
    assert onnx["int8_format"] == int8_format(u8s8_saturates())  # 7-bit weights on an x86 CPU without VNNI
    assert onnx["int8_size_bytes"] == int8.stat().st_size < 0.5 * onnx["fp32_size_bytes"]
    assert onnx["fp32_onnx_test_acc"] == pytest.approx(results["finetune"]["test_acc"], abs=0.01)
    assert onnx["int8_drop_points"] == pytest.approx(100 * (onnx["fp32_onnx_test_acc"] - onnx["int8_test_acc"]))
    assert onnx["int8_top1_agreement"] >= 0.9 and onnx["int8_latency_ms_b8"] > 0


def test_summary_has_the_promised_keys(project):
    root, _, _ = project
    summary = json.loads((root / paths.SUMMARY).read_text())
    assert {"test_acc", "flops", "params"} <= summary["base"].keys()
    assert {"test_acc", "flops", "params", "flops_reduction", "params_reduction"} <= summary["pruned"].keys()
    assert {"max_abs_diff", "top1_agreement", "latency_ms_base", "latency_ms_pruned"} <= summary["onnx"].keys()
    assert summary["base"]["test_acc"] == _project_results(project)["pretrain"]["test_acc"]
    assert summary["pruned"]["test_acc"] == _project_results(project)["finetune"]["test_acc"]
    assert summary["pruned"]["flops"] < summary["base"]["flops"]
    assert (root / paths.PLOTS / "channels.png").stat().st_size > 1000


def test_mlflow_holds_nested_stage_runs_and_the_registered_model(project):
    root, _, parent_id = project
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("emoprune")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in runs) == sorted(STAGES)
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    assert pretrain.data.params["pretrain.epochs"] == "2"
    assert len(client.get_metric_history(pretrain.info.run_id, "pretrain.val_acc")) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    version = client.get_model_version_by_alias("emoprune", "candidate")
    assert float(version.tags["flops_reduction"]) >= 0.5
    assert client.get_model_version_by_alias("emoprune", "champion").version == version.version  # the first is champion
    artifacts = {a.path for r in runs for a in client.list_artifacts(r.info.run_id, "models")}
    assert {"models/base.pt", "models/pruned.pt", "models/pruned.onnx"} <= artifacts
    model = mlflow.pytorch.load_model("models:/emoprune@candidate")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_scheme_command_takes_a_second_target_without_searching(project):
    from typer.testing import CliRunner

    from flows.cli import app

    root, results, _ = project
    search_before = (root / paths.SEARCH / "front_s1.json").read_bytes()
    out = CliRunner().invoke(app, ["scheme", "--target", "0.6", "--params", str(root / "params.yaml")])
    assert out.exit_code == 0, out.output
    doc = read_json(root / "artifacts/schemes/target-0.6.json")
    assert doc["flops"]["reduction"] >= 0.6 and doc["target"]["reduction"] == 0.6
    model, meta = load_model(root / "models/pruned_init-target-0.6.pt")
    assert count_flops_params(model, torch.zeros(1, 3, 32, 32))[0] == doc["flops"]["pruned"]
    assert (root / paths.SEARCH / "front_s1.json").read_bytes() == search_before  # no new search
    assert read_json(root / paths.SCHEME)["target"]["reduction"] == 0.5  # the pipeline's own outputs are untouched
    bad = CliRunner().invoke(app, ["scheme", "--target", "1.5", "--params", str(root / "params.yaml")])
    assert bad.exit_code == 2 and "1.5" in bad.output


def test_compare_lists_runs_at_two_targets_and_champion_follows_the_rules(project):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.config import load_params

    root, results, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["target"] = 0.6
    second = write_params(root / "params-0.6.yaml", params)
    for name in ("rank", "finetune", "export", "report"):
        stage_flow(name, str(second))
    out = CliRunner().invoke(app, ["compare", "--last", "5", "--params", str(second)])
    assert out.exit_code == 0, out.output
    lines = [ln for ln in out.output.splitlines() if "emo-dir" in ln]
    assert len(lines) == 2 and "0.6" in lines[0] and "0.5" in lines[1]  # newest first
    client = MlflowClient(tracking_uri=load_params(second).tracking.uri)
    champion = client.get_model_version_by_alias("emoprune", "champion")
    candidate = client.get_model_version_by_alias("emoprune", "candidate")
    assert str(candidate.version) == "2"
    first_acc = results["finetune"]["val_acc"]
    second_acc = float(candidate.tags["val_acc"])
    # fewer FLOPs at 0.6, so the second run takes the title exactly when it is more accurate on val (never test)
    assert str(champion.version) == ("2" if second_acc > first_acc else "1")


def test_the_python_api_finds_the_pipelines_scheme(project):
    """One EMO-DIR: `prune()` on the pipeline's base model, fed the images the selectors stage cached (same
    subsets, same order) and the same settings, chooses exactly the scheme the stages chose."""
    from torch.utils.data import Subset

    from pruning import prune
    from tasks.config import load_params
    from tasks.datasets import load_split, make_loader

    root, _, _ = project
    p = load_params(root / "params.yaml")
    base, _ = load_model(root / paths.BASE)

    def cached(split: str, n: int):  # what tasks/selectors.py:_cache feeds the division
        ds = load_split(root / paths.PREPARED, split, train=False)
        idx = np.sort(np.random.default_rng(p.seed).permutation(len(ds))[: min(n, len(ds))])
        return make_loader(Subset(ds, idx.tolist()), p.data.batch_size, shuffle=False)

    s, c = p.search, p.constrain
    result = prune(base, torch.zeros(1, 3, 32, 32), cached("train", p.divide.cache_train), cached("val", p.divide.cache_val),
                   p.prune.target, method="emo-dir", metric=p.prune.metric, k=p.divide.k, cache_train=p.divide.cache_train,
                   cache_val=p.divide.cache_val, selector_epochs=p.selectors.epochs, selector_lr=p.selectors.lr,
                   pop_size=s.pop_size, generations=s.generations, levels=s.levels, round_to=p.prune.round_to, encoding=s.encoding,
                   calib_samples=s.calib_samples, candidates=c.candidates, constrain_epochs=c.epochs, constrain_lr=c.lr, lam=c.lam,
                   top_t=p.rank.top_t, max_overshoot=p.rank.max_overshoot, seed=p.seed, device="cpu")
    assert result.scheme == project[1]["scheme.json"]["keep"]
    assert result.flops == project[1]["rank"]["flops"]


def test_constrain_streams_the_whole_training_set_when_asked(project):
    """constrain.data: stream, through the real stage: every epoch is a pass over the 150 training images
    (3 batches of 64), not the 128 cached features; the candidates are still written and indexed."""
    root, _, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["constrain"]["data"] = "stream"
    path = write_params(root / "stream.yaml", params)
    cached = [c["feature_mse"] for s in read_json(root / paths.CANDIDATES / "index.json")["subnetworks"] for c in s["candidates"]]
    out = stage_flow("constrain", str(path))
    index = read_json(root / paths.CANDIDATES / "index.json")
    assert index["data"] == "stream" and index["streamed_batches_per_epoch"] == 3
    streamed = [c["feature_mse"] for s in index["subnetworks"] for c in s["candidates"]]
    assert len(streamed) == len(cached) and all(a != b for a, b in zip(streamed, cached))  # trained on other data
    assert out["trained"] == sum(len(s["candidates"]) for s in index["subnetworks"]) > 0
