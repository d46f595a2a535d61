"""Models with int8 weights pruned in place: ORT's static QDQ and dynamic forms, and weight-only int8.

ORT's `quantize_static(..., QuantFormat.QDQ)` stores every weight and bias as int8 behind a
DequantizeLinear (weights per output channel) and wraps every activation in a per-tensor
QuantizeLinear -> DequantizeLinear pair. onnx_vbp finds the blocks through the pairs, measures the
float hidden activation, slices the int8 weights with their per-channel scales and zero points,
and quantizes what compensation changes (fc2's rows, its bias) back into int8. Weight-only int8
(`Mul(Cast(int8 W), scale)`, activations in float) is the same with the scale in a Mul. ORT's
`quantize_dynamic` writes `MatMulInteger` on activations quantized at run time, the weight's
scale multiplied in after it (fused into one DynamicQuantizeMatMul by ORT's session optimizer):
the blocks are found through that chain, fc1's per-channel scale and zero point are sliced with
it, and fc2's refit rows are quantized back against its scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from graphs import BlockSpec, build_model, quantize_static_int8, random_batch, share_initializer
from helpers import outputs_of, relative_change, session_optimized
from onnxruntime.quantization import QuantType, quantize_dynamic

from onnx_vbp import PruneOptions, find_mlp_blocks, prune_file
from onnx_vbp.find import FUSED_INTEGER_LINEARS
from onnx_vbp.graph import import_graph, trace_param
from onnx_vbp.report import count_params

SPECS = [BlockSpec(hidden=64), BlockSpec(hidden=64, act="relu")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """net.onnx (float), its pruned net.pruned.onnx, and net.qdq.onnx (ORT static QDQ,
    per-channel weights), with calib.npz."""
    folder = tmp_path_factory.mktemp("qdq")
    model = build_model(SPECS, dim=32, seq=6, layernorm=True)
    onnx.save(model, folder / "net.onnx")
    quantize_static_int8(folder / "net.onnx", folder / "net.qdq.onnx", model)
    np.savez(folder / "calib.npz", **random_batch(model, batch=64, seed=0))
    _prune(folder / "net.onnx", folder / "calib.npz")
    return folder


def _prune(model: Path, calib: Path, output: Path | None = None) -> Path:
    """`model` pruned at ratio 0.5 into `output` (default: beside it, as NAME.pruned.onnx)."""
    output = output or model.with_suffix(".pruned.onnx")
    prune_file(model, calib, output, PruneOptions(ratio=0.5, progress=False))
    return output


def _dequantized_through(model: onnx.ModelProto, node_name_part: str) -> tuple[np.ndarray, gs.Node]:
    """The weight a MatMul whose name contains `node_name_part` reads, dequantized, and the node
    that dequantizes it."""
    graph = import_graph(model)
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and node_name_part in n.name)
    traced = trace_param(matmul.inputs[1])
    assert traced is not None and np.asarray(traced.source.values).dtype == np.int8
    return traced.value(), next(n for n in traced.chain if n.op in ("DequantizeLinear", "Mul"))


def test_qdq_blocks_are_found_through_the_activation_quantizers(models: Path) -> None:
    qdq = onnx.load(models / "net.qdq.onnx")
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) > 4  # the form under test
    blocks = find_mlp_blocks(qdq)
    assert [(b.activation, b.width) for b in blocks] == [
        (b.activation, b.width) for b in find_mlp_blocks(onnx.load(models / "net.onnx"))
    ]
    assert blocks.skipped == []


def test_a_qdq_model_counts_the_float_models_parameters_plus_its_scales(models: Path) -> None:
    """Every weight and bias of the float model is in the QDQ model, as int8 or int32 (biases)
    read by a DequantizeLinear; the quantizers' float scales come on top."""
    qdq = onnx.load(models / "net.qdq.onnx")
    scale_names = {n.input[1] for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    scales = sum(int(np.prod(t.dims)) for t in qdq.graph.initializer if t.name in scale_names)
    assert count_params(qdq) - scales == count_params(onnx.load(models / "net.onnx"))


def test_a_qdq_model_is_pruned_in_place_and_stays_quantized(models: Path) -> None:
    _prune(models / "net.qdq.onnx", models / "calib.npz")
    qdq, pruned = onnx.load(models / "net.qdq.onnx"), onnx.load(models / "net.qdq.pruned.onnx")
    ops = [n.op_type for n in qdq.graph.node]
    assert [n.op_type for n in pruned.graph.node].count("QuantizeLinear") == ops.count("QuantizeLinear")
    assert count_params(pruned) < count_params(qdq) - 2 * 64 * 32 * 0.5 * 0.9  # half of fc1 and fc2, as int8

    for block in ("blocks.0", "blocks.1"):
        fc1, fc1_dq = _dequantized_through(pruned, f"{block}/mlp/fc1")
        fc2, fc2_dq = _dequantized_through(pruned, f"{block}/mlp/fc2")
        assert fc1.shape[1] == fc2.shape[0] < 64  # the block was pruned, in int8
        assert np.asarray(fc1_dq.inputs[0].values).dtype == np.int8
        # fc1's scales are per neuron: sliced with it; fc2's are per output: kept
        assert np.asarray(fc1_dq.inputs[1].values).shape == (fc1.shape[1],)
        assert np.asarray(fc2_dq.inputs[1].values).shape == (32,)

    feed = random_batch(qdq, batch=16, seed=9)
    out = outputs_of(models, ["net", "net.pruned", "net.qdq", "net.qdq.pruned"], feed)
    float_loss = relative_change(out["net"], out["net.pruned"])
    # pruning the int8 model costs what pruning the float one does, give or take int8 rounding
    assert relative_change(out["net.qdq"], out["net.qdq.pruned"]) < 1.5 * float_loss + 0.05


def test_unchanged_int8_values_round_trip_exactly(models: Path) -> None:
    graph = import_graph(onnx.load(models / "net.qdq.onnx"))
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and "fc2" in n.name)
    traced = trace_param(matmul.inputs[1])
    dq = traced.chain[-1]
    ints, scale = np.array(traced.source.values), np.array(dq.inputs[1].values)
    traced.assign(traced.value())
    np.testing.assert_array_equal(traced.source.values, ints)
    np.testing.assert_array_equal(dq.inputs[1].values, scale)


