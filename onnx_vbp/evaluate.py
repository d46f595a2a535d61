"""Held-out comparison of the original and pruned models, as their deployments would run them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from onnx_vbp.calibrate import cpu_session


def evaluate(
    original: Path, pruned: Path, batches: Iterable[Mapping[str, np.ndarray]], *, threads: int | None = None
) -> dict:
    """Run both models (ORT, all optimizations on) and compare every floating-point output.

    Per output: mean cosine similarity of each sample's flattened output, and relative L2 error
    ||pruned - original|| / ||original|| over all samples. If batches carry `labels`, top-1 accuracy
    of the first 2-D output before and after, and the top-1 agreement between the two models.
    """
    reference = cpu_session(str(original), threads, optimize=True)
    candidate = cpu_session(str(pruned), threads, optimize=True)
    input_names = [i.name for i in reference.get_inputs()]
    sums: dict[str, dict[str, float]] = {}
    samples = correct_before = correct_after = agree = 0
    for batch in batches:
        feed = {name: batch[name] for name in input_names}
        names = [o.name for o in reference.get_outputs()]
        before = reference.run(names, feed)
        after = candidate.run(names, feed)
        size = len(feed[input_names[0]])
        samples += size
        logits = None
        for name, a, b in zip(names, before, after, strict=True):
            if not np.issubdtype(a.dtype, np.floating):
                continue
            a64 = a.astype(np.float64).reshape(size, -1)
            b64 = b.astype(np.float64).reshape(size, -1)
            norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
            cosine = np.where(norms > 0, (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
            acc = sums.setdefault(name, {"cosine": 0.0, "diff2": 0.0, "ref2": 0.0})
            acc["cosine"] += float(cosine.sum())
            acc["diff2"] += float(np.square(b64 - a64).sum())
            acc["ref2"] += float(np.square(a64).sum())
            if logits is None and a.ndim == 2:
                logits = (a, b)
        if "labels" in batch and logits is not None:
            labels = np.asarray(batch["labels"]).reshape(-1)
            top_before, top_after = logits[0].argmax(axis=1), logits[1].argmax(axis=1)
            correct_before += int((top_before == labels).sum())
            correct_after += int((top_after == labels).sum())
            agree += int((top_before == top_after).sum())
    result: dict = {
        "samples": samples,
        "outputs": {
            name: {"cosine": acc["cosine"] / samples, "rel_l2": float(np.sqrt(acc["diff2"] / max(acc["ref2"], 1e-300)))}
            for name, acc in sums.items()
        },
    }
    if correct_before or correct_after or agree:
        result.update(top1_before=correct_before / samples, top1_after=correct_after / samples,
                      top1_agreement=agree / samples)
    return result
