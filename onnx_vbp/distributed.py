"""Calibration scaled out on Ray (optional extra: pip install 'onnx_vbp[ray]').

The data files are split into shards; each Ray task loads the model, finds its blocks and runs
its shard through its own ORT session, and the driver Chan-merges the partial statistics (equal
to one pass up to float64 rounding). There is no cluster code here: Ray connects to an existing
cluster (`--ray-address`, or RAY_ADDRESS) or starts a local one. On a multi-machine cluster the
model and the data must be readable at the same path on every node (a shared filesystem).
"""

from __future__ import annotations

import logging
from pathlib import Path

from onnx_vbp.calibrate import calibrate
from onnx_vbp.data import DataError, RawOptions, data_files, iter_batches, model_inputs
from onnx_vbp.find import find_mlp_blocks
from onnx_vbp.modelio import load_model
from onnx_vbp.stats import Stats, merge_stats


def shard_stats(
    model_path: str,
    files: list[str],
    batch_size: int | None,
    raw: RawOptions,
    threads: int | None,
    comoments: bool,
    block_names: list[str] | None = None,
) -> tuple[dict[str, Stats], int]:
    """One worker's job: statistics of one shard of the calibration files (of the blocks named,
    else all), and its sample count."""
    path = Path(model_path)
    model, external = load_model(path)
    blocks = [b for b in find_mlp_blocks(model) if block_names is None or b.name in block_names]
    specs = model_inputs(model)
    samples = 0

    def count(size: int) -> None:
        nonlocal samples
        samples += size

    batches = (batch for file in files for batch in iter_batches(Path(file), specs, batch_size=batch_size, raw=raw))
    stats = calibrate(
        model,
        blocks,
        batches,
        threads=threads,
        on_batch=count,
        external_dir=path.parent if external else None,
        comoments=comoments,
    )
    return stats, samples


def calibrate_on_ray(
    model_path: Path,
    calib: Path,
    shards: int,
    *,
    address: str | None = None,
    batch_size: int | None = None,
    raw: RawOptions = RawOptions(),
    threads: int | None = None,
    comoments: bool = False,
    block_names: list[str] | None = None,
) -> tuple[dict[str, Stats], int]:
    """Statistics of every file under `calib` (of the blocks named, else all), computed by up to
    `shards` Ray tasks and merged."""
    try:
        import ray
    except ImportError as exc:
        raise DataError("`ray_shards` needs Ray: pip install 'onnx_vbp[ray]'") from exc
    if not ray.is_initialized():
        # Ray's own startup lines would break onnx-vbp's one-line output: errors still come back
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    files = [str(f.resolve()) for f in data_files(calib)]
    parts = [files[i::shards] for i in range(min(shards, len(files)))]
    task = ray.remote(shard_stats)
    model = str(model_path.resolve())
    pending = [task.remote(model, part, batch_size, raw, threads, comoments, block_names) for part in parts]
    # merged as each shard finishes: the driver holds two shards' statistics at a time, not all
    # of them (with second moments, each is as large as the memory budget allows)
    merged, samples = None, 0
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        stats, count = ray.get(done[0])
        merged = stats if merged is None else merge_stats([merged, stats])
        samples += count
    return merged, samples
