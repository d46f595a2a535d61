"""The README's Python examples run verbatim, from a folder laid out like the repository root."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from onnx_vbp import find_mlp_blocks

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_python_example_runs_verbatim(code: str, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models").symlink_to(ROOT / "models")  # the repository root, without writing into it
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    written = [p for p in tmp_path.iterdir() if p.suffix == ".onnx"]
    assert written, "the example writes a pruned model"
    (pruned,) = written
    original = find_mlp_blocks(onnx.load(ROOT / "models" / "demo_vit.onnx"))
    kept = find_mlp_blocks(onnx.load(pruned))
    assert sum(b.width for b in kept) == round(0.65 * sum(b.width for b in original))


def test_the_readme_has_python_examples() -> None:
    assert len(EXAMPLES) >= 2
