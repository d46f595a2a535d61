"""Every pattern family: found with the right activation, pruned to the planned width, and exact
when only constant neurons are removed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from graphs import ACTIVATIONS, BlockSpec, Builder, build_model, make_model, random_batch, share_initializer
from helpers import prune, relative_change, run

from onnx_vbp import Plan, find_mlp_blocks, rewrite
from onnx_vbp.activations import GATES, TANH_GELU_ARGUMENT, match_product
from onnx_vbp.graph import import_graph

FAMILIES = {
    **{
        f"fc-{fc}": BlockSpec(fc=fc)
        for fc in ("matmul", "matmul_bias_first", "gemm", "gemm_transb", "conv", "conv_reshaped_bias")
    },
    **{f"act-{act}": BlockSpec(act=act) for act in ACTIVATIONS},
    **{f"store-{store}": BlockSpec(store=store) for store in ("constant", "transposed", "fp16")},
    **{f"store-{store}-gemm_transb": BlockSpec(fc="gemm_transb", store=store) for store in ("transposed", "fp16")},
    "gated-swiglu": BlockSpec(gated=True, act="silu"),
    "gated-geglu": BlockSpec(gated=True, act="gelu_erf_torch"),
    "gated-gemm": BlockSpec(gated=True, act="silu", fc="gemm"),
    "fc2-no-bias-matmul": BlockSpec(fc2_bias="none"),
    "fc2-no-bias-gemm": BlockSpec(fc="gemm_transb", fc2_bias="none"),
    "fc2-no-bias-conv": BlockSpec(fc="conv", fc2_bias="none"),
    "fc2-bias-in-skip-layernorm": BlockSpec(fc2_bias="skip_layernorm"),
    "gpt2-reshape-gemm-reshape": BlockSpec(fc="gemm", layout=True, act="gelu_tanh_pow"),
    "conv-hardswish": BlockSpec(fc="conv", act="hardswish"),
    "paddle-squeeze-excitation": BlockSpec(fc="conv_reshaped_bias", act="relu", fc2_bias="add"),
    "channels-last-4d": BlockSpec(channels_last=True),
    "token-mixing-transposed": BlockSpec(token_mixing=True, act="gelu_erf_reordered"),
    "token-mixing-gated": BlockSpec(token_mixing=True, gated=True, act="silu", store="transposed"),
}

HIDDEN, CONSTANT = 16, 4


def _model(spec: BlockSpec, **kwargs) -> onnx.ModelProto:
    spec = BlockSpec(**{**spec.__dict__, "hidden": HIDDEN, "const_neurons": CONSTANT})
    return build_model([spec, spec], **kwargs)


def _batches(model: onnx.ModelProto) -> list[dict]:
    return [random_batch(model, batch=b, seed=s) for s, b in enumerate((3, 5, 2))]


@pytest.fixture(params=FAMILIES.values(), ids=FAMILIES.keys())
def spec(request) -> BlockSpec:
    return request.param


def test_found_with_activation_kind(spec: BlockSpec) -> None:
    blocks = find_mlp_blocks(_model(spec))
    assert [b.activation for b in blocks] == [ACTIVATIONS[spec.act]] * 2
    assert [b.width for b in blocks] == [HIDDEN] * 2
    assert all(b.gated == spec.gated for b in blocks)
    assert blocks.skipped == []


@pytest.mark.parametrize("compensate", ["mean", "ridge"])
def test_constant_neurons_prune_exactly(spec: BlockSpec, compensate: str) -> None:
    model = _model(spec)
    feed = random_batch(model, batch=6, seed=42)
    blocks, stats, plan, pruned = prune(model, _batches(model), ratio=CONSTANT / HIDDEN, compensate=compensate)

    for block in blocks:
        assert np.allclose(stats[block.name].variance[:CONSTANT], 0.0, atol=1e-12)
        assert list(plan.keep[block.name]) == list(range(CONSTANT, HIDDEN))
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.width for b in find_mlp_blocks(pruned)] == [HIDDEN - CONSTANT] * 2
    (before,), (after,) = run(model, feed), run(pruned, feed)
    assert after.shape == before.shape
    assert relative_change(before, after) <= 1e-5


def test_without_compensation_constant_neurons_change_outputs(spec: BlockSpec) -> None:
    model = _model(spec)
    feed = random_batch(model, batch=6, seed=42)
    *_, pruned = prune(model, _batches(model), ratio=CONSTANT / HIDDEN, compensate="none")
    (before,), (after,) = run(model, feed), run(pruned, feed)
    assert relative_change(before, after) > 1e-3


def test_ratio_zero_is_identity(spec: BlockSpec) -> None:
    model = _model(spec)
    feed = random_batch(model, batch=6, seed=42)
    *_, pruned = prune(model, _batches(model), ratio=0.0)
    (before,), (after,) = run(model, feed), run(pruned, feed)
    assert np.max(np.abs(after - before)) <= 1e-6
    assert [b.width for b in find_mlp_blocks(pruned)] == [HIDDEN] * 2


def test_half_pruned_widths_follow_plan(spec: BlockSpec) -> None:
    model = _model(spec, layernorm=True)
    feed = random_batch(model, batch=6, seed=42)
    blocks, _, plan, pruned = prune(model, _batches(model), ratio=0.5)
    widths = [b.width for b in find_mlp_blocks(pruned)]
    assert widths == [plan.keep[b.name].size for b in blocks]
    assert sum(widths) == HIDDEN  # half of 2 x 16
    onnx.checker.check_model(pruned, full_check=True)
    (before,), (after,) = run(model, feed), run(pruned, feed)
    assert after.shape == before.shape and np.isfinite(after).all()


@pytest.mark.parametrize("kind", [gate.kind for gate in GATES])
def test_each_gate_of_the_table_is_matched_and_a_near_miss_says_why(kind: str) -> None:
    (gate,) = [g for g in GATES if g.kind == kind]

    def product(argument: float | None) -> gs.Tensor:
        g = Builder()
        y = g.gate("x", kind, argument)
        return import_graph(make_model(g, [2, 4], y)).tensors()[y]

    assert match_product(product(None)).kind == kind
    wrong = 2.5 if gate.argument is not None else 1.0  # GELU's tanh form: Tanh(x) instead
    reasons = match_product(product(wrong))
    assert isinstance(reasons, list) and len(reasons) == 2 * len(GATES)
    expected = (
        f"{gate.op}'s argument is 2.5 * x, not {gate.argument:g} * x"
        if gate.argument is not None
        else f"{gate.op}'s argument is not {TANH_GELU_ARGUMENT}"
    )
    assert f"not {gate.formula}: {expected}" in reasons


def test_a_reshaped_bias_shape_shared_by_blocks_is_rewritten_per_block() -> None:
    """Paddle exports reshape each conv bias to [1, C, 1, 1]; an exporter that merges identical
    constants hands one shape to every block of that width. Each block keeps its own width."""
    model = _model(BlockSpec(fc="conv_reshaped_bias"), layernorm=True)
    shapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    fc1_shapes = [n for n in shapes if any("fc1" in c.name for c in model.graph.node if n.output[0] in c.input)]
    assert len(fc1_shapes) == 2
    share_initializer(model, [n.input[1] for n in fc1_shapes])  # one shared [1, 16, 1, 1]
    blocks, stats, _, _ = prune(model, _batches(model), ratio=0.0)
    width_of = {blocks[0].name: 4, blocks[1].name: 12}  # two widths, one shared literal before
    plan = Plan({b.name: np.sort(np.argsort(-stats[b.name].variance)[: width_of[b.name]]) for b in blocks})
    pruned = rewrite(model, blocks, stats, plan, compensate="mean")
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.width for b in find_mlp_blocks(pruned)] == [4, 12]
    feed = random_batch(model, batch=3, seed=1)
    (after,) = run(pruned, feed)
    assert np.isfinite(after).all()


@pytest.mark.parametrize(
    ("target", "traced_shape"),
    [
        ([1, 4, 1, 1], (1, 4, 1, 1)),  # adds unit dims: traced, the neuron axis maps 1 -> 0
        ([1, -1, 1, 1], (1, 4, 1, 1)),
        ([2, 2], None),  # splits the dim: no one-to-one neuron axis
        ([[1, 4]], None),  # not a 1-D shape
    ],
)
def test_trace_param_follows_only_reshapes_that_add_or_drop_unit_dims(target: list, traced_shape) -> None:
    from onnx_vbp.graph import trace_param

    bias = gs.Constant("b", np.arange(4, dtype=np.float32))
    shaped = gs.Variable("shaped", np.float32)
    reshape = gs.Node("Reshape", inputs=[bias, gs.Constant("shape", np.array(target, np.int64))], outputs=[shaped])
    gs.Graph(nodes=[reshape])
    traced = trace_param(shaped)
    if traced_shape is None:
        assert traced is None
        return
    assert traced.shape == traced_shape and traced.source_axis(1) == 0
    np.testing.assert_array_equal(traced.value(), np.arange(4, dtype=np.float32).reshape(traced_shape))
    traced.assign(traced.value() * 2)  # undone back into the source's own shape
    np.testing.assert_array_equal(bias.values, 2 * np.arange(4, dtype=np.float32))