def test_values_beyond_the_int8_range_widen_only_their_channels_scale(models: Path) -> None:
    graph = import_graph(onnx.load(models / "net.qdq.onnx"))
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and "fc2" in n.name)
    traced = trace_param(matmul.inputs[1])
    dq = traced.chain[-1]
    scale = np.array(dq.inputs[1].values)
    value = traced.value().astype(np.float64)
    value[3, 5] = 300 * scale[5]  # output channel 5 (the per-channel axis is 1) now needs a wider scale
    traced.assign(value)
    widened = np.asarray(dq.inputs[1].values)
    assert widened[5] > scale[5] and np.array_equal(np.delete(widened, 5), np.delete(scale, 5))
    np.testing.assert_allclose(traced.value(), value, atol=float(widened.max()) / 2 + 1e-7)


def test_a_blocked_dequantize_reads_its_blocks_and_quantizes_into_new_ones() -> None:
    """A DequantizeLinear with block_size (one scale per 32 rows here) reads as codes times the
    scale of their block; rows taken across the blocks are quantized into new blocks; scales
    whose shape does not match the blocks are not followed."""
    rng = np.random.default_rng(2)
    codes = rng.integers(-127, 128, size=(70, 8)).astype(np.int8)  # 3 blocks, the last one short
    scales = rng.uniform(0.01, 0.1, size=(3, 8)).astype(np.float32)
    weight, scale = gs.Constant("w", codes), gs.Constant("s", scales)
    out = gs.Variable("wf", np.float32, (70, 8))
    gs.Node("DequantizeLinear", inputs=[weight, scale], outputs=[out], attrs={"axis": 0, "block_size": 32})
    traced = trace_param(out)
    expected = codes.astype(np.float64) * np.repeat(scales, 32, axis=0)[:70]
    np.testing.assert_allclose(traced.value(), expected, rtol=1e-6)
    rows = traced.value()[np.r_[0:20, 40:70]]  # 50 rows: two new blocks
    traced.assign(rows)
    assert weight.shape == (50, 8) and scale.shape == (2, 8)
    np.testing.assert_allclose(traced.value(), rows, atol=float(np.abs(np.asarray(scale.values)).max()) / 2 + 1e-7)

    wrong = gs.Variable("wrong", np.float32, (70, 8))
    gs.Node(
        "DequantizeLinear",
        inputs=[gs.Constant("w2", codes), gs.Constant("s2", np.ones((2, 8), np.float32))],
        outputs=[wrong],
        attrs={"axis": 0, "block_size": 32},
    )
    assert trace_param(wrong) is None


