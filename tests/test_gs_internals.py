"""The onnx-graphsurgeon internals behind onnx_vbp.gs_internals behave as graph.export_model needs.

A gs release that changes them fails here, by name, instead of somewhere in a rewrite.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnx_vbp.gs_internals import data_less, tensor_proto


def test_installed_graphsurgeon_is_in_the_range_written_for() -> None:
    major, minor = (int(part) for part in version("onnx-graphsurgeon").split(".")[:2])
    assert (0, 5) <= (major, minor) < (0, 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int8])
def test_tensor_proto_round_trips_a_constant(dtype: type) -> None:
    values = (np.arange(12).reshape(3, 4) - 5).astype(dtype)
    proto = tensor_proto(gs.Constant("w", values))
    assert proto.name == "w"
    assert list(proto.dims) == [3, 4]
    np.testing.assert_array_equal(numpy_helper.to_array(proto), values)
    assert numpy_helper.to_array(proto).dtype == dtype


def test_data_less_values_export_as_an_initializer_with_shape_and_no_data() -> None:
    x = gs.Variable("x", np.float32, [2, 3])
    weight = gs.Constant("w", data_less("w", onnx.TensorProto.FLOAT, [3, 4]))
    y = gs.Variable("y", np.float32, [2, 4])
    graph = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, weight], outputs=[y])], inputs=[x], outputs=[y])
    assert tuple(weight.shape) == (3, 4)
    assert weight.dtype == np.float32
    (initializer,) = gs.export_onnx(graph, do_type_check=False).graph.initializer
    assert (initializer.name, initializer.data_type, list(initializer.dims)) == ("w", onnx.TensorProto.FLOAT, [3, 4])
    assert not initializer.raw_data and not initializer.float_data
