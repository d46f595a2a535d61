"""Property-based fuzzing: random MLP graphs keep every invariant after pruning.

CI runs the "ci" profile (a bounded number of examples); `python tools/fuzz.py` runs many more.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from graphs import ACTIVATIONS, FUSED_BIAS, BlockSpec, build_model, random_batch
from helpers import relative_change, run
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onnx_vbp import calibrate, find_mlp_blocks, rewrite, select
from onnx_vbp.records import Plan
from onnx_vbp.select import SelectionError

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FC_BY_LAYOUT = {
    "tokens": [("matmul", False), ("matmul_bias_first", False), ("gemm", True), ("gemm_transb", True)],
    "rows": [("gemm", False), ("gemm_transb", False)],
    "nchw": [("conv", False)],
    "nhwc": [("matmul", False), ("matmul_bias_first", False)],
}


@st.composite
def block_specs(draw, layout: str) -> BlockSpec:
    fc, reshaped = draw(st.sampled_from(FC_BY_LAYOUT[layout]))
    acts = [a for a in ACTIVATIONS if not (layout == "nchw" and a in FUSED_BIAS)]
    token_mixing = layout == "tokens" and fc.startswith("matmul") and draw(st.booleans())
    gated = not reshaped and draw(st.booleans())
    biases = ["add", "none"] + (
        ["skip_layernorm"] if layout == "tokens" and fc.startswith("matmul") and not token_mixing else []
    )
    hidden = draw(st.integers(2, 24))
    return BlockSpec(
        fc=fc,
        act=draw(st.sampled_from(acts)),
        hidden=hidden,
        gated=gated,
        store=draw(st.sampled_from(["init", "constant", "transposed", "fp16"])),
        fc2_bias=draw(st.sampled_from(biases)),
        layout=reshaped,
        channels_last=layout == "nhwc",
        token_mixing=token_mixing,
        const_neurons=draw(st.integers(0, hidden)),
    )


@st.composite
def mlp_models(draw) -> tuple[onnx.ModelProto, list[BlockSpec], int]:
    layout = draw(st.sampled_from(sorted(FC_BY_LAYOUT)))
    specs = draw(st.lists(block_specs(layout), min_size=1, max_size=4))
    batch = draw(st.sampled_from([3, "batch"]))
    model = build_model(
        specs,
        dim=draw(st.integers(2, 8)),
        seq=draw(st.integers(2, 5)),
        seed=draw(st.integers(0, 99)),
        layernorm=draw(st.booleans()),
        residual=draw(st.booleans()),
        batch=batch,
    )
    return model, specs, 3


@given(case=mlp_models(), ratio=st.floats(0.0, 0.9), scope=st.sampled_from(["global", "per-block"]))
def test_random_graphs_keep_every_invariant(case, ratio: float, scope: str) -> None:
    model, specs, batch = case
    original = model.SerializeToString()
    batches = [random_batch(model, batch=batch, seed=s) for s in range(2)]
    blocks = find_mlp_blocks(model)
    assert [(b.width, b.activation) for b in blocks] == [(s.hidden, ACTIVATIONS[s.act]) for s in specs]
    stats = calibrate(model, blocks, batches)
    try:
        plan = select(stats, ratio, scope=scope)
    except SelectionError:
        assume(False)  # min-keep makes this ratio infeasible: a refusal, tested elsewhere

    pruned = rewrite(model, blocks, stats, plan)
    assert model.SerializeToString() == original  # the input is never modified
    onnx.checker.check_model(pruned, full_check=True)
    assert [b.width for b in find_mlp_blocks(pruned)] == [plan.keep[b.name].size for b in blocks]
    for feed in batches:
        before, after = run(model, feed), run(pruned, feed)
        assert [(a.shape, a.dtype) for a in after] == [(b.shape, b.dtype) for b in before]
        assert all(np.isfinite(a).all() for a in after)

    identity = rewrite(model, blocks, stats, select(stats, 0.0))
    for feed in batches:
        assert np.max(np.abs(run(identity, feed)[0] - run(model, feed)[0])) <= 1e-6

    # Pruning exactly the neurons that were constant on this data (all but one when a whole block
    # is constant, as --min-keep 1 demands) leaves the outputs unchanged up to float rounding.
    # Up to 4 stacked blocks re-round the folded bias to float32 and can end in a near-dead
    # output (ReLU, no bias, no residual), so the bound is 1e-4 of the output's scale, not the
    # single-block 1e-5; a wrong fold or slice moves outputs by a neuron's share, >= 1e-2.
    keep = {b.name: np.flatnonzero(stats[b.name].variance > 0) for b in blocks}
    keep = {name: k if k.size else np.array([0]) for name, k in keep.items()}
    constant_only = rewrite(model, blocks, stats, Plan(keep))
    for feed in batches:
        assert relative_change(run(model, feed)[0], run(constant_only, feed)[0]) <= 1e-4
