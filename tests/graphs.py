"""Synthetic MLP graphs for unit tests, written the way real exporters write each pattern.

`build_model(specs)` stacks blocks `x = x + mlp(x)`; every weight is drawn in its effective
`[in, out]` orientation and then stored as the spec says (initializer, Constant node, transposed
behind a Transpose, fp16 behind a Cast), so tests can reason about neurons independently of storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_vbp.activations import GATES

MS = "com.microsoft"

# activation variant -> the kind find_mlp_blocks must report
ACTIVATIONS = {
    "gelu_erf_torch": "gelu",  # Div / Erf / Add / Mul / Mul, as torch.onnx writes nn.GELU
    "gelu_erf_reordered": "gelu",  # 0.5 first, Mul by 1/sqrt2, constants on the left
    "gelu_tanh_pow": "gelu_tanh",
    "gelu_tanh_cube": "gelu_tanh",
    "gelu_op": "gelu",
    "gelu_op_tanh": "gelu_tanh",
    "ms_gelu": "gelu",
    "ms_fastgelu_bias": "gelu_tanh",
    "ms_biasgelu": "gelu",
    "ms_quickgelu": "quick_gelu",
    "quick_gelu_decomposed": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish_op": "silu",  # the ONNX Swish op (opset 24)
    "hardswish": "hardswish",
    "hardswish_hardsigmoid": "hardswish",
    "hardsigmoid": "hardsigmoid",
    # each product form of onnx_vbp's table, written as its formula (Builder.gate)
    **{f"gate_{gate.kind}": gate.kind for gate in GATES},
}
OP_SINCE = {"swish_op": 24}  # activations written with an op newer than build_model's default opset
FUSED_BIAS = ("ms_fastgelu_bias", "ms_biasgelu")  # fc1's bias lives in the activation op


@dataclass
class BlockSpec:
    fc: str = "matmul"  # matmul | matmul_bias_first | gemm | gemm_transb | conv | conv_reshaped_bias
    act: str = "gelu_erf_torch"
    hidden: int = 16
    gated: bool = False
    store: str = "init"  # init | constant | transposed | fp16
    fc2_bias: str = "add"  # add | none | skip_layernorm
    layout: bool = False  # GPT-2 Conv1D style: Reshape -> Gemm -> Reshape around the activation
    channels_last: bool = False  # 4-D [B, H, W, C] input, MatMul over C (ConvNeXt, Swin)
    token_mixing: bool = False  # MLP over the token axis of a transposed [B, C, S] tensor (MLP-Mixer)
    const_neurons: int = 0  # hidden neurons whose activation is constant (zero fc1 columns)
    layer_scale: float | None = None  # fc2's output times this per-feature vector (ViT-S, ConvNeXt) before the residual


class Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value: np.ndarray | float, as_node: bool = False) -> str:
        array = np.asarray(value, dtype=np.asarray(value).dtype if isinstance(value, np.ndarray) else np.float32)
        name = self.name("c")
        tensor = numpy_helper.from_array(array, name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=self.name("Constant")))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op: str, inputs: list[str], domain: str | None = None, node_name: str | None = None, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=node_name or self.name(op), domain=domain, **attrs))
        return out

    def weight(self, w: np.ndarray, store: str) -> str:
        """`w` as its consumer must see it, stored as `store` says."""
        if store == "constant":
            return self.const(w, as_node=True)
        if store == "transposed":  # stored with the first two axes swapped, as [out, in] for a 2-D weight
            perm = [1, 0, *range(2, w.ndim)]
            return self.op("Transpose", [self.const(np.ascontiguousarray(np.transpose(w, perm)))], perm=perm)
        if store == "fp16":
            return self.op("Cast", [self.const(w.astype(np.float16))], to=TensorProto.FLOAT)
        return self.const(w)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, fc: str, store: str, prefix: str) -> str:
        """x @ w (+ b), w [in, out]."""
        if fc == "conv":
            inputs = [x, self.weight(np.ascontiguousarray(w.T)[:, :, None, None], store)]
            return self.op("Conv", inputs + ([self.const(b)] if b is not None else []), node_name=f"{prefix}/Conv")
        if fc == "conv_reshaped_bias":  # Paddle's static graphs: the bias added after the Conv, reshaped
            out = self.op(
                "Conv", [x, self.weight(np.ascontiguousarray(w.T)[:, :, None, None], store)], node_name=f"{prefix}/Conv"
            )
            if b is None:
                return out
            bias = self.op("Reshape", [self.const(b), self.const(np.array([1, b.size, 1, 1], np.int64))])
            return self.op("Add", [out, bias], node_name=f"{prefix}/Add")
        if fc in ("gemm", "gemm_transb"):
            transb = fc == "gemm_transb"
            weight = self.weight(np.ascontiguousarray(w.T) if transb else w, store)
            inputs = [x, weight] + ([self.const(b)] if b is not None else [])
            return self.op("Gemm", inputs, node_name=f"{prefix}/Gemm", transB=int(transb))
        out = self.op("MatMul", [x, self.weight(w, store)], node_name=f"{prefix}/MatMul")
        if b is None:
            return out
        bias = self.const(b)
        pair = [bias, out] if fc == "matmul_bias_first" else [out, bias]
        return self.op("Add", pair, node_name=f"{prefix}/Add")

    def gate(self, x: str, kind: str, argument: float | None = None) -> str:
        """The product form `kind` of onnx_vbp.activations.GATES, as its formula says;
        `argument` replaces the table's scale of x inside the gate (to write a near miss)."""
        (gate,) = [g for g in GATES if g.kind == kind]
        c = self.const
        scale = gate.argument if argument is None else argument
        if scale is None:  # GELU's tanh argument: sqrt(2/pi) * (x + 0.044715 * x^3)
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op(
                "Mul", [c(math.sqrt(2.0 / math.pi)), self.op("Add", [x, self.op("Mul", [c(0.044715), cube])])]
            )
        else:
            inner = x if scale == 1.0 else self.op("Mul", [x, c(scale)])
        attrs = {"alpha": 1 / 6, "beta": 0.5} if gate.op == "HardSigmoid" else {}
        value = self.op(gate.op, [inner], **attrs)
        if gate.one_plus:
            value = self.op("Add", [c(1.0), value])
        product = self.op("Mul", [x, value])
        return product if gate.coefficient == 1.0 else self.op("Mul", [c(gate.coefficient), product])

    def activation(self, x: str, act: str, bias: str | None = None) -> str:
        c = self.const
        if act.startswith("gate_"):
            return self.gate(x, act.removeprefix("gate_"))
        if act == "gelu_erf_torch":
            erf = self.op("Erf", [self.op("Div", [x, c(math.sqrt(2.0), as_node=True)])])
            return self.op(
                "Mul", [self.op("Mul", [x, self.op("Add", [erf, c(1.0, as_node=True)])]), c(0.5, as_node=True)]
            )
        if act == "gelu_erf_reordered":
            erf = self.op("Erf", [self.op("Mul", [c(1 / math.sqrt(2.0)), x])])
            return self.op("Mul", [self.op("Mul", [c(0.5), x]), self.op("Add", [c(1.0), erf])])
        if act in ("gelu_tanh_pow", "gelu_tanh_cube"):
            if act == "gelu_tanh_pow":
                cube = self.op("Pow", [x, c(3.0)])
            else:
                cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op("Add", [x, self.op("Mul", [c(0.044715), cube])])
            tanh = self.op("Tanh", [self.op("Mul", [inner, c(math.sqrt(2.0 / math.pi))])])
            return self.op("Mul", [self.op("Mul", [c(0.5), x]), self.op("Add", [tanh, c(1.0)])])
        if act in ("gelu_op", "gelu_op_tanh"):
            return self.op("Gelu", [x], approximate="tanh" if act == "gelu_op_tanh" else "none")
        if act == "ms_gelu":
            return self.op("Gelu", [x], domain=MS)
        if act == "ms_fastgelu_bias":
            return self.op("FastGelu", [x, bias], domain=MS)
        if act == "ms_biasgelu":
            return self.op("BiasGelu", [x, bias], domain=MS)
        if act == "ms_quickgelu":
            return self.op("QuickGelu", [x], domain=MS, alpha=1.702)
        if act == "quick_gelu_decomposed":
            return self.op("Mul", [x, self.op("Sigmoid", [self.op("Mul", [x, c(1.702)])])])
        if act == "swish_op":
            return self.op("Swish", [x], alpha=1.0)
        if act == "silu":
            return self.op("Mul", [self.op("Sigmoid", [x]), x])
        if act == "hardswish_hardsigmoid":
            return self.op("Mul", [x, self.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
        return self.op({"relu": "Relu", "hardswish": "HardSwish", "hardsigmoid": "HardSigmoid"}[act], [x])


def _fc1_weights(rng: np.random.Generator, dim: int, spec: BlockSpec) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(0, 1 / math.sqrt(dim), (dim, spec.hidden)).astype(np.float32)
    b = rng.normal(0, 0.5, spec.hidden).astype(np.float32)
    w[:, : spec.const_neurons] = 0.0
    return w, b


def layout_of(spec: BlockSpec) -> str:
    if spec.fc.startswith("conv"):
        return "nchw"
    if spec.channels_last:
        return "nhwc"
    return "rows" if spec.fc.startswith("gemm") and not spec.layout else "tokens"


def input_shape(specs: list[BlockSpec], dim: int, batch: int | str = "batch", seq: int = 5) -> list:
    layout = layout_of(specs[0])
    shapes = {"nchw": [batch, dim, 3, 3], "nhwc": [batch, 3, 3, dim], "rows": [batch, dim], "tokens": [batch, seq, dim]}
    return shapes[layout]


def build_model(
    specs: list[BlockSpec],
    dim: int = 8,
    seq: int = 5,
    seed: int = 0,
    opset: int = 20,
    layernorm: bool = False,
    residual: bool = True,
    batch: int | str = "batch",
) -> onnx.ModelProto:
    """A model `x -> [LayerNorm] -> x + mlp_i(x) ...` with one MLP block per spec; the input layout
    follows the first spec, the batch dimension is symbolic or the given number."""
    rng = np.random.default_rng(seed)
    g = Builder()
    x = "x"
    for i, spec in enumerate(specs):
        prefix = f"/blocks.{i}/mlp"
        h = (
            g.op(
                "LayerNormalization",
                [x, g.const(np.ones(dim, np.float32)), g.const(np.zeros(dim, np.float32))],
                axis=-1,
            )
            if layernorm and layout_of(spec) != "nchw"
            else x
        )
        if spec.layout:  # GPT-2 Conv1D: flatten tokens, Gemm, restore [B, S, hidden]
            shape_in = g.op("Shape", [h])
            h = g.op("Reshape", [h, g.const(np.array([-1, dim], np.int64))])
        features = seq if spec.token_mixing else dim
        if spec.token_mixing:
            h = g.op("Transpose", [h], perm=[0, 2, 1])
        w1, b1 = _fc1_weights(rng, features, spec)
        fused = spec.act in FUSED_BIAS
        pre = g.linear(h, w1, None if fused else b1, spec.fc, spec.store, f"{prefix}/fc1")
        if spec.layout:
            lead = g.op("Slice", [shape_in, g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64))])
            target = g.op("Concat", [lead, g.const(np.array([spec.hidden], np.int64))], axis=0)
            pre = g.op("Reshape", [pre, target])
        hidden = g.activation(pre, spec.act, bias=g.const(b1) if fused else None)
        if spec.gated:
            w_up, b_up = _fc1_weights(rng, features, spec)
            hidden = g.op("Mul", [hidden, g.linear(h, w_up, b_up, spec.fc, spec.store, f"{prefix}/up")])
        if spec.layout:
            hidden = g.op("Reshape", [hidden, g.const(np.array([-1, spec.hidden], np.int64))])
        w2 = rng.normal(0, 1 / math.sqrt(spec.hidden), (spec.hidden, features)).astype(np.float32)
        b2 = rng.normal(0, 0.1, features).astype(np.float32)
        if spec.fc2_bias == "skip_layernorm":
            out = g.linear(hidden, w2, None, spec.fc, spec.store, f"{prefix}/fc2")
            x = g.op(
                "SkipLayerNormalization",
                [out, x, g.const(np.ones(dim, np.float32)), g.const(np.zeros(dim, np.float32)), g.const(b2)],
                domain=MS,
            )
            continue
        out = g.linear(hidden, w2, b2 if spec.fc2_bias == "add" else None, spec.fc, spec.store, f"{prefix}/fc2")
        if spec.layout:
            out = g.op("Reshape", [out, shape_in])
        if spec.token_mixing:
            out = g.op("Transpose", [out], perm=[0, 2, 1])
        if spec.layer_scale is not None:
            out = g.op("Mul", [out, g.const(np.full(features, spec.layer_scale, np.float32))])
        x = g.op("Add", [x, out]) if residual else out
    g.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    shape = input_shape(specs, dim, batch=batch, seq=seq)
    graph = helper.make_graph(
        g.nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        g.inits,
    )
    newest_op = max((OP_SINCE.get(spec.act, 0) for spec in specs), default=0)
    opsets = [helper.make_opsetid("", max(opset, newest_op)), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10 if newest_op >= 24 else 9
    return model


def random_batch(model: onnx.ModelProto, batch: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
    return {value.name: rng.normal(0, 1, shape).astype(np.float32)}


def share_initializer(model: onnx.ModelProto, names: list[str]) -> None:
    """Make every reader of `names[1:]` read `names[0]` instead, as exporters that merge identical
    initializers do."""
    keep, drop = names[0], set(names[1:])
    for node in model.graph.node:
        node.input[:] = [keep if name in drop else name for name in node.input]
    kept = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def readers(model: onnx.ModelProto, op: str, name_part: str) -> onnx.NodeProto:
    """The first node of type `op` whose name contains `name_part`."""
    return next(n for n in model.graph.node if n.op_type == op and name_part in n.name)


def make_model(builder: Builder, x_shape: list, y: str) -> onnx.ModelProto:
    """A model from `builder`'s nodes, input `x` of `x_shape`, output `y` of the same shape."""
    builder.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
    graph = helper.make_graph(
        builder.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
        builder.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def quantize_static_int8(src: Path, dst: Path, model: onnx.ModelProto, quant_format: str = "QDQ") -> None:
    """ORT's static int8 quantization of `src` (per-channel weights), calibrated on 4 random
    batches of `model`'s input: QDQ, or QOperator (QLinearMatMul)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Feed(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([random_batch(model, batch=16, seed=s) for s in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Feed(), quant_format=QuantFormat[quant_format], per_channel=True)
