"""Ridge compensation: the regression of pruned neurons on kept ones, folded into fc2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from graphs import Builder, make_model, random_batch
from helpers import relative_change, run

from onnx_vbp import Stats, calibrate, find_mlp_blocks, rewrite
from onnx_vbp.cli import main
from onnx_vbp.records import Plan
from onnx_vbp.rewrite import compensation


def test_uncorrelated_pruned_neurons_reduce_to_the_mean_fold() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 3))
    covariance = np.diag(rng.random(6) + 0.5)  # Σ_kp = 0
    stats = Stats(100, rng.normal(size=6), np.diag(covariance) * 100, covariance * 100)
    keep, pruned = np.array([0, 2, 3, 5]), np.array([1, 4])
    new_rows, delta = compensation(weight, stats, keep, pruned, "ridge")
    np.testing.assert_allclose(new_rows, weight[keep])
    np.testing.assert_allclose(delta, weight[pruned].T @ stats.mean[pruned])
    assert compensation(weight, stats, keep, pruned, "mean")[0] is None


def test_streaming_comoments_equal_two_pass_covariance() -> None:
    rng = np.random.default_rng(1)
    data = 1e3 + rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5))
    stats = Stats.empty(5, comoment=True)
    for chunk in np.split(data, [1, 40, 41, 300]):
        stats = stats.merge(Stats.of(chunk, comoment=True))
    exact = np.cov(data, rowvar=False, bias=True)
    np.testing.assert_allclose(np.diag(stats.covariance), np.diag(exact), rtol=1e-10)  # m2: float64, exact
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(stats.covariance - exact) / scale) < 1e-5  # float32 products, summed in float64


def _duplicated_neurons_model() -> onnx.ModelProto:
    """fc1's neurons 8..15 copy neurons 0..7: a pruned copy is a linear function of a kept one."""
    rng = np.random.default_rng(2)
    half = rng.normal(size=(8, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    g = Builder()
    pre = g.op(
        "Add",
        [
            g.op("MatMul", ["x", g.const(np.concatenate([half, half], axis=1))], node_name="/mlp/fc1"),
            g.const(np.concatenate([bias, bias])),
        ],
    )
    fc2 = g.op(
        "MatMul", [g.op("Gelu", [pre]), g.const(rng.normal(size=(16, 8)).astype(np.float32))], node_name="/mlp/fc2"
    )
    model = make_model(g, ["batch", 5, 8], g.op("Add", [fc2, g.const(np.zeros(8, np.float32))]))
    model.opset_import[0].version = 20
    return model


def test_ridge_recovers_duplicated_neurons_that_the_mean_fold_cannot() -> None:
    model = _duplicated_neurons_model()
    blocks = find_mlp_blocks(model)
    batches = [random_batch(model, batch=16, seed=s) for s in range(4)]
    stats = calibrate(model, blocks, batches, comoments=True)
    plan = Plan({blocks[0].name: np.arange(8)})  # drop every copy
    feed = random_batch(model, batch=8, seed=99)  # held out
    (before,) = run(model, feed)
    ridge = rewrite(model, blocks, stats, plan, compensate="ridge", ridge_lambda=1e-9)
    mean = rewrite(model, blocks, stats, plan, compensate="mean")
    assert relative_change(before, run(ridge, feed)[0]) < 1e-4
    assert relative_change(before, run(mean, feed)[0]) > 0.1


def test_ridge_through_the_cli_beats_the_mean_fold(tmp_path: Path) -> None:
    model = _duplicated_neurons_model()
    onnx.save(model, tmp_path / "m.onnx")
    for folder, seeds in (("calib", (0, 1)), ("held_out", (7,))):
        (tmp_path / folder).mkdir()
        for s in seeds:
            np.savez(tmp_path / folder / f"{s}.npz", **random_batch(model, batch=16, seed=s))
    cosine = {}
    for method in ("mean", "ridge"):
        report_path = tmp_path / f"{method}.json"
        assert (
            main(
                [
                    str(tmp_path / "m.onnx"),
                    str(tmp_path / "calib"),
                    "--ratio",
                    "0.5",
                    "--compensate",
                    method,
                    "-q",
                    "-o",
                    str(tmp_path / f"{method}.onnx"),
                    "--eval",
                    str(tmp_path / "held_out"),
                    "--report",
                    str(report_path),
                ]
            )
            == 0
        )
        report = json.loads(report_path.read_text())
        assert report["compensate"] == method and report["ridge_lambda"] == 1e-3
        cosine[method] = report["eval"]["outputs"]["y"]["cosine"]
    assert cosine["ridge"] > cosine["mean"] + 0.01, cosine


def test_second_moments_over_budget_are_refused(monkeypatch) -> None:
    import importlib

    import pytest

    from onnx_vbp.stats import CalibrationError

    # the package exports the function calibrate(), which shadows the module of the same name
    calibrate_module = importlib.import_module("onnx_vbp.calibrate")

    model = _duplicated_neurons_model()
    blocks = find_mlp_blocks(model)
    monkeypatch.setattr(calibrate_module, "COMOMENT_BUDGET", 8 * 16 * 16 - 1)  # one byte short of 16 x 16
    with pytest.raises(CalibrationError, match="second moments need"):
        calibrate(model, blocks, [random_batch(model, batch=4)], comoments=True)
    assert calibrate(model, blocks, [random_batch(model, batch=4)])  # without second moments: fine
