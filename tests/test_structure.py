"""Graph structures around the blocks: near misses, leaks, tied weights, shared constants, shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import BlockSpec, Builder, build_model, make_model, random_batch, readers, share_initializer
from helpers import prune, relative_change, run

from onnx_vbp import find_mlp_blocks


def _conv_pair(kernel2: int, group: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    g = Builder()
    w1 = rng.normal(size=(16, 8 // group, 1, 1)).astype(np.float32)
    w2 = rng.normal(size=(8, 16 // group, kernel2, kernel2)).astype(np.float32)
    h = g.op("Relu", [g.op("Conv", ["x", g.const(w1)], group=group)])
    pads = [kernel2 // 2] * 4
    return make_model(g, [1, 8, 5, 5], g.op("Conv", [h, g.const(w2)], group=group, pads=pads))


def test_near_misses_are_not_mlps() -> None:
    assert len(find_mlp_blocks(_conv_pair(kernel2=1, group=1))) == 1  # the control
    assert len(find_mlp_blocks(_conv_pair(kernel2=3, group=1))) == 0  # 1x1 -> ReLU -> 3x3
    assert len(find_mlp_blocks(_conv_pair(kernel2=1, group=2))) == 0  # grouped 1x1 pair


def test_non_constant_weight_is_not_a_linear() -> None:
    g = Builder()
    h = g.op("Relu", [g.op("MatMul", ["x", g.op("Transpose", ["x"], perm=[1, 0])])])
    model = make_model(g, [16, 16], g.op("MatMul", [h, g.const(np.ones((16, 16), np.float32))]))
    assert find_mlp_blocks(model) == []


def test_hidden_tensor_with_another_consumer_is_skipped_with_reason() -> None:
    model = build_model([BlockSpec(), BlockSpec()])
    hidden = readers(model, "MatMul", "blocks.1/mlp/fc2").input[0]
    model.graph.node.append(onnx.helper.make_node("Neg", [hidden], ["peek"], name="peek_node"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("peek", onnx.TensorProto.FLOAT, None))
    blocks = find_mlp_blocks(model)
    assert [b.name for b in blocks] == ["/blocks.0/mlp"]
    assert len(blocks.skipped) == 1
    assert "also feeds peek_node" in blocks.skipped[0].reason


def test_block_names_come_from_node_names() -> None:
    blocks = find_mlp_blocks(build_model([BlockSpec(), BlockSpec(gated=True, act="silu")]))
    assert [b.name for b in blocks] == ["/blocks.0/mlp", "/blocks.1/mlp"]
    assert blocks[0].fc1 == "/blocks.0/mlp/fc1/MatMul" and blocks[0].fc2 == "/blocks.0/mlp/fc2/MatMul"
    assert blocks[1].fc1 == "/blocks.1/mlp/fc1/MatMul,/blocks.1/mlp/up/MatMul"


def _tied_model(const_neurons: int) -> onnx.ModelProto:
    """ALBERT-style: one MLP's weights applied twice."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    w1[:, :const_neurons] = 0
    g = Builder()
    params = [
        g.const(w1),
        g.const(rng.normal(size=16).astype(np.float32)),
        g.const(rng.normal(size=(16, 8)).astype(np.float32) / 4),
        g.const(rng.normal(size=8).astype(np.float32)),
    ]
    x = "x"
    for layer in range(2):
        pre = g.op("Add", [g.op("MatMul", [x, params[0]], node_name=f"/layer.{layer}/fc1/MatMul"), params[1]])
        out = g.op(
            "Add", [g.op("MatMul", [g.op("Gelu", [pre]), params[2]], node_name=f"/layer.{layer}/fc2/MatMul"), params[3]]
        )
        x = g.op("Add", [x, out])
    model = make_model(g, ["batch", 5, 8], x)
    model.opset_import[0].version = 20
    return model


