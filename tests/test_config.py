"""params.yaml validation: every bad value is named with what is allowed; the CLI exits non-zero."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tasks.config import ConfigError, load_params, parse_params
from tests.conftest import REPO


def test_params_yaml_holds_exactly_the_code_defaults():
    """params.yaml, tasks/config.py and pruning/emodir.py name one set of defaults: a change in one place fails here."""
    from tasks.config import Params

    p = load_params(REPO / "params.yaml")
    assert p.model_dump() == Params().model_dump()
    assert p.data.source == "digits" and p.prune.method == "emo-dir"


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        ({"prune": {"targte": 0.5}}, "prune.targte", "unknown key"),
        ({"prune": {"target": 1.5}}, "prune.target", "less than 1"),
        ({"prune": {"target": 0}}, "prune.target", "greater than 0"),
        ({"data": {"batch_size": "many"}}, "data.batch_size", "valid integer"),
        ({"data": {"source": "mnist"}}, "data.source", "'digits'"),
        ({"model": {"name": "resnet21"}}, "model.name", "resnet20"),
        ({"prune": {"method": "magic"}}, "prune.method", "emo-dir, whole-emo, uniform"),
        ({"search": {"encoding": "gray"}}, "search.encoding", "'levels'"),
        ({"divide": {"k": 0}}, "divide.k", "greater than or equal to 1"),
        ({"finetune": {"kd": "teacher"}}, "finetune.kd", "'none'"),
        ({"device": "tpu"}, "device", "auto, cpu, cuda"),
        ({"export": {"latency_batch_sizes": [1, 0]}}, "export.latency_batch_sizes", ">= 1"),
        ({"bogus_section": {}}, "bogus_section", "unknown key"),
        ({"prune": {"metric": "latency"}, "latency": {"precision": "int8"}}, "latency", "export.quantize int8, or latency.precision fp32"),
        ({"latency": {"precision": "fp16"}}, "latency.precision", "'fp32' or 'int8'"),
        ({"finetune": {"precision": "fp16"}}, "finetune.precision", "'auto', 'bf16' or 'fp32'"),
        ({"pretrain": {"epochs": True}}, "pretrain.epochs = True", "not a boolean"),
        ({"pretrain": {"lr": float("nan")}}, "pretrain.lr = nan", "finite number"),
        ({"constrain": {"lam": float("inf")}}, "constrain.lam = inf", "finite number"),
        ({"seed": 2**40}, "seed = 1099511627776", "less than or equal to 2147483647"),
        ({"resources": {"memory_budget_mb": 1}}, "resources.memory_budget_mb = 1", "greater than or equal to 16"),
    ],
)
def test_bad_values_name_key_and_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "p.yaml")
    msg = str(err.value)
    assert key in msg and allowed in msg, msg


def test_non_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_params([1, 2])
    bad = tmp_path / "params.yaml"
    bad.write_text("prune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    bad.write_bytes(b"prune:\n  target: 0.5\xff\n")
    with pytest.raises(ConfigError, match=r"not a UTF-8 text file \(byte 20: b'\\xff'\)"):
        load_params(bad)


def test_cli_rejects_bad_params_before_any_work(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prune"]["target"] = 1.2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "rank", "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "prune.target" in out.stderr and "1.2" in out.stderr
    assert not (tmp_path / "models").exists()


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0
    for command in ("stage", "run", "check", "scheme", "ui"):
        assert command in out.stdout


def test_one_stage_list_matches_dvc_yaml_and_the_cli():
    """tasks.paths.STAGES is the list the flows dispatch on and the CLI offers: it must be dvc.yaml's, in order,
    after `sources` (a fingerprint, not a Prefect flow: `emoprune sources`)."""
    from flows.cli import Stage
    from flows.stages import STAGES as DISPATCH
    from tasks.paths import STAGES

    assert list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == ["sources", *STAGES]
    assert list(DISPATCH) == list(STAGES) and [s.value for s in Stage] == list(STAGES)
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "prune"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "prune" in bad.stderr and "finetune" in bad.stderr, bad.stderr


def test_gpir_only_switches_on_for_another_method_are_named_as_ignored():
    from tasks.preflight import _Report, _unused_switches

    params = parse_params({"prune": {"method": "global-magnitude"}, "rank": {"prefer_capacity": True}})
    r = _Report()
    _unused_switches(r, params)
    assert r.notes == ["rank.prefer_capacity: on, but global-magnitude does not rank sub-network candidates by GPIR; ignored"]
    # the capacity window is read only by prefer_capacity: changed while it is off, it is named as ignored
    r = _Report()
    _unused_switches(r, parse_params({"prune": {"method": "emo-dir"}, "rank": {"capacity_window": 2.0}}))
    assert r.notes == ["rank.capacity_window = 2: read only with rank.prefer_capacity on, which is off; ignored"]
    r = _Report()
    _unused_switches(r, parse_params({"prune": {"method": "uniform"}, "rank": {"capacity_window": 2.0}}))
    assert r.notes == ["rank.capacity_window: on, but uniform does not rank sub-network candidates by GPIR; ignored"]
    for quiet in (
        parse_params({"prune": {"method": "emo-dir"}, "rank": {"prefer_capacity": True}, "constrain": {"spread_outputs": True}}),
        parse_params({"prune": {"method": "emo-dir"}, "rank": {"prefer_capacity": True, "capacity_window": 2.0}}),
        parse_params({"prune": {"method": "uniform"}}),
    ):
        r = _Report()
        _unused_switches(r, quiet)
        assert r.notes == []
