"""A thin layer over onnx-graphsurgeon shared by the find and rewrite stages.

Both stages import the model the same way (`import_graph`), so tensor names recorded by `find`
name the same tensors when `rewrite` imports the model again.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from onnx_vbp.gs_internals import data_less, tensor_proto
from onnx_vbp.nbits import PackedWeight, is_nbits, quantize_blocks

# Ops that hand a parameter to its consumer unchanged up to layout, dtype or quantization:
# exporters put weights stored [out, in] behind a Transpose and fp16 weights behind a Cast, and
# quantizers put int8 weights and biases behind a DequantizeLinear (per tensor, per channel along
# one axis, or in blocks along one axis) or, weight-only, behind Mul(Cast(int8 W), scale). A
# Reshape passes only when its shape is a constant and it only adds or drops unit dims (Paddle's
# Add(conv, Reshape(bias, [1, C, 1, 1]))), so that the neuron axis maps one to one.
PARAM_PASS_THROUGH = ("Transpose", "Cast", "Identity", "Reshape", "DequantizeLinear", "Mul")
DEQUANTIZERS = ("DequantizeLinear", "Mul")
# Integer types a DequantizeLinear of a parameter may hold (float8 is not followed); 4-bit ones
# only in blocks (MatMulNBitsQuantizer's QDQ format), which are quantized again block by block.
QUANTIZED_DTYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)
FOUR_BIT_DTYPES = (ml_dtypes.int4, ml_dtypes.uint4)

_CONSTANT_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def import_graph(model: onnx.ModelProto, *, through_qdq: bool = False) -> gs.Graph:
    """Import `model` into onnx-graphsurgeon with every `Constant` node turned into a constant
    and every `Identity` bypassed.

    Exporters write weights, biases and activation scalars either as initializers or as
    `Constant` nodes, and leave `Identity` nodes in the data path (dropout, renames); folding
    both lets every matcher see one form. `through_qdq` (find's view of a statically quantized
    model) also bypasses every per-tensor QuantizeLinear -> DequantizeLinear pair, which rounds a
    tensor but keeps its shape and meaning, or reads it as the ReLU it stands for: a graph to
    read, not to export. The input model is not modified.
    """
    graph = gs.import_onnx(model)
    graph_outputs = {t.name for t in graph.outputs}
    folded = []
    for node in graph.nodes:
        if node.op != "Constant" or len(node.outputs) != 1 or node.outputs[0].name in graph_outputs:
            continue
        values = _constant_node_values(node)
        if values is None:
            continue
        out = node.outputs[0]
        node.outputs.clear()
        out.to_constant(values)
        folded.append(node)
    if not any(isinstance(value, gs.Graph) for node in graph.nodes for value in node.attrs.values()):
        folded += _bypass_identities(graph, graph_outputs)  # subgraphs may read a tensor by name: then keep them
        if through_qdq:
            folded += _bypass_qdq_pairs(graph, graph_outputs)
    if folded:
        folded_ids = {id(n) for n in folded}
        graph.nodes = [n for n in graph.nodes if id(n) not in folded_ids]
    return graph


def _bypass_identities(graph: gs.Graph, graph_outputs: set[str]) -> list[gs.Node]:
    """Connect the readers of every Identity (dropout left by an exporter, paddle2onnx's
    renames, weights aliased for tied layers) to its input; returns the bypassed nodes. Their
    outputs are no longer read, so an exported graph simply drops them."""
    bypassed = []
    for node in graph.nodes:
        if node.op != "Identity" or not in_default_domain(node) or node.outputs[0].name in graph_outputs:
            continue
        source, out = node.inputs[0], node.outputs[0]
        for reader in list(out.outputs):
            for index, tensor in enumerate(reader.inputs):
                if tensor is out:
                    reader.inputs[index] = source
        node.inputs.clear()  # gs keeps readers on tensors: the node must not read `source` any more
        node.outputs.clear()
        bypassed.append(node)
    return bypassed


def _bypass_qdq_pairs(graph: gs.Graph, graph_outputs: set[str]) -> list[gs.Node]:
    """Connect the readers of every DequantizeLinear(QuantizeLinear(x)) with one scale and zero
    point (ORT's static QDQ wraps every activation so) to x; returns the pairs' nodes once no
    reader is left on them.

        x -> QuantizeLinear -> DequantizeLinear -> readers    becomes    x -> readers
        linear -> QuantizeLinear(zero point at the type's minimum) -> DequantizeLinear
                                                              becomes    linear -> Relu

    ORT drops a ReLU after a MatMul/Add/Gemm/Conv and lets the quantizer clamp at 0 instead: such
    a pair is the ReLU.
    """
    bypassed = []
    for dq in graph.nodes:
        if dq.op != "DequantizeLinear" or not in_default_domain(dq) or dq.outputs[0].name in graph_outputs:
            continue
        q = producer(dq.inputs[0])
        if q is None or q.op != "QuantizeLinear" or not all(_is_scalar(t) for t in (*q.inputs[1:], *dq.inputs[1:])):
            continue
        source, out = q.inputs[0], dq.outputs[0]
        if _clamps_at_zero(q) and _is_linear_output(source):
            dq.op, dq.attrs, dq.domain = "Relu", {}, None
            dq.inputs.clear()
            dq.inputs.append(source)
        else:
            for reader in list(out.outputs):
                for index, tensor in enumerate(reader.inputs):
                    if tensor is out:
                        reader.inputs[index] = source
            dq.inputs.clear()
            dq.outputs.clear()
            bypassed.append(dq)
        if not q.outputs[0].outputs and q.outputs[0].name not in graph_outputs:
            q.inputs.clear()
            q.outputs.clear()
            bypassed.append(q)
    return bypassed


LINEAR_OPS = ("MatMul", "Gemm", "Conv")


def _is_linear_output(tensor: gs.Tensor) -> bool:
    """`tensor` comes from a MatMul/Gemm/Conv, or from the Add of its bias (ORT's static
    quantization folds a ReLU after these into the next QuantizeLinear)."""
    node = producer(tensor)
    if node is not None and node.op == "Add":  # one level only: a residual chain of Adds is not a bias
        return any(producer(t) is not None and producer(t).op in LINEAR_OPS for t in node.inputs)
    return node is not None and node.op in LINEAR_OPS


def _clamps_at_zero(quantize: gs.Node) -> bool:
    """A QuantizeLinear whose zero point is its type's minimum: every negative input becomes 0."""
    if len(quantize.inputs) < 3 or not isinstance(quantize.inputs[2], gs.Constant):
        return False  # no zero point: uint8 with 0, which clamps too, but ORT always writes one
    zero_point = np.asarray(quantize.inputs[2].values)
    return zero_point.dtype.kind in "iu" and int(zero_point.reshape(-1)[0]) == np.iinfo(zero_point.dtype).min


def _is_scalar(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) == 1


def _constant_node_values(node: gs.Node) -> np.ndarray | None:
    if "value" in node.attrs:
        return np.asarray(node.attrs["value"].values)
    for attr, dtype in _CONSTANT_ATTRS.items():
        if attr in node.attrs:
            return np.asarray(node.attrs[attr], dtype=dtype)
    return None  # sparse_value / string values: never a weight, leave the node alone


def export_model(graph: gs.Graph, like: onnx.ModelProto, edited: set[str]) -> onnx.ModelProto:
    """Export `graph`, imported from `like`, carrying over the model-level fields gs does not keep.

    Every weight is copied once, into the returned model. gs alone would gather the initializers,
    copy them into a GraphProto, and `make_model` would copy that graph again. So the initializers
    leave gs as data-less shells, and each one's data is then set in the model, one tensor at a
    time: the original initializer where the constant is not among `edited` (names), else the
    edited values, converted by gs itself.
    """
    originals = {t.name: t for t in like.graph.initializer}
    sources: dict[str, onnx.TensorProto] = {}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or not (tensor.name in edited or tensor.name in originals):
            continue
        source = tensor_proto(tensor) if tensor.name in edited else originals[tensor.name]
        sources[tensor.name] = source
        tensor.values = data_less(tensor.name, source.data_type, list(source.dims))
    model = gs.export_onnx(graph, do_type_check=False)
    for initializer in model.graph.initializer:
        source = sources.pop(initializer.name, None)
        if source is not None:
            initializer.CopyFrom(source)
    model.ir_version = like.ir_version
    model.doc_string = like.doc_string
    model.domain = like.domain
    model.model_version = like.model_version
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def in_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def node_key(node: gs.Node) -> str:
    """A stable identity for a node across imports: the name of its first output (SSA-unique)."""
    return node.outputs[0].name


def nodes_by_key(graph: gs.Graph) -> dict[str, gs.Node]:
    """The graph's nodes by `node_key`: how records (ParamRef, BiasRef) name the nodes they mean."""
    return {node_key(n): n for n in graph.nodes}


def node_label(node: gs.Node) -> str:
    """The node's name for people; exporters that leave names empty get the op and output."""
    return node.name or f"{node.op}({node.outputs[0].name})"


def scalar(tensor: gs.Tensor) -> float | None:
    """The value of a constant holding one number, else None; also behind the ops `trace_param`
    follows (ORT's session optimizer folds a static QDQ model's quantized constants, GELU's 0.5
    and 1, into DequantizeLinear(integer constant))."""
    if isinstance(tensor, gs.Constant):
        return float(np.asarray(tensor.values).reshape(())) if int(np.prod(tensor.shape)) == 1 else None
    traced = trace_param(tensor) if producer(tensor) is not None else None
    if traced is None or int(np.prod(traced.shape)) != 1:
        return None
    return float(np.asarray(traced.value()).reshape(()))


@dataclass
class TracedParam:
    """A constant that reaches a consumer input through a chain of pass-through ops."""

    source: gs.Constant
    chain: list[gs.Node]  # from the consumer back towards the source

    def source_axis(self, axis: int) -> int:
        """Map an axis of the value the consumer sees to the matching axis of the source."""
        return self.link_axes(axis)[-1]

    def link_axes(self, axis: int) -> list[int]:
        """Where `axis` of the value the consumer sees is in the output of each link of the
        chain (consumer side first), then in the source."""
        shapes = self._shapes()
        axis %= len(shapes[-1])
        axes = []
        for index, node in enumerate(self.chain):
            axes.append(axis)
            out_shape, in_shape = shapes[len(self.chain) - index], shapes[len(self.chain) - index - 1]
            if node.op == "Transpose":
                perm = node.attrs.get("perm", list(range(len(out_shape)))[::-1])
                axis = perm[axis]
            elif node.op == "Reshape":  # the same non-unit dim, counted in the input's shape
                rank_among = sum(1 for d in out_shape[:axis] if d != 1)
                axis = [i for i, d in enumerate(in_shape) if d != 1][rank_among]
        return [*axes, axis]

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape as the consumer sees it, read without loading its values (a
        large external weight stays on disk)."""
        return self._shapes()[-1]

    def _shapes(self) -> list[tuple[int, ...]]:
        """The source's shape, then the shape after each link of the chain (source side first)."""
        shapes = [tuple(self.source.shape)]
        for node in reversed(self.chain):
            shape = shapes[-1]
            if node.op == "Transpose":
                shape = tuple(shape[axis] for axis in node.attrs.get("perm", range(len(shape))[::-1]))
            elif node.op == "Reshape":
                shape = _reshaped(shape, np.asarray(node.inputs[1].values).tolist(), node.attrs.get("allowzero", 0))
            shapes.append(shape)
        return shapes

    def value(self) -> np.ndarray:
        """The parameter as the consumer sees it."""
        value = np.asarray(self.source.values)
        for node in reversed(self.chain):
            if node.op == "Transpose":
                value = np.transpose(value, node.attrs.get("perm"))
            elif node.op == "Cast":
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
            elif node.op == "Reshape":
                target = np.asarray(node.inputs[1].values).tolist()
                value = value.reshape(_reshaped(value.shape, target, node.attrs.get("allowzero", 0)))
            elif node.op in DEQUANTIZERS:
                scale, zero_point = dequantizer(node, value.ndim)
                value = ((value.astype(np.float64) - zero_point) * scale).astype(scale.dtype)
        return value

    def assign(self, value: np.ndarray) -> None:
        """Store `value`, given as the consumer sees it, into the source (undoing the chain). Behind
        a DequantizeLinear (or a weight-only scale) it is quantized again: its scale is kept where
        the values fit in the integer range, else widened (in place: `rewrite` owns the scale
        first)."""
        shapes = self._shapes()
        for index, node in enumerate(self.chain):
            if node.op == "Transpose":
                perm = node.attrs.get("perm", list(range(value.ndim))[::-1])
                value = np.transpose(value, np.argsort(perm))
            elif node.op == "Reshape":
                value = value.reshape(shapes[len(self.chain) - index - 1])
            elif node.op in DEQUANTIZERS:
                value = _requantize(node, value, np.asarray(self.source.values).dtype)
        self.source.values = np.ascontiguousarray(value.astype(np.asarray(self.source.values).dtype))

    def tensors(self) -> list[gs.Tensor]:
        """Every tensor of the chain, source included."""
        return [self.source] + [n.outputs[0] for n in self.chain]


def param_input(node: gs.Node) -> int:
    """Which input of a pass-through op carries the parameter (the others hold its shape, scale
    or zero point): the one a weight-only scale's Mul does not take as a constant."""
    if node.op == "Mul":
        return next(i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant))
    return 0


def scale_input(node: gs.Node) -> int:
    """Which input of a dequantizer (DEQUANTIZERS) holds its scale."""
    return 1 - param_input(node) if node.op == "Mul" else 1


def quantizer_inputs(node: gs.Node) -> list[int]:
    """The inputs of a dequantizer that hold its scale and zero point (given as constants)."""
    if node.op == "Mul":
        return [scale_input(node)]
    return [i for i in (1, 2) if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant)]


