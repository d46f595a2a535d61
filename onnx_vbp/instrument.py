"""Stage 2, instrument: the model, serialized, with every block's hidden tensor (and the residual
stream after it) as extra outputs."""

from __future__ import annotations

import onnx

from onnx_vbp.graph import with_outputs
from onnx_vbp.records import MlpBlock


def hidden_outputs(blocks: list[MlpBlock]) -> list[str]:
    """The tensors calibration observes: each site's fc2 input, in block order."""
    return [site.hidden for block in blocks for site in block.sites]


def residual_outputs(blocks: list[MlpBlock]) -> list[str]:
    """The residual-stream sums the blocks' outputs join (see MlpSite.residual), where found."""
    return [site.residual for block in blocks for site in block.sites if site.residual]


def instrument(model: onnx.ModelProto, blocks: list[MlpBlock], residuals: bool = False) -> bytes:
    """Serialize `model` with the hidden tensors of `blocks` (and with `residuals`, the residual
    sums after them) added to the graph outputs.

    A sum made inside a fused SkipLayerNormalization is its optional output 3: where the model
    leaves that out, the node is given it for the serialization only (`model` is left as it was)."""
    names = hidden_outputs(blocks) + (residual_outputs(blocks) if residuals else [])
    fused = {site.residual_node: site.residual for b in blocks for site in b.sites if site.residual_node}
    widened = []
    if residuals and fused:
        for node in model.graph.node:
            if node.output and node.output[0] in fused and (len(node.output) < 4 or not node.output[3]):
                widened.append((node, list(node.output)))
                sum_output = fused[node.output[0]]
                del node.output[3:]
                node.output.extend([""] * (3 - len(node.output)) + [sum_output])
    try:
        return with_outputs(model, names)
    finally:
        for node, outputs in widened:
            del node.output[:]
            node.output.extend(outputs)
