"""Where the time goes before and after pruning: ORT's profiler on the DeiT-B-size export.

The MAC bound (MACs before / MACs after) assumes every MAC costs the same. This splits ORT's
kernel time into the MLP blocks' nodes (fc1, the fused BiasGelu, fc2 and its bias) and the rest
(attention, LayerNorm, Softmax, ...), for the original and one pruned model, so one can see
whether the MLP nodes speed up as much as their MACs shrink, and how much of the gap to the MAC
bound is time that pruning MLP neurons cannot touch. The MLP nodes are those whose name holds
"/mlp/" (timm's module path, kept by ORT for the MatMuls and fc2's bias Add) and the BiasGelu
nodes ORT fuses.

Usage:  python tools/profile_mlp_time.py [--cut 0.35] [--batches 1,8] [--runs 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnxruntime as ort
from export_deit import export
from fetch_models import cache_dir

from onnx_vbp import PruneOptions
from onnx_vbp.data import make_inputs
from onnx_vbp.pipeline import prepare, prune_prepared

# ORT names the node it fuses from fc1's bias Add and the GELU "BiasGelu_token_<n>", outside "/mlp/".
MLP_FUSED_OPS = ("BiasGelu",)


def kernel_ms(model: Path, feed: dict, threads: int, runs: int, folder: Path) -> dict[str, float]:
    """Mean kernel time per run (ms) of the MLP nodes and of the others, ORT_ENABLE_ALL."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / model.stem)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(3):  # warm-up, excluded below by counting only the last `runs` runs
        session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    start = runs_seen[-runs]["ts"]
    totals = {"mlp": 0.0, "other": 0.0}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= start:
            mlp = "/mlp/" in event["name"] or event["args"].get("op_name") in MLP_FUSED_OPS
            totals["mlp" if mlp else "other"] += event["dur"] / 1e3 / runs
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cut", type=float, default=0.35, help="share of the model's MACs to remove")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = export("deit_base_patch16_224", 17, cache_dir())
    base = PruneOptions(progress=False, threads=args.threads, max_samples=32, min_samples=1)
    prepared = prepare(model, cache_dir() / "photos", base)
    mlp_nodes = {ref.node for b in prepared.blocks for s in b.sites for ref in (*s.fc1_params, s.fc2_weight)}
    mlp_macs = sum(m for node, m in prepared.macs.items() if node in mlp_nodes)
    ratio = round(args.cut * sum(prepared.macs.values()) / mlp_macs, 4)
    print(
        "| batch | MLP kernels ms: original -> pruned | MLP time ratio (MLP MACs ratio) | other kernels ms: "
        "original -> pruned | MLP share of time | speedup bound if only MLP time shrinks |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned.onnx"
        report = prune_prepared(prepared, PruneOptions(**{**base.__dict__, "ratio": ratio}), pruned)
        kept = report.neurons_after / report.neurons_before
        for batch in map(int, args.batches.split(",")):
            feed = make_inputs(prepared.specs, batch, 0, None)
            before = kernel_ms(model, feed, args.threads, args.runs, Path(tmp))
            after = kernel_ms(pruned, feed, args.threads, args.runs, Path(tmp))
            share = before["mlp"] / (before["mlp"] + before["other"])
            mac_bound = report.macs_before / report.macs_after
            print(
                f"| {batch} | {before['mlp']:.1f} -> {after['mlp']:.1f} | {after['mlp'] / before['mlp']:.3f} "
                f"({kept:.3f}) | {before['other']:.1f} -> {after['other']:.1f} | {share:.3f} | "
                f"{1 / (1 - share * (1 - kept)):.3f} (MAC bound {mac_bound:.3f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
