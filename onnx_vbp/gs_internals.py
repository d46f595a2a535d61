"""The two onnx-graphsurgeon internals onnx_vbp relies on, in one place.

gs has no public API to convert one constant to a TensorProto, nor to give a constant a shape and
dtype without data; `graph.export_model` needs both to export a model without copying its
weights twice. Written against onnx-graphsurgeon 0.5 to 0.6 (setup.cfg bounds it);
tests/test_gs_internals.py pins the behaviour relied on.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues


def tensor_proto(constant: gs.Constant) -> onnx.TensorProto:
    """The constant's values as a TensorProto, converted by gs itself (name, dtype, dims, data);
    4-bit integers by onnx, which packs two in a byte where gs writes one per byte."""
    if constant.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        return onnx.numpy_helper.from_array(np.asarray(constant.values), constant.name)
    return OnnxExporter.export_tensor_proto(constant)


def data_less(name: str, data_type: int, dims: list[int]) -> LazyValues:
    """Values for a gs.Constant that carry its dtype and shape but no data: gs exports them as an
    initializer with no data, which the caller fills in."""
    return LazyValues(onnx.TensorProto(name=name, data_type=data_type, dims=dims))