def _weight_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """`model` with every 2-D MatMul weight stored weight-only int8, Mul(Cast(int8 W), scale)
    with one scale per output column; and the float model of exactly the dequantized weights."""
    quantized, dequantized = onnx.ModelProto(), onnx.ModelProto()
    quantized.CopyFrom(model)
    dequantized.CopyFrom(model)
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    for name in weights:
        w = onnx.numpy_helper.to_array(inits[name])
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        ints = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        for target in (quantized, dequantized):
            kept = [t for t in target.graph.initializer if t.name != name]
            del target.graph.initializer[:]
            target.graph.initializer.extend(kept)
        dequantized.graph.initializer.append(onnx.numpy_helper.from_array(ints.astype(np.float32) * scale, name))
        quantized.graph.initializer.extend(
            [onnx.numpy_helper.from_array(ints, f"{name}.int8"), onnx.numpy_helper.from_array(scale, f"{name}.scale")]
        )
        quantized.graph.node.insert(
            0, onnx.helper.make_node("Mul", [f"{name}.float", f"{name}.scale"], [name], name=f"{name}/dequantize")
        )
        quantized.graph.node.insert(
            0, onnx.helper.make_node("Cast", [f"{name}.int8"], [f"{name}.float"], to=onnx.TensorProto.FLOAT)
        )
    return quantized, dequantized


def test_weight_only_int8_is_pruned_in_place_like_its_float_model(tmp_path: Path) -> None:
    quantized, dequantized = _weight_only(build_model(SPECS, dim=32, seq=6, layernorm=True))
    onnx.save(quantized, tmp_path / "int8.onnx")
    onnx.save(dequantized, tmp_path / "float.onnx")
    np.savez(tmp_path / "calib.npz", **random_batch(quantized, batch=64, seed=0))
    for name in ("int8", "float"):
        _prune(tmp_path / f"{name}.onnx", tmp_path / "calib.npz")
    pruned = onnx.load(tmp_path / "int8.pruned.onnx")
    assert all(t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2 for t in pruned.graph.initializer)
    fc1, fc1_mul = _dequantized_through(pruned, "blocks.0/mlp/fc1")
    assert fc1_mul.op == "Mul" and np.asarray(fc1_mul.inputs[1].values).shape == (fc1.shape[1],) and fc1.shape[1] < 64

    feed = random_batch(quantized, batch=16, seed=9)
    out = outputs_of(tmp_path, ["float", "float.pruned", "int8.pruned"], feed)
    # the same plan and compensation; only fc2's refit rows are rounded back to int8
    assert relative_change(out["float.pruned"], out["int8.pruned"]) < 0.1 * relative_change(
        out["float"], out["float.pruned"]
    )


