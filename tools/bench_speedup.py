"""Pruned-model speedup in ONNX Runtime against the MAC bound, on the DeiT-B-size timm export.

Calibrates once on scikit-image's photos (tools/fetch_models.py --photos), then prunes for each
target MAC cut (the ratio of MLP neurons that removes that share of the model's MACs, as with the
paper's 55 % -> -34.9 % on DeiT-B) with and without --round-to, and times every pruned model
against the original with `onnx_vbp.bench` (ORT_ENABLE_ALL, pinned threads, warm-up, interleaved
runs, medians). Reports speedup / (MACs before / MACs after) and whether ORT optimized both graphs
into the same ops.

Usage:  python tools/bench_speedup.py [--cuts 0.20,0.35] [--round-to 1,16,32,64] [--batches 1,8]
                                      [--threads 2] [--runs 40,20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from export_deit import export
from fetch_models import cache_dir

from onnx_vbp import PruneOptions
from onnx_vbp.bench import bench
from onnx_vbp.data import make_inputs
from onnx_vbp.pipeline import prepare, prune_prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", default="0.20,0.35", help="target shares of the model's MACs to remove")
    parser.add_argument("--round-to", default="1,16,32,64")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", default="40,20", help="interleaved runs per batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = export("deit_base_patch16_224", 17, cache_dir())
    photos = cache_dir() / "photos"
    if not photos.is_dir():
        raise SystemExit(f"{photos} absent: run python tools/fetch_models.py --photos")
    base = PruneOptions(progress=False, threads=args.threads, max_samples=32, min_samples=1)
    prepared = prepare(model, photos, base)
    mlp_nodes = {ref.node for b in prepared.blocks for s in b.sites for ref in (*s.fc1_params, s.fc2_weight)}
    mlp_share = sum(m for node, m in prepared.macs.items() if node in mlp_nodes) / sum(prepared.macs.values())
    runs = dict(zip(map(int, args.batches.split(",")), map(int, args.runs.split(",")), strict=True))
    print(f"MLP share of DeiT-B MACs: {mlp_share:.3f}")
    print(
        "| MAC cut | ratio | round-to | MACs after (G) | batch | original ms | pruned ms | speedup | MAC bound "
        "| speedup / bound | ORT fusions |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cut in map(float, args.cuts.split(",")):
            ratio = round(cut / mlp_share, 4)
            for round_to in map(int, args.round_to.split(",")):
                options = PruneOptions(**{**base.__dict__, "ratio": ratio, "round_to": round_to})
                out = Path(tmp) / f"deit_{cut}_{round_to}.onnx"
                report = prune_prepared(prepared, options, out)
                for batch, count in runs.items():
                    feed = make_inputs(prepared.specs, batch, 0, None)
                    r = bench(model, out, feed, threads=args.threads, runs=count)
                    fusion = "same" if not r["fusion_differences"] else json.dumps(r["fusion_differences"])
                    print(
                        f"| {cut:.0%} | {ratio} | {round_to} | {report.macs_after / 1e9:.2f} | {batch} | "
                        f"{r['original']['median_ms']:.1f} | {r['pruned']['median_ms']:.1f} | {r['speedup']:.3f} | "
                        f"{r['mac_bound']:.3f} | **{r['speedup_over_mac_bound']:.3f}** | {fusion} |",
                        flush=True,
                    )
                    rows.append(
                        {
                            "cut": cut,
                            "ratio": ratio,
                            "round_to": round_to,
                            "widths": [b["width_after"] for b in report.blocks],
                            **r,
                        }
                    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
