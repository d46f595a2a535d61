"""The records every stage shares: blocks found in a graph, removal rankings, pruning plans.

Plain frozen data, no graph or runtime: `find` makes blocks, `importance` rankings, `select`
plans; every later stage reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamRef:
    """Input `input` of the node keyed `node`: a constant whose axis `axis` runs over neurons."""

    node: str
    input: int
    axis: int


@dataclass(frozen=True)
class BiasRef:
    """Where fc2's bias lives, or should be created.

    `node` carries (or will carry) the bias at input `input`; `input` None means fc2 is a MatMul
    with no bias anywhere, so a bias Add must be inserted after `node` (fc2 itself). The output
    change `delta` of fc2 is absorbed as `bias += delta * scale` (Gemm: alpha / beta).
    """

    node: str
    input: int | None
    scale: float = 1.0


@dataclass(frozen=True)
class MlpSite:
    """One place in the graph where a block's weights are used."""

    fc1: tuple[str, ...]  # node names; gated blocks: (gate, up)
    fc2: str
    hidden: str  # fc2's input tensor: the activation (or gate product) calibration observes
    hidden_axis: int  # axis of `hidden` that runs over neurons
    fc1_params: tuple[ParamRef, ...]  # sliced along neurons: fc1 weight(s) and bias(es)
    fc2_weight: ParamRef  # sliced along neurons (its input axis)
    fc2_bias: BiasRef
    width_literals: tuple[ParamRef, ...]  # shape constants holding the width (axis = position)
    width_tensors: tuple[tuple[str, int], ...]  # (tensor, axis) whose annotated shape has the width
    # Where fc2's output joins the residual stream (see `_residual`): the sum tensor, None when
    # there is none; the key of the fused SkipLayerNormalization whose optional output 3 is that
    # sum (`fused_sums`; graph.with_outputs adds the output where the model leaves it out), else
    # None; and the constant that scales fc2's output on the way (a transformer's layer scale),
    # axis -1 over fc2's output features.
    residual: str | None = None
    residual_node: str | None = None
    output_scale: ParamRef | None = None
    # The scale γ of the layer normalization (over the last axis) that reads that sum: a
    # LayerNormalization, the fused SkipLayerNormalization, or their decomposed formula; None
    # when the sum is not normalized there (see `_norm_scale`).
    norm_scale: ParamRef | None = None
    # fc2 as an integer MatMul (ORT dynamic quantization): the constants its weight is
    # dequantized by, W = (Wq - zero point) * scale, each one value or one per output feature
    # (axis -1); None for a float fc2.
    fc2_dequantize: tuple[ParamRef, ParamRef | None] | None = None


def fused_sums(sites: Iterable[MlpSite]) -> dict[str, str]:
    """For `graph.with_outputs`: each fused SkipLayerNormalization (by its key) whose optional
    output 3 is the residual sum one of `sites` joins -> that sum."""
    return {site.residual_node: site.residual for site in sites if site.residual_node}


@dataclass(frozen=True)
class MlpBlock:
    name: str
    activation: str
    width: int
    sites: tuple[MlpSite, ...]
    gated: bool = False

    @property
    def fc1(self) -> str:
        return ",".join(self.sites[0].fc1)

    @property
    def fc2(self) -> str:
        return self.sites[0].fc2

    @property
    def conv(self) -> bool:
        """fc1 and fc2 are 1x1 Convs: the neurons are channels (axis 1) of an NCHW tensor."""
        return self.sites[0].hidden_axis == 1


@dataclass(frozen=True)
class SkippedBlock:
    name: str
    reason: str


class BlockList(list):
    """The blocks found, plus `skipped`: structural matches that cannot be pruned, with reasons."""

    def __init__(self, blocks: list[MlpBlock], skipped: list[SkippedBlock]) -> None:
        super().__init__(blocks)
        self.skipped = skipped


@dataclass(frozen=True)
class Ranking:
    """One block's neurons in the order the pruner removes them, with the cost of each removal.

    `order[i]` is the neuron removed at step i; `cost[i]` what that step costs, in units that are
    comparable across blocks. A ranking may stop before the block's width (`depth`): the neurons
    not in `order` are never removed.
    """

    order: np.ndarray  # [depth] neuron indices
    cost: np.ndarray  # [depth]
    width: int

    @classmethod
    def by_score(cls, score: np.ndarray) -> Ranking:
        """Remove the lowest score first; the cost of a step is the removed neuron's score."""
        order = np.argsort(score, kind="stable")
        return cls(order, np.asarray(score)[order], score.size)


@dataclass
class Plan:
    """Sorted indices of the neurons each block keeps, by block name."""

    keep: dict[str, np.ndarray]

    def pruned(self, name: str, width: int) -> np.ndarray:
        return np.setdiff1d(np.arange(width), self.keep[name])


@dataclass
class BlockPositions:
    """What a block saw at some calibration positions of the original model."""

    inputs: np.ndarray  # [positions, in] fc1's input
    outputs: np.ndarray  # [positions, out] fc2's output
    sample: np.ndarray  # [positions] the calibration sample of each position
    # Where a layer normalization reads the residual sum (MlpSite.norm_scale), what it makes of
    # an error in fc2's output: 1 / variance of the sum over its features, per position; its γ and
    # the layer scale between fc2 and the sum (None if none), per output feature. None elsewhere.
    position_weight: np.ndarray | None = None
    norm_scale: np.ndarray | None = None
    output_scale: np.ndarray | None = None


@dataclass
class BlockWeights:
    """A block's weights as its neurons see them, whatever the graph's layout."""

    fc1: np.ndarray  # [in, width]
    fc1_bias: np.ndarray | None  # [width]; None where fc1 has no bias
    fc2: np.ndarray  # [width, out]


@dataclass
class Refit:
    """The outcome of refitting one pruned block (`reconstruct.fit_block`): the new weights and
    what to add to fc2's bias, or None and why not; the held-out errors before and after."""

    weights: BlockWeights | None
    fc2_bias_delta: np.ndarray  # [out]
    held_error_before: float
    held_error_after: float
    step: int  # the step kept (0: none)
    reason: str | None = None  # why the refit is not kept
    # "normalized": the error as the layer normalization after the residual sum sees it (see
    # `reconstruct`), "plain": the squared error of fc2's output
    loss: str = "plain"
