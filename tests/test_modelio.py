"""Writing models: the piecewise serializer, and the one-copy export of rewritten weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from graphs import BlockSpec, build_model, random_batch
from onnx import helper

from onnx_vbp import calibrate, find_mlp_blocks, rewrite, select
from onnx_vbp.modelio import write_proto


def test_piecewise_serialization_parses_to_the_same_model(tmp_path: Path) -> None:
    model = build_model([BlockSpec(), BlockSpec(act="relu", store="constant")], layernorm=True)
    model.doc_string, model.producer_name, model.graph.doc_string = "a doc", "tests", "graph doc"
    helper.set_model_props(model, {"author": "onnx_vbp", "licence": "Apache-2.0"})
    model.graph.value_info.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    model.functions.append(
        helper.make_function(
            "local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 20)]
        )
    )
    write_proto(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size == model.ByteSize()
    assert onnx.load(tmp_path / "m.onnx") == model


def test_rewrite_leaves_the_original_intact_and_keeps_untouched_weights_bit_exact() -> None:
    """Untouched initializers are copied from the original's protos; edited ones are converted
    from their new values: neither may come out as a data-less placeholder."""
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=32, act="relu", store="transposed")], layernorm=True)
    before = model.SerializeToString()
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=4)])
    plan = select(stats, 0.5)
    pruned = rewrite(model, blocks, stats, plan)
    assert model.SerializeToString() == before
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = 0
    for tensor in pruned.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor)
        assert values.size == int(np.prod(tensor.dims))
        if tensor.name in originals and originals[tensor.name].shape == values.shape:
            changed += not np.array_equal(values, originals[tensor.name])
    # only the fc2 biases of pruned blocks took the folded means; LayerNorm weights etc. are bit-exact
    assert changed == sum(plan.keep[b.name].size < b.width for b in blocks) > 0
