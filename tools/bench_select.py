"""Selection time and memory of the default method (obs) on a DeiT-B-size model: 12 blocks of
768 -> 3072 -> 768.

Selection is the stage between calibration and rewrite: the obs ranking (inverting each block's
3072 x 3072 Hessian, then greedy removals with Schur downdates) and the allocation across blocks.
Its cost depends on the shapes, not on the values, so the model and its statistics are synthetic:
random fc2 weights, and hidden covariances with a decaying spectrum (like real GELU activations,
a few strong directions and a long tail), written as a statistics file and pruned with --stats,
exactly as the CLI would. Each run is a fresh process; its peak RSS (VmHWM) is reported beside
the peak of the same process before selection (the model and the statistics loaded).

Usage:  python tools/bench_select.py [--ratios 0.2,0.35,0.5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_vbp import Stats, find_mlp_blocks
from onnx_vbp.stats import save_stats

BLOCKS, DIM, HIDDEN = 12, 768, 3072

RUN = """
import json, sys, time
from pathlib import Path
from onnx_vbp.pipeline import PruneOptions, prepare
def peak_mb():
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
model, stats, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
options = PruneOptions(ratio=ratio, stats=Path(stats), progress=False)
prepared = prepare(Path(model), None, options)
before = peak_mb()
start = time.perf_counter()
plan = prepared.plan(options)
seconds = time.perf_counter() - start
widths = [int(plan.keep[b.name].size) for b in prepared.blocks]
ranked = prepared._rankings[(options.score, options.ridge_lambda)]
depths = [int(ranked[b.name].order.size) for b in prepared.blocks]
print(json.dumps({"ratio": ratio, "seconds": seconds, "peak_before_mb": before, "peak_mb": peak_mb(),
                  "depths": depths, "widths": widths}))
"""


def synthetic(folder: Path) -> tuple[Path, Path]:
    """A 12-block MLP stack of DeiT-B's shapes, and statistics for it."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    for i in range(BLOCKS):
        names = [f"b{i}.{part}" for part in ("w1", "b1", "w2", "b2")]
        inits += [
            numpy_helper.from_array((rng.standard_normal((DIM, HIDDEN)) / DIM**0.5).astype(np.float32), names[0]),
            numpy_helper.from_array(np.zeros(HIDDEN, np.float32), names[1]),
            numpy_helper.from_array((rng.standard_normal((HIDDEN, DIM)) / HIDDEN**0.5).astype(np.float32), names[2]),
            numpy_helper.from_array(np.zeros(DIM, np.float32), names[3]),
        ]
        p = f"/blocks.{i}/mlp"
        nodes += [
            helper.make_node("MatMul", [x, names[0]], [f"{p}/h0"], name=f"{p}/fc1/MatMul"),
            helper.make_node("Add", [f"{p}/h0", names[1]], [f"{p}/h1"]),
            helper.make_node("Relu", [f"{p}/h1"], [f"{p}/h2"]),
            helper.make_node("MatMul", [f"{p}/h2", names[2]], [f"{p}/o0"], name=f"{p}/fc2/MatMul"),
            helper.make_node("Add", [f"{p}/o0", names[3]], [f"{p}/o1"]),
            helper.make_node("Add", [x, f"{p}/o1"], [f"{p}/y"]),
        ]
        x = f"{p}/y"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    shape = ["batch", 197, DIM]
    graph = helper.make_graph(
        nodes,
        "deit_b_mlps",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_path = folder / "deit_b_mlps.onnx"
    onnx.save(model, model_path)
    stats = {}
    for block in find_mlp_blocks(model):
        basis = np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))[0]
        spectrum = 1.0 / (1.0 + np.arange(HIDDEN)) ** 1.2
        covariance = (basis * spectrum) @ basis.T
        count = 10_000
        stats[block.name] = Stats(
            count,
            rng.random(HIDDEN),
            np.diag(covariance) * count,
            covariance * count,
            np.array([DIM * 1.0 * count, count]),
        )
    stats_path = folder / "deit_b_mlps.stats.npz"
    save_stats(stats_path, stats, 10_000, {"x": np.zeros((1, 197, DIM), np.float32)})
    return model_path, stats_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (OMP/OPENBLAS_NUM_THREADS)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
    print("| ratio | selection s | peak RSS before MB | peak RSS MB | ranked depths | kept widths |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        model, stats = synthetic(Path(tmp))
        for ratio in args.ratios.split(","):
            out = subprocess.run(
                [sys.executable, "-c", RUN, str(model), str(stats), ratio],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {r['ratio']} | {r['seconds']:.1f} | {r['peak_before_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{min(r['depths'])}–{max(r['depths'])} | {min(r['widths'])}–{max(r['widths'])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
