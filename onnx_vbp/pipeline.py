"""The whole job on files: find -> calibrate -> select -> rewrite -> write -> report."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx.external_data_helper import uses_external_data
from tqdm import tqdm

from onnx_vbp.calibrate import (
    COMOMENT_BUDGET,
    COMOMENT_MEMORY_SHARE,
    calibrate,
    comoment_budget,
    comoment_bytes,
    comoment_passes,
    comoments_fit,
)
from onnx_vbp.data import (
    DataError,
    ImageEncoder,
    InputSpec,
    RawOptions,
    conform,
    count_samples,
    data_files,
    data_kind,
    external_entries,
    external_file,
    fixed_batch,
    iter_batches,
    make_inputs,
    model_inputs,
    one_sample,
)
from onnx_vbp.errors import VbpError
from onnx_vbp.evaluate import evaluate
from onnx_vbp.find import find_mlp_blocks
from onnx_vbp.graph import import_graph, nodes_by_key, trace_param
from onnx_vbp.importance import rankings
from onnx_vbp.modelio import (
    ModelError,
    Publication,
    default_output,
    file_bytes,
    guard_outputs,
    load_model,
    model_files,
    publishing,
    verify_model,
    write_model,
)
from onnx_vbp.options import ALLOCATIONS, DEFAULT_RIDGE_LAMBDA, METHODS, STREAM_POWERS
from onnx_vbp.reconstruct import (
    POSITIONS_MEMORY,
    POSITIONS_MEMORY_SHARE,
    fit_block,
    gather_positions,
    positions_budget,
    unfit_reason,
)
from onnx_vbp.records import BlockList, BlockPositions, BlockWeights, MlpBlock, Plan, Ranking, Refit
from onnx_vbp.report import (
    Report,
    block_rows,
    count_params,
    node_macs,
    pruned_macs,
    refit_rows,
    run_sample,
    skipped_rows,
)
from onnx_vbp.rewrite import refit_blockers, refit_weights, rewrite
from onnx_vbp.runtime import cpu_session
from onnx_vbp.select import select
from onnx_vbp.stats import (
    DISK_TEMPORARY_FOLDER,
    CalibrationError,
    Stats,
    load_stats,
    merge_stats,
    save_stats,
    spill_folder,
)

log = logging.getLogger("onnx_vbp")


class NoBlocksError(VbpError):
    """The model has no prunable MLP block."""


@dataclass(frozen=True)
class PruneOptions:
    """The options of `prune_file`, one per CLI flag (see `python -m onnx_vbp --help`).

    `method` sets `score` and `compensate` (see METHODS); either may be given to override it.
    """

    ratio: float = 0.35
    scope: str = "global"
    min_keep: int = 1
    round_to: int = 1
    method: str = "obs"
    compensate: str | None = None  # mean | ridge | none (default: the method's)
    score: str | None = None  # importance criterion: variance | variance-x-norm | obs (default: the method's)
    ridge_lambda: float = DEFAULT_RIDGE_LAMBDA
    ranking_lambda: float | None = None  # the obs ranking's ridge term alone (default: ridge_lambda)
    allocation: str = "stream"  # obs's global budget across blocks (see ALLOCATIONS)
    reconstruct: bool = False  # refit each pruned block to the original's outputs (see `reconstruct`)
    batch_size: int | None = None
    max_samples: int | None = None
    min_samples: int = 16
    stats: Path | None = None  # prune from statistics saved earlier instead of calibrating
    save_stats: Path | None = None  # write the calibration statistics here
    ray_shards: int | None = None  # calibrate on Ray, this many shards of the data files
    ray_address: str | None = None  # an existing Ray cluster (default: RAY_ADDRESS, else a local one)
    allow_empty: bool = False  # a model without MLP blocks is copied instead of refused
    threads: int | None = None
    progress: bool = True
    raw: RawOptions = field(default_factory=RawOptions)  # how raw images / text are encoded

    def __post_init__(self) -> None:
        for name in ("stats", "save_stats"):  # str paths are welcome
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.ranking_lambda is not None and not (math.isfinite(self.ranking_lambda) and self.ranking_lambda >= 0):
            raise ValueError(f"ranking_lambda must be a finite number >= 0, got {self.ranking_lambda!r}")
        score, compensate = METHODS[self.method]
        object.__setattr__(self, "score", self.score or score)
        object.__setattr__(self, "compensate", self.compensate or compensate)

    @property
    def effective_ranking_lambda(self) -> float:
        """The ridge term of the obs ranking: `ranking_lambda`, else `ridge_lambda` (the refit's)."""
        return self.ridge_lambda if self.ranking_lambda is None else self.ranking_lambda

    @property
    def comoments(self) -> bool:
        """Whether these options need each block's hidden covariance."""
        return self.score == "obs" or self.compensate == "ridge"

    def without_comoments(self) -> PruneOptions:
        """The paper's VBP with these options' other settings: what fits when covariances do not."""
        return dataclasses.replace(self, method="vbp", score=None, compensate=None)


def progress_bar(desc: str, total: int | None, options: PruneOptions, unit: str = "sample") -> tqdm:
    """A progress bar (in samples), with a total (and so an ETA) when it is known; drawn only on
    a terminal, never with `options.progress` off."""
    return tqdm(desc=desc, unit=unit, total=total, disable=None if options.progress else True)


def _counted(batches: Iterator[dict], bar: tqdm, name: str) -> Iterator[dict]:
    """`batches`, advancing `bar` by each batch's samples (the length of input `name`)."""
    for batch in batches:
        yield batch
        bar.update(len(batch[name]))


def _calibrate(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    batches: Iterator[dict],
    options: PruneOptions,
    external_dir: Path | None,
    total: int | None = None,
    desc: str = "calibrating",
) -> tuple[dict[str, Stats], int, float]:
    """Calibrate with a progress bar (drawn only on a terminal); returns (stats, samples, seconds)."""
    start = time.perf_counter()
    samples = 0
    with progress_bar(desc, total, options) as bar:

        def on_batch(size: int) -> None:
            nonlocal samples
            samples += size
            bar.update(size)

        stats = calibrate(
            model,
            blocks,
            batches,
            threads=options.threads,
            on_batch=on_batch,
            external_dir=external_dir,
            comoments=options.comoments,
        )
    return stats, samples, time.perf_counter() - start


def _check_stats_fit(stats: dict[str, Stats], blocks: list[MlpBlock], options: PruneOptions) -> None:
    """Saved statistics must describe exactly this model's blocks."""
    found = {b.name: b.width for b in blocks}
    saved = {name: s.mean.size for name, s in stats.items()}
    if found != saved:
        raise CalibrationError(
            f"statistics in {options.stats} do not match this model's MLP blocks "
            f"({len(saved)} saved, {len(found)} found)"
        )


def _have_comoments(stats: dict[str, Stats]) -> bool:
    return all(s.comoment is not None for s in stats.values())


def fitted_options(options: PruneOptions, comoments: bool) -> PruneOptions:
    """`options`, or the paper's VBP where they need second moments that cannot be had
    (`comoments` false): the default method degrades (`within_memory` warns), an explicit choice of
    them is refused."""
    if not options.comoments or comoments:
        return options
    if options.method == "obs" and (options.score, options.compensate) == METHODS["obs"]:
        return options.without_comoments()
    raise CalibrationError(
        f"`score` {options.score} / `compensate` {options.compensate} need second moments, and "
        "there are none (over the memory budget, or a statistics file saved without them)"
    )


@dataclass
class Prepared:
    """A loaded, calibrated model: what any number of ratios can be pruned from."""

    path: Path
    model: onnx.ModelProto
    external: bool
    specs: list[InputSpec]
    blocks: BlockList
    stats: dict[str, Stats]
    samples: int
    seconds: float
    macs: dict[str, int]  # per MatMul/Gemm/Conv node, per sample
    sample_feed: dict[str, np.ndarray]  # one calibration sample: what a written model is verified on
    sample_outputs: dict[str, np.ndarray]  # the original's outputs on it
    fingerprint: str  # of the weights the statistics describe (see `weights_fingerprint`)
    source: dict = field(default_factory=dict)  # where the statistics came from, for the report
    validation: list[dict[str, np.ndarray]] = field(default_factory=list)  # for --allocation measured
    positions: dict[str, BlockPositions] = field(default_factory=dict)  # for --reconstruct, by block
    refit_declined: dict[str, str] = field(default_factory=dict)  # blocks --reconstruct cannot refit: why
    _rankings: dict[tuple, dict[str, Ranking]] = field(default_factory=dict)  # per (score, λ), per block
    _validation_outputs: list[list[np.ndarray]] | None = None  # the original's, on `validation`

    def plan(self, options: PruneOptions) -> Plan:
        """Select by `options` (see `allocated_plan`)."""
        return self.allocated_plan(options)[0]

    def allocated_plan(self, options: PruneOptions) -> tuple[Plan, dict | None]:
        """Select by `options`, from this model's rankings (see `allocated_plan`), with how the
        budget was allocated. Each block is ranked once and only deepened when a plan needs more,
        since a sweep plans many ratios from the same rankings and a shallower ranking is a
        prefix of a deeper one."""

        rank = ranker(self.stats, options, self.model, self.blocks, self.external_dir)
        ranked = self._rankings.setdefault((options.score, options.effective_ranking_lambda), {})
        return allocated_plan(self.stats, self.blocks, options, cached(rank, ranked), self._output_error(options))

    def _output_error(self, options: PruneOptions) -> Callable[[Plan], float] | None:
        """How far a plan's rewritten model moves the outputs on `validation` (`output_error`);
        None without validation samples, or for a model whose weights live in external files."""
        if options.allocation != "measured" or not self.validation or self.external:
            return None
        if self._validation_outputs is None:
            self._validation_outputs = run_batches(self.model.SerializeToString(), self.validation, options.threads)
        return validation_error(self.model, self.blocks, self.stats, options, self.validation, self._validation_outputs)

    def save_stats(self, path: Path) -> None:
        """Write the calibration statistics to `path` (see `stats.save_stats`)."""
        save_stats(path, self.stats, self.samples, self.sample_feed, self.fingerprint)

    @property
    def external_dir(self) -> Path | None:
        return self.path.parent if self.external else None  # large weights stay in their files

    def eval_batches(self, source: Path, options: PruneOptions) -> Iterator[dict]:
        """Held-out batches from `source`: all of it, at most EVAL_BATCH_SIZE samples per run
        unless `options` or the model fix the batch size, so memory stays bounded whatever the
        size of a file."""
        size = options.batch_size or (None if fixed_batch(self.specs) else EVAL_BATCH_SIZE)
        return iter_batches(source, self.specs, batch_size=size, raw=options.raw)


RankFunction = Callable[[dict[str, int]], dict[str, Ranking]]


def ranker(
    stats: dict[str, Stats],
    options: PruneOptions,
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    external_dir: Path | None,
) -> RankFunction:
    """`rankings` by `options` (their score, and the obs ranking's λ) of the blocks a call names,
    each as deep as it asks."""

    def rank(depths: dict[str, int]) -> dict[str, Ranking]:
        return rankings(
            stats,
            options.score,
            model,
            blocks,
            depth=depths,
            external_dir=external_dir,
            ridge_lambda=options.effective_ranking_lambda,
        )

    return rank


def cached(rank: RankFunction, ranked: dict[str, Ranking]) -> RankFunction:
    """`rank`, called only for the blocks that `ranked` (kept up to date in place) does not hold
    as deep as asked: a shallower ranking is a prefix of a deeper one."""

    def rank_cached(depths: dict[str, int]) -> dict[str, Ranking]:
        stale = {name: d for name, d in depths.items() if name not in ranked or ranked[name].order.size < d}
        if stale:
            ranked.update(rank(stale))
        return {name: ranked[name] for name in depths}

    return rank_cached


# A block's first obs ranking goes this many times its share of the budget deep: enough for most
# blocks of a real model, whose allocations are uneven; the others are ranked again, deeper.
FIRST_DEPTH = 1.5


def deepening_plan(
    stats: dict[str, Stats],
    blocks: list[MlpBlock],
    options: PruneOptions,
    rank: RankFunction,
) -> Plan:
    """Select by `options`, with `rank(depths)` the rankings of the blocks it names, each at least
    that many removals deep. Sequential rankings (obs) cost more the deeper they go, so each block
    starts at FIRST_DEPTH times its share of the budget, and only a block whose allocation takes
    all of its ranked removals, and could take more, is ranked again twice as deep."""
    rank = cached(rank, {})
    widths = {b.name: b.width for b in blocks}
    if options.scope == "global":
        depths = {name: min(w, math.ceil(FIRST_DEPTH * options.ratio * w) + 1) for name, w in widths.items()}
    else:
        depths = {name: int(options.ratio * w) for name, w in widths.items()}
    budget = int(options.ratio * sum(widths.values()))
    while True:
        ranked = rank(depths)
        room = sum(min(ranked[name].order.size, w - options.min_keep) for name, w in widths.items())
        deeper = {name: min(2 * d, widths[name]) for name, d in depths.items()}
        if options.scope == "global" and room < budget and deeper != depths:
            depths = deeper
            continue
        plan = select(
            stats,
            options.ratio,
            scope=options.scope,
            min_keep=options.min_keep,
            round_to=block_multiples(blocks, options.round_to),
            rankings={name: ranked[name] for name in widths},
        )
        saturated = [
            name
            for name, w in widths.items()  # took every ranked removal, and may take more
            if plan.keep[name].size <= w - ranked[name].order.size and ranked[name].order.size < w - options.min_keep
        ]
        if not saturated:
            return plan
        depths.update({name: deeper[name] for name in saturated})


def allocated_plan(
    stats: dict[str, Stats],
    blocks: list[MlpBlock],
    options: PruneOptions,
    rank: RankFunction,
    error: Callable[[Plan], float] | None = None,
) -> tuple[Plan, dict | None]:
    """`deepening_plan` with obs's global budget allocated as `options.allocation` says: each
    block's costs divided by its residual stream's energy to the power STREAM_POWERS[allocation]
    (`rankings` divides them by the energy itself). "measured" plans with every power and
    keeps the plan whose `error` (`output_error` on calibration samples) is least, by more than
    MEASURED_MARGIN against the stream-relative one; without
    `error`, the stream-relative plan. Returns the plan and, for obs's global allocations, what
    was chosen (and the errors measured), for the report."""
    streams = {name: s.stream_energy for name, s in stats.items()}
    if options.score != "obs" or options.scope != "global" or not all(streams.values()):
        if options.allocation != "stream":
            log.warning(
                "--allocation %s applies only to obs's global allocation by stream energies", options.allocation
            )
        return deepening_plan(stats, blocks, options, rank), None
    if options.allocation != "measured":
        powers = {options.allocation: STREAM_POWERS[options.allocation]}
    elif error is None:
        log.warning("--allocation measured needs calibration samples of a model held in memory: allocating by stream")
        powers = {"stream": STREAM_POWERS["stream"]}
    else:
        powers = STREAM_POWERS

    def rescaled(power: float) -> RankFunction:
        def rank_at(depths: dict[str, int]) -> dict[str, Ranking]:
            ranked = rank(depths)
            if power == 1.0:
                return ranked
            return {n: Ranking(r.order, r.cost * streams[n] ** (1.0 - power), r.width) for n, r in ranked.items()}

        return rank_at

    plans = {name: deepening_plan(stats, blocks, options, rescaled(power)) for name, power in powers.items()}
    if len(plans) == 1:
        ((name, plan),) = plans.items()
        return plan, {"allocation": name}
    errors: dict[str, float] = {}
    for name, plan in plans.items():
        same = next((other for other in errors if _same_plan(plans[other], plan)), None)
        errors[name] = errors[same] if same is not None else error(plan)
    best = min(errors, key=errors.get)
    chosen = best if errors[best] < (1.0 - MEASURED_MARGIN) * errors["stream"] else "stream"
    log.info(
        "allocation: %s (output error on calibration samples %s)",
        chosen,
        ", ".join(f"{name} {value:.4g}" for name, value in errors.items()),
    )
    return plans[chosen], {"allocation": chosen, "output_errors": errors}


def _same_plan(a: Plan, b: Plan) -> bool:
    return a.keep.keys() == b.keep.keys() and all(np.array_equal(a.keep[n], b.keep[n]) for n in a.keep)


# --allocation measured compares candidate plans on this many calibration samples, and leaves
# the stream-relative plan only for one whose error is lower by more than this fraction: on the
# demo two candidates differed by 0.015 %, which the batching of the samples alone can reverse
VALIDATION_SAMPLES = 64
MEASURED_MARGIN = 0.01


def first_batches(batches: Iterator[Mapping[str, np.ndarray]], samples: int) -> list[Mapping[str, np.ndarray]]:
    """Batches taken from `batches` until they hold `samples` samples (or it runs out)."""
    taken, seen = [], 0
    while seen < samples and (batch := next(batches, None)) is not None:
        taken.append(batch)
        seen += len(next(iter(batch.values())))
    return taken


def run_batches(
    model_bytes: bytes, batches: list[Mapping[str, np.ndarray]], threads: int | None
) -> list[list[np.ndarray]]:
    """The model's outputs on each batch (batches may differ in more than their length: text
    is padded per batch)."""
    session = cpu_session(model_bytes, threads, optimize=True)
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {n: batch[n] for n in names}) for batch in batches]


