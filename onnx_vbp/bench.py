"""Latency of an original and a pruned model side by side in ORT (`onnx-vbp bench`).

Both sessions use ORT's full graph optimizations and the same pinned thread count; after a
warm-up, runs alternate A/B so that machine noise hits both alike, and medians and p90 are
reported with the MAC ratio, the speedup the pruning promises. Timing lives here and in tools/,
never in tests.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_vbp.data import model_inputs, one_sample
from onnx_vbp.modelio import ModelError, load_model
from onnx_vbp.report import node_macs
from onnx_vbp.runtime import cpu_session


def perf_test_folder(model_path: Path) -> Path:
    """Where `write_perf_test_data` will write, refused up front if something is already there."""
    folder = model_path.parent / "test_data_set_0"
    if folder.exists() or folder.is_symlink():
        raise ModelError(f"{folder} already exists; move it away to write new perf-test data there")
    return folder


def write_perf_test_data(model_path: Path, feed: dict[str, np.ndarray]) -> Path:
    """`test_data_set_0/input_*.pb` beside the model, the layout onnxruntime_perf_test reads;
    written in a hidden folder and renamed into place whole."""
    folder = perf_test_folder(model_path)
    with tempfile.TemporaryDirectory(prefix=".onnx_vbp.", dir=model_path.parent) as staging:
        written = Path(staging) / folder.name
        written.mkdir()
        for index, (name, value) in enumerate(feed.items()):
            (written / f"input_{index}.pb").write_bytes(numpy_helper.from_array(value, name).SerializeToString())
        os.rename(written, folder)
    return folder


def optimized_ops(path: Path) -> Counter[str]:
    """Node count per op of a graph ORT saved after optimizing (`domain:op` outside ai.onnx)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node)


def fusion_differences(original: Counter[str], pruned: Counter[str]) -> dict[str, list[int]]:
    """Ops whose count differs between the two optimized graphs: a fusion pruning broke shows
    here (e.g. BiasGelu back to Add + Gelu)."""
    return {op: [original[op], pruned[op]] for op in sorted(original | pruned) if original[op] != pruned[op]}


def bench(
    original: Path, pruned: Path, feed: dict[str, np.ndarray], *, threads: int = 1, runs: int = 50, warmup: int = 5
) -> dict:
    """Median and p90 latency (ms) of both models on `feed` (see `data.make_inputs`), interleaved, the
    speedup against the MAC ratio, and whether ORT optimized both graphs into the same ops."""
    model, external = load_model(original)
    pruned_model, pruned_external = load_model(pruned)
    inputs = {
        name: [(s.name, s.dtype) for s in model_inputs(m)]
        for name, m in (("original", model), ("pruned", pruned_model))
    }
    if inputs["original"] != inputs["pruned"]:
        raise ModelError(f"the two models take different inputs: {inputs['original']} and {inputs['pruned']}")
    paths = {"original": original, "pruned": pruned}
    with tempfile.TemporaryDirectory(prefix="onnx_vbp.") as folder:
        sessions = {
            name: cpu_session(str(path), threads, optimize=True, save_optimized=Path(folder) / f"{name}.onnx")
            for name, path in paths.items()
        }
        ops = {name: optimized_ops(Path(folder) / f"{name}.onnx") for name in paths}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1e3)
    one = one_sample(model_inputs(model), feed)
    macs_before = sum(node_macs(model, one, original.parent if external else None).values())
    macs_after = sum(node_macs(pruned_model, one, pruned.parent if pruned_external else None).values())
    result = {
        name: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))} for name, t in times.items()
    }
    speedup = result["original"]["median_ms"] / result["pruned"]["median_ms"]
    mac_bound = macs_before / max(macs_after, 1)
    return {
        **result,
        "speedup": speedup,
        "mac_bound": mac_bound,
        "speedup_over_mac_bound": speedup / mac_bound,
        "batch_size": len(next(iter(feed.values()))),
        "threads": threads,
        "runs": runs,
        "inputs": {name: list(value.shape) for name, value in feed.items()},
        "ort_optimization": "ORT_ENABLE_ALL",
        "optimized_nodes": {name: sum(counts.values()) for name, counts in ops.items()},
        "fusion_differences": fusion_differences(ops["original"], ops["pruned"]),
    }


def format_bench(result: dict) -> str:
    lines = [f"{'':<10} {'median ms':>10} {'p90 ms':>10}"]
    for name in ("original", "pruned"):
        lines.append(f"{name:<10} {result[name]['median_ms']:>10.2f} {result[name]['p90_ms']:>10.2f}")
    lines.append(
        f"speedup {result['speedup']:.3f}x; MAC bound {result['mac_bound']:.3f}x; "
        f"speedup / MAC bound {result['speedup_over_mac_bound']:.3f} "
        f"(batch {result['batch_size']}, {result['threads']} thread(s), {result['runs']} interleaved runs)"
    )
    differences = result["fusion_differences"]
    lines.append(
        "ORT-optimized graphs: "
        + (
            "same ops"
            if not differences
            else "differ: " + ", ".join(f"{op} {before} -> {after}" for op, (before, after) in differences.items())
        )
        + f" ({result['optimized_nodes']['original']} / {result['optimized_nodes']['pruned']} nodes)"
    )
    return "\n".join(lines)
