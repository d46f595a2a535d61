"""Stage 1, find: every MLP block `fc1 -> activation -> fc2` of a graph, as plain records.

A block is matched from its fc2 upwards, along explicit op-type paths:

    fc2 input  <- [Reshape | Flatten]*  <- activation (see `activations.py`)
               <- [Reshape | Flatten]*  <- fc1 [+ bias Add]
    gated:     fc2 input <- [layout]* <- Mul(activation(gate(x)), up(x))

fc1 / fc2 (`Linear` below) are one of
    MatMul(x, W) [+ Add(b, .) either operand order]     W [in, out]
    Gemm(x, W, C), transA = 0, any transB                W [in, out] or [out, in]
    Conv(x, W, B), 1x1 kernel (any rank), group 1, no padding   features on axis 1
    MatMulInteger of ORT's dynamic quantization, or its fused forms (see `_integer_linear`)
    QLinearMatMul -> DequantizeLinear [+ Add], static QDQ as ORT's session optimizer fuses it
    com.microsoft MatMulNBits(x, B, scales, ...) [+ Add]  W [in, out] packed in blocks (nbits.py)
where W and the biases are constants, possibly behind Transpose / Cast / Identity /
DequantizeLinear (or a weight-only scale's Mul). fc2's bias
may also be input 4 of a following com.microsoft SkipLayerNormalization.

Not MLPs: fc2 that is not a linear (1x1 -> ReLU -> 3x3 conv), grouped convolutions, non-constant
weights. A structural match whose intermediate tensors feed anything outside the block is
reported in `BlockList.skipped` with the reason, since slicing it would change that consumer.
Blocks that share fc weights (tied layers) are merged into one block with several sites.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_vbp.activations import Activation, match_activation
from onnx_vbp.graph import (
    TracedParam,
    import_graph,
    in_default_domain,
    node_key,
    node_label,
    producer,
    trace_param,
)
from onnx_vbp.nbits import PackedWeight, is_nbits
from onnx_vbp.records import BiasRef, BlockList, MlpBlock, MlpSite, ParamRef, SkippedBlock

LAYOUT_OPS = ("Reshape", "Flatten")
# An integer fc2's quantization of its float input (the same tensor, rounded): op -> the fc2 ops
# that read it
INPUT_QUANTIZERS = {
    "DynamicQuantizeLinear": ("MatMulInteger", "MatMulIntegerToFloat"),
    "QuantizeLinear": ("QLinearMatMul",),
}
# Between the activation and fc2: layouts, and an integer fc2's quantization of its input.
HIDDEN_PATH_OPS = (*LAYOUT_OPS, *INPUT_QUANTIZERS)


@dataclass
class Linear:
    node: gs.Node
    weight_input: int
    weight: TracedParam | PackedWeight
    in_axis: int  # weight axis (as the node sees it) over input features
    out_axis: int  # weight axis over output features
    feature_axis: int  # axis of the data tensors over features
    bias_node: gs.Node | None  # node holding the bias constant (the Gemm/Conv itself, or an Add)
    bias_input: int | None
    output: gs.Tensor  # after the bias
    alpha: float = 1.0
    beta: float = 1.0
    bias_axis: int = -1  # axis of the bias (as the Add sees it) over output features
    # an integer linear (ORT dynamic quantization): the nodes from its MatMulInteger to `output`
    # before the bias (Cast, Mul by the scales), the node multiplying the input's scale by the
    # weight's, and the weight's scale and zero point (per tensor, or per output feature)
    steps: tuple[gs.Node, ...] = ()
    scales_node: gs.Node | None = None
    scale: ParamRef | None = None
    zero_point: ParamRef | None = None
    per_channel: tuple[ParamRef, ...] = ()  # those of the two with one value per output feature

    @property
    def in_features(self) -> int:
        return self.weight.shape[self.in_axis]

    @property
    def out_features(self) -> int:
        return self.weight.shape[self.out_axis]


def _is_present(tensor: gs.Tensor) -> bool:
    return bool(tensor.name)


def _match_bias_add(
    out: gs.Tensor, features: int, feature_axis: int = -1, rank: int = 0
) -> tuple[gs.Node, int, int] | None:
    """`out`'s only consumer is Add(out, b) with b a constant that broadcasts over `out`'s
    `feature_axis` only (of `rank` dims, needed when that axis is not the last): (Add, input of
    b, b's axis over the features)."""
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    for i, other in enumerate(add.inputs):
        if other is out:
            continue
        traced = trace_param(other)
        shape = traced.shape if traced else ()
        # the axis of b over `out`'s feature axis, the two shapes aligned from the right
        axis = len(shape) - 1 if feature_axis == -1 else feature_axis - rank + len(shape)
        if shape and 0 <= axis < len(shape) and shape[axis] == features and int(np.prod(shape)) == features:
            return add, i, -1 if feature_axis == -1 else axis
    return None


def match_linear(node: gs.Node) -> Linear | None:
    """Recognise MatMul[+Add] / Gemm / 1x1 Conv / MatMulNBits / ORT's integer MatMuls with
    constant weights, else None."""
    if is_nbits(node):
        return _nbits_linear(node)
    fused_integer = node.op in FUSED_INTEGER_LINEARS and node.domain == "com.microsoft"
    qlinear = node.op == "QLinearMatMul"  # its 8 inputs: x, x_scale, x_zero, W, w_scale, w_zero, y_scale, y_zero
    if not (in_default_domain(node) or fused_integer) or len(node.inputs) < (8 if qlinear else 2):
        return None
    weight = trace_param(node.inputs[3 if qlinear else 1])
    if weight is None:
        return None
    rank = len(weight.shape)  # shapes only: finding blocks loads no weight
    out = node.outputs[0]
    if fused_integer or qlinear:
        return _integer_linear(node, weight) if rank == 2 else None
    if node.op == "MatMul" and rank == 2:
        return _with_bias_add(Linear(node, 1, weight, 0, 1, -1, None, None, out))
    if node.op == "Gemm" and rank == 2 and not node.attrs.get("transA", 0):
        in_axis, out_axis = (1, 0) if node.attrs.get("transB", 0) else (0, 1)
        linear = Linear(
            node,
            1,
            weight,
            in_axis,
            out_axis,
            -1,
            None,
            None,
            out,
            alpha=float(node.attrs.get("alpha", 1.0)),
            beta=float(node.attrs.get("beta", 1.0)),
        )
        return _with_own_bias(linear)
    if node.op == "MatMulInteger" and rank == 2:
        return _integer_linear(node, weight)
    if node.op == "Conv" and rank >= 3:
        kernel = weight.shape[2:]
        pads = node.attrs.get("pads", [0])
        if any(k != 1 for k in kernel) or node.attrs.get("group", 1) != 1 or any(pads):
            return None
        linear = _with_own_bias(Linear(node, 1, weight, 1, 0, 1, None, None, out))
        if linear is not None and linear.bias_node is None:  # Paddle: Add(conv, Reshape(bias, [1, C, 1, 1]))
            return _with_bias_add(linear, rank)
        return linear
    return None


# ORT's optimizer fuses a dynamically quantized linear into one com.microsoft op: where it reads
# the weight's scale, its zero point and the bias
FUSED_INTEGER_LINEARS = {"DynamicQuantizeMatMul": (2, 3, 4), "MatMulIntegerToFloat": (3, 5, 6)}


def _integer_linear(node: gs.Node, weight: TracedParam) -> Linear | None:
    """ORT's dynamic quantization of x @ W, with W = (Wq - w_zero) * w_scale, as its quantizer
    writes it, or as its optimizer fuses it (FUSED_INTEGER_LINEARS):

    xq, x_scale, x_zero = DynamicQuantizeLinear(x)
    MatMulInteger(xq, Wq, x_zero, w_zero) -> Cast(float) -> Mul(·, Mul(x_scale, w_scale)) [+ Add(b)]
    MatMulIntegerToFloat(xq, Wq, x_scale, w_scale, x_zero, w_zero, b)                   [+ Add(b)]
    DynamicQuantizeMatMul(x, Wq, w_scale, w_zero, b)  (x quantized inside)              [+ Add(b)]

    and static QDQ as ORT's session optimizer fuses it, the scales and zero points of its input
    and output single values:

    QLinearMatMul(QuantizeLinear(x), x_scale, x_zero, Wq, w_scale, w_zero, y_scale, y_zero)
        -> DequantizeLinear                                                              [+ Add(b)]
    """
    fused = FUSED_INTEGER_LINEARS.get(node.op)
    if node.op == "QLinearMatMul":
        dequantize = _only_reader(node.outputs[0], "DequantizeLinear")
        activation_scales = [trace_param(node.inputs[i]) for i in (1, 2, 6, 7)]
        if dequantize is None or any(t is None or int(np.prod(t.shape)) != 1 for t in activation_scales):
            return None
        linear = Linear(node, 3, weight, 0, 1, -1, None, None, dequantize.outputs[0])
        linear.steps = (dequantize,)
        scale_at, zero_index, bias_index = (node, 4), 5, None
    elif fused is not None:
        linear = Linear(node, 1, weight, 0, 1, -1, None, None, node.outputs[0])
        scale_at, zero_index, bias_index = (node, fused[0]), fused[1], fused[2]
    else:
        cast = _only_reader(node.outputs[0], "Cast")
        mul = _only_reader(cast.outputs[0], "Mul") if cast is not None else None
        if mul is None or len(mul.inputs) != 2:
            return None
        scales = producer(next(t for t in mul.inputs if t is not cast.outputs[0]))
        if scales is None or scales.op != "Mul":
            return None
        constants = [i for i, t in enumerate(scales.inputs) if trace_param(t) is not None]
        if len(constants) != 1:
            return None
        linear = Linear(node, 1, weight, 0, 1, -1, None, None, mul.outputs[0])
        linear.steps, linear.scales_node = (cast, mul), scales
        scale_at, zero_index, bias_index = (scales, constants[0]), 3, None
    has_zero = len(node.inputs) > zero_index and _is_present(node.inputs[zero_index])
    quantizers = [scale_at] + [(node, zero_index)] * has_zero
    refs = []  # the weight's scale and zero point: one value, or one per output feature
    for owner, index in quantizers:
        traced = trace_param(owner.inputs[index])
        size = None if traced is None else int(np.prod(traced.shape))
        if size not in (1, linear.out_features):
            return None
        refs.append((ParamRef(node_key(owner), index, -1), size))
    linear.scale, linear.zero_point = refs[0][0], refs[1][0] if len(refs) > 1 else None
    linear.per_channel = tuple(ref for ref, size in refs if size == linear.out_features > 1)
    if bias_index is not None:
        linear = _with_own_bias(linear, bias_index)
        if linear is None or linear.bias_node is not None:
            return linear
    return _with_bias_add(linear)


def _nbits_linear(node: gs.Node) -> Linear | None:
    """MatMulNBits(x, B, scales[, zero_points, , bias]) [+ Add(b)]: x @ W [+ bias], W [K, N] in
    4-bit (or 2, 8) blocks along K (see `nbits.py`)."""
    weight = PackedWeight.of(node)
    if weight is None:
        return None
    linear = _with_own_bias(Linear(node, 1, weight, 0, 1, -1, None, None, node.outputs[0]), 5)
    if linear is not None and linear.bias_node is None:
        return _with_bias_add(linear)
    return linear


def _only_reader(tensor: gs.Tensor, op: str) -> gs.Node | None:
    readers = tensor.outputs
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _with_bias_add(linear: Linear, rank: int = 0) -> Linear:
    """`linear`, with the bias of a following Add if there is one (see `_match_bias_add`)."""
    bias = _match_bias_add(linear.output, linear.out_features, linear.feature_axis, rank)
    if bias is not None:
        linear.bias_node, linear.bias_input, linear.bias_axis = bias
        linear.output = bias[0].outputs[0]
    return linear


def _with_own_bias(linear: Linear, index: int = 2) -> Linear | None:
    """Gemm / Conv carry the bias as input 2 (MatMulNBits as input 5, ORT's fused integer ops
    elsewhere); it must be a per-feature constant if present."""
    node = linear.node
    if len(node.inputs) > index and _is_present(node.inputs[index]):
        bias = trace_param(node.inputs[index])
        if bias is None or int(np.prod(bias.shape)) != linear.out_features:
            return None
        linear.bias_node, linear.bias_input = node, index
    return linear


def _fc2_bias(fc2: Linear) -> BiasRef:
    if fc2.bias_node is not None:
        return BiasRef(node_key(fc2.bias_node), fc2.bias_input, fc2.alpha / fc2.beta)
    if fc2.node.op in ("Gemm", "Conv"):
        return BiasRef(node_key(fc2.node), 2, fc2.alpha / fc2.beta)
    out = fc2.output
    if len(out.outputs) == 1 and out.outputs[0].op == "SkipLayerNormalization":
        return BiasRef(node_key(out.outputs[0]), 4)
    return BiasRef(node_key(fc2.node), None)


# what `_residual` returns where fc2's output joins no residual stream it can follow
_NO_RESIDUAL = (None, None, None, None)


def _residual(fc2: Linear, taken: set[str]) -> tuple[str | None, str | None, ParamRef | None, ParamRef | None]:
    """Where fc2's output (after its bias) is added to the residual stream:

        fc2 [-> Add(bias)] [-> Reshape]* [-> Mul(scale)] [-> Reshape]* -> Add(·, stream) -> sum
        ... -> SkipLayerNormalization(·, stream, γ, β[, bias])        -> its output 3, the sum

    Returns (sum, SkipLayerNormalization key or None, scale, the scale γ of the layer
    normalization that reads the sum, see `_norm_scale`). The fused op writes the sum only
    when asked (optional output 3): if the model leaves it out, the sum gets a name not in
    `taken` and `graph.with_outputs` adds it. `scale` is a constant of one value per output feature or one
    in all (layer scale, ViT-S and ConvNeXt); the other operand of a final Add must not be
    constant. A Reshape (onnxsim's Gemm on [batch * positions, features], reshaped back) keeps
    the features on the last axis, which the stream's energy is measured over. All None otherwise.
    """
    out, scale = fc2.output, None
    for _ in range(2):
        while len(out.outputs) == 1 and out.outputs[0].op in LAYOUT_OPS and fc2.feature_axis == -1:
            out = out.outputs[0].outputs[0]
        if len(out.outputs) != 1:
            return _NO_RESIDUAL
        node = out.outputs[0]
        if node.op == "SkipLayerNormalization" and len(node.inputs) >= 3 and any(t is out for t in node.inputs[:2]):
            return _sum_output(node, taken), node_key(node), scale, _scale_of(node, 2, fc2.out_features)
        others = [i for i, t in enumerate(node.inputs) if t is not out]
        if len(node.inputs) != 2 or len(others) != 1:
            return _NO_RESIDUAL
        other = trace_param(node.inputs[others[0]])
        if node.op == "Add" and other is None and node.outputs:
            return node.outputs[0].name, None, scale, _norm_scale(node.outputs[0], fc2.out_features)
        if node.op != "Mul" or scale is not None or other is None:
            return _NO_RESIDUAL
        size = int(np.prod(other.source.shape))
        if size not in (1, fc2.out_features):
            return _NO_RESIDUAL
        scale, out = ParamRef(node_key(node), others[0], -1), node.outputs[0]
    return _NO_RESIDUAL


def _norm_scale(total: gs.Tensor, features: int) -> ParamRef | None:
    """The scale γ of the layer normalization over the last axis that reads the residual sum
    `total` (one value per feature), in either form:

        total -> LayerNormalization(·, γ, β)                     (axis -1)
        total -> ReduceMean(axes -1) -> m
        Sub(total, m) -> d -> Div(d, Sqrt(...)) -> Mul(·, γ)     (torch before opset 17)

    None when nothing of the kind reads it (an RMS norm does not remove the mean: not matched)."""
    for reader in total.outputs:
        if (
            reader.op == "LayerNormalization"
            and reader.inputs[0] is total
            and _last(reader.attrs.get("axis", -1), total)
        ):
            return _scale_of(reader, 1, features)
        if reader.op != "Sub" or reader.inputs[0] is not total:
            continue
        if not _mean_over_last_axis(producer(reader.inputs[1]), total):
            continue
        for divide in reader.outputs[0].outputs:
            root = producer(divide.inputs[1]) if len(divide.inputs) == 2 else None
            if divide.op != "Div" or divide.inputs[0] is not reader.outputs[0] or root is None or root.op != "Sqrt":
                continue
            scaled = divide.outputs[0].outputs
            if len(scaled) == 1 and scaled[0].op == "Mul":
                mul = scaled[0]
                return _scale_of(mul, next(i for i, t in enumerate(mul.inputs) if t is not divide.outputs[0]), features)
    return None


def _mean_over_last_axis(node: gs.Node | None, tensor: gs.Tensor) -> bool:
    """Whether `node` is ReduceMean(`tensor`) over its last axis alone."""
    if node is None or node.op != "ReduceMean" or node.inputs[0] is not tensor:
        return False
    axes = node.attrs.get("axes") if len(node.inputs) < 2 else _ints(node.inputs[1])  # an input from opset 18
    return axes is not None and len(axes) == 1 and _last(axes[0], tensor)


def _last(axis: int, tensor: gs.Tensor) -> bool:
    """Whether `axis` is the last of `tensor` (counted from its end, or from its start where its
    rank is known)."""
    return axis == -1 or (tensor.shape is not None and axis == len(tensor.shape) - 1)


def _scale_of(node: gs.Node, index: int, features: int) -> ParamRef | None:
    """Input `index` of `node` as a constant of one value per feature, or None."""
    traced = trace_param(node.inputs[index]) if index < len(node.inputs) else None
    if traced is None or int(np.prod(traced.shape)) != features:
        return None
    return ParamRef(node_key(node), index, -1)


def _sum_output(skip_layernorm: gs.Node, taken: set[str]) -> str:
    """The name of a SkipLayerNormalization's output 3 (input + skip + bias), given or to give."""
    outputs = skip_layernorm.outputs
    if len(outputs) > 3 and outputs[3].name:
        return outputs[3].name
    base = f"{node_key(skip_layernorm)}_input_skip_bias_sum"
    name = next(f"{base}{i or ''}" for i in itertools.count() if f"{base}{i or ''}" not in taken)
    taken.add(name)
    return name


def _linear_producing(t: gs.Tensor) -> Linear | None:
    """The linear whose output (after its bias) is `t`."""
    node = producer(t)
    if node is None:
        return None
    candidates = [node]
    if node.op == "Add":
        candidates = [producer(i) for i in node.inputs if producer(i) is not None]
    for candidate in list(candidates):
        if candidate.op == "Mul":  # an integer linear ends in Mul(Cast(MatMulInteger), scales)
            casts = [producer(i) for i in candidate.inputs if producer(i) is not None and producer(i).op == "Cast"]
            candidates += [producer(c.inputs[0]) for c in casts if producer(c.inputs[0]) is not None]
        elif candidate.op == "DequantizeLinear" and producer(candidate.inputs[0]) is not None:  # QLinearMatMul's
            candidates.append(producer(candidate.inputs[0]))
    for candidate in candidates:
        linear = match_linear(candidate)
        if linear is not None and linear.output is t:
            return linear
    return None


def _shape_literal(reshape: gs.Node, width: int) -> tuple[ParamRef | None, bool]:
    """Where a Reshape's target shape holds `width` in its last position.

    Returns (literal or None, ok). The shape is a constant, or a Concat whose last part is one
    (torch's dynamic export); a computed last dim (-1, 0 or from Shape) needs no rewrite. A last
    dim that is some other number moves the neuron axis, so the path is not an MLP.
    """
    holder, index = reshape, 1
    concat = producer(reshape.inputs[1])
    if concat is not None and concat.op == "Concat":
        holder, index = concat, len(concat.inputs) - 1
    traced = trace_param(holder.inputs[index])
    if traced is None:
        return None, True
    last = int(traced.value().reshape(-1)[-1])
    if last == width:
        return ParamRef(node_key(holder), index, -1), True
    return None, last in (-1, 0)


def _skip_layout(t: gs.Tensor, layout: list[gs.Node]) -> gs.Tensor:
    node = producer(t)
    while node is not None and node.op in HIDDEN_PATH_OPS:
        layout.append(node)
        t = node.inputs[0]
        node = producer(t)
    return t


def _layout_keeps_last_axis(node: gs.Node, width: int) -> tuple[ParamRef | None, bool]:
    if node.op in INPUT_QUANTIZERS:  # the integer fc2's input: the same tensor, rounded
        return None, True
    if node.op == "Reshape":
        return _shape_literal(node, width)
    shape = node.inputs[0].shape
    axis = node.attrs.get("axis", 1)
    return None, axis == -1 or (shape is not None and axis % len(shape) == len(shape) - 1)


@dataclass
class _Match:
    fc1: list[Linear]
    fc2: Linear
    activation: Activation
    region: list[gs.Node]  # every node strictly between fc1's MatMul/Gemm/Conv and fc2
    layout: list[gs.Node]


def _match_plain(fc2: Linear, t: gs.Tensor, layout: list[gs.Node]) -> _Match | None:
    activation = match_activation(t)
    if activation is None:
        return None
    fc1 = _linear_producing(_skip_layout(activation.input, layout))
    return _Match([fc1], fc2, activation, [], layout) if fc1 is not None else None


def _match_gated(fc2: Linear, t: gs.Tensor, layout: list[gs.Node]) -> _Match | None:
    """down(act(gate(x)) * up(x)): SwiGLU / GeGLU."""
    mul = producer(t)
    if mul is None or mul.op != "Mul":
        return None
    for act_out, up_out in (mul.inputs, mul.inputs[::-1]):
        branch_layout = list(layout)
        activation = match_activation(_skip_layout(act_out, branch_layout))
        if activation is None:
            continue
        gate = _linear_producing(_skip_layout(activation.input, branch_layout))
        up = _linear_producing(_skip_layout(up_out, branch_layout))
        if gate is not None and up is not None and gate.node.inputs[0] is up.node.inputs[0]:
            return _Match([gate, up], fc2, activation, [mul], branch_layout)
    return None


def _match_block(fc2: Linear) -> _Match | None:
    for matcher in (_match_plain, _match_gated):
        layout: list[gs.Node] = []
        match = matcher(fc2, _skip_layout(fc2.node.inputs[0], layout), layout)
        if match is not None:
            return match
    return None


def _width(match: _Match) -> int | None:
    widths = {lin.out_features for lin in match.fc1} | {match.fc2.in_features}
    axes = {lin.feature_axis for lin in match.fc1} | {match.fc2.feature_axis}
    if len(widths) != 1 or len(axes) != 1:
        return None
    return widths.pop()


def _region_nodes(match: _Match) -> list[gs.Node]:
    nodes = list(match.region) + match.activation.nodes + match.layout
    for lin in match.fc1:
        nodes += [lin.node, *lin.steps]
        if lin.bias_node is not None and lin.bias_node is not lin.node:
            nodes.append(lin.bias_node)
    return nodes


def _leak(match: _Match, graph_outputs: set[str]) -> str | None:
    """Why the block's intermediate tensors cannot be sliced, or None if they are private."""
    region = _region_nodes(match)
    fc2 = match.fc2  # an integer fc2 also reads its input's (scalar) scale in its scales Mul
    inside = {id(n) for n in region} | {id(fc2.node)} | {id(n) for n in (*fc2.steps, fc2.scales_node) if n}
    for node in region:
        for tensor in node.outputs:
            if tensor.name in graph_outputs:
                return f"hidden tensor '{tensor.name}' is a graph output"
            for consumer in tensor.outputs:
                rank = len(tensor.shape) if tensor.shape is not None else None
                if id(consumer) not in inside and not _reads_other_dims(consumer, match.fc2.feature_axis, rank):
                    return f"hidden tensor '{tensor.name}' also feeds {node_label(consumer)}"
    return None


def _ints(tensor: gs.Tensor) -> list[int] | None:
    traced = trace_param(tensor)
    return None if traced is None else [int(v) for v in np.asarray(traced.value()).reshape(-1)]


def _reads_other_dims(shape: gs.Node, axis: int, rank: int | None) -> bool:
    """Whether `shape` is a Shape of a hidden tensor (of `rank` dims, if known) whose every reader
    keeps only dims other than the neuron `axis` (exporters build fc2's output shape as
    Shape(hidden)[:-1] + [features], or from Gathers of the batch and sequence dims), so slicing
    neurons changes nothing it reads."""
    if shape.op != "Shape" or not in_default_domain(shape):
        return False
    last = axis == -1 or (rank is not None and axis == rank - 1)

    def not_the_axis(index: int) -> bool:  # an index into the shape vector
        if rank is not None:
            return index % rank != axis % rank
        return last and index < -1  # without the rank, only "before the last" is certain

    if last and shape.attrs.get("end") is not None and int(shape.attrs["end"]) < 0:
        return True  # Shape(end=-k) stops before the last dim (opset 15)
    for reader in shape.outputs[0].outputs:
        if reader.op == "Slice" and 3 <= len(reader.inputs) <= 4:
            starts, ends = _ints(reader.inputs[1]), _ints(reader.inputs[2])
            axes = _ints(reader.inputs[3]) if len(reader.inputs) == 4 else [0]
            if starts is None or ends is None or axes not in ([0], [-1]) or starts[0] < 0:
                return False
            if not (last and ends[0] < 0) and not (rank is not None and starts[0] <= ends[0] <= axis % rank):
                return False
        elif reader.op == "Gather":
            indices = _ints(reader.inputs[1])
            if indices is None or not all(not_the_axis(i) for i in indices):
                return False
        else:
            return False
    return True


def _site(match: _Match, width: int, taken: set[str]) -> MlpSite | None:
    fc2 = match.fc2
    fc1_params = []
    for lin in match.fc1:
        fc1_params.append(ParamRef(node_key(lin.node), lin.weight_input, lin.out_axis))
        if lin.bias_node is not None:
            fc1_params.append(ParamRef(node_key(lin.bias_node), lin.bias_input, lin.bias_axis))
        fc1_params += lin.per_channel  # an integer fc1's scale and zero point, one per neuron
    fused_bias = match.activation.bias_node
    if fused_bias is not None:
        traced = trace_param(fused_bias.inputs[1])
        if traced is None or int(np.prod(traced.shape)) != width:
            return None
        fc1_params.append(ParamRef(node_key(fused_bias), 1, -1))
    literals = []
    for node in match.layout:
        literal, ok = _layout_keeps_last_axis(node, width)
        if not ok:
            return None
        if literal is not None:
            literals.append(literal)
    axis = fc2.feature_axis
    width_tensors = tuple((t.name, axis) for n in _region_nodes(match) for t in n.outputs)
    residual, residual_node, output_scale, norm_scale = _residual(fc2, taken)
    hidden = fc2.node.inputs[0]
    quantizer = producer(hidden)
    if quantizer is not None and fc2.node.op in INPUT_QUANTIZERS.get(quantizer.op, ()):
        hidden = quantizer.inputs[0]  # calibration observes the float activation, not its int8 rounding
    elif any(fc2.node.op in readers for readers in INPUT_QUANTIZERS.values()):
        return None
    return MlpSite(
        fc1=tuple(node_label(lin.node) for lin in match.fc1),
        fc2=node_label(fc2.node),
        hidden=hidden.name,
        hidden_axis=axis,
        fc1_params=tuple(fc1_params),
        fc2_weight=ParamRef(node_key(fc2.node), fc2.weight_input, fc2.in_axis),
        fc2_bias=_fc2_bias(fc2),
        width_literals=tuple(literals),
        width_tensors=width_tensors,
        residual=residual,
        residual_node=residual_node,
        output_scale=output_scale,
        norm_scale=norm_scale,
        fc2_dequantize=None if fc2.scale is None else (fc2.scale, fc2.zero_point),
    )


def _block_name(fc1: str, fc2: str, index: int, taken: set[str]) -> str:
    # common leading path components of the node names: "/blocks.0/mlp/fc1/MatMul" -> "/blocks.0/mlp"
    parts = zip(re.split(r"(?<=[/.])", fc1), re.split(r"(?<=[/.])", fc2), strict=False)
    name = "".join(a for a, _ in itertools.takewhile(lambda pair: pair[0] == pair[1], parts)).rstrip("/.")
    if not name or name in taken:
        name = f"mlp{index}"
    return name


def find_mlp_blocks(model: onnx.ModelProto) -> BlockList:
    """Find every prunable MLP block of `model`, in graph order.

    Returns a list of `MlpBlock`; its `skipped` attribute lists structural matches that cannot be
    pruned, with the reason. The model is not modified.
    """
    graph = import_graph(model, through_qdq=True)
    graph_outputs = {t.name for t in graph.outputs}
    taken = {name for n in model.graph.node for name in n.output} | {t.name for t in model.graph.initializer}
    taken |= {t.name for t in model.graph.input}
    found: list[tuple[_Match, MlpSite, int]] = []
    skipped: list[SkippedBlock] = []
    for node in graph.nodes:
        fc2 = match_linear(node)
        match = _match_block(fc2) if fc2 is not None else None
        width = _width(match) if match is not None else None
        if width is None:
            continue
        site = _site(match, width, taken)
        if site is None:
            continue
        reason = "its hidden layer has no neurons" if width == 0 else _leak(match, graph_outputs)
        if reason is not None:
            skipped.append(SkippedBlock(f"{site.fc1[0]} -> {site.fc2}", reason))
            continue
        found.append((match, site, width))
    return BlockList(_merge_tied(found), skipped)


def _merge_tied(found: list[tuple[_Match, MlpSite, int]]) -> list[MlpBlock]:
    """Group sites that share any fc weight constant: they must keep the same neurons."""
    groups: list[list[tuple[_Match, MlpSite, int]]] = []
    group_of_weight: dict[str, int] = {}
    for item in found:
        match = item[0]
        weights = [lin.weight.source.name for lin in [*match.fc1, match.fc2]]
        group = next((group_of_weight[w] for w in weights if w in group_of_weight), None)
        if group is None:
            group = len(groups)
            groups.append([])
        groups[group].append(item)
        for w in weights:
            group_of_weight[w] = group
    blocks: list[MlpBlock] = []
    taken: set[str] = set()
    for index, group in enumerate(groups):
        match, first, width = group[0]
        if any(w != width for _, _, w in group):
            continue  # one weight used at two widths: not a tied MLP we understand
        name = _block_name(first.fc1[0], first.fc2, index, taken)
        taken.add(name)
        blocks.append(
            MlpBlock(name, match.activation.kind, width, tuple(s for _, s, _ in group), gated=len(match.fc1) == 2)
        )
    return blocks
