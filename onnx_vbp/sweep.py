"""Prune at several ratios from one calibration, evaluate each, pick the largest that keeps quality."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onnx_vbp.data import DataError
from onnx_vbp.pipeline import PruneOptions, prepare, prune_prepared


def retention(evaluation: dict) -> float:
    """One number per pruned model: top-1 kept (after / before) when labels exist, else the mean
    cosine of the first floating-point output against the original."""
    if evaluation.get("top1_before"):
        return evaluation["top1_after"] / evaluation["top1_before"]
    return next(iter(evaluation["outputs"].values()))["cosine"]


def sweep(model_path: Path, calib: Path | None, ratios: list[float], eval_data: Path, out_dir: Path,
          options: PruneOptions = PruneOptions()) -> list[dict]:
    """Calibrate once; write and evaluate one pruned model per ratio into `out_dir`; their reports
    with a `retention` field, in the order of `ratios`."""
    prepared = prepare(model_path, calib, options)
    reference: dict = {}  # the original's held-out outputs, computed once
    rows = []
    for ratio in ratios:
        out = Path(out_dir) / f"{Path(model_path).stem}.r{ratio:g}.onnx"
        report = prune_prepared(prepared, dataclasses.replace(options, ratio=ratio), out, eval_data, reference)
        rows.append({**report, "retention": retention(report["eval"])})
    return rows


def pick(rows: list[dict], target: float) -> dict | None:
    """The row of the largest ratio whose retention reaches `target`, if any."""
    meeting = [row for row in rows if row["retention"] >= target]
    return max(meeting, key=lambda row: row["ratio"]) if meeting else None


def format_sweep(rows: list[dict]) -> str:
    lines = [f"{'ratio':>6} {'MACs':>8} {'params':>8} {'retention':>10}  metric"]
    for row in rows:
        evaluation = row["eval"]
        metric = "top-1 after/before" if evaluation.get("top1_before") else "cosine"
        lines.append(f"{row['ratio']:>6g} {row['macs_after'] / row['macs_before'] - 1:>+8.1%} "
                     f"{row['params_after'] / row['params_before'] - 1:>+8.1%} {row['retention']:>10.4f}  {metric}")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Retention against MACs removed, one point per ratio (needs matplotlib: onnx_vbp[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DataError("--plot needs matplotlib: pip install 'onnx_vbp[plot]'") from exc
    removed = [100 * (1 - row["macs_after"] / row["macs_before"]) for row in rows]
    fig, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot(removed, [row["retention"] for row in rows], marker="o")
    for x, row in zip(removed, rows, strict=True):
        axes.annotate(f"{row['ratio']:g}", (x, row["retention"]), textcoords="offset points", xytext=(4, 4))
    axes.set(xlabel="MACs removed (%)", ylabel="retention", title=Path(rows[0]["model"]).name)
    axes.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
