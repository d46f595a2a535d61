"""`--reconstruct`: each pruned block's kept fc1 and fc2 refit to the original block's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import BlockSpec, build_model, quantize_static_int8, random_batch
from helpers import run
from onnx import helper, numpy_helper

from onnx_vbp import find_mlp_blocks, reconstruct
from onnx_vbp.cli import main
from onnx_vbp.graph import ConstantReader
from onnx_vbp.reconstruct import (
    ACTIVATIONS,
    NORM_EPSILON,
    POSITIONS_MEMORY,
    POSITIONS_MEMORY_SHARE,
    _Loss,
    fit_block,
    gather_positions,
    positions_budget,
)
from onnx_vbp.records import BlockPositions, BlockWeights, Refit
from onnx_vbp.rewrite import refit_weights


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activation_slopes_are_the_derivatives(kind: str) -> None:
    a = np.linspace(-4.0, 4.0, 801) + 0.0013  # off relu's kink
    step = 1e-5
    value, slope = ACTIVATIONS[kind](a)
    numeric = (ACTIVATIONS[kind](a + step)[0] - ACTIVATIONS[kind](a - step)[0]) / (2 * step)
    np.testing.assert_allclose(slope, numeric, atol=1e-6)
    assert value.shape == a.shape


def _gelu_block(rng: np.random.Generator, positions: int, dim: int = 16, width: int = 64):
    """A GELU block's weights and its outputs on Gaussian inputs; samples of 10 positions each."""
    x = rng.normal(size=(positions, dim)).astype(np.float32)
    fc1 = (rng.normal(size=(dim, width)) / np.sqrt(dim)).astype(np.float32)
    fc1_bias = (0.3 * rng.normal(size=width)).astype(np.float32)
    fc2 = (rng.normal(size=(width, dim)) / np.sqrt(width)).astype(np.float32)
    y = (ACTIVATIONS["gelu"](x @ fc1 + fc1_bias)[0] @ fc2).astype(np.float32)
    return BlockPositions(x, y, np.arange(positions) // 10), BlockWeights(fc1, fc1_bias, fc2)


def test_fit_lowers_the_held_out_error_of_a_pruned_block() -> None:
    positions, full = _gelu_block(np.random.default_rng(0), 20_000)
    keep = np.arange(24)  # the rest dropped outright: what remains is far from y
    kept = BlockWeights(full.fc1[:, keep], full.fc1_bias[keep], full.fc2[keep])
    refit = fit_block(kept, positions, "gelu")
    assert refit.weights is not None and refit.step > 0
    assert refit.held_error_after < 0.7 * refit.held_error_before
    assert refit.weights.fc1.shape == kept.fc1.shape and refit.weights.fc2.shape == kept.fc2.shape
    again = fit_block(kept, positions, "gelu")  # seeded: the same refit
    np.testing.assert_array_equal(again.weights.fc2, refit.weights.fc2)


def test_a_fit_that_only_learns_its_samples_is_not_kept() -> None:
    rng = np.random.default_rng(1)
    positions, full = _gelu_block(rng, 2_000)
    positions.outputs = rng.normal(size=positions.outputs.shape).astype(np.float32)  # nothing to learn
    no_fc2 = BlockWeights(full.fc1, full.fc1_bias, np.zeros_like(full.fc2))
    refit = fit_block(no_fc2, positions, "gelu")
    assert refit.weights is None and refit.step == 0 and "held-out" in refit.reason
    assert not np.any(refit.fc2_bias_delta)


def test_too_few_samples_to_hold_out_are_not_fitted() -> None:
    positions, full = _gelu_block(np.random.default_rng(2), 150)  # samples 0..14: one held out
    refit = fit_block(full, positions, "gelu")
    assert refit.weights is None and "too few" in refit.reason


LAYOUTS = [
    BlockSpec(),
    BlockSpec(fc="gemm_transb", act="relu"),
    BlockSpec(store="transposed", act="gelu_tanh_pow"),
    BlockSpec(store="fp16", act="silu"),
    BlockSpec(fc2_bias="none"),
    BlockSpec(act="ms_biasgelu"),
    BlockSpec(fc2_bias="skip_layernorm"),
]


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: f"{s.fc}-{s.store}-{s.act}-{s.fc2_bias}")
def test_refit_weights_writes_what_the_fit_returns(spec: BlockSpec) -> None:
    model = build_model([spec], residual=False)
    feed = random_batch(model)
    rng = np.random.default_rng(3)
    offered, written = {}, {}

    def fit(block, weights: BlockWeights) -> Refit:
        offered[block.name] = weights
        new = BlockWeights(
            weights.fc1 * rng.uniform(0.5, 1.5, weights.fc1.shape),
            None if weights.fc1_bias is None else weights.fc1_bias + 0.1,
            weights.fc2 * rng.uniform(0.5, 1.5, weights.fc2.shape),
        )
        written[block.name] = new
        return Refit(new, np.full(weights.fc2.shape[1], 0.25), 1.0, 0.5, 10)

    refit_model, outcomes = refit_weights(model, find_mlp_blocks(model), fit)
    onnx.checker.check_model(refit_model)
    assert all(isinstance(o, Refit) for o in outcomes.values()) and len(outcomes) == 1
    seen = {}

    def record(block, weights: BlockWeights) -> Refit:
        seen[block.name] = weights
        return Refit(None, np.zeros(weights.fc2.shape[1]), 1.0, 1.0, 0, "only looking")

    refit_weights(refit_model, find_mlp_blocks(refit_model), record)
    tolerance = 2e-3 if spec.store == "fp16" else 1e-6
    for name, new in written.items():
        np.testing.assert_allclose(seen[name].fc1, new.fc1, rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(seen[name].fc2, new.fc2, rtol=tolerance, atol=tolerance)
        if new.fc1_bias is not None:
            np.testing.assert_allclose(seen[name].fc1_bias, new.fc1_bias, rtol=tolerance, atol=tolerance)
    if spec.fc2_bias != "skip_layernorm":  # the block's output is the model's: check it numerically
        (before,), (after,) = run(model, feed), run(refit_model, feed)
        (old,), (new,) = offered.values(), written.values()
        act = ACTIVATIONS[find_mlp_blocks(model)[0].activation]
        x = feed["x"].reshape(-1, old.fc1.shape[0]).astype(np.float64)
        b1_old = 0.0 if old.fc1_bias is None else old.fc1_bias
        b1_new = 0.0 if new.fc1_bias is None else new.fc1_bias
        change = act(x @ new.fc1 + b1_new)[0] @ new.fc2 - act(x @ old.fc1 + b1_old)[0] @ old.fc2 + 0.25
        atol = 2e-2 if spec.store == "fp16" else 1e-4
        np.testing.assert_allclose((after - before).reshape(change.shape), change, atol=atol)


def test_quantized_weights_are_not_refit(tmp_path: Path) -> None:
    model = build_model([BlockSpec(hidden=32)], dim=16, residual=False)
    onnx.save(model, tmp_path / "net.onnx")
    quantize_static_int8(tmp_path / "net.onnx", tmp_path / "int8.onnx", model)
    int8 = onnx.load(tmp_path / "int8.onnx")
    blocks = find_mlp_blocks(int8)
    assert blocks
    _, outcomes = refit_weights(int8, blocks, lambda b, w: pytest.fail("offered quantized weights"))
    assert all("quantized" in outcome for outcome in outcomes.values()), outcomes


def test_quantized_blocks_are_declined_before_the_data_pass(tmp_path: Path, caplog) -> None:
    model = build_model([BlockSpec(hidden=32)], dim=16, residual=False)
    onnx.save(model, tmp_path / "net.onnx")
    quantize_static_int8(tmp_path / "net.onnx", tmp_path / "int8.onnx", model)
    _write_batches(tmp_path / "calib", model, range(2))
    argv = [str(tmp_path / "int8.onnx"), str(tmp_path / "calib"), "--ratio", "0.5", "-o", str(tmp_path / "out.onnx")]
    caplog.set_level("INFO")
    assert main([*argv, "--reconstruct", "--report", str(tmp_path / "r.json")]) == 0
    assert "is not refit: its weights are quantized" in caplog.text
    assert "gathered" not in caplog.text  # no pass over the data for nothing to refit
    (row,) = json.loads((tmp_path / "r.json").read_text())["reconstruct"]  # the report still says why
    assert row["refit"] is False and "quantized" in row["reason"]
    assert find_mlp_blocks(onnx.load(tmp_path / "out.onnx"))[0].width == 16  # pruned, as without the option


def _write_batches(folder: Path, model: onnx.ModelProto, seeds: range) -> None:
    folder.mkdir()
    for seed in seeds:
        np.savez(folder / f"{seed}.npz", **random_batch(model, batch=32, seed=seed))


@pytest.mark.parametrize("layernorm", [False, True], ids=["plain-loss", "normalized-loss"])
def test_reconstruct_through_the_cli_beats_the_rewrite_on_held_out_data(tmp_path: Path, layernorm: bool) -> None:
    # pre-LN: block 0's error is weighed as block 1's LayerNorm sees it, block 1's plainly
    specs = [BlockSpec(hidden=48), BlockSpec(hidden=48, act="relu")]
    model = build_model(specs, dim=16, seq=5, layernorm=layernorm)
    onnx.save(model, tmp_path / "m.onnx")
    _write_batches(tmp_path / "calib", model, range(8))
    held_out = random_batch(model, batch=64, seed=99)
    (reference,) = run(model, held_out)
    errors = {}
    for name, extra in (("ridge", []), ("refit", ["--reconstruct"])):
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        argv = [str(tmp_path / "m.onnx"), str(tmp_path / "calib"), "--ratio", "0.5", "-q", "-o", str(out)]
        assert main([*argv, "--report", str(report), *extra]) == 0
        (pruned,) = run(onnx.load(out), held_out)
        errors[name] = float(np.linalg.norm(pruned - reference) / np.linalg.norm(reference))
        rows = json.loads(report.read_text()).get("reconstruct")
        if extra:
            assert [row["refit"] for row in rows] == [True, True], rows
            assert [row["loss"] for row in rows] == (["normalized", "plain"] if layernorm else ["plain", "plain"])
            assert all(row["held_error_after"] < row["held_error_before"] for row in rows)
        else:
            assert rows is None
    assert errors["refit"] < 0.92 * errors["ridge"], errors  # 0.87 when written


def test_report_lists_every_pruned_block_in_order_with_why_not(tmp_path: Path) -> None:
    model = build_model([BlockSpec(hidden=32, gated=True), BlockSpec(hidden=32)], dim=16, seq=5)
    onnx.save(model, tmp_path / "m.onnx")
    _write_batches(tmp_path / "calib", model, range(4))
    argv = [str(tmp_path / "m.onnx"), str(tmp_path / "calib"), "--ratio", "0.5", "-q", "-o", str(tmp_path / "o.onnx")]
    assert main([*argv, "--scope", "per-block", "--reconstruct", "--report", str(tmp_path / "r.json")]) == 0
    gated, plain = json.loads((tmp_path / "r.json").read_text())["reconstruct"]
    names = [block.name for block in find_mlp_blocks(model)]
    assert [gated["block"], plain["block"]] == names
    assert gated == {"block": names[0], "refit": False, "reason": "gated blocks are not refit"}
    assert plain["held_error_before"] is not None  # offered to the fit


def test_reconstruct_from_saved_statistics_alone_prunes_without_refitting(tmp_path: Path, caplog) -> None:
    model = build_model([BlockSpec(hidden=32)], dim=16)
    onnx.save(model, tmp_path / "m.onnx")
    _write_batches(tmp_path / "calib", model, range(2))
    stats, report = tmp_path / "s.npz", tmp_path / "r.json"
    first = [str(tmp_path / "m.onnx"), str(tmp_path / "calib"), "-q", "-o", str(tmp_path / "a.onnx")]
    assert main([*first, "--save-stats", str(stats)]) == 0
    argv = [str(tmp_path / "m.onnx"), "--stats", str(stats), "--reconstruct", "-o", str(tmp_path / "b.onnx")]
    assert main([*argv, "--report", str(report)]) == 0
    assert "reconstruct" not in json.loads(report.read_text())
    assert "--reconstruct needs the calibration data" in caplog.text


def test_gathered_positions_stay_within_memory_and_span_the_data() -> None:
    model = build_model([BlockSpec(hidden=16)], dim=8, seq=5, residual=False)
    batches = [random_batch(model, batch=8, seed=s) for s in range(10)]  # 80 samples of 5 positions
    blocks = find_mlp_blocks(model)
    row_bytes = 4 * (8 + 8)  # fc1's input and fc2's output, float32
    (positions,) = gather_positions(model, blocks, batches, 80, memory=100 * row_bytes).values()
    assert 90 <= positions.sample.size <= 100  # every 4th position of 400
    assert positions.sample.min() == 0 and positions.sample.max() >= 75  # spread over all the data
    np.testing.assert_array_equal(positions.sample, np.sort(positions.sample))
    first = batches[0]["x"].reshape(-1, 8)
    np.testing.assert_array_equal(positions.inputs[:2], first[[0, 4]])
    assert positions.outputs.shape == positions.inputs.shape
    assert gather_positions(model, [], batches, 80) == {}  # nothing to gather: no pass, no division by 0


def test_gathered_positions_stay_within_a_share_of_the_memory_available(monkeypatch) -> None:
    model = build_model([BlockSpec(hidden=16)], dim=8, seq=5, residual=False)
    batches = [random_batch(model, batch=8, seed=s) for s in range(10)]  # 400 positions
    row_bytes = 4 * (8 + 8)
    monkeypatch.setattr(reconstruct, "available_memory", lambda: int(100 * row_bytes / POSITIONS_MEMORY_SHARE))
    (positions,) = gather_positions(model, find_mlp_blocks(model), batches, 80).values()
    assert 90 <= positions.sample.size <= 100
    monkeypatch.setattr(reconstruct, "available_memory", lambda: None)  # unknown: the fixed budget
    assert positions_budget() == POSITIONS_MEMORY
    monkeypatch.setattr(reconstruct, "available_memory", lambda: 1 << 40)
    assert positions_budget() == POSITIONS_MEMORY


def test_a_positions_budget_held_down_by_the_memory_available_is_said(tmp_path: Path, monkeypatch, caplog) -> None:
    model = build_model([BlockSpec(hidden=32)], dim=16, seq=5)
    onnx.save(model, tmp_path / "m.onnx")
    _write_batches(tmp_path / "calib", model, range(4))
    argv = [str(tmp_path / "m.onnx"), str(tmp_path / "calib"), "--reconstruct", "-q", "-o", str(tmp_path / "o.onnx")]
    monkeypatch.setattr(reconstruct, "available_memory", lambda: 1 << 34)  # room for the full budget
    assert main(argv) == 0
    assert "held to" not in caplog.text
    monkeypatch.setattr(reconstruct, "available_memory", lambda: 1 << 28)
    assert main([*argv[:-1], str(tmp_path / "p.onnx")]) == 0
    assert "positions gathered for the fit are held to 64 MiB" in caplog.text


def test_blocks_on_different_grids_each_get_their_share_spread_over_the_data() -> None:
    # MLP-Mixer: the token-mixing block sees 8 rows (channels) per sample, the channel block 5
    model = build_model([BlockSpec(token_mixing=True, hidden=16), BlockSpec(hidden=16)], dim=8, seq=5)
    batches = [random_batch(model, batch=8, seed=s) for s in range(10)]  # 80 samples
    blocks = find_mlp_blocks(model)
    row_bytes = 4 * (5 + 5) + 4 * (8 + 8)
    gathered = gather_positions(model, blocks, batches, 80, memory=100 * row_bytes)
    for positions in gathered.values():
        assert 90 <= positions.sample.size <= 100, positions.sample.size
        assert positions.sample.min() == 0 and positions.sample.max() >= 75


def _layer_norm(z: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    centered = z - z.mean(axis=1, keepdims=True)
    return gamma * centered / np.sqrt(centered.var(axis=1, keepdims=True) + 1e-12)


def test_the_normalized_loss_is_what_the_layer_norm_sees_and_its_gradient() -> None:
    rng = np.random.default_rng(3)
    features = 256  # the loss leaves out one direction of the features': the change of the variance
    total = rng.normal(size=(50, features)) * rng.uniform(0.5, 20.0, size=(50, 1))  # unequal scales
    gamma, layer_scale = rng.uniform(0.1, 3.0, features), rng.uniform(0.2, 1.5, features)
    error = 1e-4 * rng.normal(size=(50, features))  # in fc2's output, before the layer scale
    seen = _layer_norm(total + layer_scale * error, gamma) - _layer_norm(total, gamma)
    loss = _Loss(gamma, layer_scale)
    value, half_gradient = loss.terms(error, 1.0 / total.var(axis=1))
    assert value == pytest.approx(np.sum(np.square(seen)), rel=2e-2)
    step, direction = 1e-6, rng.normal(size=error.shape)
    up, down = (loss.terms(error + s * step * direction, 1.0 / total.var(axis=1))[0] for s in (1, -1))
    assert (up - down) / 2 == pytest.approx(2 * step * np.sum(half_gradient * direction), rel=1e-6)
    plain = _Loss(None, None).terms(error, None)
    assert plain[0] == pytest.approx(np.sum(np.square(error))) and plain[1] is error


def _decompose_layer_norms(model: onnx.ModelProto, axis: int = -1) -> None:
    """Each LayerNormalization as torch writes it before opset 17 (reducing over `axis`)."""
    nodes = []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        z, gamma, beta = node.input
        p = node.name
        eps = numpy_helper.from_array(np.array(1e-6, np.float32), f"{p}/eps")
        two = numpy_helper.from_array(np.array(2.0, np.float32), f"{p}/two")
        model.graph.initializer.extend([eps, two])
        nodes += [
            helper.make_node("ReduceMean", [z], [f"{p}/m"], axes=[axis], name=f"{p}/ReduceMean"),
            helper.make_node("Sub", [z, f"{p}/m"], [f"{p}/d"], name=f"{p}/Sub"),
            helper.make_node("Pow", [f"{p}/d", f"{p}/two"], [f"{p}/d2"], name=f"{p}/Pow"),
            helper.make_node("ReduceMean", [f"{p}/d2"], [f"{p}/v"], axes=[axis], name=f"{p}/ReduceMean_1"),
            helper.make_node("Add", [f"{p}/v", f"{p}/eps"], [f"{p}/ve"], name=f"{p}/Add"),
            helper.make_node("Sqrt", [f"{p}/ve"], [f"{p}/s"], name=f"{p}/Sqrt"),
            helper.make_node("Div", [f"{p}/d", f"{p}/s"], [f"{p}/n"], name=f"{p}/Div"),
            helper.make_node("Mul", [f"{p}/n", gamma], [f"{p}/g"], name=f"{p}/Mul"),
            helper.make_node("Add", [f"{p}/g", beta], list(node.output), name=f"{p}/Add_1"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import[0].version = 17


def _gammas(model: onnx.ModelProto, rng: np.random.Generator) -> list[np.ndarray]:
    """Give every LayerNormalization a γ of its own, unequal values; returns them in order."""
    inits = {t.name: t for t in model.graph.initializer}
    gammas = []
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization"):
            name = node.input[1 if node.op_type == "LayerNormalization" else 2]
            gamma = rng.uniform(0.2, 2.0, numpy_helper.to_array(inits[name]).shape).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array(gamma, name))
            gammas.append(gamma)
    return gammas


@pytest.mark.parametrize("form", ["fused", "decomposed", "skip_layernorm"])
def test_the_layer_norm_after_each_block_is_found(form: str) -> None:
    fc2_bias = "skip_layernorm" if form == "skip_layernorm" else "add"
    model = build_model([BlockSpec(fc2_bias=fc2_bias), BlockSpec(fc2_bias=fc2_bias)], layernorm=True, opset=17)
    gammas = _gammas(model, np.random.default_rng(4))
    if form == "decomposed":
        _decompose_layer_norms(model)
    first, second = find_mlp_blocks(model)
    onnx.checker.check_model(model)
    reader = ConstantReader(model, None)
    scale = first.sites[0].norm_scale
    # pre-LN: block 0's sum is normalized by block 1's LayerNorm; the fused form by its own
    np.testing.assert_array_equal(reader.value(scale.node, scale.input).reshape(-1), gammas[1])
    assert (second.sites[0].norm_scale is None) == (form != "skip_layernorm")  # its sum is the output


def test_a_mean_over_another_axis_is_no_layer_norm() -> None:
    model = build_model([BlockSpec(), BlockSpec()], layernorm=True, opset=17)
    _decompose_layer_norms(model, axis=1)
    assert find_mlp_blocks(model)[0].sites[0].norm_scale is None


@pytest.mark.parametrize("fused", [False, True], ids=["add-layernorm", "skip_layernorm"])
def test_gathered_positions_carry_how_the_next_layer_norm_weighs_them(fused: bool) -> None:
    # the fused form normalizes its own sum, made inside it (output 3, absent from the model)
    specs = [BlockSpec(fc2_bias="skip_layernorm"), BlockSpec()] if fused else [BlockSpec(layer_scale=0.5), BlockSpec()]
    model = build_model(specs, dim=8, seq=5, layernorm=True)
    gammas = _gammas(model, np.random.default_rng(5))
    batches = [random_batch(model, batch=4, seed=s) for s in range(3)]
    blocks = find_mlp_blocks(model)
    first, second = gather_positions(model, blocks, batches, 12).values()
    assert second.position_weight is None and second.norm_scale is None  # nothing normalizes its sum
    np.testing.assert_array_equal(first.norm_scale, gammas[1])
    layer_scale = 1.0 if fused else 0.5
    if fused:
        assert first.output_scale is None
    else:
        np.testing.assert_array_equal(first.output_scale, np.full(8, layer_scale, np.float32))
    inputs = np.concatenate([b["x"] for b in batches]).reshape(-1, 8)
    bias_ref = blocks[0].sites[0].fc2_bias
    fc2_bias = ConstantReader(model, None).value(bias_ref.node, bias_ref.input)
    total = inputs + layer_scale * (first.outputs + fc2_bias)  # every position: the data fits the memory
    np.testing.assert_allclose(first.position_weight, 1.0 / (total.var(axis=1) + NORM_EPSILON), rtol=1e-4)