def dequantizer(node: gs.Node, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A dequantizer's scale and zero point, shaped to broadcast over its input of `rank` dims:
    one value, or one per index of its channel axis (a DequantizeLinear's `axis`; for a
    weight-only Mul, the scale's one dim longer than 1, its shape aligned from the right)."""
    scale = np.asarray(node.inputs[scale_input(node)].values)
    if node.op == "Mul":
        return scale.reshape((1,) * (rank - scale.ndim) + scale.shape), np.zeros(())
    present = len(node.inputs) > 2 and node.inputs[2].name
    zero_point = np.asarray(node.inputs[2].values, dtype=np.float64) if present else np.zeros(())
    axis = block_axis(node)
    if axis is not None:  # one scale per block of `block_size` along `axis`: repeated over each block
        size, block = node.inputs[0].shape[axis], int(node.attrs["block_size"])
        scale = np.repeat(scale, block, axis=axis).take(np.arange(size), axis=axis)
        if present:
            zero_point = np.repeat(zero_point, block, axis=axis).take(np.arange(size), axis=axis)
        return scale, zero_point
    if scale.size == 1:
        return scale.reshape(()), zero_point.reshape(())
    shape = [1] * rank
    shape[node.attrs.get("axis", 1) % rank] = scale.size
    return scale.reshape(shape), zero_point.reshape(shape) if zero_point.size > 1 else zero_point.reshape(())


def indexed_axes(node: gs.Node, rank: int) -> tuple[int, ...]:
    """The axes of its input (`rank` dims) along which a dequantizer's scale holds one value per
    index: its channel axis (per channel), every axis but the blocked one (in blocks), or none
    (one scale in all)."""
    blocked = block_axis(node)
    if blocked is not None:
        return tuple(axis for axis in range(rank) if axis != blocked)
    axis = _channel_axis(dequantizer(node, rank)[0])
    return () if axis is None else (axis,)


def block_axis(node: gs.Node) -> int | None:
    """The axis a DequantizeLinear with `block_size` has one scale per block of, else None."""
    if node.op != "DequantizeLinear" or not node.attrs.get("block_size", 0):
        return None
    return int(node.attrs.get("axis", 1)) % len(node.inputs[0].shape)


def _channel_axis(scale: np.ndarray) -> int | None:
    """The axis of a broadcastable scale longer than 1, or None for one scale in all."""
    return next((axis for axis, size in enumerate(scale.shape) if size > 1), None)


def _requantize(node: gs.Node, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`value` quantized for the dequantizer `node` (see `quantize`), its scale constant widened
    where needed; in blocks, every block's scale (and zero point) chosen anew."""
    if block_axis(node) is not None:
        return _requantize_blocks(node, value, dtype)
    scale, zero_point = dequantizer(node, value.ndim)
    ints, wider = quantize(value, scale, zero_point, dtype)
    if np.any(wider != scale):
        constant = node.inputs[scale_input(node)]
        constant.values = wider.reshape(np.asarray(constant.values).shape)
    return ints


def _requantize_blocks(node: gs.Node, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`value` quantized in blocks of `block_size` along the DequantizeLinear's axis (see
    `nbits.quantize_blocks`): symmetric without a zero point, over each block's range with one.
    The scale and zero point constants are replaced by the new blocks' (their axis may have
    shrunk)."""
    axis, block = block_axis(node), int(node.attrs["block_size"])
    limits = ml_dtypes.iinfo(dtype)
    moved = np.moveaxis(value.astype(np.float64), axis, -1)  # blocks along the last axis
    has_zero = len(node.inputs) > 2 and node.inputs[2].name
    codes, scales, zeros = quantize_blocks(moved, block, int(limits.min), int(limits.max), symmetric=not has_zero)
    for index, values in ((1, scales), (2, zeros))[: 1 + bool(has_zero)]:
        constant = node.inputs[index]
        constant.values = np.moveaxis(values, -1, axis).astype(np.asarray(constant.values).dtype)
    return np.moveaxis(codes[..., : moved.shape[-1]], -1, axis).astype(dtype)


def dequantized_rows(rows: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """An integer weight [rows, outputs] as float64, (rows - zero_point) * scale, the two given as
    one value or one per output."""
    shift = 0.0 if zero_point is None else np.asarray(zero_point, np.float64).reshape(1, -1)
    return (rows.astype(np.float64) - shift) * np.asarray(scale, np.float64).reshape(1, -1)


def quantize(
    value: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """`value` as integers of `dtype` for (q - zero_point) * scale, with `scale` and `zero_point`
    shaped to broadcast over it (one value, or one per index of one axis): (integers, scale). The
    scale is kept where the values fit the integer range around the zero point, else widened to
    the smallest that fits them, channel by channel."""
    limits = np.iinfo(dtype)
    axis = _channel_axis(scale)
    others = tuple(i for i in range(value.ndim) if i != axis)
    high = np.maximum(value.max(axis=others, keepdims=True), 0.0) / (limits.max - zero_point)
    low = np.minimum(value.min(axis=others, keepdims=True), 0.0) / (limits.min - zero_point)
    needed = np.maximum(high, low).reshape(scale.shape) if value.size else np.zeros(scale.shape)
    wider = np.maximum(scale, needed.astype(scale.dtype))
    ints = np.clip(np.rint(value / wider.astype(np.float64)) + zero_point, limits.min, limits.max)
    return ints.astype(dtype), wider


def trace_input(node: gs.Node, index: int) -> TracedParam | PackedWeight | None:
    """The constant behind input `index` of `node` (see `trace_param`); for a MatMulNBits' packed
    weight, the float matrix it stands for."""
    if is_nbits(node) and index == 1:
        return PackedWeight.of(node)
    return trace_param(node.inputs[index])


def trace_param(tensor: gs.Tensor) -> TracedParam | None:
    """Follow `tensor` up through pass-through ops to a constant; None if it is not constant."""
    chain = []
    while not isinstance(tensor, gs.Constant):
        node = producer(tensor)
        if node is None or node.op not in PARAM_PASS_THROUGH:
            return None
        if node.op == "Reshape" and not _constant_shape(node):
            return None
        if node.op == "DequantizeLinear" and not _dequantizes_param(node):
            return None
        if node.op == "Mul" and not _scales_a_param(node):
            return None
        chain.append(node)
        tensor = node.inputs[param_input(node)]
    traced = TracedParam(tensor, chain)
    for index, node in enumerate(chain):  # a weight-only scale: Mul(Cast(integer constant), scale)
        if node.op != "Mul":
            continue
        if index != len(chain) - 2 or chain[-1].op != "Cast" or not _quantized(tensor):
            return None
        shape, scale_shape = tuple(tensor.shape), tuple(node.inputs[scale_input(node)].shape)
        if len(scale_shape) > len(shape) or np.broadcast_shapes(shape, scale_shape) != shape:
            return None
    if any(node.op == "Reshape" for node in chain):
        try:
            shapes = traced._shapes()
        except ValueError:  # a shape that does not fit its input
            return None
        if any([d for d in a if d != 1] != [d for d in b if d != 1] for a, b in itertools.pairwise(shapes)):
            return None  # a Reshape that merges or splits dims: no one-to-one neuron axis
    return traced


def _dequantizes_param(node: gs.Node) -> bool:
    """A DequantizeLinear of a constant integer tensor, by a constant scale and zero point given
    per tensor, per channel, or in blocks along one axis (int4 too): one that `assign` can
    quantize back."""
    if not in_default_domain(node) or not isinstance(node.inputs[1], gs.Constant):
        return False
    zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zero is not None and not isinstance(zero, gs.Constant):
        return False
    data = node.inputs[0]
    if not node.attrs.get("block_size", 0):
        return _quantized(data)
    if not isinstance(data, gs.Constant) or data.dtype not in (*QUANTIZED_DTYPES[:2], *FOUR_BIT_DTYPES):
        return False
    shape, block = tuple(data.shape), int(node.attrs["block_size"])
    axis = int(node.attrs.get("axis", 1))
    if not -len(shape) <= axis < len(shape):
        return False
    blocked = list(shape)
    blocked[axis] = -(-shape[axis] // block)
    return tuple(node.inputs[1].shape) == tuple(blocked) and (zero is None or tuple(zero.shape) == tuple(blocked))


def _quantized(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and tensor.dtype in QUANTIZED_DTYPES


def _scales_a_param(mul: gs.Node) -> bool:
    """Mul(x, scale) with one constant floating-point scale of at most one dim longer than 1."""
    constants = [t for t in mul.inputs if isinstance(t, gs.Constant)]
    if len(mul.inputs) != 2 or len(constants) != 1:
        return False
    shape = constants[0].shape
    return constants[0].dtype.kind == "f" and sum(1 for d in shape if d != 1) <= 1


def _constant_shape(reshape: gs.Node) -> bool:
    """The Reshape's target shape is a constant 1-D integer tensor."""
    if len(reshape.inputs) < 2 or not isinstance(reshape.inputs[1], gs.Constant):
        return False
    target = np.asarray(reshape.inputs[1].values)
    return target.ndim == 1 and target.dtype.kind in "iu"


def _reshaped(shape: tuple[int, ...], target: list[int], allowzero: int) -> tuple[int, ...]:
    """The output shape of Reshape(shape -> target): 0 copies the input's dim (unless
    allowzero), -1 takes what is left. ValueError if it does not fit."""
    dims = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(target)]
    total = int(np.prod(shape, dtype=np.int64))
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            raise ValueError(f"cannot reshape {shape} to {target}")
        dims[dims.index(-1)] = total // known
    if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) != total:
        raise ValueError(f"cannot reshape {shape} to {target}")
    return tuple(int(d) for d in dims)


