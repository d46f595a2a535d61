"""Rewrite speed and memory: find + select + rewrite + write on the DeiT-B-size timm export.

Statistics are computed once and saved (8 photos; their values do not change the cost), so the
measured process does only what follows calibration, as `onnx-vbp --stats` would: load the model
(timed apart), find the blocks, select, rewrite, write, and check the written file (onnx.checker
and an ORT load, with the models dropped first, as the CLI does). Each run is a fresh process;
reported are the time of each stage, and each stage's own peak RSS (the high-water mark is reset
between stages) above the interpreter with its imports, as a multiple of the model's size.

Usage:  python tools/bench_rewrite.py [--ratio 0.55] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from export_deit import export
from fetch_models import cache_dir

RUN = """
import json, sys, time
from pathlib import Path
import onnx_vbp
from onnx_vbp import find_mlp_blocks, rewrite, select
from onnx_vbp.calibrate import load_stats
from onnx_vbp.runtime import cpu_session
from onnx_vbp.modelio import load_model, publishing, verify_model, write_model
def peak_mb():  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
    Path("/proc/self/clear_refs").write_text("5")
model_path, stats_path, out, ratio = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
imports_mb = peak_mb()
times, peaks = {}, {}
def stage(name, work):
    reset_peak()
    start = time.perf_counter()
    result = work()
    times[name], peaks[name] = time.perf_counter() - start, peak_mb()
    return result
model, external = stage("load", lambda: load_model(model_path))
stats, _, feed, _ = load_stats(stats_path)
session = cpu_session(str(model_path))
expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
del session
blocks = stage("find", lambda: find_mlp_blocks(model))
plan = stage("select", lambda: select(stats, ratio))
pruned = stage("rewrite", lambda: rewrite(model, blocks, stats, plan))
with publishing() as publication:  # as onnx_vbp.pipeline.prune_prepared does
    written = publication.stage(out)
    stage("write", lambda: write_model(pruned, written, external_data=external))
    del pruned, model
    stage("check", lambda: verify_model(written, feed, expected))
print(json.dumps({"times": times, "peaks": peaks, "imports_mb": imports_mb}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.55)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = export("deit_base_patch16_224", 17, cache_dir())
    size_mb = model.stat().st_size / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.npz"
        from onnx_vbp import PruneOptions  # the statistics, once, outside the measured processes
        from onnx_vbp.pipeline import prepare

        prepare(model, cache_dir() / "photos", PruneOptions(max_samples=8, min_samples=1, progress=False)).save_stats(
            stats
        )
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, "-c", RUN, str(model), str(stats), str(Path(tmp) / "out.onnx"), str(args.ratio)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs.append(json.loads(out))
    median = {stage: statistics.median(r["times"][stage] for r in runs) for stage in runs[0]["times"]}
    peaks = {stage: statistics.median(r["peaks"][stage] for r in runs) for stage in runs[0]["peaks"]}
    imports = statistics.median(r["imports_mb"] for r in runs)
    stages = ("find", "select", "rewrite", "write", "check")
    print(
        f"model {size_mb:.0f} MB, ratio {args.ratio}, median of {args.repeat} fresh processes; peak RSS per "
        f"stage, above the {imports:.0f} MB of the interpreter and its imports, as a multiple of the model size"
    )
    print("| | load | find | select | rewrite | write | check (onnx.checker, ORT load and run) | find..check |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        "| seconds | "
        + " | ".join(f"{median[s]:.2f}" for s in ("load", *stages))
        + f" | **{sum(median[s] for s in stages):.2f}** |"
    )
    print(
        "| peak RSS / model | "
        + " | ".join(f"{(peaks[s] - imports) / size_mb:.2f}" for s in ("load", *stages))
        + f" | **{(max(peaks[s] for s in stages) - imports) / size_mb:.2f}** |"
    )


if __name__ == "__main__":
    main()
