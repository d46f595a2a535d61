"""The embedded demo model: the README's first command, end to end, on the committed data."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from onnx_vbp import PruneOptions, find_mlp_blocks, prune_file

MODELS = Path(__file__).resolve().parents[1] / "models"
FACTS = json.loads((MODELS / "demo_vit.json").read_text())

# Measured on the committed eval subset at ratio 0.35 (global, mean): top-1 0.846 -> 0.8425.
# The threshold leaves room for ORT's float rounding across machines, not for a regression.
MIN_TOP1_AFTER = 0.83


def test_demo_is_the_documented_model() -> None:
    blocks = find_mlp_blocks(onnx.load(MODELS / "demo_vit.onnx"))
    assert [(b.activation, b.width) for b in blocks] == [("gelu", 512)] * 6


def test_pruning_the_demo_at_035_keeps_top1(tmp_path: Path) -> None:
    report = prune_file(MODELS / "demo_vit.onnx", MODELS / "calib", tmp_path / "demo.vbp.onnx",
                        PruneOptions(ratio=0.35, progress=False), eval_data=MODELS / "eval")
    evaluation = report["eval"]
    assert evaluation["samples"] == 2000
    assert abs(evaluation["top1_before"] - FACTS["test_top1_eval_subset"]) < 1e-3
    assert evaluation["top1_after"] >= MIN_TOP1_AFTER
    assert report["neurons_after"] == 3072 - int(0.35 * 3072)
    assert report["macs_after"] < 0.8 * report["macs_before"]
    assert report["file_bytes_after"] < report["file_bytes_before"]
