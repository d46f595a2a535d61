"""Small shared helpers for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_vbp import calibrate, find_mlp_blocks, rewrite, select


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def outputs_of(folder: Path, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first output of each model `folder/NAME.onnx` on `feed`, by NAME."""
    return {name: ort.InferenceSession(str(folder / f"{name}.onnx")).run(None, feed)[0] for name in names}


def session_optimized(src: Path, dst: Path) -> Path:
    """`src` as ORT's session optimizer saves it (extended level, `optimized_model_filepath`) to
    `dst`, which may be `src`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst.with_suffix(".optimizing.onnx"))
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst.with_suffix(".optimizing.onnx").replace(dst)


def prune(model: onnx.ModelProto, batches: list[dict], ratio: float, **kwargs):
    """The API pipeline in four lines; returns (blocks, stats, plan, pruned)."""
    compensate = kwargs.pop("compensate", "mean")
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, batches, comoments=compensate == "ridge")
    plan = select(stats, ratio, **kwargs)
    return blocks, stats, plan, rewrite(model, blocks, stats, plan, compensate=compensate)


def relative_change(before: np.ndarray, after: np.ndarray) -> float:
    """Largest deviation relative to the largest reference value (an all-zero reference is legal:
    dead ReLUs with no bias and no residual)."""
    return float(np.max(np.abs(after - before)) / max(float(np.max(np.abs(before))), 1e-12))