def test_tied_blocks_are_pruned_jointly() -> None:
    model = _tied_model(const_neurons=4)
    blocks = find_mlp_blocks(model)
    assert len(blocks) == 1 and len(blocks[0].sites) == 2
    feed = random_batch(model, 6, seed=9)
    batches = [random_batch(model, 4, seed=s) for s in range(3)]
    _, _, plan, pruned = prune(model, batches, ratio=0.25)
    assert list(plan.keep[blocks[0].name]) == list(range(4, 16))
    assert relative_change(run(model, feed)[0], run(pruned, feed)[0]) <= 1e-5
    shapes = sorted(tuple(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2)
    assert shapes == [(8, 12), (12, 8)]  # still one copy of each weight


def test_initializer_shared_with_other_nodes_is_copied_before_slicing() -> None:
    spec = BlockSpec(hidden=16)
    model = build_model([spec, spec], seed=4)
    biases = [readers(model, "Add", f"blocks.{i}/mlp/fc1").input[1] for i in range(2)]
    share_initializer(model, biases)
    shared = biases[0]
    # an unrelated node reads the merged constant too
    last = model.graph.node[-1]
    model.graph.node.insert(
        len(model.graph.node) - 1,
        onnx.helper.make_node("ReduceSum", [shared], ["bias_sum"], keepdims=0, name="unrelated"),
    )
    model.graph.output.append(onnx.helper.make_tensor_value_info("bias_sum", onnx.TensorProto.FLOAT, []))
    assert last.op_type == "Identity"
    feed = random_batch(model, 6, seed=9)
    batches = [random_batch(model, 4, seed=s) for s in range(3)]
    blocks, _, plan, pruned = prune(model, batches, ratio=0.4)
    assert [plan.keep[b.name].size for b in blocks] != [16, 16]
    onnx.checker.check_model(pruned, full_check=True)
    before, after = run(model, feed), run(pruned, feed)
    assert after[1] == pytest.approx(before[1])  # the unrelated reader still sees the full constant
    assert after[0].shape == before[0].shape


@pytest.mark.parametrize(
    "spec",
    [BlockSpec(), BlockSpec(fc="gemm", layout=True), BlockSpec(fc="conv")],
    ids=["matmul", "gpt2-layout", "conv"],
)
def test_shape_annotations_follow_the_new_width(spec: BlockSpec) -> None:
    model = onnx.shape_inference.infer_shapes(build_model([spec], seq=5))
    hidden = readers(model, "MatMul" if spec.fc == "matmul" else "Gemm" if spec.layout else "Conv", "fc2").input[0]
    annotated = {v.name: v for v in model.graph.value_info}
    assert hidden in annotated
    batches = [random_batch(model, 4, seed=s) for s in range(2)]
    *_, pruned = prune(model, batches, ratio=0.25)
    onnx.checker.check_model(pruned, full_check=True)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pruned.graph.value_info}
    axis = 1 if spec.fc == "conv" else -1
    assert dims[hidden][axis] == 12


@pytest.mark.parametrize(
    "spec",
    [BlockSpec(), BlockSpec(gated=True, act="silu"), BlockSpec(fc="gemm", layout=True), BlockSpec(fc="conv")],
    ids=["matmul", "gated", "gpt2-layout", "conv"],
)
def test_derived_macs_equal_the_pruned_model_measured(spec: BlockSpec) -> None:
    from onnx_vbp.report import node_macs, pruned_macs

    model = build_model([spec, BlockSpec(**{**spec.__dict__, "hidden": 24})], seq=5)
    batches = [random_batch(model, 4, seed=s) for s in range(2)]
    blocks, _, plan, pruned = prune(model, batches, ratio=0.3)
    feed = {"x": batches[0]["x"][:1]}
    assert pruned_macs(node_macs(model, feed), blocks, plan) == sum(node_macs(pruned, feed).values())


def test_derived_macs_of_tied_blocks() -> None:
    from onnx_vbp.report import node_macs, pruned_macs

    model = _tied_model(const_neurons=0)
    batches = [random_batch(model, 4, seed=s) for s in range(2)]
    blocks, _, plan, pruned = prune(model, batches, ratio=0.5)
    feed = {"x": batches[0]["x"][:1]}
    assert pruned_macs(node_macs(model, feed), blocks, plan) == sum(node_macs(pruned, feed).values())


