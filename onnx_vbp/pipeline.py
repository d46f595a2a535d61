"""The whole job on files: find -> calibrate -> select -> rewrite -> write -> report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from onnx_vbp.calibrate import calibrate
from onnx_vbp.data import RawOptions, iter_batches, model_inputs
from onnx_vbp.evaluate import evaluate
from onnx_vbp.find import find_mlp_blocks
from onnx_vbp.modelio import (
    ModelError,
    default_output,
    file_bytes,
    load_model,
    save_model,
)
from onnx_vbp.report import block_rows, count_macs, count_params
from onnx_vbp.rewrite import rewrite
from onnx_vbp.select import select

log = logging.getLogger("onnx_vbp")


class NoBlocksError(ValueError):
    """The model has no prunable MLP block."""


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = 0.35
    scope: str = "global"
    min_keep: int = 1
    round_to: int = 1
    compensate: str = "mean"
    batch_size: int | None = None
    max_samples: int | None = None
    threads: int | None = None
    progress: bool = True
    raw: RawOptions = field(default_factory=RawOptions)  # how raw images / text are encoded


def prune_file(
    model_path: Path,
    calib: Path,
    out: Path | None = None,
    options: PruneOptions = PruneOptions(),
    eval_data: Path | None = None,
) -> dict:
    """Prune the model at `model_path` with calibration data `calib`; write it to `out`.

    Returns the report (see README for its fields). The input model file is never modified.
    """
    model_path, calib = Path(model_path), Path(calib)
    out = Path(out) if out is not None else default_output(model_path)
    if out.resolve() == model_path.resolve():
        raise ModelError(f"output would overwrite the input model: {out}")
    model, external = load_model(model_path)
    specs = model_inputs(model)

    blocks = find_mlp_blocks(model)
    for skipped in blocks.skipped:
        log.warning("skipped MLP block %s: %s", skipped.name, skipped.reason)
    if not blocks:
        why = "; ".join(f"{s.name}: {s.reason}" for s in blocks.skipped)
        raise NoBlocksError(f"no prunable MLP block in {model_path}" + (f" (skipped: {why})" if why else
                            " (looked for fc1 -> activation -> fc2 with MatMul/Gemm/1x1-Conv layers)"))
    log.info("found %d MLP blocks, %d hidden neurons", len(blocks), sum(b.width for b in blocks))

    def batches(source: Path):
        return iter_batches(source, specs, batch_size=options.batch_size, max_samples=options.max_samples,
                            raw=options.raw)

    start = time.perf_counter()
    samples = 0

    def on_batch(size: int) -> None:
        nonlocal samples
        samples += size
        bar.update(size)

    # disable=None: tqdm draws only on a terminal
    with tqdm(desc="calibrating", unit="sample", disable=None if options.progress else True,
              total=options.max_samples) as bar:
        stats = calibrate(model, blocks, batches(calib), threads=options.threads, on_batch=on_batch)
    seconds = time.perf_counter() - start
    log.info("calibrated on %d samples in %.1f s", samples, seconds)

    plan = select(stats, options.ratio, scope=options.scope, min_keep=options.min_keep, round_to=options.round_to)
    pruned = rewrite(model, blocks, stats, plan, compensate=options.compensate)
    first = next(batches(calib))
    sample_feed = {s.name: first[s.name][:1] for s in specs}
    macs_before, params_before = count_macs(model, sample_feed), count_params(model)
    macs_after, params_after = count_macs(pruned, sample_feed), count_params(pruned)
    save_model(pruned, out, external_data=external)
    log.info("wrote %s", out)

    report = {
        **{k: getattr(options, k) for k in ("ratio", "scope", "min_keep", "round_to", "compensate")},
        "model": str(model_path),
        "output": str(out),
        "blocks": block_rows(blocks, plan),
        "skipped": [{"name": s.name, "reason": s.reason} for s in blocks.skipped],
        "neurons_before": sum(b.width for b in blocks),
        "neurons_after": int(sum(plan.keep[b.name].size for b in blocks)),
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "file_bytes_before": file_bytes(model_path),
        "file_bytes_after": file_bytes(out),
        "calibration": {"samples": samples, "seconds": round(seconds, 3)},
    }
    if eval_data is not None:
        report["eval"] = evaluate(model_path, out, batches(eval_data), threads=options.threads)
    return report