class DiskWeights:
    """The initializers a model keeps in external data files (it was loaded without them), read
    into gs constants one at a time, only when a stage needs their values."""

    def __init__(self, model: onnx.ModelProto, folder: Path | None) -> None:
        self.folder = folder
        self.tensors = {t.name: t for t in model.graph.initializer if uses_external_data(t)}

    def load_param(self, param: TracedParam | PackedWeight) -> None:
        """Give every constant of a traced parameter its values."""
        for tensor in param.tensors():
            if isinstance(tensor, gs.Constant):
                self.load(tensor)

    def load(self, const: gs.Constant) -> None:
        """Give `const` its values if they are still on disk (a no-op otherwise)."""
        tensor = self.tensors.pop(const.name, None)
        if tensor is None:
            return
        if self.folder is None:
            raise ValueError(f"weight '{tensor.name}' is in external data: pass external_dir")
        const.values = numpy_helper.to_array(tensor, base_dir=str(self.folder))
        const.data_location = None  # else gs exports the edited tensor marked external, with no location


class ConstantReader:
    """The values of a model's constants, by the node that reads them and the input (traced back
    through pass-through ops, see `trace_input`); external data is read only for those asked."""

    def __init__(self, model: onnx.ModelProto, external_dir: Path | None) -> None:
        self.nodes = nodes_by_key(import_graph(model))
        self.disk = DiskWeights(model, external_dir)

    def value(self, node: str, index: int) -> np.ndarray:
        traced = trace_input(self.nodes[node], index)
        self.disk.load_param(traced)
        return traced.value()


