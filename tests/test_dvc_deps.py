"""dvc.yaml declares every module a stage runs: DVC reruns a stage when any file it imports changes.

The import closure of each stage module (tasks/<stage>.py) is read statically from the source, function-level
imports included; flows/ (orchestration, which never changes a result) is left out on purpose."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tasks.paths import STAGES
from tests.conftest import REPO

PACKAGES = ("pruning", "tasks")


def _file(module: str) -> Path | None:
    for f in (REPO / f"{module.replace('.', '/')}.py", REPO / module.replace(".", "/") / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imports(f: Path, module: str) -> set[str]:
    package = module if f.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def import_closure(module: str) -> set[str]:
    """Repository-relative paths of every project file that importing `module` executes."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        if parts[0] not in PACKAGES:
            continue
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            name = ".".join(parts[:i])
            f = _file(name)
            if f is not None and name not in seen:
                seen[name] = f
                todo.extend(_imports(f, name))
    return {str(f.relative_to(REPO)) for f in seen.values()}


def _declared(deps: list[str], path: str) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_every_imported_module_is_a_dependency_of_its_stage(stage):
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    closure = import_closure(f"tasks.{stage}")
    assert f"tasks/{stage}.py" in closure and "pruning/emodir.py" in closure  # the reader found real imports
    missing = sorted(p for p in closure if not _declared(deps, p))
    assert not missing, f"stage {stage} imports {missing}, which dvc.yaml does not list in its deps"


def test_code_folders_ignore_bytecode():
    """`pruning` is a directory dependency: Python's bytecode caches inside it must not count as changes."""
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored


def test_the_sources_stage_is_light_and_declares_what_it_runs():
    """It runs on every repro: nothing of torch, Prefect or MLflow, and its one module is its dependency."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sources"]
    assert import_closure("tasks.sources") == {"tasks/__init__.py", "tasks/sources.py"}
    assert stage["deps"] == ["tasks/sources.py"] and stage["always_changed"] is True
    assert not any("torch" in n or "prefect" in n or "mlflow" in n for n in _imports(REPO / "tasks/sources.py", "tasks.sources"))
