"""Calibration overhead: onnx_vbp's calibration against plain inference on the same batches.

One fresh process per (model, sample count). Both sessions are built in it with the same pinned
intra-op thread count; plain inference uses ORT_ENABLE_ALL, as a deployment does. The batches
alternate in blocks of 8: the plain session runs a block, then `onnx_vbp.calibrate` is handed the
same batches; its time for a batch is the time from receiving it to asking for the next one (the
ORT run, the float64 reduction and the merge). Machine noise therefore hits both sides alike.
Blocks rather than single batches, because ORT's worker threads spin-wait for a moment after a
run and would slow whichever session ran next, which a calibration running alone never meets.
Set-up (finding the blocks, instrumenting, building the session) is timed apart.

One run goes to the largest sample count and reports at each smaller one on the way, at the end
of the block that reaches it (time so far, and the high-water mark so far): calibration memory
must not grow with the samples. The plain session's peak RSS, taken once it has run a batch, is
what inference alone needs; the rest of the peak is what calibration adds.

Usage:  python tools/bench_calibration.py [--models minilm,minilm_l6,deit] [--samples 1000,10000]
                                         [--threads 2] [--comoments]
        (--samples: checkpoints of one run per model; --comoments: also gather each block's
        hidden covariance, as the default method obs does)
Models: paraphrase-MiniLM-L3-v2 (tools/fetch_models.py) and all-MiniLM-L6-v2
(tools/export_minilm_l6.py), batch 32 x 128 random token ids; the DeiT-B-size timm export
(tools/export_deit.py; batch 32 random 224x224 images).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from export_deit import export
from export_minilm_l6 import export as export_l6
from fetch_models import cache_dir, fetch

RUN = """
import json, sys, time
from pathlib import Path
import numpy as np, onnx
from onnx_vbp import calibrate, find_mlp_blocks
from onnx_vbp.runtime import cpu_session
path, threads, comoments, batch, *counts = sys.argv[1], *map(int, sys.argv[2:])
def peak_mb():  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
model = onnx.load(path)
rng = np.random.default_rng(0)
def random_batch(size):
    if model.graph.input[0].name == "input_ids":
        ids = rng.integers(1000, 20000, (size, 128)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if len(model.graph.input) == 3:
            feed["token_type_ids"] = np.zeros_like(ids)
        return feed
    return {model.graph.input[0].name: rng.standard_normal((size, 3, 224, 224)).astype(np.float32)}
start = time.perf_counter()
plain = cpu_session(path, threads, optimize=True)
plain.run(None, random_batch(batch))  # its first run, slower, is set-up as calibration's is
plain_setup = time.perf_counter() - start
peak_plain = peak_mb()
timing = {"plain": 0.0, "calibrate": 0.0}
def report(samples):  # one JSON line per checkpoint, as soon as it is reached
    print(json.dumps({"samples": samples, "plain_s": timing["plain"], "calibrate_s": timing["calibrate"],
                      "plain_setup_s": plain_setup, "calibrate_setup_s": timing["calibrate_setup"],
                      "peak_rss_plain_mb": peak_plain, "peak_rss_mb": peak_mb()}), flush=True)
def interleaved():
    # blocks of batches, not single ones: ORT's workers spin-wait a moment after a run, and would
    # slow whichever session ran next; a real calibration runs alone
    timing["calibrate_setup"] = time.perf_counter() - called  # finding, instrumenting, the session
    done, pending = 0, list(counts[:-1])
    for first in range(0, counts[-1], BLOCK * batch):
        block = [random_batch(min(batch, counts[-1] - begin))
                 for begin in range(first, min(first + BLOCK * batch, counts[-1]), batch)]
        start = time.perf_counter()
        for feed in block:
            plain.run(None, feed)
        timing["plain"] += time.perf_counter() - start
        for index, feed in enumerate(block):
            if index:
                timing["calibrate"] += time.perf_counter() - mark
            mark = time.perf_counter()
            yield feed
        timing["calibrate"] += time.perf_counter() - mark  # asked for the next batch: this block is merged
        done += sum(len(feed[next(iter(feed))]) for feed in block)
        while pending and done >= pending[0]:
            pending.pop(0)
            report(done)
BLOCK = 8
called = time.perf_counter()
calibrate(model, find_mlp_blocks(model), interleaved(), threads=threads, comoments=bool(comoments))
report(counts[-1])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,deit")
    parser.add_argument(
        "--samples", default="1000,10000", help="checkpoints of one run (reported at the batch that reaches each)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--comoments", action="store_true", help="gather second moments too (--method obs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    paths = {
        "minilm": lambda: fetch("paraphrase-MiniLM-L3-v2.onnx", cache_dir()),
        "minilm_l6": lambda: export_l6(cache_dir()),
        "deit": lambda: export("deit_base_patch16_224", 17, cache_dir()),
    }
    counts = sorted(map(int, args.samples.split(",")))
    print(
        "| model | samples | plain s | calibrate s | ratio (batches) | ratio (with set-up) | plain peak RSS MB "
        "| peak RSS MB so far | calibration adds MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models.split(","):
        command = [
            sys.executable,
            "-c",
            RUN,
            str(paths[name]()),
            str(args.threads),
            str(int(args.comoments)),
            str(args.batch),
            *map(str, counts),
        ]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
            for line in child.stdout:
                r = {
                    **json.loads(line),
                    "model": name,
                    "batch": args.batch,
                    "threads": args.threads,
                    "comoments": args.comoments,
                }
                results.append(r)
                total_plain = r["plain_s"] + r["plain_setup_s"]
                total_calib = r["calibrate_s"] + r["calibrate_setup_s"]
                print(
                    f"| {name} | {r['samples']:,} | {r['plain_s']:.1f} | {r['calibrate_s']:.1f} | "
                    f"**{r['calibrate_s'] / r['plain_s']:.3f}** | {total_calib / total_plain:.3f} | "
                    f"{r['peak_rss_plain_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['peak_rss_mb'] - r['peak_rss_plain_mb']:.0f} |",
                    flush=True,
                )
        if child.returncode:
            raise SystemExit(f"{name}: the measuring process failed")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
