"""onnx-vbp bench: what it reports and writes (never how fast: no timed asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from graphs import BlockSpec, build_model, random_batch

from onnx_vbp.bench import make_inputs
from onnx_vbp.cli import main
from onnx_vbp.data import InputSpec, iter_batches, model_inputs


def test_bench_reports_both_models_and_the_mac_bound(tmp_path: Path, capsys) -> None:
    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=64)], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "b.npz", **random_batch(model, batch=32))
    assert main([str(tmp_path / "net.onnx"), str(tmp_path / "calib"), "--ratio", "0.5", "-q",
                 "-o", str(tmp_path / "small.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "net.onnx"), str(tmp_path / "small.onnx"), "--runs", "3", "--warmup", "1",
                 "--batch-size", "4", "--json", "--perf-test-data"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert result["mac_bound"] == report["macs_before"] / report["macs_after"]
    assert result["speedup"] == result["original"]["median_ms"] / result["pruned"]["median_ms"]
    assert result["inputs"] == {"x": [4, 6, 8]} and result["runs"] == 3
    assert all(result[m]["p90_ms"] >= result[m]["median_ms"] > 0 for m in ("original", "pruned"))
    (written,) = iter_batches(Path(result["perf_test_data"]), model_inputs(model))  # our own loader reads it back
    assert written["x"].shape == (4, 6, 8)


def test_inputs_random_or_from_data(tmp_path: Path) -> None:
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
             InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq"))]
    feed = make_inputs(specs, 3, 16, None)
    assert feed["input_ids"].shape == (3, 16) and feed["attention_mask"].all()
    np.savez(tmp_path / "d.npz", input_ids=np.arange(10).reshape(2, 5), attention_mask=np.ones((2, 5), np.int64))
    from_data = make_inputs(specs, 3, 16, tmp_path)
    assert from_data["input_ids"].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
