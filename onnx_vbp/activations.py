"""Activation patterns for the find stage: which subgraph between fc1 and fc2 is a nonlinearity.

Each pattern is a small function `pattern(y) -> Activation | None` that starts at the activation's
output tensor `y` and walks parents along explicit op types. Together they cover what exporters
write:

- one op: ONNX `Relu`, `Gelu` (approximate none/tanh), `Swish`, `HardSwish`, `HardSigmoid`, `Sigmoid`,
  `Tanh`, ...; com.microsoft `Gelu`, `FastGelu`, `BiasGelu` (the last two may carry fc1's bias),
  `QuickGelu`.
- a product `x * gate(x) * c`, in any operand order and any nesting of the `Mul`s, with the
  constants as initializers or `Constant` nodes (folded on import) and `Div` by a constant seen
  as a product:
  - GELU, erf form:   `x * 0.5 * (1 + Erf(x / sqrt(2)))`        (torch, tf2onnx, ...)
  - GELU, tanh form:  `x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`,
                      the cube as `Pow(x, 3)` or `x * x * x`     (GPT-2 "gelu_new")
  - SiLU / Swish:     `x * Sigmoid(x)`
  - QuickGELU:        `x * Sigmoid(1.702 * x)`
  - HardSwish:        `x * HardSigmoid(x)`                       (torch before opset 14)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnx_vbp.graph import in_default_domain, producer, scalar

MS_DOMAIN = "com.microsoft"

# Single-op activations of the default domain: op type -> reported kind.
ONNX_UNARY = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softplus": "softplus",
    "Mish": "mish",
    "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish",
}
# com.microsoft contrib ops: op type -> reported kind. FastGelu and BiasGelu take fc1's bias as
# their second input.
MS_ACTIVATIONS = {"Gelu": "gelu", "FastGelu": "gelu_tanh", "BiasGelu": "gelu", "QuickGelu": "quick_gelu"}
MS_WITH_BIAS = ("FastGelu", "BiasGelu")


@dataclass
class Activation:
    kind: str
    input: gs.Tensor  # the pre-activation tensor
    nodes: list[gs.Node] = field(default_factory=list)  # every node of the activation
    bias_node: gs.Node | None = None  # a fused op carrying fc1's bias as its input 1


def _close(value: float | None, target: float) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=1e-3)


def _product(t: gs.Tensor, nodes: list[gs.Node]) -> tuple[list[gs.Tensor], float]:
    """Flatten a tree of `Mul` (and `Div` by a scalar) into its non-scalar terms and a coefficient."""
    node = producer(t)
    if node is not None and node.op == "Mul":
        nodes.append(node)
        left, c_left = _product(node.inputs[0], nodes)
        right, c_right = _product(node.inputs[1], nodes)
        return left + right, c_left * c_right
    if node is not None and node.op == "Div" and scalar(node.inputs[1]):
        nodes.append(node)
        terms, coeff = _product(node.inputs[0], nodes)
        return terms, coeff / scalar(node.inputs[1])
    value = scalar(t)
    return ([], value) if value is not None else ([t], 1.0)


def _scaled(t: gs.Tensor, nodes: list[gs.Node]) -> tuple[gs.Tensor | None, float]:
    """`t` as `c * u` for a single tensor `u`; (None, 0) if `t` is not of that form."""
    terms, coeff = _product(t, nodes)
    return (terms[0], coeff) if len(terms) == 1 else (None, 0.0)


def _one_plus(t: gs.Tensor, op: str, nodes: list[gs.Node]) -> gs.Tensor | None:
    """If `t` is `1 + op(u)` (either operand order), return u."""
    add = producer(t)
    if add is None or add.op != "Add":
        return None
    for one, other in (add.inputs, add.inputs[::-1]):
        inner = producer(other)
        if _close(scalar(one), 1.0) and inner is not None and inner.op == op:
            nodes += [add, inner]
            return inner.inputs[0]
    return None


def _is_cube_of(terms: list[gs.Tensor], x: gs.Tensor, nodes: list[gs.Node]) -> bool:
    """The flattened product `terms` is x^3: `x * x * x` or `Pow(x, 3)`."""
    if len(terms) == 3:
        return all(term is x for term in terms)
    node = producer(terms[0]) if len(terms) == 1 else None
    if node is not None and node.op == "Pow" and node.inputs[0] is x and _close(scalar(node.inputs[1]), 3.0):
        nodes.append(node)
        return True
    return False


def _is_tanh_gelu_arg(u: gs.Tensor, x: gs.Tensor, nodes: list[gs.Node]) -> bool:
    """u == sqrt(2/pi) * (x + 0.044715 * x^3)."""
    inner, coeff = _scaled(u, nodes)
    add = producer(inner) if inner is not None else None
    if not _close(coeff, math.sqrt(2.0 / math.pi)) or add is None or add.op != "Add":
        return False
    nodes.append(add)
    for linear, cubic in (add.inputs, add.inputs[::-1]):
        terms, cube_coeff = _product(cubic, nodes)
        if linear is x and _close(cube_coeff, 0.044715) and _is_cube_of(terms, x, nodes):
            return True
    return False


def _gate_kind(x: gs.Tensor, gate: gs.Tensor, coeff: float, nodes: list[gs.Node]) -> str | None:
    """Name the activation `coeff * x * gate`, or None when `gate` is not a known gate of `x`."""
    gate_node = producer(gate)
    if gate_node is None:
        return None
    if gate_node.op == "Sigmoid" and _close(coeff, 1.0):
        arg, arg_coeff = _scaled(gate_node.inputs[0], nodes)
        if arg is x and _close(arg_coeff, 1.0):
            nodes.append(gate_node)
            return "silu"
        if arg is x and _close(arg_coeff, 1.702):
            nodes.append(gate_node)
            return "quick_gelu"
        return None
    if gate_node.op == "HardSigmoid" and gate_node.inputs[0] is x and _close(coeff, 1.0):
        nodes.append(gate_node)
        return "hardswish"
    if not _close(coeff, 0.5):
        return None
    erf_arg = _one_plus(gate, "Erf", nodes)
    if erf_arg is not None:
        arg, arg_coeff = _scaled(erf_arg, nodes)
        return "gelu" if arg is x and _close(arg_coeff, 1.0 / math.sqrt(2.0)) else None
    tanh_arg = _one_plus(gate, "Tanh", nodes)
    if tanh_arg is not None and _is_tanh_gelu_arg(tanh_arg, x, nodes):
        return "gelu_tanh"
    return None


def single_op(y: gs.Tensor) -> Activation | None:
    node = producer(y)
    if node is None:
        return None
    if node.domain == MS_DOMAIN and node.op in MS_ACTIVATIONS:
        with_bias = node.op in MS_WITH_BIAS and len(node.inputs) > 1 and node.inputs[1].name
        return Activation(MS_ACTIVATIONS[node.op], node.inputs[0], [node], node if with_bias else None)
    if not in_default_domain(node):
        return None
    if node.op == "Gelu":
        kind = "gelu_tanh" if node.attrs.get("approximate", "none") == "tanh" else "gelu"
        return Activation(kind, node.inputs[0], [node])
    if node.op == "Swish":  # x * sigmoid(alpha * x), opset 24
        return Activation("silu" if node.attrs.get("alpha", 1.0) == 1.0 else "swish", node.inputs[0], [node])
    if node.op in ONNX_UNARY:
        return Activation(ONNX_UNARY[node.op], node.inputs[0], [node])
    return None


def product_form(y: gs.Tensor) -> Activation | None:
    nodes: list[gs.Node] = []
    terms, coeff = _product(y, nodes)
    if len(terms) != 2 or not nodes:
        return None
    for x, gate in (terms, terms[::-1]):
        gate_nodes: list[gs.Node] = []
        kind = _gate_kind(x, gate, coeff, gate_nodes)
        if kind is not None:
            return Activation(kind, x, nodes + gate_nodes)
    return None


ACTIVATION_PATTERNS = (single_op, product_form)


def match_activation(y: gs.Tensor) -> Activation | None:
    """The activation whose output is `y`, or None."""
    for pattern in ACTIVATION_PATTERNS:
        activation = pattern(y)
        if activation is not None:
            return activation
    return None
