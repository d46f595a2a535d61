"""Activation patterns for the find stage: which subgraph between fc1 and fc2 is a nonlinearity.

Each pattern is a small function `pattern(y) -> Activation | None` that starts at the activation's
output tensor `y` and walks parents along explicit op types. Together they cover what exporters
write:

- one op: ONNX `Relu`, `Gelu` (approximate none/tanh), `Swish`, `HardSwish`, `HardSigmoid`, `Sigmoid`,
  `Tanh`, ...; com.microsoft `Gelu`, `FastGelu`, `BiasGelu` (the last two may carry fc1's bias),
  `QuickGelu`.
- a product `c * x * gate(x)`, in any operand order and any nesting of the `Mul`s, with the
  constants as initializers or `Constant` nodes (folded on import) and `Div` by a constant seen
  as a product; the forms are the table GATES (`match_gate` says why each did not match):
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
TANH_GELU_ARGUMENT = "sqrt(2/pi) * (x + 0.044715 * x^3)"


@dataclass(frozen=True)
class Gate:
    """A product-form activation: `coefficient * x * gate`, where gate is `op(argument * x)`, or
    `1 + op(...)` when `one_plus`; `argument` None stands for GELU's TANH_GELU_ARGUMENT."""

    kind: str
    coefficient: float
    op: str
    one_plus: bool
    argument: float | None
    formula: str


# Every product form find recognises (matched in any operand order and Mul nesting, constants as
# initializers or Constant nodes, Div by a constant as a product), and the test builder writes.
GATES = (
    Gate("silu", 1.0, "Sigmoid", False, 1.0, "x * Sigmoid(x)"),
    Gate("quick_gelu", 1.0, "Sigmoid", False, 1.702, "x * Sigmoid(1.702 * x)"),
    Gate("hardswish", 1.0, "HardSigmoid", False, 1.0, "x * HardSigmoid(x)"),
    Gate("gelu", 0.5, "Erf", True, 1.0 / math.sqrt(2.0), "0.5 * x * (1 + Erf(x / sqrt(2)))"),
    Gate("gelu_tanh", 0.5, "Tanh", True, None, f"0.5 * x * (1 + Tanh({TANH_GELU_ARGUMENT}))"),
)


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


def _gate_mismatch(gate: Gate, x: gs.Tensor, value: gs.Tensor, coefficient: float, nodes: list[gs.Node]) -> str | None:
    """Why `coefficient * x * value` is not `gate`'s formula, or None when it is."""
    if not _close(coefficient, gate.coefficient):
        return f"the coefficient is {coefficient:g}, not {gate.coefficient:g}"
    if gate.one_plus:
        argument = _one_plus(value, gate.op, nodes)
        if argument is None:
            return f"the gate is not 1 + {gate.op}(.)"
    else:
        node = producer(value)
        if node is None or node.op != gate.op:
            return f"the gate is {node.op if node is not None else 'not computed'}, not {gate.op}"
        nodes.append(node)
        argument = node.inputs[0]
    if gate.argument is None:
        return None if _is_tanh_gelu_arg(argument, x, nodes) else f"{gate.op}'s argument is not {TANH_GELU_ARGUMENT}"
    inner, scale = _scaled(argument, nodes)
    if inner is not x:
        return f"{gate.op}'s argument is not a multiple of x"
    return None if _close(scale, gate.argument) else f"{gate.op}'s argument is {scale:g} * x, not {gate.argument:g} * x"


@dataclass
class GateMatch:
    """What `match_gate` found: the gate and its nodes, or why each gate of GATES did not match."""

    gate: Gate | None
    nodes: list[gs.Node]
    reasons: list[str]


def match_gate(x: gs.Tensor, value: gs.Tensor, coefficient: float) -> GateMatch:
    """The entry of GATES that `coefficient * x * value` is, trying each in turn."""
    reasons = []
    for gate in GATES:
        nodes: list[gs.Node] = []
        why = _gate_mismatch(gate, x, value, coefficient, nodes)
        if why is None:
            return GateMatch(gate, nodes, [])
        reasons.append(f"not {gate.formula}: {why}")
    return GateMatch(None, [], reasons)


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


def match_product(y: gs.Tensor) -> Activation | list[str]:
    """The product-form activation (GATES) whose output is `y`, or why not: one reason per gate
    and operand order."""
    nodes: list[gs.Node] = []
    terms, coeff = _product(y, nodes)
    if len(terms) != 2 or not nodes:
        return [f"not a product of two tensors ({len(terms)} terms)"]
    reasons = []
    for x, value in (terms, terms[::-1]):
        matched = match_gate(x, value, coeff)
        if matched.gate is not None:
            return Activation(matched.gate.kind, x, nodes + matched.nodes)
        reasons += matched.reasons
    return reasons


def product_form(y: gs.Tensor) -> Activation | None:
    matched = match_product(y)
    return matched if isinstance(matched, Activation) else None


ACTIVATION_PATTERNS = (single_op, product_form)


def match_activation(y: gs.Tensor) -> Activation | None:
    """The activation whose output is `y`, or None."""
    for pattern in ACTIVATION_PATTERNS:
        activation = pattern(y)
        if activation is not None:
            return activation
    return None
