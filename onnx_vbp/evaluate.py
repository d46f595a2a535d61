"""Held-out comparison of the original and pruned models, as their deployments would run them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from onnx_vbp.runtime import cpu_session

SIMILARITY_SAMPLES = 2000  # pairwise similarities grow as N^2: use the first 2,000 samples


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(values.size)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays of continuous values (ties broken by order)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _pairwise_cosines(rows: np.ndarray) -> np.ndarray:
    unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
    return (unit @ unit.T)[np.triu_indices(len(rows), k=1)]


def evaluate(
    original: Path,
    pruned: Path,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
    reference: dict[int, list[np.ndarray]] | None = None,
) -> dict:
    """Run both models (ORT, all optimizations on) and compare every floating-point output.

    Per output: mean cosine similarity of each sample's flattened output, and relative L2 error
    ||pruned - original|| / ||original|| over all samples. For 2-D outputs ([batch, features]:
    logits, sentence embeddings) also the top-1 (argmax) agreement of the two models and the
    Spearman correlation of the pairwise cosine similarities of the first 2,000 samples (is the
    similarity structure kept?).
    If batches carry `labels`, top-1 accuracy of the first 2-D output before and after.
    `reference` caches the original's outputs by batch index, for evaluating several pruned models
    on the same data (a sweep) without running the original again.
    """
    candidate = cpu_session(str(pruned), threads, optimize=True)
    original_session = None
    input_names = [i.name for i in candidate.get_inputs()]
    output_names = [o.name for o in candidate.get_outputs()]
    sums: dict[str, dict[str, float]] = {}
    rows: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    labels: list[np.ndarray] = []
    samples = 0
    for index, batch in enumerate(batches):
        feed = {name: batch[name] for name in input_names}
        size = len(feed[input_names[0]])
        samples += size
        if "labels" in batch:
            labels.append(np.asarray(batch["labels"]).reshape(-1))
        if reference is not None and index in reference:
            before = reference[index]
        else:
            original_session = original_session or cpu_session(str(original), threads, optimize=True)
            before = original_session.run(output_names, feed)
            if reference is not None:
                reference[index] = before
        after = candidate.run(output_names, feed)
        for name, a, b in zip(output_names, before, after, strict=True):
            if not np.issubdtype(a.dtype, np.floating) or a.ndim == 0 or len(a) != size:
                continue  # not a float output with one row per sample (e.g. an attention map [seq, seq])
            a64, b64 = a.astype(np.float64).reshape(size, -1), b.astype(np.float64).reshape(size, -1)
            norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
            cosine = np.where(norms > 0, (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
            acc = sums.setdefault(name, {"cosine": 0.0, "diff2": 0.0, "ref2": 0.0})
            acc["cosine"] += float(cosine.sum())
            acc["diff2"] += float(np.square(b64 - a64).sum())
            acc["ref2"] += float(np.square(a64).sum())
            if a.ndim == 2:
                rows.setdefault(name, ([], []))
                rows[name][0].append(a64)
                rows[name][1].append(b64)
    outputs = {
        name: {"cosine": acc["cosine"] / samples, "rel_l2": float(np.sqrt(acc["diff2"] / max(acc["ref2"], 1e-300)))}
        for name, acc in sums.items()
    }
    for name, (before_rows, after_rows) in rows.items():
        a, b = np.concatenate(before_rows), np.concatenate(after_rows)
        outputs[name]["top1_agreement"] = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
        if len(a) > 2:
            head_a, head_b = a[:SIMILARITY_SAMPLES], b[:SIMILARITY_SAMPLES]
            outputs[name]["similarity_spearman"] = spearman(_pairwise_cosines(head_a), _pairwise_cosines(head_b))
    result: dict = {"samples": samples, "outputs": outputs}
    if labels and len(np.concatenate(labels)) == samples and rows:
        truth = np.concatenate(labels)
        a, b = (np.concatenate(r) for r in next(iter(rows.values())))
        result.update(
            top1_before=float((a.argmax(axis=1) == truth).mean()),
            top1_after=float((b.argmax(axis=1) == truth).mean()),
            top1_agreement=float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
        )
    return result
