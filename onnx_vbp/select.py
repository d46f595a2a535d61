"""Stage 4, select: which neurons each block keeps.

The importance criterion (`importance`: a removal order and a cost per step, per block) is
separate from the pruner: this stage only allocates the budget across blocks by those costs and
turns them into a `Plan` of kept indices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from onnx_vbp.errors import VbpError
from onnx_vbp.options import SCOPES
from onnx_vbp.records import Plan, Ranking
from onnx_vbp.stats import Stats


class SelectionError(VbpError):
    """Options that no plan can satisfy."""


def select(
    stats: dict[str, Stats],
    ratio: float,
    *,
    scope: str = "global",
    min_keep: int = 1,
    round_to: int | Mapping[str, int] = 1,
    rankings: Mapping[str, Ranking] | None = None,
) -> Plan:
    """Prune the fraction `ratio` of all hidden neurons: by `rankings` (from `importance`) when
    given, else the lowest-variance neurons first (the paper).

    `scope="global"` merges every block's ranking by cost and cuts at the budget (for variance:
    all neurons ranked together, as the paper does); `"per-block"` removes the same fraction from
    each block. Each block keeps at least `min_keep` neurons, and its kept width is then rounded
    up to a multiple of `round_to` (one number, or one per block name) by restoring the pruned
    neurons whose removal cost the most.
    """
    if not 0.0 <= ratio < 1.0:
        raise SelectionError(f"ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise SelectionError(f"scope must be one of {SCOPES}, got {scope!r}")
    ranked = dict(rankings) if rankings is not None else {n: Ranking.by_score(s.variance) for n, s in stats.items()}
    multiple = round_to if isinstance(round_to, Mapping) else dict.fromkeys(ranked, round_to)
    if min_keep < 0 or min(multiple.values(), default=1) < 1:
        raise SelectionError("min_keep must be >= 0 and round_to >= 1")
    if scope == "global":
        total = sum(r.width for r in ranked.values())
        room = {name: max(min(r.order.size, r.width - min_keep), 0) for name, r in ranked.items()}
        if int(ratio * total) > sum(room.values()):
            raise SelectionError(
                f"ratio {ratio} removes {int(ratio * total)} of {total} neurons, but keeping "
                f"`min_keep` {min_keep} per block leaves only {sum(room.values())} removable"
            )
        removed = _allocate(ranked, room, int(ratio * total))
    else:
        removed = {}
        for name, r in ranked.items():
            count = int(ratio * r.width)
            if r.width - count < min_keep:
                raise SelectionError(
                    f"ratio {ratio} would leave block '{name}' {r.width - count} "
                    f"of {r.width} neurons, fewer than `min_keep` {min_keep}"
                )
            if count > r.order.size:
                raise SelectionError(f"block '{name}' was ranked only {r.order.size} removals deep, {count} needed")
            removed[name] = count
    keep = {}
    for name, r in ranked.items():
        mask = np.ones(r.width, dtype=bool)
        mask[r.order[: removed[name]]] = False
        target = min(r.width, math.ceil(mask.sum() / multiple[name]) * multiple[name])
        if target > mask.sum():
            cost = np.full(r.width, -np.inf)
            cost[r.order[: removed[name]]] = r.cost[: removed[name]]
            restore = [i for i in np.argsort(-cost, kind="stable") if not mask[i]]
            mask[restore[: target - mask.sum()]] = True
        keep[name] = np.flatnonzero(mask)
    return Plan(keep)


def _allocate(ranked: Mapping[str, Ranking], room: Mapping[str, int], budget: int) -> dict[str, int]:
    """How many of its ranked removals each block makes: the `budget` cheapest steps over all
    blocks, each block's steps taken in its own order (a step's key is the highest cost up to it,
    so a cheap step behind an expensive one waits for it)."""
    names = list(ranked)
    keys = [np.maximum.accumulate(ranked[n].cost[: room[n]]) if room[n] else np.zeros(0) for n in names]
    owner = np.concatenate([np.full(k.size, i) for i, k in enumerate(keys)]).astype(np.int64)
    chosen = owner[np.argsort(np.concatenate(keys), kind="stable")[:budget]]
    counts = np.bincount(chosen, minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts, strict=True)}