def with_outputs(model: onnx.ModelProto, names: list[str], fused_sums: Mapping[str, str] | None = None) -> bytes:
    """Serialize `model` with the tensors `names` added to its graph outputs.

    Protobuf merges concatenated serializations of a message (repeated fields append), so the
    extra outputs are appended to the serialized model without copying its weights into a second
    ModelProto. The outputs carry no type: ORT takes it from the producing node.

    `fused_sums` maps the first output of a fused SkipLayerNormalization to the name of its
    optional output 3 (input + skip + bias): where the model leaves that output out, the node is
    given it for the serialization only (`model` is left as it was).
    """
    widened = []
    for node in model.graph.node:
        if fused_sums and node.output and node.output[0] in fused_sums and (len(node.output) < 4 or not node.output[3]):
            widened.append((node, list(node.output)))
            del node.output[3:]
            node.output.extend([""] * (3 - len(node.output)) + [fused_sums[node.output[0]]])
    try:
        existing = {o.name for o in model.graph.output}
        extra = [onnx.ValueInfoProto(name=name) for name in names if name not in existing]
        addition = onnx.ModelProto(graph=onnx.GraphProto(output=extra))
        return model.SerializeToString() + addition.SerializeToString()
    finally:
        for node, outputs in widened:
            del node.output[:]
            node.output.extend(outputs)