def test_a_qdq_model_with_external_data_prunes_as_inline(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 weights left on disk (as a large model's are; its scales and zero points, under
    1 MiB, are read at load time) are read when they are sliced or dequantized."""
    monkeypatch.setattr("onnx_vbp.modelio.SMALL_TENSOR_BYTES", 1024)  # the 32 x 64 int8 weights stay on disk
    qdq = onnx.load(models / "net.qdq.onnx")
    for tensor in qdq.graph.initializer:  # as raw data, which onnx writes externally (not typed fields)
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
    onnx.save(
        qdq,
        tmp_path / "ext.onnx",
        save_as_external_data=True,
        location="ext.data",
        size_threshold=0,
    )
    _prune(tmp_path / "ext.onnx", models / "calib.npz")
    _prune(models / "net.qdq.onnx", models / "calib.npz", tmp_path / "inline.pruned.onnx")
    feed = random_batch(onnx.load(models / "net.onnx"), batch=8, seed=3)
    ext, inline = (
        ort.InferenceSession(str(tmp_path / f"{name}.pruned.onnx")).run(None, feed)[0] for name in ("ext", "inline")
    )
    np.testing.assert_allclose(ext, inline, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_ort_dynamic_int8_is_pruned_in_place(models: Path, tmp_path: Path, per_channel: bool, fused: bool) -> None:
    """As `quantize_dynamic` writes it (MatMulInteger), and as ORT's session optimizer saves it
    (`fused`: com.microsoft DynamicQuantizeMatMul, the input's quantizer, the integer product,
    the scales and the bias in one op)."""
    quantize_dynamic(
        str(models / "net.onnx"), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8, per_channel=per_channel
    )
    op = "MatMulInteger"
    if fused:
        op = "DynamicQuantizeMatMul"
        session_optimized(tmp_path / "dyn.onnx", tmp_path / "dyn.onnx")
    dynamic = onnx.load(tmp_path / "dyn.onnx")
    assert [n.op_type for n in dynamic.graph.node].count(op) == 4  # the form under test
    blocks = find_mlp_blocks(dynamic)
    assert [b.width for b in blocks] == [64, 64] and blocks.skipped == []
    assert all(b.sites[0].fc2_dequantize is not None for b in blocks)

    _prune(tmp_path / "dyn.onnx", models / "calib.npz")
    pruned = onnx.load(tmp_path / "dyn.pruned.onnx")
    assert [n.op_type for n in pruned.graph.node].count(op) == 4
    assert [n.op_type for n in pruned.graph.node].count("MatMul") == [n.op_type for n in dynamic.graph.node].count(
        "MatMul"
    )
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    weights = [inits[n.input[1]] for n in pruned.graph.node if n.op_type == op]
    assert all(w.dtype == np.int8 for w in weights) and sum(w.size for w in weights) == 2 * 32 * 64  # half
    if per_channel:  # one zero point per output: fc1's sliced with its neurons
        zero_points = [inits[n.input[3]] for n in pruned.graph.node if n.op_type == op]
        assert [z.shape for z in zero_points] == [(w.shape[1],) for w in weights]
    assert count_params(pruned) < count_params(dynamic) - 4 * 32 * 64 // 2 * 0.9

    feed = random_batch(dynamic, batch=16, seed=9)
    out = {**outputs_of(models, ["net", "net.pruned"], feed), **outputs_of(tmp_path, ["dyn", "dyn.pruned"], feed)}
    float_loss = relative_change(out["net"], out["net.pruned"])
    assert relative_change(out["dyn"], out["dyn.pruned"]) < 1.5 * float_loss + 0.05


def test_a_qdq_model_saved_by_orts_session_optimizer_is_pruned_in_place(models: Path, tmp_path: Path) -> None:
    """ORT's session optimizer fuses a QDQ linear whose input it quantizes as uint8 into
    QLinearMatMul (-> DequantizeLinear -> bias Add), and folds GELU's quantized constants into
    DequantizeLinear of integer constants. fc1's int8 columns are sliced with their scales and
    zero points (QLinearMatMul's inputs 4 and 5); fc2's rows are sliced, and the refit quantized
    back against its per-output scales."""
    session_optimized(models / "net.qdq.onnx", tmp_path / "saved.onnx")
    saved = onnx.load(tmp_path / "saved.onnx")
    fused = [n for n in saved.graph.node if n.op_type == "QLinearMatMul"]
    assert any("blocks.0/mlp/fc2" in n.name for n in fused)  # the form under test
    blocks = find_mlp_blocks(saved)
    # the ReLU block's activation is folded into its QuantizeLinear's zero point: not followed
    assert [(b.name, b.activation, b.width) for b in blocks] == [("/blocks.0/mlp", "gelu", 64)]
    assert blocks[0].sites[0].fc2_dequantize is not None

    _prune(tmp_path / "saved.onnx", models / "calib.npz")
    pruned = onnx.load(tmp_path / "saved.pruned.onnx")
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in saved.graph.node]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    fc1, fc2 = (next(n for n in pruned.graph.node if f"blocks.0/mlp/{fc}" in n.name) for fc in ("fc1", "fc2"))
    assert fc1.op_type == fc2.op_type == "QLinearMatMul"  # the LayerNorm's output is quantized as uint8 too
    assert inits[fc1.input[3]].dtype == inits[fc2.input[3]].dtype == np.int8
    assert inits[fc1.input[3]].shape == inits[fc2.input[3]].shape == (32, 32)  # half the columns, half the rows
    assert inits[fc1.input[4]].shape == inits[fc1.input[5]].shape == (32,)  # fc1's per-neuron scales: sliced
    assert inits[fc2.input[4]].shape == (32,)  # fc2's per-output scales: kept
    assert count_params(pruned) < count_params(saved) - 2 * 32 * 32 * 0.9

    feed = random_batch(saved, batch=16, seed=9)
    out = {**outputs_of(models, ["net", "net.pruned"], feed), **outputs_of(tmp_path, ["saved", "saved.pruned"], feed)}
    float_loss = relative_change(out["net"], out["net.pruned"])  # both blocks pruned there, one here
    assert relative_change(out["saved"], out["saved.pruned"]) < 1.5 * float_loss + 0.05


def test_fused_dynamic_int8_of_a_gated_mlp_is_pruned_in_place(tmp_path: Path) -> None:
    """Where the input's quantizer feeds two linears (a gated MLP's gate and up projections), ORT
    fuses each into a MatMulIntegerToFloat reading the shared quantized input; fc2 becomes a
    DynamicQuantizeMatMul. Pruned in place, the gate's and the up projection's columns go together."""
    model = build_model([BlockSpec(hidden=64, gated=True, act="silu")], dim=32, seq=6, layernorm=True)
    onnx.save(model, tmp_path / "gated.onnx")
    np.savez(tmp_path / "calib.npz", **random_batch(model, batch=64, seed=0))
    quantize_dynamic(str(tmp_path / "gated.onnx"), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8)
    session_optimized(tmp_path / "dyn.onnx", tmp_path / "dyn.onnx")
    fused = onnx.load(tmp_path / "dyn.onnx")
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and ops.count("DynamicQuantizeMatMul") == 1
    (block,) = find_mlp_blocks(fused)
    assert block.width == 64 and len(block.sites[0].fc1) == 2

    _prune(tmp_path / "gated.onnx", tmp_path / "calib.npz")
    _prune(tmp_path / "dyn.onnx", tmp_path / "calib.npz")
    pruned = onnx.load(tmp_path / "dyn.pruned.onnx")
    assert [n.op_type for n in pruned.graph.node] == ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    shapes = [inits[n.input[1]].shape for n in pruned.graph.node if n.op_type in FUSED_INTEGER_LINEARS]
    assert sorted(shapes) == [(32, 32), (32, 32), (32, 32)]  # gate, up: 32 columns kept; fc2: 32 rows
    feed = random_batch(model, batch=16, seed=9)
    out = outputs_of(tmp_path, ["gated", "gated.pruned", "dyn", "dyn.pruned"], feed)
    float_loss = relative_change(out["gated"], out["gated.pruned"])
    assert relative_change(out["dyn"], out["dyn.pruned"]) < 1.5 * float_loss + 0.05


def test_a_zero_point_shared_by_two_blocks_is_sliced_for_each(models: Path, tmp_path: Path) -> None:
    """Tools that merge identical initializers leave one all-zero per-channel zero point read by
    the fc1 of both blocks: each block slices its own copy, to its own width."""
    qdq = onnx.load(models / "net.qdq.onnx")
    fc1 = [n for n in qdq.graph.node if n.op_type == "MatMul" and "fc1" in n.name]
    dequantize = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    zero_points = [dequantize[n.input[1]].input[2] for n in fc1]
    assert len(set(zero_points)) == 2  # one per block, as ORT writes them
    share_initializer(qdq, zero_points)
    onnx.save(qdq, tmp_path / "shared.onnx")
    pruned = onnx.load(_prune(tmp_path / "shared.onnx", models / "calib.npz"))
    widths = [_dequantized_through(pruned, f"blocks.{i}/mlp/fc1")[0].shape[1] for i in (0, 1)]
    assert widths[0] != widths[1] and sum(widths) == 64  # global allocation: the two differ
    feed = random_batch(qdq, batch=8, seed=4)
    plain = _prune(models / "net.qdq.onnx", models / "calib.npz", tmp_path / "plain.pruned.onnx")
    reference = ort.InferenceSession(str(plain)).run(None, feed)[0]
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "shared.pruned.onnx")).run(None, feed)[0], reference)


def test_an_integer_fc2_not_fed_by_a_dynamic_quantizer_is_not_a_block(models: Path) -> None:
    """fc2's float input is what calibration observes: an int8 input made some other way (here a
    plain Cast) has none, so that block is left alone."""
    quantize_dynamic(str(models / "net.onnx"), str(models / "dyn.onnx"), weight_type=QuantType.QInt8)
    dynamic = onnx.load(models / "dyn.onnx")
    (fc2,) = [n for n in dynamic.graph.node if n.op_type == "MatMulInteger" and "blocks.0/mlp/fc2" in n.name]
    quantizer = next(n for n in dynamic.graph.node if fc2.input[0] in n.output)
    cast = onnx.helper.make_node("Cast", [quantizer.input[0]], ["hidden_uint8"], to=onnx.TensorProto.UINT8)
    dynamic.graph.node.insert(list(dynamic.graph.node).index(quantizer), cast)
    fc2.input[0] = "hidden_uint8"
    assert [b.name for b in find_mlp_blocks(dynamic)] == ["/blocks.1/mlp"]