def test_a_shape_concat_shared_by_blocks_of_different_kept_widths() -> None:
    """torch's dynamic export builds [B, S, hidden] once by Concat and reshapes every block's fc1
    output with it (a GPT-2 pruned this way loaded in ORT, then failed in a Reshape). Each block
    must get its own shape."""
    from onnx_vbp import calibrate, rewrite
    from onnx_vbp.records import Plan

    spec = BlockSpec(fc="gemm", layout=True, hidden=16)
    model = build_model([spec, spec], seq=5)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    second_reshape = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[1] == concats[1].output[0])
    second_reshape.input[1] = concats[0].output[0]  # the first block's shape now serves both
    onnx.checker.check_model(model)
    blocks = find_mlp_blocks(model)
    assert len(blocks) == 2
    batches = [random_batch(model, 4, seed=s) for s in range(2)]
    stats = calibrate(model, blocks, batches)
    plan = Plan({blocks[0].name: np.arange(10), blocks[1].name: np.arange(13)})
    pruned = rewrite(model, blocks, stats, plan)
    assert [b.width for b in find_mlp_blocks(pruned)] == [10, 13]
    before, after = run(model, batches[0]), run(pruned, batches[0])  # runs: each Reshape has its own width
    assert after[0].shape == before[0].shape and np.isfinite(after[0]).all()


@pytest.mark.parametrize("where", ["input", "fc1", "activation", "fc2-matmul", "fc2", "fc2-weight"])
def test_identity_nodes_anywhere_in_the_block_are_harmless(where: str) -> None:
    """Dropout left as Identity, paddle2onnx's renames: the block, its fc2 bias and its residual
    are found through them, and the pruned model runs."""
    model = build_model([BlockSpec(hidden=16)], seq=4)
    fc1, fc2 = readers(model, "MatMul", "fc1"), readers(model, "MatMul", "fc2")
    fc1_add, fc2_add = (next(n for n in model.graph.node if n.input and n.input[0] == m.output[0]) for m in (fc1, fc2))
    tensor = {
        "input": "x",
        "fc1": fc1_add.output[0],
        "activation": fc2.input[0],
        "fc2-matmul": fc2.output[0],
        "fc2": fc2_add.output[0],
        "fc2-weight": fc2.input[1],
    }[where]
    for node in model.graph.node:
        node.input[:] = [f"{tensor}_id" if name == tensor else name for name in node.input]
    position = next((i + 1 for i, n in enumerate(model.graph.node) if tensor in n.output), 0)
    model.graph.node.insert(position, onnx.helper.make_node("Identity", [tensor], [f"{tensor}_id"], name="dropout"))
    onnx.checker.check_model(model)
    (block,) = find_mlp_blocks(model)
    site = block.sites[0]
    assert site.residual is not None and site.fc2_bias.input is not None
    batches = [random_batch(model, 4, seed=s) for s in range(2)]
    *_, pruned = prune(model, batches, ratio=0.25)
    assert [b.width for b in find_mlp_blocks(pruned)] == [12]
    assert "dropout" not in {n.name for n in pruned.graph.node}
    assert run(pruned, batches[0])[0].shape == run(model, batches[0])[0].shape


@pytest.mark.parametrize("store", ["init", "transposed", "fp16"])
def test_tied_layers_read_through_their_own_chains_share_one_sliced_weight(store: str) -> None:
    """ALBERT-style: two layers reuse one fc1 and one fc2 weight, each through a Transpose or
    Cast of its own. The pruned model holds each weight once, sliced: never more parameters."""
    from onnx_vbp.report import count_params

    spec = BlockSpec(hidden=32, store=store)
    model = build_model([spec, spec], seq=4)
    fc1_first, fc2_first, fc1_second, fc2_second = (t.name for t in model.graph.initializer if len(t.dims) == 2)
    share_initializer(model, [fc1_first, fc1_second])
    share_initializer(model, [fc2_first, fc2_second])
    (block,) = find_mlp_blocks(model)
    assert len(block.sites) == 2
    batches = [random_batch(model, 8, seed=s) for s in range(3)]
    *_, plan, pruned = prune(model, batches, ratio=0.35)
    kept = plan.keep[block.name].size
    weights = sorted(tuple(t.dims) for t in pruned.graph.initializer if len(t.dims) == 2)
    assert weights == sorted([(8, kept), (kept, 8)])  # one sliced copy of each, no full-size original
    assert count_params(pruned) < count_params(model)
    assert run(pruned, batches[0])[0].shape == run(model, batches[0])[0].shape


