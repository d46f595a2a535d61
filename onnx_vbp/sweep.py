"""Prune at several ratios from one calibration, evaluate each, pick the largest that keeps quality."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from onnx_vbp.bench import bench
from onnx_vbp.data import DataError
from onnx_vbp.modelio import guard_outputs, publishing
from onnx_vbp.pipeline import PruneOptions, input_files, prepare, progress_bar, prune_prepared, warn_dubious

log = logging.getLogger("onnx_vbp")


def retention_metric(evaluation: dict, output: str | None = None) -> str:
    """What `retention` measures: top-1 kept when labels exist, else the mean cosine of `output`,
    by default the first output with one row of features per sample (logits, a sentence
    embedding), else the first float output. A transformer encoder's first output is often its
    token embeddings, not the pooled one users compare."""
    outputs = evaluation["outputs"]
    if output is not None:
        if output not in outputs:
            raise DataError(f"no float output named '{output}' to measure retention by (outputs: {', '.join(outputs)})")
        return f"cosine of {output}"
    if evaluation.get("top1_before"):
        return "top-1 after/before"
    pooled = [name for name, measured in outputs.items() if "top1_agreement" in measured]  # 2-D outputs
    return f"cosine of {(pooled or list(outputs))[0]}"


def retention(evaluation: dict, output: str | None = None) -> float:
    """One number per pruned model, as `retention_metric` describes it."""
    metric = retention_metric(evaluation, output)
    if metric == "top-1 after/before":
        return evaluation["top1_after"] / evaluation["top1_before"]
    return evaluation["outputs"][metric.removeprefix("cosine of ")]["cosine"]


def sweep(
    model_path: Path | str,
    calib: Path | str | None,
    ratios: list[float],
    eval_data: Path | str,
    options: PruneOptions = PruneOptions(),
    *,
    target: float | None = None,
    max_macs: float | None = None,
    max_latency_ms: float | None = None,
    latency_runs: int = 30,
    output: Path | str | None = None,
    output_dir: Path | str | None = None,
    report_path: Path | str | None = None,
    plot: Path | str | None = None,
    metric: str | None = None,
) -> tuple[list[dict], dict | None]:
    """Calibrate once, prune and evaluate one model per ratio; returns their reports (each with
    `retention` and the `metric` it measures, see `retention_metric`; `metric` names the output
    to measure it on) in the order of `ratios`, and the row `pick` chooses for `target` (retention),
    `max_macs` (the fraction of the MACs to keep at most) and `max_latency_ms`, if any is given.
    With `max_latency_ms`, every model is timed against the original on the first batch of
    `eval_data` (`options.batch_size`, `options.threads`; median of `latency_runs` runs).

    With `output`, that row's model is written there; with `output_dir` instead, every ratio's
    model is kept there, as `<model stem>.r<ratio>.onnx`. `report_path` gets the rows as JSON,
    `plot` a retention plot, `options.save_stats` the statistics. Every output is checked against
    every input first, and all of them appear together at the end or not at all. Otherwise the
    models are written to a temporary folder and removed; their rows have no `output`. A ratio
    of 0 gives the baseline row (the model rewritten unpruned); `pick` never chooses it.
    """
    model_path, calib, eval_data, output, output_dir, report_path, plot = (
        None if p is None else Path(p) for p in (model_path, calib, eval_data, output, output_dir, report_path, plot)
    )
    if output is not None and output_dir is not None:
        raise DataError("give `output` (the chosen model) or `output_dir` (every model), not both")
    ratios = list(dict.fromkeys(ratios))  # a ratio given twice is swept once
    kept = {} if output_dir is None else {ratio: output_dir / f"{model_path.stem}.r{ratio:g}.onnx" for ratio in ratios}
    outputs = {"the report": report_path, "the plot": plot, "the statistics file": options.save_stats}
    if output is not None:
        outputs.update(
            {"the output model": output, "the output model's data file": output.with_name(f"{output.name}.data")}
        )
    for ratio, path in kept.items():
        outputs.update({f"the model of ratio {ratio:g}": path, f"its data file {path.name}.data": Path(f"{path}.data")})
    outputs = {role: Path(path) for role, path in outputs.items() if path is not None}
    if options.stats is not None:
        outputs.pop("the statistics file", None)
    guard_outputs(outputs, input_files(model_path, calib, eval_data, options=options))
    warn_dubious(dataclasses.replace(options, ratio=0.0), calib, eval_data)
    if plot is not None:
        _pyplot()  # before the work, not after it
    name = output.name if output is not None else f"{model_path.stem}.onnx"
    with (
        publishing() as publication,
        tempfile.TemporaryDirectory(prefix=".onnx_vbp.", dir=output.parent if output is not None else None) as folder,
    ):
        prepared = prepare(model_path, calib, options)
        if metric is not None and metric not in prepared.sample_outputs:
            raise DataError(f"`metric` {metric}: the model has no such output ({', '.join(prepared.sample_outputs)})")
        reference: dict = {}  # the original's held-out outputs, computed once
        timing_feed = None
        if max_latency_ms is not None:  # the model's inputs of the first held-out batch (not its labels)
            first = next(prepared.eval_batches(eval_data, options))
            timing_feed = {spec.name: first[spec.name] for spec in prepared.specs}
        rows = []
        with progress_bar("sweep", len(ratios), options, unit="ratio") as ratios_done:
            for ratio in ratios:
                if ratio in kept:
                    candidate = publication.stage(kept[ratio])
                else:  # named `name`: its data file keeps its name when published
                    candidate = Path(folder) / f"r{ratio:g}" / name
                    candidate.parent.mkdir()
                report = prune_prepared(
                    prepared,
                    dataclasses.replace(options, ratio=ratio, save_stats=None),
                    candidate,
                    eval_data,
                    reference,
                )
                rows.append(
                    {
                        **report.to_dict(),
                        "output": str(kept[ratio]) if ratio in kept else None,
                        "retention": retention(report.eval, metric),
                        "metric": retention_metric(report.eval, metric),
                    }
                )
                if timing_feed is not None:
                    timed = bench(
                        prepared.path, candidate, timing_feed, threads=options.threads or 1, runs=latency_runs
                    )
                    rows[-1].update(
                        latency_ms=timed["pruned"]["median_ms"], original_latency_ms=timed["original"]["median_ms"]
                    )
                log.info("ratio %g (%d of %d): retention %.4f", ratio, len(rows), len(ratios), rows[-1]["retention"])
                ratios_done.update(1)
        targeted = target is not None or max_macs is not None or max_latency_ms is not None
        best = pick(rows, target, max_macs, max_latency_ms) if targeted else None
        if best is not None and output is not None:
            publication.adopt(Path(folder) / f"r{best['ratio']:g}" / name, output)
            best["output"] = str(output)
        if "the statistics file" in outputs:
            prepared.save_stats(publication.stage(options.save_stats))
        if plot is not None:
            plot_sweep(rows, publication.stage(plot), target, best, max_macs)
        if report_path is not None:
            publication.stage(report_path).write_text(json.dumps(summary(rows, best), indent=2) + "\n")
        publication.commit()  # inside the temporary folder's lifetime: the chosen model is renamed out of it
    return rows, best


def summary(rows: list[dict], best: dict | None) -> dict:
    """The sweep's JSON report."""
    return {"rows": rows, "best_ratio": best and best["ratio"]}


