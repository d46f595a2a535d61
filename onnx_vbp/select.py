"""Stage 4, select: which neurons each block keeps, ranked by hidden-activation variance.

The importance criterion (variance; low = prunable) is separate from the pruner: this stage only
turns statistics into a `Plan` of kept indices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnx_vbp.calibrate import Stats

SCOPES = ("global", "per-block")


class SelectionError(ValueError):
    """Options that no plan can satisfy."""


@dataclass
class Plan:
    """Sorted indices of the neurons each block keeps, by block name."""

    keep: dict[str, np.ndarray]

    def pruned(self, name: str, width: int) -> np.ndarray:
        return np.setdiff1d(np.arange(width), self.keep[name])


def select(
    stats: dict[str, Stats],
    ratio: float,
    *,
    scope: str = "global",
    min_keep: int = 1,
    round_to: int | Mapping[str, int] = 1,
    scores: dict[str, np.ndarray] | None = None,
) -> Plan:
    """Prune the fraction `ratio` of all hidden neurons with the lowest variance (or the lowest
    `scores`, from `importance`, when given).

    `scope="global"` ranks every block's neurons together (the paper); `"per-block"` removes the
    same fraction from each block. Each block keeps at least `min_keep` neurons, and its kept width
    is then rounded up to a multiple of `round_to` (one number, or one per block name) by restoring
    its highest-variance pruned neurons.
    """
    if not 0.0 <= ratio < 1.0:
        raise SelectionError(f"ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise SelectionError(f"scope must be one of {SCOPES}, got {scope!r}")
    multiple = round_to if isinstance(round_to, Mapping) else dict.fromkeys(stats, round_to)
    if min_keep < 0 or min(multiple.values(), default=1) < 1:
        raise SelectionError("min_keep must be >= 0 and round_to >= 1")
    ranking = scores if scores is not None else {name: s.variance for name, s in stats.items()}
    if scope == "global":
        total = sum(v.size for v in ranking.values())
        prunable = sum(max(v.size - min_keep, 0) for v in ranking.values())
        if int(ratio * total) > prunable:
            raise SelectionError(f"ratio {ratio} removes {int(ratio * total)} of {total} neurons, but keeping "
                                 f"--min-keep {min_keep} per block leaves only {prunable} removable")
        pruned = _prune_global(ranking, ratio, min_keep)
    else:
        for name, v in ranking.items():
            if v.size - int(ratio * v.size) < min_keep:
                raise SelectionError(f"ratio {ratio} would leave block '{name}' {v.size - int(ratio * v.size)} "
                                     f"of {v.size} neurons, fewer than --min-keep {min_keep}")
        pruned = {name: _lowest(v, int(ratio * v.size)) for name, v in ranking.items()}
    keep = {}
    for name, score in ranking.items():
        width = score.size
        mask = np.ones(width, dtype=bool)
        mask[pruned[name]] = False
        target = min(width, math.ceil(mask.sum() / multiple[name]) * multiple[name])
        if target > mask.sum():
            restore = [i for i in np.argsort(-score, kind="stable") if not mask[i]]
            mask[restore[: target - mask.sum()]] = True
        keep[name] = np.flatnonzero(mask)
    return Plan(keep)


def _lowest(variance: np.ndarray, count: int) -> np.ndarray:
    return np.argsort(variance, kind="stable")[: max(count, 0)]


def _prune_global(variances: dict[str, np.ndarray], ratio: float, min_keep: int) -> dict[str, np.ndarray]:
    names = list(variances)
    owner = np.concatenate([np.full(variances[n].size, i) for i, n in enumerate(names)])
    index = np.concatenate([np.arange(variances[n].size) for n in names])
    order = np.argsort(np.concatenate([variances[n] for n in names]), kind="stable")
    budget = int(ratio * order.size)
    room = [variances[n].size - min_keep for n in names]
    pruned: list[list[int]] = [[] for _ in names]
    for k in order:
        if budget == 0:
            break
        block = owner[k]
        if room[block] > 0:
            pruned[block].append(int(index[k]))
            room[block] -= 1
            budget -= 1
    return {n: np.array(p, dtype=np.int64) for n, p in zip(names, pruned, strict=True)}
