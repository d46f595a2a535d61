"""The supported order for int8 deployments: prune the float model, then quantize it with ORT.

A model in a form onnx_vbp does not prune (QOperator) is refused with that hint
(tests/test_cli.py); here that order is shown to work: the pruned float model quantizes like any
other, keeps its narrower MLPs, and its int8 outputs stay as close to the pruned float model's as
quantization keeps the unpruned one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from graphs import BlockSpec, build_model, random_batch
from helpers import relative_change
from onnxruntime.quantization import QuantType, quantize_dynamic

from onnx_vbp import PruneOptions, find_mlp_blocks, prune_file


def _integer_weight_elements(path: Path) -> int:
    """Elements of the int8 weight matrices (not the scalar zero points)."""
    model = onnx.load(path)
    return sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    )


def test_prune_then_quantize_dynamic(tmp_path: Path) -> None:
    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=64, act="relu")], dim=32, seq=6, layernorm=True)
    onnx.save(model, tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", **random_batch(model, batch=64, seed=0))
    report = prune_file(
        tmp_path / "net.onnx", tmp_path / "calib.npz", tmp_path / "pruned.onnx", PruneOptions(ratio=0.5, progress=False)
    )
    assert report.neurons_after == 64
    for name in ("net", "pruned"):
        quantize_dynamic(
            str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.int8.onnx"), weight_type=QuantType.QInt8
        )

    feed = random_batch(model, batch=16, seed=9)
    outputs = {
        name: ort.InferenceSession(str(tmp_path / f"{name}.onnx")).run(None, feed)[0]
        for name in ("net", "pruned", "net.int8", "pruned.int8")
    }
    quantization_error = relative_change(outputs["net"], outputs["net.int8"])
    assert relative_change(outputs["pruned"], outputs["pruned.int8"]) < 3 * quantization_error + 1e-3
    # the quantized pruned model keeps the pruned widths: half the int8 MLP weights
    assert (
        _integer_weight_elements(tmp_path / "pruned.int8.onnx")
        == _integer_weight_elements(tmp_path / "net.int8.onnx") // 2
    )
    # the int8 blocks, found again at their pruned widths (dynamic int8 is pruned in place too)
    assert sorted(b.width for b in find_mlp_blocks(onnx.load(tmp_path / "pruned.int8.onnx"))) == sorted(
        b.width for b in find_mlp_blocks(onnx.load(tmp_path / "pruned.onnx"))
    )
