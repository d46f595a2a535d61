"""Prune the float model, then quantize it: what an int8 deployment of a pruned model keeps.

all-MiniLM-L6-v2 (tools/export_minilm_l6.py) is pruned by onnx_vbp's default method at several
ratios, calibrated on the 300 news documents of lee_background.cor (128 tokens), exactly as
`python -m onnx_vbp` would; the unpruned and every pruned model are then quantized by ORT's
`quantize_dynamic` (int8 weights, the usual CPU deployment of sentence encoders). Each is compared
with the unpruned float model on the 200 held-out pang_lee_polarity sentences (sentence
embedding: mean cosine, and Spearman correlation of the 19,900 pairwise similarities), and timed
against the unpruned int8 model with `onnx_vbp.bench` (batch 8 x 128 tokens of news text, 2
threads, interleaved runs).

Usage:  python tools/fetch_models.py && python tools/export_minilm_l6.py &&
        python tools/bench_quantized.py [--ratios 0.2,0.35] [--runs 40]
Needs (tools only): scipy, tokenizers, torch and transformers for the export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
from export_minilm_l6 import export as export_l6
from export_minilm_l6 import fetch_weights as l6_weights
from fetch_models import cache_dir
from onnxruntime.quantization import QuantType, quantize_dynamic
from scipy.stats import spearmanr

from onnx_vbp import PruneOptions, iter_batches, model_inputs, prune_file
from onnx_vbp.bench import bench
from onnx_vbp.data import RawOptions
from onnx_vbp.modelio import load_model
from onnx_vbp.runtime import cpu_session

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text"
SENTENCE_OUTPUT = 1  # the export's mean-pooled, L2-normalized sentence embedding


def _embeddings(model: Path, batches: list[dict]) -> np.ndarray:
    session = cpu_session(str(model), 2, optimize=True)
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {n: b[n] for n in names})[SENTENCE_OUTPUT] for b in batches])


def _similarities(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (unit @ unit.T)[np.triu_indices(len(x), k=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "results" / "quantized.json")
    args = parser.parse_args()
    model = export_l6(cache_dir())
    tokenizer = l6_weights(cache_dir()) / "tokenizer.json"
    raw = RawOptions(tokenizer=tokenizer, max_length=128)
    specs = model_inputs(load_model(model)[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, lines in (
            ("calib", (TEXT / "lee_background.cor").read_text(encoding="latin-1").splitlines()),
            (
                "held_out",
                [
                    line.split(" ", 1)[1]
                    for line in (TEXT / "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
                    if line.strip()
                ],
            ),
        ):
            (work / name).mkdir()
            (work / name / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        held_out = list(iter_batches(work / "held_out", specs, batch_size=32, raw=raw))
        timing = next(iter_batches(work / "calib", specs, batch_size=8, raw=raw))
        reference = _similarities(base := _embeddings(model, held_out))
        options = PruneOptions(raw=raw, progress=False, threads=2)
        models = {"float, unpruned": model}
        stats = work / "stats.npz"
        for i, ratio in enumerate(float(r) for r in args.ratios.split(",")):
            out = work / f"pruned{ratio:g}.onnx"
            first = i == 0  # calibrate once; the other ratios prune from the saved statistics
            prune_file(
                model,
                work / "calib" if first else None,
                out,
                dataclasses.replace(
                    options, ratio=ratio, save_stats=stats if first else None, stats=None if first else stats
                ),
            )
            models[f"float, pruned {ratio:g}"] = out
        for name, path in list(models.items()):
            quantized = work / f"int8_{path.name}"
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
            models[name.replace("float", "int8")] = quantized
        rows = []
        int8_base = models["int8, unpruned"]
        for name, path in models.items():
            emb = _embeddings(path, held_out)
            cosine = np.sum(emb * base, axis=1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(base, axis=1)
            row = {
                "model": name,
                "file_mb": path.stat().st_size / 2**20,
                "cosine": float(cosine.mean()),
                "similarity_spearman": float(spearmanr(reference, _similarities(emb))[0]),
            }
            if name.startswith("int8") and path != int8_base:
                timed = bench(int8_base, path, timing, threads=2, runs=args.runs)
                row["speedup_vs_int8_unpruned"] = timed["speedup"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | file MB | cosine | similarity Spearman | speedup vs int8 unpruned |")
    print("|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['speedup_vs_int8_unpruned']:.3f}×" if "speedup_vs_int8_unpruned" in r else ""
        print(f"| {r['model']} | {r['file_mb']:.1f} | {r['cosine']:.4f} | {r['similarity_spearman']:.4f} | {speed} |")


if __name__ == "__main__":
    main()
