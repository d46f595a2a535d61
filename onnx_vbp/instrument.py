"""Stage 2, instrument: the model, serialized, with every block's hidden tensor (and the residual
stream after it) as extra outputs."""

from __future__ import annotations

import onnx

from onnx_vbp.graph import with_outputs
from onnx_vbp.records import MlpBlock, fused_sums


def hidden_outputs(blocks: list[MlpBlock]) -> list[str]:
    """The tensors calibration observes: each site's fc2 input, in block order."""
    return [site.hidden for block in blocks for site in block.sites]


def residual_outputs(blocks: list[MlpBlock]) -> list[str]:
    """The residual-stream sums the blocks' outputs join (see MlpSite.residual), where found."""
    return [site.residual for block in blocks for site in block.sites if site.residual]


def instrument(model: onnx.ModelProto, blocks: list[MlpBlock], residuals: bool = False) -> bytes:
    """Serialize `model` with the hidden tensors of `blocks` (and with `residuals`, the residual
    sums after them) added to the graph outputs. A sum made inside a fused SkipLayerNormalization
    is its optional output 3, given to the node where the model leaves it out (`with_outputs`)."""
    names = hidden_outputs(blocks) + (residual_outputs(blocks) if residuals else [])
    sites = [site for block in blocks for site in block.sites]
    return with_outputs(model, names, fused_sums(sites) if residuals else None)
