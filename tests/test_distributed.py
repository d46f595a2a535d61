"""Calibration on a local Ray cluster equals the single-process result."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import BlockSpec, build_model, random_batch

from onnx_vbp import PruneOptions
from onnx_vbp.cli import main
from onnx_vbp.distributed import calibrate_on_ray
from onnx_vbp.pipeline import prepare

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=24, act="silu", gated=True)], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    (tmp_path / "calib").mkdir()
    for s in range(5):
        np.savez(tmp_path / "calib" / f"{s}.npz", **random_batch(model, batch=4 + s, seed=s))
    return tmp_path


def test_ray_shards_merge_to_the_single_process_statistics(cluster, ws: Path) -> None:
    single = prepare(ws / "net.onnx", ws / "calib", PruneOptions(progress=False, min_samples=1))
    stats, samples = calibrate_on_ray(ws / "net.onnx", ws / "calib", 3, comoments=True)
    assert samples == single.samples == 4 + 5 + 6 + 7 + 8
    for name, expected in single.stats.items():
        assert stats[name].count == expected.count
        np.testing.assert_allclose(stats[name].mean, expected.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats[name].m2, expected.m2, rtol=1e-10, atol=1e-12)
        assert stats[name].comoment.shape == (expected.mean.size,) * 2


def test_cli_with_ray_prunes_like_one_process(cluster, ws: Path) -> None:
    for name, extra in (("local", []), ("ray", ["--ray", "2"])):
        assert (
            main(
                [
                    str(ws / "net.onnx"),
                    str(ws / "calib"),
                    "--ratio",
                    "0.4",
                    "-q",
                    "-o",
                    str(ws / f"{name}.onnx"),
                    "--report",
                    str(ws / f"{name}.json"),
                    *extra,
                ]
            )
            == 0
        )
    local, on_ray = (json.loads((ws / f"{n}.json").read_text()) for n in ("local", "ray"))
    assert on_ray["blocks"] == local["blocks"] and on_ray["calibration"]["samples"] == 30


def test_ray_gathers_second_moments_over_the_budget_in_rounds(cluster, ws: Path, monkeypatch, caplog) -> None:
    """Over the memory budget, each group of blocks gets its own round of Ray tasks, and the
    model is the one of a single round."""

    def prune(name: str) -> dict:
        argv = [str(ws / "net.onnx"), str(ws / "calib"), "--ratio", "0.4", "-q", "--ray", "2"]
        assert main([*argv, "-o", str(ws / f"{name}.onnx"), "--report", str(ws / f"{name}.json")]) == 0
        return json.loads((ws / f"{name}.json").read_text())

    one_round = prune("one-round")
    monkeypatch.setattr(importlib.import_module("onnx_vbp.calibrate"), "available_memory", lambda: 2 * 8 * 32**2)
    rounds = prune("rounds")  # the budget holds the 32-wide block, then the 24-wide one
    assert "calibrating in 2 rounds of Ray tasks" in caplog.text
    assert rounds["method"] == "obs" and rounds["blocks"] == one_round["blocks"]
    assert rounds["calibration"]["samples"] == 30
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(ws / "one-round.onnx").graph.initializer}
    for tensor in onnx.load(ws / "rounds.onnx").graph.initializer:
        np.testing.assert_allclose(onnx.numpy_helper.to_array(tensor), expected[tensor.name], rtol=1e-5, atol=1e-6)
