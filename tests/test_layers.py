"""The architecture, checked: a foundation that imports no stage, stages that import the
foundation and not each other (README, "Code layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_vbp"
FOUNDATION = {"errors", "options", "records", "stats", "runtime", "data", "graph", "nbits", "gs_internals", "modelio"}
# the pipeline's stages, and the one other stage each may call
STAGES = {
    "activations": set(),
    "find": {"activations"},  # the activation patterns are find's own table
    "instrument": set(),
    "calibrate": {"instrument"},  # calibration runs the instrumented model
    "importance": set(),
    "select": set(),
    "rewrite": set(),
    "reconstruct": {"calibrate"},  # its positions are calibration's: real tokens, not padding
    "report": set(),
}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_vbp."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("onnx_vbp.")}
    return found


def test_every_module_is_in_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    top = {"pipeline", "cli", "sweep", "evaluate", "bench", "distributed"}
    assert modules == FOUNDATION | set(STAGES) | top


@pytest.mark.parametrize("module", sorted(FOUNDATION))
def test_foundation_imports_no_stage(module: str) -> None:
    assert _imports(module) <= FOUNDATION, f"{module} imports {sorted(_imports(module) - FOUNDATION)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stages_import_the_foundation_not_each_other(stage: str) -> None:
    allowed = FOUNDATION | STAGES[stage]
    assert _imports(stage) <= allowed, f"{stage} imports {sorted(_imports(stage) - allowed)}"
