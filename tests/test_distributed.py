"""Calibration on a local Ray cluster equals the single-process result."""

from __future__ import annotations

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
