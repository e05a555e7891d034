"""The examples in the library's docstrings run as written (doctest); the examples that need a trained model
and data are marked illustrative in the docstrings instead of showing invented output."""
from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from pruning.models import build_model

RUNNABLE = ["pruning.divide", "pruning.exact", "pruning.knapsack", "pruning.selectors", "pruning.channels", "pruning.methods", "pruning.models", "pruning.distill"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_docstring_examples_run(name):
    torch.manual_seed(0)
    module = importlib.import_module(name)
    extra = {"torch": torch, "copy": __import__("copy"), "build_model": build_model, "model": build_model("resnet20", 10)}
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_no_docstring_shows_output_it_does_not_check():
    """Outside the modules above, docstrings hold no `>>>` prompts: their examples are illustrative blocks."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    runnable = {f"{n.replace('.', '/')}.py" for n in RUNNABLE}
    prompts = [str(p.relative_to(root)) for d in ("pruning", "tasks", "flows") for p in (root / d).glob("*.py")
               if ">>> " in p.read_text() and str(p.relative_to(root)) not in runnable]
    assert not prompts, prompts
