"""Rewrite speed and memory: find + select + rewrite + write on the DeiT-B-size timm export.

Statistics are computed once and saved (8 photos; their values do not change the cost), so the
measured process does only what follows calibration, as `onnx-vbp --stats` would: load the model
(timed apart), find the blocks, select, rewrite, and write (onnx.checker and an ORT load check
included, as the CLI does). Each run is a fresh process; reported are the time of each stage, and
the process's peak RSS against the model's size, both whole and above the interpreter with its
imports (the part the model costs).

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
from onnx_vbp.modelio import load_model, save_model
def peak_mb():  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
model_path, stats_path, out, ratio = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
imports_mb = peak_mb()
times = {}
start = time.perf_counter()
model, external = load_model(model_path)
times["load"] = time.perf_counter() - start
loaded_mb = peak_mb()
stats = load_stats(stats_path)[0]
mark = time.perf_counter()
blocks = find_mlp_blocks(model)
times["find"] = time.perf_counter() - mark
mark = time.perf_counter()
plan = select(stats, ratio)
times["select"] = time.perf_counter() - mark
mark = time.perf_counter()
pruned = rewrite(model, blocks, stats, plan)
times["rewrite"] = time.perf_counter() - mark
mark = time.perf_counter()
save_model(pruned, out, external_data=external)
times["write"] = time.perf_counter() - mark
print(json.dumps({"times": times, "imports_mb": imports_mb, "loaded_mb": loaded_mb, "peak_mb": peak_mb()}))
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

        prepare(model, cache_dir() / "photos", PruneOptions(max_samples=8, min_samples=1, progress=False,
                                                            save_stats=stats))
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, "-c", RUN, str(model), str(stats), str(Path(tmp) / "out.onnx"),
                                  str(args.ratio)], capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out))
    median = {stage: statistics.median(r["times"][stage] for r in runs) for stage in runs[0]["times"]}
    measured = sum(median[s] for s in ("find", "select", "rewrite", "write"))
    peak = statistics.median(r["peak_mb"] for r in runs)
    imports = statistics.median(r["imports_mb"] for r in runs)
    print(f"model {size_mb:.0f} MB, ratio {args.ratio}, median of {args.repeat} fresh processes")
    print("| load s | find s | select s | rewrite s | write s (check + ORT load) | find..write s | peak RSS MB "
          "| peak / model | (peak - imports) / model |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {median['load']:.2f} | {median['find']:.2f} | {median['select']:.3f} | {median['rewrite']:.2f} | "
          f"{median['write']:.2f} | **{measured:.2f}** | {peak:.0f} | {peak / size_mb:.2f} | "
          f"**{(peak - imports) / size_mb:.2f}** |")


if __name__ == "__main__":
    main()