def pick(
    rows: list[dict], target: float | None = None, max_macs: float | None = None, max_latency_ms: float | None = None
) -> dict | None:
    """The row (ratio above 0) that meets every target given: retention at least `target`, at
    most `max_macs` of the original's MACs, a median latency of at most `max_latency_ms`. With a
    retention target, the largest such ratio (the smallest model that keeps the quality); with
    budgets alone, the smallest (the best quality within them). None if no row meets them."""
    meeting = [
        row
        for row in rows
        if row["ratio"] > 0
        and (target is None or row["retention"] >= target)
        and (max_macs is None or row["macs_after"] <= max_macs * row["macs_before"])
        and (max_latency_ms is None or row["latency_ms"] <= max_latency_ms)
    ]
    if not meeting:
        return None
    return max(meeting, key=lambda row: row["ratio"] if target is not None else -row["ratio"])


def format_sweep(rows: list[dict]) -> str:
    timed = all("latency_ms" in row for row in rows)
    latency = f" {'ms':>8}" if timed else ""
    lines = [f"{'ratio':>6} {'MACs':>8} {'params':>8}{latency} {'retention':>10}  metric"]
    for row in rows:
        metric = row["metric"]
        latency = f" {row['latency_ms']:>8.2f}" if timed else ""
        lines.append(
            f"{row['ratio']:>6g} {row['macs_after'] / row['macs_before'] - 1:>+8.1%} "
            f"{row['params_after'] / row['params_before'] - 1:>+8.1%}{latency} {row['retention']:>10.4f}  {metric}"
        )
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DataError("plotting needs matplotlib: pip install 'onnx_vbp[plot]'") from exc
    return plt


def plot_sweep(
    rows: list[dict],
    path: Path,
    target: float | None = None,
    best: dict | None = None,
    max_macs: float | None = None,
) -> None:
    """Retention against MACs removed, one point per ratio, with the targets as dashed lines and
    the chosen ratio circled (needs matplotlib: onnx_vbp[plot])."""
    plt = _pyplot()
    removed = [100 * (1 - row["macs_after"] / row["macs_before"]) for row in rows]
    fig, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot(removed, [row["retention"] for row in rows], marker="o")
    for x, row in zip(removed, rows, strict=True):
        axes.annotate(f"{row['ratio']:g}", (x, row["retention"]), textcoords="offset points", xytext=(4, 4))
    if target is not None:
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    if max_macs is not None:
        axes.axvline(100 * (1 - max_macs), color="grey", linestyle=":", linewidth=1, label=f"MACs <= {max_macs:g}")
    if best is not None:
        chosen = 100 * (1 - best["macs_after"] / best["macs_before"])
        axes.plot(
            [chosen], [best["retention"]], "o", markersize=14, fillstyle="none", label=f"chosen: {best['ratio']:g}"
        )
    if target is not None or best is not None or max_macs is not None:
        axes.legend(fontsize=8)
    axes.set(xlabel="MACs removed (%)", ylabel="retention", title=Path(rows[0]["model"]).name)
    axes.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