def _shape_of_hidden_model(
    shape_readers: list[onnx.NodeProto], constants: dict[str, list[int]], infer: bool = False, **shape_attrs
) -> onnx.ModelProto:
    """fc2's output reshaped by a shape built from Shape(hidden), as onnxsim and torch's legacy
    GPT-2 export write it: `shape_readers` turn Shape's output "dims" into "target"."""
    model = build_model([BlockSpec(hidden=16)], seq=4)
    fc2 = readers(model, "MatMul", "fc2")
    fc2_add = next(n for n in model.graph.node if n.input and n.input[0] == fc2.output[0])
    for node in model.graph.node:
        node.input[:] = ["reshaped" if name == fc2_add.output[0] else name for name in node.input]
    added = [
        onnx.helper.make_node("Shape", [fc2.input[0]], ["dims"], **shape_attrs),
        *shape_readers,
        onnx.helper.make_node("Reshape", [fc2_add.output[0], "target"], ["reshaped"]),
    ]
    position = list(model.graph.node).index(fc2_add) + 1
    for offset, node in enumerate(added):
        model.graph.node.insert(position + offset, node)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    model = onnx.shape_inference.infer_shapes(model) if infer else model
    onnx.checker.check_model(model)
    return model


SLICE_ALL_BUT_LAST = (
    [
        onnx.helper.make_node("Slice", ["dims", "zero", "minus_one"], ["lead"]),
        onnx.helper.make_node("Concat", ["lead", "features"], ["target"], axis=0),
    ],
    {"zero": [0], "minus_one": [-1], "features": [8]},
)
GATHER = (
    [
        onnx.helper.make_node("Gather", ["dims", "index"], ["dim"], axis=0),
        onnx.helper.make_node("Concat", ["minus_one", "dim", "features"], ["target"], axis=0),
    ],
    {"index": [1], "minus_one": [-1], "features": [8]},
)
GATHER_LAST = (
    [
        onnx.helper.make_node("Gather", ["dims", "index"], ["dim"], axis=0),
        onnx.helper.make_node("Concat", ["batch_seq", "dim"], ["hidden_width"], axis=0),
        onnx.helper.make_node("Concat", ["batch_seq", "features"], ["target"], axis=0),
    ],
    {"index": [-1], "batch_seq": [-1, 4], "features": [8]},
)


@pytest.mark.parametrize(
    ("case", "infer", "found"),
    [
        (SLICE_ALL_BUT_LAST, False, True),  # Shape(hidden)[:-1]: the rank need not be known
        (GATHER, True, True),  # Gather(1) of a hidden tensor known to have rank 3
        (GATHER, False, False),  # the same without shapes: index 1 could be the last dim
        (GATHER_LAST, True, False),  # reads the hidden width itself
    ],
    ids=["slice-to-last", "gather-known-rank", "gather-unknown-rank", "gather-last"],
)
def test_a_shape_read_of_the_hidden_tensor_is_harmless_unless_it_reads_the_width(
    case, infer: bool, found: bool
) -> None:
    model = _shape_of_hidden_model(*case, infer=infer)
    blocks = find_mlp_blocks(model)
    assert len(blocks) == int(found), blocks.skipped
    if found:
        batches = [random_batch(model, 4, seed=s) for s in range(2)]
        *_, pruned = prune(model, batches, ratio=0.25)
        assert [b.width for b in find_mlp_blocks(pruned)] == [12]
        assert run(pruned, batches[0])[0].shape == run(model, batches[0])[0].shape


def test_shape_with_an_end_before_the_last_dim_is_harmless() -> None:
    model = _shape_of_hidden_model(
        [onnx.helper.make_node("Concat", ["dims", "features"], ["target"], axis=0)], {"features": [8]}, end=-1
    )
    assert len(find_mlp_blocks(model)) == 1
