"""Importance criteria for select: how much each hidden neuron matters, higher = keep.

Kept apart from the pruner (as Torch-Pruning does): select ranks whatever this returns.
- "variance" (the paper): Var(h_j), the hidden activation's variance after the nonlinearity.
- "variance-x-norm" (FLAP's fluctuation metric): Var(h_j) * ||W2[j, :]||^2, the variance of
  neuron j's contribution to fc2's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnx_vbp.calibrate import Stats
from onnx_vbp.find import MlpBlock
from onnx_vbp.graph import DiskWeights, import_graph, node_key, trace_param

SCORES = ("variance", "variance-x-norm")


def fc2_row_norms(model: onnx.ModelProto, blocks: list[MlpBlock], external_dir: Path | None = None
                  ) -> dict[str, np.ndarray]:
    """Squared norm of each neuron's row of fc2's weight (first site; tied sites share it)."""
    graph = import_graph(model)
    nodes = {node_key(n): n for n in graph.nodes}
    disk = DiskWeights(model, external_dir)
    norms = {}
    for block in blocks:
        ref = block.sites[0].fc2_weight
        traced = trace_param(nodes[ref.node].inputs[ref.input])
        disk.load(traced.source)
        rows = np.moveaxis(traced.value().astype(np.float64), ref.axis, 0).reshape(block.width, -1)
        norms[block.name] = np.square(rows).sum(axis=1)
    return norms


def neuron_scores(stats: dict[str, Stats], score: str = "variance", model: onnx.ModelProto | None = None,
               blocks: list[MlpBlock] | None = None, external_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Per-neuron importance of every block; "variance-x-norm" also needs `model` and `blocks`."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    variances = {name: s.variance for name, s in stats.items()}
    if score == "variance":
        return variances
    norms = fc2_row_norms(model, blocks, external_dir)
    return {name: variance * norms[name] for name, variance in variances.items()}
