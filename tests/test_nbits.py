"""ORT's MatMulNBits (int4 / int8 weights in blocks along K, `MatMulNBitsQuantizer`) pruned in place.

fc1's neurons are rows of the packed weight (N): they are sliced with their scales and zero points
exactly. fc2's neurons run along K, across the blocks: fc2 is read as its float matrix, sliced
(and refit), and quantized once into new blocks; K and N follow. The same quantizer's QDQ format
(int4 blocks behind a DequantizeLinear with block_size) is pruned the same way. The forms are
written by ORT's own `MatMulNBitsQuantizer` (which needs `onnx-ir`, in the test extras).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from graphs import BlockSpec, build_model, random_batch
from helpers import outputs_of, relative_change
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from onnx_vbp import PruneOptions, find_mlp_blocks, prune_file
from onnx_vbp.graph import import_graph
from onnx_vbp.nbits import PackedWeight
from onnx_vbp.pipeline import quantized_ops
from onnx_vbp.report import count_params

SPECS = [BlockSpec(hidden=64), BlockSpec(hidden=64, act="relu")]


def _quantize(src: Path, dst: Path, *, bits: int = 4, symmetric: bool = True, block: int = 16) -> onnx.ModelProto:
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block, is_symmetric=symmetric)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return onnx.load(dst)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """net.onnx (float), net.pruned.onnx (its pruned model), calib.npz, and the int4 forms
    sym.onnx (zero point 8) and asym.onnx (packed zero points)."""
    folder = tmp_path_factory.mktemp("nbits")
    model = build_model(SPECS, dim=32, seq=6, layernorm=True)
    onnx.save(model, folder / "net.onnx")
    np.savez(folder / "calib.npz", **random_batch(model, batch=64, seed=0))
    _prune(folder / "net.onnx", folder)
    _quantize(folder / "net.onnx", folder / "sym.onnx")
    _quantize(folder / "net.onnx", folder / "asym.onnx", symmetric=False)
    return folder


def _prune(model: Path, folder: Path, output: Path | None = None, **options: object) -> Path:
    """`model` pruned at ratio 0.5 into `output` (default: beside it, as NAME.pruned.onnx)."""
    output = output or model.with_suffix(".pruned.onnx")
    prune_file(model, folder / "calib.npz", output, PruneOptions(ratio=0.5, progress=False, **options))
    return output


def _packed(model: onnx.ModelProto) -> dict[str, PackedWeight]:
    """Every MatMulNBits weight, by node name."""
    return {n.name: PackedWeight.of(n) for n in import_graph(model).nodes if n.op == "MatMulNBits"}


@pytest.mark.parametrize("form", ["sym", "asym"])
def test_every_block_is_found_in_the_int4_form(models: Path, form: str) -> None:
    quantized = onnx.load(models / f"{form}.onnx")
    assert sum(n.op_type == "MatMulNBits" for n in quantized.graph.node) == 4  # the form under test
    blocks = find_mlp_blocks(quantized)
    assert [(b.activation, b.width) for b in blocks] == [
        (b.activation, b.width) for b in find_mlp_blocks(onnx.load(models / "net.onnx"))
    ]
    assert all("MatMulNBits" not in s.reason for s in blocks.skipped)


@pytest.mark.parametrize("form", ["sym", "asym"])
def test_the_packed_weight_reads_as_the_matrix_ort_multiplies_by(models: Path, form: str) -> None:
    quantized = onnx.load(models / f"{form}.onnx")
    graph = import_graph(quantized)
    node = next(n for n in graph.nodes if n.op == "MatMulNBits" and "fc2" in n.name)
    weight = PackedWeight.of(node).value()
    assert weight.shape == (64, 32)
    x = np.random.default_rng(3).normal(size=(5, 64)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 64])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 32])]
    only = gs.Graph(
        nodes=[
            gs.Node("MatMulNBits", attrs=node.attrs, inputs=[gs.Variable("x"), *node.inputs[1:]], domain=node.domain)
        ]
    )
    only.nodes[0].outputs = [gs.Variable("y", np.float32)]
    model = gs.export_onnx(only)
    model.graph.input.extend(inputs)
    model.graph.output.extend(outputs)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weight, rtol=1e-4, atol=1e-4)


def test_an_unchanged_symmetric_weight_packs_back_to_the_same_bytes(models: Path) -> None:
    for weight in _packed(onnx.load(models / "sym.onnx")).values():
        before = [np.array(t.values) for t in weight.tensors()]
        weight.assign(weight.value())
        weight.pack()
        for old, tensor in zip(before, weight.tensors(), strict=True):
            np.testing.assert_array_equal(np.asarray(tensor.values), old)


@pytest.mark.parametrize(("form", "compensate"), [("sym", "mean"), ("asym", "ridge")])
def test_an_int4_model_is_pruned_in_place_and_stays_int4(models: Path, form: str, compensate: str) -> None:
    pruned_path = _prune(models / f"{form}.onnx", models, compensate=compensate)
    quantized, pruned = onnx.load(models / f"{form}.onnx"), onnx.load(pruned_path)
    ops = [n.op_type for n in pruned.graph.node]
    assert ops.count("MatMulNBits") == 4 and "MatMul" not in ops
    widths = [b.width for b in find_mlp_blocks(pruned)]
    assert sum(widths) == 64
    shapes = {name: w.shape for name, w in _packed(pruned).items()}
    assert [shapes[n] for n in sorted(shapes)] == [(32, widths[0]), (widths[0], 32), (32, widths[1]), (widths[1], 32)]
    assert count_params(pruned) < count_params(quantized) - 4 * 32 * 32 * 0.9

    feed = random_batch(onnx.load(models / "net.onnx"), batch=16, seed=9)
    if compensate != "mean":
        prune_file(
            models / "net.onnx",
            models / "calib.npz",
            models / "net.ridge.onnx",
            PruneOptions(ratio=0.5, compensate=compensate, progress=False),
        )
    reference = "net.pruned" if compensate == "mean" else "net.ridge"
    out = outputs_of(models, ["net", reference, form, f"{form}.pruned"], feed)
    float_loss = relative_change(out["net"], out[reference])
    quantization_loss = relative_change(out["net"], out[form])
    # against the float model: the float model's pruning loss, plus int4 noise
    assert relative_change(out["net"], out[f"{form}.pruned"]) < float_loss + 2 * quantization_loss


def test_an_fp16_int4_model_is_pruned_in_place(models: Path, tmp_path: Path) -> None:
    """fp16 activations and scales (ORT's fp16 converter, then the quantizer): the new scales stay fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(models / "net.onnx"), keep_io_types=True), tmp_path / "f16.onnx")
    _quantize(tmp_path / "f16.onnx", tmp_path / "f16.int4.onnx")
    np.savez(tmp_path / "calib.npz", **np.load(models / "calib.npz"))
    pruned = onnx.load(_prune(tmp_path / "f16.int4.onnx", tmp_path))
    weights = _packed(pruned)
    assert len(weights) == 4 and all(w.node.inputs[2].dtype == np.float16 for w in weights.values())
    assert sum(w.shape[1] for name, w in weights.items() if "fc1" in name) == 64
    (tmp_path / "net.onnx").write_bytes((models / "net.onnx").read_bytes())
    (tmp_path / "net.pruned.onnx").write_bytes((models / "net.pruned.onnx").read_bytes())
    out = outputs_of(
        tmp_path,
        ["net", "net.pruned", "f16.int4", "f16.int4.pruned"],
        random_batch(onnx.load(models / "net.onnx"), batch=16, seed=9),
    )
    float_loss = relative_change(out["net"], out["net.pruned"])
    assert relative_change(out["net"], out["f16.int4.pruned"]) < float_loss + 2 * relative_change(
        out["net"], out["f16.int4"]
    )


def test_fc1_rows_are_sliced_exactly(models: Path, tmp_path: Path) -> None:
    pruned = onnx.load(_prune(models / "asym.onnx", models, tmp_path / "none.onnx", compensate="none"))
    before, after = _packed(onnx.load(models / "asym.onnx")), _packed(pruned)
    for name, weight in before.items():
        if "fc1" not in name:
            continue
        kept = after[name].value()
        full = weight.value()
        columns = [
            next(j for j in range(full.shape[1]) if np.array_equal(full[:, j], kept[:, i]))
            for i in range(kept.shape[1])
        ]
        assert 0 < len(columns) < 64 and columns == sorted(set(columns))  # distinct original neurons, bit for bit


def test_a_bias_input_and_flat_scales_are_sliced_with_the_neurons(models: Path, tmp_path: Path) -> None:
    """MatMulNBits' own bias (input 5) and scales stored flat, [N * blocks], as older exports do."""
    model = onnx.load(models / "asym.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "MatMulNBits"]:
        scales = inits[node.input[2]]
        scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales).reshape(-1), scales.name))
        add = next(n for n in model.graph.node if node.output[0] in n.input and n.op_type == "Add")
        bias = next(name for name in add.input if name in inits)
        node.input.extend([""] * (5 - len(node.input)) + [bias])
        node.output[0] = add.output[0]
        model.graph.node.remove(add)
    onnx.save(model, tmp_path / "bias.onnx")
    np.savez(tmp_path / "calib.npz", **np.load(models / "calib.npz"))
    assert [b.width for b in find_mlp_blocks(model)] == [64, 64]
    pruned = onnx.load(_prune(tmp_path / "bias.onnx", tmp_path))
    onnx.checker.check_model(pruned)
    _prune(models / "asym.onnx", models, tmp_path / "asym.pruned.onnx")
    (tmp_path / "asym.onnx").write_bytes((models / "asym.onnx").read_bytes())
    feed = random_batch(onnx.load(models / "net.onnx"), batch=16, seed=9)
    out = outputs_of(tmp_path, ["bias", "bias.pruned", "asym", "asym.pruned"], feed)
    np.testing.assert_allclose(out["bias"], out["asym"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["bias.pruned"], out["asym.pruned"], rtol=1e-4, atol=1e-4)


def test_an_int8_block_model_with_external_data_prunes_as_inline(models: Path, tmp_path: Path) -> None:
    quantized = _quantize(models / "net.onnx", tmp_path / "int8.onnx", bits=8, block=32)
    assert {
        a.i for n in quantized.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"
    } == {8}
    onnx.save(quantized, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", **np.load(models / "calib.npz"))
    for name in ("int8", "ext"):
        _prune(tmp_path / f"{name}.onnx", tmp_path)
    feed = random_batch(onnx.load(models / "net.onnx"), batch=16, seed=9)
    out = outputs_of(tmp_path, ["int8", "int8.pruned", "ext.pruned"], feed)
    np.testing.assert_array_equal(out["int8.pruned"], out["ext.pruned"])
    reference = outputs_of(models, ["net", "net.pruned"], feed)
    float_loss = relative_change(reference["net"], reference["net.pruned"])
    assert relative_change(out["int8"], out["int8.pruned"]) < 1.5 * float_loss + 0.05


def test_a_weight_with_a_column_order_is_not_a_block(models: Path) -> None:
    """g_idx (input 4) reorders K: slicing would have to keep it; not followed."""
    model = onnx.load(models / "sym.onnx")
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and "fc2" in node.name:
            k = next(a.i for a in node.attribute if a.name == "K")
            model.graph.initializer.append(
                numpy_helper.from_array(np.arange(k, dtype=np.int32) // 16, node.name + ".g")
            )
            node.input.extend(["", node.name + ".g"][len(node.input) - 3 :])
    assert find_mlp_blocks(model) == []


@pytest.mark.parametrize(("symmetric", "compensate"), [(True, "ridge"), (False, "mean")])
def test_the_int4_qdq_form_is_pruned_in_place(models: Path, tmp_path: Path, symmetric: bool, compensate: str) -> None:
    """MatMulNBitsQuantizer's QDQ format: int4 [K, N] behind a DequantizeLinear with block_size
    (blocks along K, scales [K / block, N], uint4 zero points when asymmetric). fc1's columns
    are sliced exactly with their scales; fc2's rows cut across the blocks, so fc2 is quantized
    again into new blocks, and the scales shrink with K."""
    from onnxruntime.quantization import QuantFormat

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(models / "net.onnx"), block_size=16, is_symmetric=symmetric, quant_format=QuantFormat.QDQ
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp_path / "qdq.onnx"))
    qdq = onnx.load(tmp_path / "qdq.onnx")
    before = _blocked(qdq)
    assert len(before) == 4 and all(data.dtype.name in ("int4", "uint4") for data, _ in before.values())
    assert [b.width for b in find_mlp_blocks(qdq)] == [64, 64]
    assert quantized_ops(qdq) == []  # nothing left to hint at

    np.savez(tmp_path / "calib.npz", **np.load(models / "calib.npz"))
    pruned = onnx.load(_prune(tmp_path / "qdq.onnx", tmp_path, compensate=compensate))
    after = _blocked(pruned)
    assert after.keys() == before.keys()
    assert sum(data.shape[1] for name, (data, _) in after.items() if "fc1" in name) == 64
    for name, (data, scales) in after.items():
        old_data, old_scales = before[name]
        if "fc1" in name:  # N sliced: some of the original columns of codes and scales, unchanged
            columns = {old_data[:, j].tobytes() + old_scales[:, j].tobytes() for j in range(old_data.shape[1])}
            assert all(data[:, i].tobytes() + scales[:, i].tobytes() in columns for i in range(data.shape[1]))
        else:  # K sliced across the blocks: quantized into new blocks, ceil(K / 16) of them
            assert data.shape[1] == old_data.shape[1] and scales.shape == (-(-data.shape[0] // 16), data.shape[1])
    assert count_params(pruned) < count_params(qdq) - 4 * 32 * 32 * 0.9

    (tmp_path / "net.onnx").write_bytes((models / "net.onnx").read_bytes())
    prune_file(
        models / "net.onnx",
        models / "calib.npz",
        tmp_path / "net.pruned.onnx",
        PruneOptions(ratio=0.5, compensate=compensate, progress=False),
    )
    out = outputs_of(tmp_path, ["net", "net.pruned", "qdq", "qdq.pruned"], random_batch(qdq, batch=16, seed=9))
    float_loss = relative_change(out["net"], out["net.pruned"])
    assert relative_change(out["net"], out["qdq.pruned"]) < float_loss + 2 * relative_change(out["net"], out["qdq"])


def _blocked(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each blocked DequantizeLinear's data and scales, by the name of the node reading it."""
    graph = import_graph(model)
    return {
        n.outputs[0].outputs[0].name: (np.asarray(n.inputs[0].values), np.asarray(n.inputs[1].values))
        for n in graph.nodes
        if n.op == "DequantizeLinear" and n.attrs.get("block_size")
    }