def validation_error(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    stats: dict[str, Stats],
    options: PruneOptions,
    validation: list[Mapping[str, np.ndarray]],
    reference: list[list[np.ndarray]],
) -> Callable[[Plan], float]:
    """`output_error` of a plan's rewritten model on the `validation` batches, against the
    original's outputs on them (`reference`)."""

    def error(plan: Plan) -> float:
        pruned = rewrite(model, blocks, stats, plan, compensate=options.compensate, ridge_lambda=options.ridge_lambda)
        return output_error(reference, run_batches(pruned.SerializeToString(), validation, options.threads))

    return error


def output_error(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """The squared error of `outputs` against `reference` (per batch, each output), relative to
    the reference's spread about each batch's mean sample, summed over the floating-point outputs
    that have a spread."""
    total = 0.0
    for k, first in enumerate(reference[0]):
        if not np.issubdtype(first.dtype, np.floating):
            continue
        error = spread = 0.0
        for expected, actual in zip(reference, outputs, strict=True):
            expected64 = expected[k].astype(np.float64)
            error += float(np.sum(np.square(actual[k].astype(np.float64) - expected64)))
            spread += float(np.sum(np.square(expected64 - expected64.mean(axis=0))))
        if spread > 0:
            total += error / spread
    return total


def within_memory(
    options: PruneOptions, blocks: list[MlpBlock], spill: str | None = None
) -> tuple[PruneOptions, list[list[MlpBlock]]]:
    """`options`, and the blocks whose second moments are gathered together. All at once when
    they are not needed or fit their memory budget (`comoment_budget`). Over it, where `spill`
    says how they can still be had (data that can be read again: "calibrating in {passes} passes
    over the data"), groups that each fit (`comoment_passes`), each group's kept in temporary
    files on disk once gathered, where those have room; otherwise the paper's VBP
    (`fitted_options`). Either change is said in one line."""
    if not options.comoments or comoments_fit(blocks):
        return options, [blocks]
    needed, budget = comoment_bytes(blocks), comoment_budget()
    over = (
        f"second moments of these blocks need {needed / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget "
        f"(at most {COMOMENT_BUDGET / 2**30:.0f} GiB, and {100 * COMOMENT_MEMORY_SHARE:.0f}% of the memory available)"
    )
    passes, folder, why_not = (
        comoment_plan(blocks, budget) if spill else (None, None, "the calibration data can be read only once")
    )
    if spill and passes:
        log.warning("%s: %s, each then kept in temporary files in %s", over, spill.format(passes=len(passes)), folder)
        return options, passes
    fitted = fitted_options(options, comoments=False)
    log.warning("%s%s: pruning with --method %s instead", over, f"; {why_not}" if why_not else "", fitted.method)
    return fitted, [blocks]


def comoment_plan(blocks: list[MlpBlock], budget: int) -> tuple[list[list[MlpBlock]] | None, str | None, str | None]:
    """How second moments over `budget` can be had: the groups of blocks gathered in turn
    (`comoment_passes`) and the folder on disk their temporary files go to (`spill_folder`), or
    (None, None, why not)."""
    passes = comoment_passes(blocks, budget)
    if passes is None:
        return None, None, "a block alone is over the budget"
    folder = spill_folder()
    if folder is None:
        held = f"{tempfile.gettempdir()} and {DISK_TEMPORARY_FOLDER} are in memory (tmpfs), so temporary files"
        return None, None, f"{held} would not spare it: set TMPDIR to a folder on disk"
    room = shutil.disk_usage(folder).free
    if room < comoment_bytes(blocks):
        return None, None, f"{room / 2**30:.1f} GiB free in {folder} is too little for them"
    return passes, folder, None


def prepare(model_path: Path, calib: Path | None, options: PruneOptions = PruneOptions()) -> Prepared:
    """Load and check the model, find its blocks, and calibrate (or load `options.stats`)."""
    model_path = Path(model_path)
    model, external = load_model(model_path)
    specs = model_inputs(model)
    blocks = find_mlp_blocks(model)
    for skipped in blocks.skipped:
        log.warning("skipped MLP block %s: %s", skipped.name, skipped.reason)
    if not blocks:
        why = "; ".join(f"{s.name}: {s.reason}" for s in blocks.skipped)
        quantized = quantized_hint(model)
        if not options.allow_empty:
            raise NoBlocksError(
                f"no prunable MLP block in {model_path}"
                + (
                    f" (all skipped: {why})"
                    if why
                    else " (looked for fc1 -> activation -> fc2 with MatMul/Gemm/1x1-Conv layers)"
                )
                + (f"; {quantized}" if quantized else "")
            )
        log.warning("no prunable MLP block; writing an unchanged copy (--allow-empty)")
    log.info("found %d MLP blocks, %d hidden neurons", len(blocks), sum(b.width for b in blocks))
    external_dir = model_path.parent if external else None  # large weights stay in their files
    fingerprint = weights_fingerprint(model, blocks, external_dir)
    passes, asked = [blocks], options
    if blocks:
        spill = "calibrating in {passes} passes over the data"
        if options.stats is not None:
            spill = "reading them from the statistics file one block at a time"
        elif options.ray_shards:
            spill = "calibrating in {passes} rounds of Ray tasks"
        options, passes = within_memory(options, blocks, spill)
    if blocks and options.stats is not None:
        if calib is not None:
            log.warning("calibration data %s is not used: pruning from the statistics in %s", calib, options.stats)
        comoments = "spill" if len(passes) > 1 else "skip" if asked.comoments and not options.comoments else "load"
        measured = _from_stats_file(blocks, specs, fingerprint, options, comoments)
    elif calib is None:
        raise DataError("no calibration data: give `calib` or `stats`")
    elif blocks and options.ray_shards:
        measured = _from_ray(model_path, passes, Path(calib), specs, options)
    else:
        measured = _from_calibration(model, passes, Path(calib), specs, options, external_dir)
    if blocks:
        _check_sample_count(measured, calib or options.stats, options)
    # the sample saved with statistics may no longer fit the model
    where = f"the sample saved in {options.stats}" if options.stats else "a calibration sample"
    sample_run = run_sample(model, measured.sample_feed, external_dir, where)
    validation = []
    if blocks and options.allocation == "measured" and options.stats is None:
        first = dataclasses.replace(options, max_samples=VALIDATION_SAMPLES)
        validation = list(calibration_batches(Path(calib), specs, first))
    positions, refit_declined = (
        _block_positions(model, blocks, calib, specs, measured.samples, options, external_dir) if blocks else ({}, {})
    )
    return Prepared(
        model_path,
        model,
        external,
        specs,
        blocks,
        measured.stats,
        measured.samples,
        measured.seconds,
        sample_run.macs,
        measured.sample_feed,
        sample_run.outputs,
        fingerprint,
        measured.source,
        validation,
        positions,
        refit_declined,
    )


def _block_positions(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    calib: Path | None,
    specs: list[InputSpec],
    samples: int,
    options: PruneOptions,
    external_dir: Path | None,
) -> tuple[dict[str, BlockPositions], dict[str, str]]:
    """For `--reconstruct`: what each block that can be refit sees in the original model, at
    positions spread over the calibration data (one more pass over it); and why each other block
    cannot be refit."""
    if not options.reconstruct:
        return {}, {}
    if options.stats is not None:
        log.warning("--reconstruct needs the calibration data, not only its statistics: no block is refit")
        return {}, {}
    reasons = {block.name: unfit_reason(block) for block in blocks}
    candidates = [block for block in blocks if reasons[block.name] is None]
    # quantized or scaled weights are known from the graph: spare the data pass for them
    reasons.update(refit_blockers(model, candidates) if candidates else {})
    declined = {name: reason for name, reason in reasons.items() if reason is not None}
    for name, reason in declined.items():
        log.warning("block %s is not refit: %s", name, reason)
    refittable = [block for block in blocks if block.name not in declined]
    if not refittable:
        return {}, declined
    start, budget = time.perf_counter(), positions_budget()
    if budget < POSITIONS_MEMORY:
        log.warning(
            "--reconstruct: the positions gathered for the fit are held to %d MiB, %d%% of the memory available "
            "(at most %d MiB): the fit may see fewer of them than with more memory",
            budget >> 20,
            round(100 * POSITIONS_MEMORY_SHARE),
            POSITIONS_MEMORY >> 20,
        )
    with progress_bar("gathering positions", samples, options) as bar:
        batches = _counted(calibration_batches(Path(calib), specs, options), bar, specs[0].name)
        positions = gather_positions(
            model,
            refittable,
            batches,
            samples,
            threads=options.threads,
            external_dir=external_dir,
            memory=budget,
        )
    log.info(
        "gathered %d positions per block for --reconstruct in %.1f s (at most %d MiB for all blocks)",
        len(next(iter(positions.values())).sample) if positions else 0,
        time.perf_counter() - start,
        budget >> 20,
    )
    return positions, declined


@dataclass(frozen=True)
class Measured:
    """What each source of statistics gives `prepare`: the statistics, how many samples they
    saw and in how long, one sample of inputs (to verify written models on), and where they
    came from (for the report)."""

    stats: dict[str, Stats]
    samples: int
    seconds: float
    sample_feed: dict[str, np.ndarray]
    source: dict


def _from_stats_file(
    blocks: BlockList, specs: list[InputSpec], fingerprint: str, options: PruneOptions, comoments: str = "load"
) -> Measured:
    """Statistics saved by an earlier run (`options.stats`), checked against this model; their
    second moments read as `comoments` says (`load_stats`)."""
    saved = load_stats(options.stats, comoments)
    _check_stats_fit(saved.stats, blocks, options)
    if saved.model is None:
        log.warning(
            "statistics in %s carry no model fingerprint (an older file): they cannot be checked against this model",
            options.stats,
        )
    elif saved.model != fingerprint:
        raise CalibrationError(
            f"statistics in {options.stats} were measured on another model: its MLP "
            "weights differ from this one's (same blocks and widths); calibrate this model"
        )
    if fitted_options(options, _have_comoments(saved.stats)) is not options:
        log.warning("statistics in %s have no second moments: pruning with --method vbp", options.stats)
    log.info("using statistics of %d samples from %s", saved.samples, options.stats)
    feed = _saved_feed(saved.feed, specs, options.stats)
    return Measured(saved.stats, saved.samples, 0.0, feed, {"stats": str(options.stats)})


def _from_ray(
    model_path: Path, passes: list[list[MlpBlock]], calib: Path, specs: list[InputSpec], options: PruneOptions
) -> Measured:
    """Statistics calibrated on a Ray cluster, one shard of the data files per task, one round of
    tasks per group of blocks (`_in_passes`)."""
    from onnx_vbp.distributed import calibrate_on_ray  # Ray is an optional extra

    if options.max_samples is not None:
        raise DataError("`max_samples` cannot cap shards calibrated on Ray; pass a smaller `calib` instead")
    start = time.perf_counter()

    def calibrate_group(group: list[MlpBlock], _: str) -> tuple[dict[str, Stats], int]:
        return calibrate_on_ray(
            model_path,
            calib,
            options.ray_shards,
            address=options.ray_address,
            batch_size=options.batch_size,
            raw=options.raw,
            threads=options.threads,
            comoments=options.comoments,
            block_names=None if len(passes) == 1 else [b.name for b in group],
        )

    stats, samples = _in_passes(passes, calibrate_group)
    seconds = time.perf_counter() - start
    return Measured(stats, samples, seconds, _first_sample(calib, specs, options), _data_source(calib, options, specs))


def _from_calibration(
    model: onnx.ModelProto,
    passes: list[list[MlpBlock]],
    calib: Path,
    specs: list[InputSpec],
    options: PruneOptions,
    external_dir: Path | None,
) -> Measured:
    """Statistics calibrated here, on `calib`, one pass over it per group of blocks (`_in_passes`;
    none for a model without blocks: only its sample)."""
    stats, samples, seconds = {}, 0, 0.0
    if any(passes):
        counted = count_samples(calib, specs, options.raw, limit=options.max_samples)
        total = min(counted, options.max_samples or counted) if counted is not None else options.max_samples

        def calibrate_group(group: list[MlpBlock], desc: str) -> tuple[dict[str, Stats], int]:
            batches = calibration_batches(calib, specs, options)
            group_stats, group_samples, _ = _calibrate(model, group, batches, options, external_dir, total, desc)
            return group_stats, group_samples

        start = time.perf_counter()
        stats, samples = _in_passes(passes, calibrate_group)
        seconds = time.perf_counter() - start
    return Measured(stats, samples, seconds, _first_sample(calib, specs, options), _data_source(calib, options, specs))


def _in_passes(
    passes: list[list[MlpBlock]], calibrate_group: Callable[[list[MlpBlock], str], tuple[dict[str, Stats], int]]
) -> tuple[dict[str, Stats], int]:
    """Statistics of every group of `passes` (`within_memory`), each from one pass over the data
    by `calibrate_group(group, progress label)`, and the samples seen. Past one pass, each pass's
    second moments move to temporary files before the next (`Stats.spilled`)."""
    stats, samples = {}, 0
    for number, group in enumerate(passes, 1):
        desc = "calibrating" if len(passes) == 1 else f"calibrating, pass {number}/{len(passes)}"
        group_stats, samples = calibrate_group(group, desc)
        stats.update(group_stats if len(passes) == 1 else {name: s.spilled() for name, s in group_stats.items()})
    return stats, samples


def calibration_batches(source: Path, specs: list[InputSpec], options: PruneOptions) -> Iterator[dict]:
    """Calibration batches from `source`, as `options` say."""
    return iter_batches(source, specs, batch_size=options.batch_size, max_samples=options.max_samples, raw=options.raw)


def _first_sample(calib: Path, specs: list[InputSpec], options: PruneOptions) -> dict[str, np.ndarray]:
    """The first calibration sample (the first batch, if the model fixes its batch size)."""
    return one_sample(specs, next(calibration_batches(calib, specs, options)))


def _check_sample_count(measured: Measured, source: Path, options: PruneOptions) -> None:
    """Refuse too few calibration samples; warn where a covariance has too few positions."""
    if measured.samples < options.min_samples:
        raise DataError(
            f"only {measured.samples} calibration samples in {source}; at least "
            f"`min_samples` {options.min_samples} are needed"
        )
    log.info("calibrated on %d samples in %.1f s", measured.samples, measured.seconds)
    short: dict[tuple[int, int], list[str]] = {}  # (width, positions) -> blocks: one line per group
    for name, block_stats in measured.stats.items():
        width = block_stats.mean.size
        if block_stats.comoment is not None and block_stats.count < POSITIONS_PER_NEURON * width:
            short.setdefault((width, block_stats.count), []).append(name)
    for (width, count), names in short.items():
        log.warning(
            "%s: %s %d x %d covariance comes from only %d positions; the obs ranking and the ridge refit "
            "will fit noise: give more calibration data (at least %d positions)",
            f"block {names[0]}" if len(names) == 1 else f"{len(names)} blocks ({names[0]} to {names[-1]})",
            "its" if len(names) == 1 else "each",
            width,
            width,
            count,
            POSITIONS_PER_NEURON * width,
        )


def _data_source(source: Path, options: PruneOptions, specs: list[InputSpec]) -> dict:
    """Where data came from and, for photos and text, how it was encoded."""
    described: dict = {"data": str(source)}
    kind = data_kind(source)
    if kind == "images":
        encoder = ImageEncoder(specs, options.raw)
        described["images"] = {
            "mean": encoder.mean.tolist(),
            "std": encoder.std.tolist(),
            "image_size": options.raw.image_size and list(options.raw.image_size),
        }
    elif kind == "text":
        described["text"] = {
            "tokenizer": str(options.raw.tokenizer),
            "max_length": options.raw.max_length,
            "long_text": options.raw.long_text,
        }
    return described


def versions() -> dict[str, str]:
    """The versions that made a result, for reports."""
    from onnx_vbp import __version__  # the package's __init__ imports this module: read it at call time

    return {
        "onnx_vbp": __version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }


def _saved_feed(feed: dict[str, np.ndarray], specs: list[InputSpec], path: Path) -> dict[str, np.ndarray]:
    """The one-sample feed of a statistics file, checked against the model's inputs."""
    for spec in specs:
        if spec.name not in feed or feed[spec.name].ndim == 0 or len(feed[spec.name]) == 0:
            raise CalibrationError(f"{path}: no sample of model input '{spec.name}' ('feed/{spec.name}')")
    sample = one_sample(specs, feed)
    return {spec.name: conform(path, spec, sample[spec.name]) for spec in specs}


FINGERPRINT_BYTES = 1 << 16


def weights_fingerprint(model: onnx.ModelProto, blocks: list[MlpBlock], external_dir: Path | None) -> str:
    """A digest of what a model's statistics describe: each block's name and width, and the first
    64 KiB of its fc1 and fc2 weights (any training or fine-tuning changes those). The same for a
    model stored inline or with external data; different for another model of the same
    architecture."""
    nodes = nodes_by_key(import_graph(model))
    initializers = {t.name: t for t in model.graph.initializer}
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(f"{block.name}:{block.width};".encode())
        site = block.sites[0]
        for ref in (site.fc1_params[0], site.fc2_weight):
            source = trace_param(nodes[ref.node].inputs[ref.input]).source
            tensor = initializers.get(source.name)
            if tensor is not None and uses_external_data(tensor):
                entries = external_entries(tensor)
                with open(external_file(tensor, external_dir), "rb") as data:
                    data.seek(int(entries.get("offset", 0)))
                    head = data.read(min(FINGERPRINT_BYTES, int(entries.get("length", FINGERPRINT_BYTES))))
            elif tensor is not None and tensor.raw_data:
                head = tensor.raw_data[:FINGERPRINT_BYTES]
            else:  # typed fields or a Constant node: the same little-endian bytes raw_data would hold
                head = np.asarray(source.values).astype(np.asarray(source.values).dtype.newbyteorder("<")).tobytes()
                head = head[:FINGERPRINT_BYTES]
            digest.update(head)
    return digest.hexdigest()


# A block left with less than this fraction of its neurons is worth a warning: global allocation
# may gut one block to spare others, and users rarely expect it.
DUBIOUS_KEEP = 0.2
# Ratios from here on remove most of the network's MLP capacity.
DUBIOUS_RATIO = 0.8

# Held-out data is run this many samples at a time: a 2,000-sample file fed whole took 2 GB.
EVAL_BATCH_SIZE = 64

# A covariance estimated from fewer observations than this many per neuron is mostly noise.
POSITIONS_PER_NEURON = 4

# ORT's CPU optimizer moves a 1x1 Conv to its NCHWc layout only when both channel counts are
# multiples of 4; a pruned width like 23 would fall back to plain Conv plus layout reorders.
NCHWC_CHANNELS = 4


def block_multiples(blocks: list[MlpBlock], round_to: int) -> dict[str, int]:
    """What each block's kept width is rounded to: `round_to`, and for 1x1-Conv blocks also a
    multiple of NCHWC_CHANNELS, so the pruned graph keeps the original's NCHWc kernels."""
    return {b.name: math.lcm(round_to, NCHWC_CHANNELS) if b.conv else round_to for b in blocks}


def prune_prepared(
    prepared: Prepared,
    options: PruneOptions,
    out: Path,
    eval_data: Path | None = None,
    reference: dict | None = None,
    *,
    release_original: bool = False,
    publication: Publication | None = None,
) -> Report:
    """Select, rewrite, write, verify and evaluate one pruned model from `prepared`; returns its
    report (`reference`: see `evaluate`).

    The model is written under a hidden name beside `out` and checked from its files alone: it
    must pass onnx.checker, load and run in ORT on a calibration sample with outputs of the
    original's names, dtypes and shapes (finite where the original's are), and be no larger than
    the original. Evaluation runs on it there too. Only then is it renamed to `out`, at the end,
    or with the rest of `publication` when one is given (its owner commits it).
    `release_original` (nothing more will be pruned from `prepared`) drops the original from
    memory while the written model is checked.
    """
    model, blocks = prepared.model, prepared.blocks
    options = fitted_options(options, _have_comoments(prepared.stats))
    allocation = refits = None
    if blocks:
        plan, allocation = prepared.allocated_plan(options)
        for block in blocks:
            if plan.keep[block.name].size < DUBIOUS_KEEP * block.width:
                log.warning(
                    "block %s keeps only %d of its %d neurons: if quality suffers, try --scope per-block or "
                    "a --min-keep",
                    block.name,
                    plan.keep[block.name].size,
                    block.width,
                )
        pruned = rewrite(
            model,
            blocks,
            prepared.stats,
            plan,
            compensate=options.compensate,
            ridge_lambda=options.ridge_lambda,
            external_dir=prepared.external_dir,
        )
        if options.reconstruct and (prepared.positions or prepared.refit_declined):
            pruned, refits = _reconstructed(pruned, prepared, plan, options)
    else:
        plan, pruned = Plan({}), model
    params_before, params_after = count_params(model), count_params(pruned)
    with publishing(publication) as staged:
        written = staged.stage(out)
        write_model(pruned, written, external_data=prepared.external, source_dir=prepared.external_dir)
        del pruned, model  # checking loads the written model: at most one other copy stays in memory
        if release_original:
            del prepared.model
        verify_model(written, prepared.sample_feed, prepared.sample_outputs)
        bytes_before, bytes_after = file_bytes(prepared.path), file_bytes(written)
        if params_after > params_before or bytes_after > bytes_before + GROWTH_SLACK_BYTES:
            raise ModelError(
                f"the pruned model would be larger than the original ({params_after} parameters, "
                f"{bytes_after} bytes, against {params_before} and {bytes_before}); nothing written"
            )
        report = Report(
            **{
                k: getattr(options, k)
                for k in ("ratio", "method", "scope", "min_keep", "round_to", "compensate", "ridge_lambda", "score")
            },
            ranking_lambda=options.effective_ranking_lambda,
            model=str(prepared.path),
            output=str(out),
            blocks=block_rows(blocks, plan),
            skipped=skipped_rows(blocks),
            neurons_before=sum(b.width for b in blocks),
            neurons_after=int(sum(plan.keep[b.name].size for b in blocks)),
            params_before=params_before,
            params_after=params_after,
            macs_before=sum(prepared.macs.values()),
            macs_after=pruned_macs(prepared.macs, blocks, plan),
            file_bytes_before=bytes_before,
            file_bytes_after=bytes_after,
            calibration={"samples": prepared.samples, "seconds": round(prepared.seconds, 3), **prepared.source},
            versions=versions(),
            allocation=allocation,
            reconstruct=refit_rows(refits) if refits else None,
        )
        if eval_data is not None:
            with progress_bar("evaluating", count_samples(eval_data, prepared.specs, options.raw), options) as bar:
                report.eval = evaluate(
                    prepared.path,
                    written,
                    _counted(prepared.eval_batches(eval_data, options), bar, prepared.specs[0].name),
                    threads=options.threads,
                    reference=reference,
                )
            report.eval["data"] = _data_source(eval_data, options, prepared.specs)
            log.info("evaluated on %d held-out samples from %s", report.eval["samples"], eval_data)
    return report


def _reconstructed(
    pruned: onnx.ModelProto, prepared: Prepared, plan: Plan, options: PruneOptions
) -> tuple[onnx.ModelProto, dict[str, Refit | str]]:
    """`pruned` with each pruned block refit to the original's outputs at `prepared.positions`,
    and each pruned block's outcome (why not, for those `prepare` declined). The blocks are found
    again in `pruned`, whose rewrite may have renamed fc2's output."""
    order = [block.name for block in prepared.blocks]
    pruned_names = {block.name for block in prepared.blocks if plan.keep[block.name].size < block.width}
    declined = {name: why for name, why in prepared.refit_declined.items() if name in pruned_names}
    wanted = prepared.positions.keys() & pruned_names
    if not wanted:
        return pruned, dict(declined)
    blocks = [block for block in find_mlp_blocks(pruned) if block.name in wanted]
    with progress_bar("refitting blocks", len(blocks), options, unit="block") as bar:

        def fit(block: MlpBlock, weights: BlockWeights) -> Refit:
            start = time.perf_counter()
            refit = fit_block(weights, prepared.positions[block.name], block.activation)
            bar.update(1)
            if refit.weights is None:
                log.info("block %s is not refit: %s", block.name, refit.reason)
            else:
                log.info(
                    "refit block %s: held-out error %.3g -> %.3g of its output variance, %s loss (%.1f s)",
                    block.name,
                    refit.held_error_before,
                    refit.held_error_after,
                    refit.loss,
                    time.perf_counter() - start,
                )
            return refit

        refit_model, outcomes = refit_weights(pruned, blocks, fit, external_dir=prepared.external_dir)
    for name in wanted - outcomes.keys():
        outcomes[name] = "not found again in the pruned model"
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            log.warning("block %s is not refit: %s", name, outcome)
    outcomes.update(declined)
    return refit_model, {name: outcomes[name] for name in order if name in outcomes}


# A pruned model's file may outgrow the original's by this much: the compensation can add a bias
# per block, and a rewritten graph's metadata differs, even when few neurons go.
GROWTH_SLACK_BYTES = 4096


def prune(
    model: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    ratio: float = 0.35,
    *,
    options: PruneOptions = PruneOptions(),
    external_dir: Path | str | None = None,
) -> onnx.ModelProto:
    """The whole job in memory, in one call: find the blocks of `model`, calibrate on `batches`,
    rank, select `ratio` of the neurons and rewrite; returns the pruned model (`model` is not
    modified). `options` chooses the method and the rest as on the command line (their file and
    data fields are not used). `external_dir`: the folder of a model loaded without its external
    data."""
    options = dataclasses.replace(options, ratio=ratio)
    blocks = find_mlp_blocks(model)
    if not blocks:
        raise NoBlocksError(
            "no prunable MLP block in the model" + "".join(f"; {s.name}: {s.reason}" for s in blocks.skipped)
        )
    options, _ = within_memory(options, blocks)  # `batches` are read once: no passes
    if options.reconstruct:
        log.warning("--reconstruct needs a second pass over the calibration data, which can be read only once here")
    folder = None if external_dir is None else Path(external_dir)
    batches = iter(batches)
    validation: list[Mapping[str, np.ndarray]] = []  # the first samples, for --allocation measured
    if options.allocation == "measured" and folder is None:
        validation = first_batches(batches, VALIDATION_SAMPLES)
    stats = calibrate(
        model,
        blocks,
        itertools.chain(validation, batches),
        threads=options.threads,
        external_dir=folder,
        comoments=options.comoments,
    )
    options = fitted_options(options, _have_comoments(stats))

    error = None
    if validation:
        reference = run_batches(model.SerializeToString(), validation, options.threads)
        error = validation_error(model, blocks, stats, options, validation, reference)
    return rewrite(
        model,
        blocks,
        stats,
        allocated_plan(stats, blocks, options, cached(ranker(stats, options, model, blocks, folder), {}), error)[0],
        compensate=options.compensate,
        ridge_lambda=options.ridge_lambda,
        external_dir=folder,
    )


# Ops of ORT's and ONNX's quantized forms that onnx_vbp does not prune through. (The QDQ forms,
# per channel or in int4 blocks, the weight-only form, ORT's dynamic MatMulInteger form and its
# fused DynamicQuantizeMatMul / MatMulIntegerToFloat, and its int4 MatMulNBits are pruned in place.)
QUANTIZED_OPS = ("QLinearMatMul", "QLinearConv", "ConvInteger", "QGemm")


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantized op types (QUANTIZED_OPS) the model uses that onnx_vbp cannot prune through, sorted."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})


def quantized_hint(model: onnx.ModelProto) -> str | None:
    """What to do with a model in a quantized form onnx_vbp cannot prune through, naming its ops;
    None for other models."""
    ops = quantized_ops(model)
    if not ops:
        return None
    return (
        f"the model is quantized ({', '.join(ops)}): prune the float model, then quantize it (a QDQ model "
        "that ORT's session optimizer fused into these ops: prune the QDQ model, then optimize it)"
    )


def inspect_model(model_path: Path | str, seq: int = 128, data: Path | str | None = None) -> dict:
    """What pruning would work on, without calibration data: the blocks found (activation,
    width, sites, fc1/fc2 nodes, MACs per sample), the ones skipped with the reason, the model's
    MACs per sample (symbolic dims after the batch set to `seq`, or the first sample of `data`),
    the memory the default method's second moments would take against their budget (and how many
    calibration passes keep each within it, or why the default would fall back to vbp), and a
    hint when the model is quantized or has no block."""
    model_path = Path(model_path)
    model, external = load_model(model_path)
    blocks = find_mlp_blocks(model)
    feed = make_inputs(model_inputs(model), 1, seq, None if data is None else Path(data))
    try:
        macs = node_macs(model, feed, model_path.parent if external else None)
    except CalibrationError as exc:
        raise CalibrationError(
            f"{exc} (random inputs of length {seq}: try a shorter --seq, or --data)" if data is None else str(exc)
        ) from exc
    hint = None if blocks else quantized_hint(model)
    hints = [hint] if hint else []
    if not blocks:
        hints.append(
            "no prunable MLP block: onnx_vbp looks for fc1 -> activation -> fc2 with MatMul/Gemm/1x1-Conv "
            "layers (see README, What is recognised)"
        )
    needed, budget = comoment_bytes(blocks), comoment_budget()  # one reading of the memory available
    passes, _, why_not = comoment_plan(blocks, budget) if needed > budget else ([blocks], None, None)
    rows = block_rows(blocks, Plan({b.name: np.arange(b.width) for b in blocks}))
    for row, block in zip(rows, blocks, strict=True):
        del row["width_after"]
        row["width"] = row.pop("width_before")
        nodes = {ref.node for site in block.sites for ref in (*site.fc1_params, site.fc2_weight)}  # Gemm: W and b
        row["macs"] = sum(macs.get(node, 0) for node in nodes)
    return {
        "model": str(model_path),
        "blocks": rows,
        "skipped": skipped_rows(blocks),
        "neurons": sum(b.width for b in blocks),
        "macs": sum(macs.values()),
        "macs_in_blocks": sum(row["macs"] for row in rows),
        "inputs": {k: list(v.shape) for k, v in feed.items()},
        "quantized_ops": quantized_ops(model),
        "second_moments": {
            "bytes": needed,
            "budget": budget,
            "fits": needed <= budget,
            "passes": len(passes) if passes else None,
            "fallback": why_not,
        },
        "hints": hints,
    }


def warn_dubious(options: PruneOptions, calib: Path | None, eval_data: Path | None) -> None:
    """Warn about runs that are legal but rarely what was meant."""
    if options.ratio >= DUBIOUS_RATIO:
        log.warning(
            "--ratio %g removes most of the MLP neurons: expect a large loss of quality (sweep shows the trade-off)",
            options.ratio,
        )
    if calib is not None and eval_data is not None and calib.resolve() == eval_data.resolve():
        log.warning(
            "--eval is the calibration data itself: the evaluation is not held out and will look better "
            "than on new data"
        )


def input_files(model_path: Path, *sources: Path | None, options: PruneOptions = PruneOptions()) -> list[Path]:
    """Every file a run reads: the model and its external data, the data files of each source,
    the statistics file and the tokenizer. No output may be any of them."""
    files = model_files(Path(model_path))
    for source in sources:
        if source is not None and Path(source).exists():
            for path in data_files(Path(source)):
                files += sorted(path.glob("input_*.pb")) if path.is_dir() else [path]
    return files + [p for p in (options.stats, options.raw.tokenizer) if p is not None]


def prune_file(
    model_path: Path | str,
    calib: Path | str | None,
    out: Path | str | None = None,
    options: PruneOptions = PruneOptions(),
    eval_data: Path | str | None = None,
    report_path: Path | str | None = None,
) -> Report:
    """Prune the model at `model_path` with calibration data `calib` (or `options.stats`); write `out`
    (default: `<stem>.vbp.onnx` beside the model, or inside `out` when it is a folder) and, if
    given, the JSON report to `report_path` and the statistics to `options.save_stats`.

    Returns the `Report` (`to_dict()`: its JSON, see README). Every output is checked against every input
    before any work; the input files are never modified, and the outputs appear together at the
    end or not at all.
    """
    model_path, calib, eval_data, report_path = (
        None if p is None else Path(p) for p in (model_path, calib, eval_data, report_path)
    )
    out = Path(out) if out is not None else default_output(model_path)
    if out.is_dir():
        out = out / default_output(model_path).name
    outputs = {"the output model": out, "the output model's data file": out.with_name(f"{out.name}.data")}
    if report_path is not None:
        outputs["the report"] = Path(report_path)
    saving_stats = options.save_stats is not None and options.stats is None
    if saving_stats:
        outputs["the statistics file"] = options.save_stats
    guard_outputs(outputs, input_files(model_path, calib, eval_data, options=options))
    warn_dubious(options, calib, eval_data)
    with publishing() as publication:
        prepared = prepare(model_path, calib, options)
        report = prune_prepared(prepared, options, out, eval_data, release_original=True, publication=publication)
        if saving_stats:
            prepared.save_stats(publication.stage(options.save_stats))
        if report_path is not None:
            publication.stage(Path(report_path)).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    log.info("wrote %s", out)
    return report


def merge_stats_files(parts: list[Path], out: Path) -> None:
    """Merge statistics files saved on disjoint shards of the data into `out` (never one of them)."""
    if len({part.resolve() for part in parts}) < len(parts):
        raise CalibrationError("the same statistics file is given twice: its samples would count twice")
    guard_outputs({"the merged statistics file": out}, parts)
    loaded = [load_stats(path) for path in parts]
    merged = merge_stats([part.stats for part in loaded])
    if len({part.model for part in loaded}) > 1:
        raise CalibrationError("the statistics files were measured on different models (their fingerprints differ)")
    with publishing() as publication:
        save_stats(
            publication.stage(out), merged, sum(part.samples for part in loaded), loaded[0].feed, loaded[0].model
        )
