"""Per-neuron statistics of hidden activations (the `Stats` algebra) and their files.

Calibration produces them; selection, compensation and reports read them; a statistics file
carries them between runs, shards and machines.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.linalg.blas import dsyrk, ssyrk

from onnx_vbp.data import DataError, read_npz
from onnx_vbp.errors import VbpError
from onnx_vbp.runtime import in_memory

CHUNK_ELEMENTS = 1 << 18  # float64 values per row chunk of Stats.of: 2 MiB, cache-resident


# where temporary files go on disk by convention (FHS) when the temporary folder is in memory
DISK_TEMPORARY_FOLDER = "/var/tmp"


def spill_folder() -> str | None:
    """Where `Stats.spilled` writes: the temporary folder ($TMPDIR, else /tmp), or /var/tmp where
    that one is in memory (a tmpfs /tmp, as on Debian 13 and Fedora); None where both are."""
    for folder in (tempfile.gettempdir(), DISK_TEMPORARY_FOLDER):
        if os.path.isdir(folder) and os.access(folder, os.W_OK) and not in_memory(folder):
            return folder
    return None


class CalibrationError(VbpError):
    """Calibration data produced unusable activations (NaN/Inf, no samples) or ORT failed on it."""


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

    def spilled(self) -> Stats:
        """These statistics with the comoment in an anonymous temporary file, mapped back
        read-only: the page cache keeps what memory allows, the file goes with its last
        reference. For second moments calibrated in passes (`calibrate.comoment_passes`)."""
        if self.comoment is None:
            return self
        # unlinked at once where the OS can
        with tempfile.TemporaryFile(prefix="onnx_vbp-comoment-", dir=spill_folder()) as file:
            np.ascontiguousarray(self.comoment, np.float64).tofile(file)  # no copy of a C-order comoment
            file.flush()
            mapped = np.memmap(file, np.float64, mode="r", shape=self.comoment.shape)  # the map keeps the file
        return dataclasses.replace(self, comoment=mapped)

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
        deviations from the (float64) mean, a symmetric rank-n update (BLAS `ssyrk`, at twice the
        float64 speed), added up in float64. The diagonal is m2 itself, exact; off-diagonal terms
        carry float32 rounding (about 1e-7 of the neurons' standard deviations), far below the
        sampling noise of any covariance estimated from data.

        `stride` > 1 takes the product over every stride-th row only (the product is most of the
        cost of calibrating with second moments), centred on the subset's own mean, and scales it
        to the exact m2 of all rows: the correlations come from the subset, the variances from
        every row. A congruence by a positive diagonal, so the result stays positive
        semi-definite, of the subset's rank: a neuron that is an exact linear combination of
        others still is one."""
        pooled = PooledComoment(self.mean.shape[0])
        pooled.add(samples, self, stride)
        return pooled.of(self)

    def deviations(self, samples: np.ndarray, stride: int = 1) -> np.ndarray:
        """The float32 rows whose product is `with_comoment`'s (before its diagonal becomes m2),
        of the `samples` these statistics describe."""
        rows = np.asarray(samples)[::stride]
        center = self.mean if stride == 1 else rows.mean(axis=0, dtype=np.float64)
        deviations = np.asarray(rows, dtype=np.float32) - center.astype(np.float32)
        if stride > 1:  # scale each neuron's deviations so that the subset's m2 becomes all rows' m2
            subset_m2 = np.einsum("ij,ij->j", deviations, deviations, dtype=np.float64)
            scale = np.zeros_like(subset_m2)
            seen = subset_m2 > 0  # a neuron constant on the subset keeps its variance, no correlation
            scale[seen] = np.sqrt(self.m2[seen] / subset_m2[seen])
            deviations *= scale.astype(np.float32)
        return deviations

    def with_stream(self, positions: np.ndarray) -> Stats:
        """These statistics plus the residual stream's energy at `positions` [n, features]: each
        position's float32 sum of squares about its own mean, added up in float64 (a scale for
        the allocation's costs, to float32's seven digits)."""
        values = np.asarray(positions, dtype=np.float32)
        centered = values - values.mean(axis=1, keepdims=True)
        energy = np.einsum("ij,ij->i", centered, centered).sum(dtype=np.float64)
        return Stats(self.count, self.mean, self.m2, self.comoment, np.array([energy, values.shape[0]]))

    @property
    def stream_energy(self) -> float | None:
        """Mean ||z - mean(z)||² of the residual stream after the block, per position; None if unknown."""
        return None if self.stream is None or self.stream[1] == 0 else float(self.stream[0] / self.stream[1])

    @classmethod
    def of_parallel(cls, samples: np.ndarray, pool: ThreadPoolExecutor, workers: int) -> Stats:
        """`of` over `workers` row ranges at once, Chan-merged: numpy releases the GIL in the
        casts and sums, so the host reduction uses the cores ORT ran the batch on. (A comoment is
        one product over the whole batch, which BLAS spreads over the cores itself: see
        `with_comoment` and `PooledComoment`.)"""
        values = np.asarray(samples)
        parts = min(workers, max(values.shape[0] * values.shape[1] // CHUNK_ELEMENTS, 1))
        if parts == 1:
            return cls.of(values)
        bounds = np.linspace(0, values.shape[0], parts + 1).astype(int)
        pieces = pool.map(lambda i: cls.of(values[bounds[i] : bounds[i + 1]]), range(parts))
        return functools.reduce(cls.merge, pieces)

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


class PooledComoment:
    """A block's comoment pooled over calibration batches by the law of total covariance: the
    sum of every batch's own product (of `Stats.deviations`), added in float64, plus the scatter
    of the batch means about their pooled mean. The same comoment as Chan-merging each batch's
    (`Stats.merge`), without three [width, width] temporaries per batch: the product is written
    by `ssyrk` into one float32 buffer (`product`, which blocks of one width may share), and the
    scatter is one `dsyrk` per FOLD_BATCHES batches (folding them into one group of their pooled
    mean), both into upper triangles, mirrored once at the end."""

    FOLD_BATCHES = 64

    def __init__(self, width: int, product: np.ndarray | None = None) -> None:
        # Fortran order: ssyrk writes into it in place, and `within` is added to it element by element
        self.product = np.zeros((width, width), np.float32, order="F") if product is None else product
        self.within = np.zeros((width, width), order="F")  # its upper triangle; the lower stays zero
        self.means: list[np.ndarray] = []
        self.counts: list[float] = []

    def add(self, samples: np.ndarray, batch: Stats, stride: int = 1) -> None:
        """Add one batch: its `samples` [n, width] and their statistics `batch` (`Stats.of`)."""
        deviations = batch.deviations(samples, stride)
        # the upper triangle; the lower stays zero, in `product` and in a copy, should ssyrk make one
        product = ssyrk(1.0, deviations.T, beta=0.0, c=self.product, overwrite_c=1)
        np.add(self.within, product, out=self.within)
        self.means.append(batch.mean)
        self.counts.append(float(batch.count))
        if len(self.means) >= self.FOLD_BATCHES:
            self._fold()

    def _fold(self) -> None:
        counts, means = np.array(self.counts), np.array(self.means)
        mean = counts @ means / counts.sum()
        offsets = (means - mean) * np.sqrt(counts)[:, None]
        self.within = dsyrk(1.0, offsets.T, beta=1.0, c=self.within, overwrite_c=1)  # in place, upper triangle
        self.means, self.counts = [mean], [float(counts.sum())]

    def of(self, pooled: Stats) -> Stats:
        """`pooled`, the merge of every added batch's statistics, with their comoment (its
        diagonal the exact m2)."""
        if self.means:
            self._fold()
        comoment = np.add(self.within, self.within.T, order="C")  # its lower triangle is zero
        np.fill_diagonal(comoment, pooled.m2)
        return Stats(pooled.count, pooled.mean, pooled.m2, comoment, pooled.stream)


STATS_VERSION = 1
STATS_KEYS = ("__version__", "__samples__", "__model__", "stats/", "feed/")  # nothing else is read
COMOMENT = "/comoment"  # the member of a block's largest array, read one block at a time


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


def _read_members(path: Path, wanted: Callable[[str], bool]) -> tuple[dict[str, np.ndarray], list[str]]:
    try:
        return read_npz(path, wanted)
    except DataError as exc:
        raise CalibrationError(f"not a statistics file: {exc}") from exc


def load_stats(path: Path, comoments: str = "load") -> SavedStats:
    """Read a file written by `save_stats`. Each block's comoment is read on its own, after the
    rest, and kept in memory ("load"), moved to a temporary file before the next is read
    ("spill", `Stats.spilled`: second moments over their memory budget), or not read ("skip").

    Every array is checked (`_checked_stats`): a damaged or hand-edited file is refused with the
    key at fault, never turned into a model with NaN outputs.
    """
    arrays, members = _read_members(path, lambda key: key.startswith(STATS_KEYS) and not key.endswith(COMOMENT))
    version = arrays.get("__version__")
    if version is None or version.shape != () or version.dtype.kind not in "iu" or version != STATS_VERSION:
        raise CalibrationError(f"{path}: not a statistics file written by onnx_vbp (version {STATS_VERSION})")
    names = sorted({key[len("stats/") :].rsplit("/", 1)[0] for key in arrays if key.startswith("stats/")})
    stats = {}
    for name in names:
        key = f"stats/{name}{COMOMENT}"
        read = comoments != "skip" and key in members
        stats[name] = _checked_stats(path, name, {**arrays, **_read_members(path, key.__eq__)[0]} if read else arrays)
        if comoments == "spill":
            stats[name] = stats[name].spilled()
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
        return value.astype(np.float64, copy=False) if value.dtype.kind == "f" else value

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
