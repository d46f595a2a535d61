"""Calibration overhead: onnx_vbp's calibration vs plain inference on the same batches.

Each measurement runs in a fresh process (so its peak RSS is its own), with the same pinned
intra-op thread count: (a) a plain ORT session (graph optimizations off, as calibration has
them) running every batch; (b) onnx_vbp.calibrate over the same batches. Reported: time ratio
(b)/(a) and peak RSS of each, for two sample counts (memory must not grow with samples).

Usage:  python tools/bench_calibration.py [--samples 1000,10000] [--threads 2]
Default model: paraphrase-MiniLM-L3-v2 (fetch with tools/fetch_models.py), batch 32, seq 128.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fetch_models import cache_dir, fetch

RUN = """
import json, resource, sys, time
import numpy as np, onnx
from onnx_vbp import calibrate, find_mlp_blocks
from onnx_vbp.calibrate import cpu_session
path, mode, samples, batch, seq, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
model = onnx.load(path)
rng = np.random.default_rng(0)
def batches():
    for start in range(0, samples, batch):
        ids = rng.integers(1000, 20000, (min(batch, samples - start), seq)).astype(np.int64)
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}
start = time.perf_counter()
if mode == "plain":
    session = cpu_session(model.SerializeToString(), threads)
    for feed in batches():
        session.run(None, feed)
else:
    calibrate(model, find_mlp_blocks(model), batches(), threads=threads)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model: Path, mode: str, samples: int, batch: int, seq: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, str(model), mode, str(samples), str(batch), str(seq),
                          str(threads)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1000,10000")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = fetch("paraphrase-MiniLM-L3-v2.onnx", cache_dir())
    print("| samples | plain s | calibrate s | ratio | plain peak RSS MB | calibrate peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for samples in map(int, args.samples.split(",")):
        plain = measure(model, "plain", samples, args.batch, args.seq, args.threads)
        calib = measure(model, "calibrate", samples, args.batch, args.seq, args.threads)
        print(f"| {samples} | {plain['seconds']:.1f} | {calib['seconds']:.1f} | "
              f"{calib['seconds'] / plain['seconds']:.2f} | {plain['peak_rss_mb']:.0f} | "
              f"{calib['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
