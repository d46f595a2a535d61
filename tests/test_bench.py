"""onnx-vbp bench: what it reports and writes (never how fast: no timed asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import BlockSpec, build_model, random_batch

from onnx_vbp import calibrate, find_mlp_blocks, rewrite, select
from onnx_vbp.bench import bench, optimized_ops
from onnx_vbp.cli import main
from onnx_vbp.data import InputSpec, iter_batches, make_inputs, model_inputs
from onnx_vbp.pipeline import block_multiples
from onnx_vbp.runtime import cpu_session


def test_bench_reports_both_models_and_the_mac_bound(tmp_path: Path, capsys) -> None:
    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=64)], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "b.npz", **random_batch(model, batch=32))
    assert (
        main(
            [
                str(tmp_path / "net.onnx"),
                str(tmp_path / "calib"),
                "--ratio",
                "0.5",
                "-q",
                "-o",
                str(tmp_path / "small.onnx"),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "bench",
                str(tmp_path / "net.onnx"),
                str(tmp_path / "small.onnx"),
                "--runs",
                "3",
                "--warmup",
                "1",
                "--batch-size",
                "4",
                "--json",
                "--perf-test-data",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert result["mac_bound"] == report["macs_before"] / report["macs_after"]
    assert result["speedup"] == result["original"]["median_ms"] / result["pruned"]["median_ms"]
    assert result["inputs"] == {"x": [4, 6, 8]} and result["runs"] == 3
    assert all(result[m]["p90_ms"] >= result[m]["median_ms"] > 0 for m in ("original", "pruned"))
    assert result["fusion_differences"] == {}  # ORT fuses the pruned graph (BiasGelu...) as it did the original
    (written,) = iter_batches(Path(result["perf_test_data"]), model_inputs(model))  # our own loader reads it back
    assert written["x"].shape == (4, 6, 8)


def test_inputs_random_or_from_data(tmp_path: Path) -> None:
    specs = [
        InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq")),
    ]
    feed = make_inputs(specs, 3, 16, None)
    assert feed["input_ids"].shape == (3, 16) and feed["attention_mask"].all()
    np.savez(tmp_path / "d.npz", input_ids=np.arange(10).reshape(2, 5), attention_mask=np.ones((2, 5), np.int64))
    from_data = make_inputs(specs, 3, 16, tmp_path)
    assert from_data["input_ids"].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize(("fc", "extra_adds"), [("matmul", 2), ("gemm", 0), ("conv", 0)])
def test_fc2_without_bias_fuses_as_before_but_for_the_bias_a_matmul_lacks(
    tmp_path: Path, fc: str, extra_adds: int
) -> None:
    """Gemm and Conv take the folded bias as an input; a 3-D MatMul has none, so each of its blocks
    gains exactly one Add (ORT's CPU optimizer fuses no MatMul + Add here, with or without pruning).
    Pruned through the CLI, whose plan keeps 1x1-Conv widths NCHWc-friendly."""
    model = build_model([BlockSpec(fc=fc, fc2_bias="none", hidden=64)] * 2, dim=16, layernorm=True)
    onnx.save(model, tmp_path / "net.onnx")
    (tmp_path / "calib").mkdir()
    np.savez(tmp_path / "calib" / "b.npz", **random_batch(model, batch=8))
    assert (
        main(
            [
                str(tmp_path / "net.onnx"),
                str(tmp_path / "calib"),
                "--ratio",
                "0.5",
                "-q",
                "--min-samples",
                "1",
                "-o",
                str(tmp_path / "small.onnx"),
            ]
        )
        == 0
    )
    result = bench(tmp_path / "net.onnx", tmp_path / "small.onnx", random_batch(model, batch=2), runs=1, warmup=0)
    adds = result["fusion_differences"].get("Add", [])
    assert result["fusion_differences"] == ({"Add": [adds[0], adds[0] + extra_adds]} if extra_adds else {})
    assert result["optimized_nodes"]["pruned"] - result["optimized_nodes"]["original"] == extra_adds


def test_conv_blocks_keep_nchwc_widths(tmp_path: Path) -> None:
    """An odd kept width drops ORT's NCHWc Conv for that block; the pipeline rounds 1x1-Conv
    blocks to multiples of 4 (and of --round-to), MatMul blocks only to --round-to."""
    model = build_model([BlockSpec(fc="conv", hidden=64), BlockSpec(fc="conv", hidden=64)], dim=16)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=8)])
    free = select(stats, 0.45)  # prunes 57 of 128: an odd total, so some block's width is odd
    assert any(k.size % 4 for k in free.keep.values())
    onnx.save(model, tmp_path / "net.onnx")
    cpu_session(str(tmp_path / "net.onnx"), optimize=True, save_optimized=tmp_path / "optimized.onnx")
    if not any(op.startswith("com.microsoft.nchwc:") for op in optimized_ops(tmp_path / "optimized.onnx")):
        pytest.skip("ORT has no NCHWc kernels on this CPU")
    onnx.save(rewrite(model, blocks, stats, free), tmp_path / "odd.onnx")
    odd = bench(tmp_path / "net.onnx", tmp_path / "odd.onnx", random_batch(model, batch=2), runs=1, warmup=0)
    assert odd["fusion_differences"]  # the effect the rounding exists for
    aligned = select(stats, 0.45, round_to=block_multiples(blocks, 1))
    assert all(k.size % 4 == 0 for k in aligned.keep.values())
    onnx.save(rewrite(model, blocks, stats, aligned), tmp_path / "aligned.onnx")
    result = bench(tmp_path / "net.onnx", tmp_path / "aligned.onnx", random_batch(model, batch=2), runs=1, warmup=0)
    assert result["fusion_differences"] == {}
    assert block_multiples(blocks, 6) == dict.fromkeys((b.name for b in blocks), 12)
    matmul = find_mlp_blocks(build_model([BlockSpec(hidden=64)]))
    assert block_multiples(matmul, 6) == {matmul[0].name: 6}


def test_bench_inputs_from_text(tmp_path: Path) -> None:
    tokenizer = Path(__file__).resolve().parents[2] / "shared" / "data" / "minilm-tokenizer" / "tokenizer.json"
    pytest.importorskip("tokenizers")
    if not tokenizer.exists():
        pytest.skip("shared tokenizer absent")
    from onnx_vbp.data import RawOptions

    (tmp_path / "t.txt").write_text("hello world\nanother sentence\n")
    specs = [
        InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq")),
        InputSpec("token_type_ids", np.dtype(np.int64), ("batch", "seq")),
    ]
    feed = make_inputs(specs, 3, 16, tmp_path / "t.txt", raw=RawOptions(tokenizer=tokenizer))
    assert feed["input_ids"].shape[0] == 3 and feed["input_ids"][0, 0] == 101  # [CLS]
    assert not feed["token_type_ids"].any() and feed["attention_mask"][0].sum() == 4  # [CLS] hello world [SEP]
    random_feed = make_inputs(specs, 2, 8, None)
    assert not random_feed["token_type_ids"].any()  # a 2-row token-type table takes only 0 and 1


def test_a_dynamically_quantized_model_counts_its_embedding_table(tmp_path: Path) -> None:
    """quantize_dynamic stores an embedding table as uint8 read by a Gather (its rows then
    dequantized, or fed to a MatMulInteger): its parameters are still the table's elements (plus
    a few scales)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    from onnx_vbp.report import count_params

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("MatMul", ["rows", "w"], ["y"])],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        [
            numpy_helper.from_array(rng.normal(size=(300, 16)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"))
    quantized = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "Gather" and n.input[0] != "table" for n in quantized.graph.node)  # the form under test
    assert 300 * 16 + 16 * 8 <= count_params(quantized) <= 300 * 16 + 16 * 8 + 8


def test_macs_count_quantized_and_fused_matmuls_like_their_float_form(tmp_path: Path) -> None:
    """ORT's dynamic int8 form (MatMulInteger) counts as the float model; a fused Attention counts
    its QKV projection and its two attention products; FusedMatMul honours transA."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import quantize_dynamic

    from onnx_vbp.report import node_macs

    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=32, act="relu")], dim=16, seq=4)
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"))
    feed = random_batch(model, 1)
    assert sum(node_macs(onnx.load(tmp_path / "q.onnx"), feed).values()) == sum(node_macs(model, feed).values())

    batch, seq, dim = 2, 5, 8
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(dim, 3 * dim)).astype(np.float32), "qkv"),
        numpy_helper.from_array(np.zeros(3 * dim, np.float32), "qkv_bias"),
        numpy_helper.from_array(rng.normal(size=(dim, dim)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Attention", ["x", "qkv", "qkv_bias"], ["a"], domain="com.microsoft", num_heads=2),
        helper.make_node("Transpose", ["w"], ["w_t"]),
        helper.make_node("FusedMatMul", ["a", "w_t"], ["y"], domain="com.microsoft", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, dim])],
        weights,
    )
    fused = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    macs = node_macs(fused, {"x": rng.normal(size=(batch, seq, dim)).astype(np.float32)})
    assert macs == {"a": seq * dim * 3 * dim + 2 * seq * seq * dim, "y": seq * dim * dim}  # per sample


@pytest.mark.parametrize(
    ("equation", "shapes", "expected"),
    [
        ("bsd,df->bsf", [(2, 5, 8), (8, 16)], 2 * 5 * 8 * 16),  # a MatMul
        ("bhqd,bhkd->bhqk", [(2, 4, 5, 8), (2, 4, 5, 8)], 2 * 4 * 5 * 5 * 8),  # attention scores
        ("...d,df->...f", [(2, 5, 8), (8, 16)], 2 * 5 * 8 * 16),  # broadcast dims
        ("bij->bji", [(2, 3, 4)], 0),  # a transpose: no MACs
    ],
)
def test_einsum_macs(equation: str, shapes: list[tuple[int, ...]], expected: int) -> None:
    from onnx import TensorProto, helper

    from onnx_vbp.report import node_macs

    rng = np.random.default_rng(0)
    names = [f"x{i}" for i in range(len(shapes))]
    graph = helper.make_graph(
        [helper.make_node("Einsum", names, ["y"], equation=equation)],
        "einsum",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in zip(names, shapes, strict=True)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {n: rng.normal(size=s).astype(np.float32) for n, s in zip(names, shapes, strict=True)}
    assert node_macs(model, feed) == {"y": expected // shapes[0][0]}  # per sample: the first dim is the batch


def test_run_sample_gives_the_original_outputs_with_the_macs(tmp_path: Path) -> None:
    """One session gives both: the graph's outputs, in its order and equal to a plain ORT run
    (the extra outputs fetched for the MAC count change nothing), and a failure names the sample."""
    import onnxruntime as ort

    from onnx_vbp.report import run_sample
    from onnx_vbp.stats import CalibrationError

    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=32, act="relu")], dim=16, seq=4)
    feed = random_batch(model, 2)
    sample = run_sample(model, feed)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert list(sample.outputs) == [o.name for o in plain.get_outputs()]
    for got, want in zip(sample.outputs.values(), plain.run(None, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert sample.macs and all(m > 0 for m in sample.macs.values())
    wrong = {name: value[..., :3] for name, value in feed.items()}
    with pytest.raises(CalibrationError, match="fails to run on the saved sample"):
        run_sample(model, wrong, where="the saved sample")

    from onnx import TensorProto, helper

    # a sequence output of tensors of different shapes (no shape of its own) beside the MAC ops
    graph = model.graph
    constant = helper.make_tensor("c", TensorProto.FLOAT, [3], [1, 2, 3])
    graph.node.append(helper.make_node("Constant", [], ["c"], value=constant))
    graph.node.append(helper.make_node("SequenceConstruct", [graph.output[0].name, "c"], ["seq"]))
    graph.output.append(helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None))
    with_sequence = run_sample(model, feed)
    assert with_sequence.macs == sample.macs and len(with_sequence.outputs["seq"]) == 2
