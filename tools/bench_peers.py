"""onnx_vbp against the nearest peer, onnxsim 0.8.1's calibrated structured pruning, side by side.

Same models, same calibration data, the same fraction of MLP neurons removed (global), the same
metrics as tools/bench_retention.py: the sentence embeddings of the 200 held-out
pang_lee_polarity sentences, against the unpruned model of the same form (mean cosine, and the
Spearman correlation of the 19,900 pairwise similarities). Calibration: the 300 documents of
lee_background.cor, read as the CLI reads text (all of each document, in 738 windows of at most
128 tokens), batches of 32, handed to both tools.

Forms: the ORT transformers optimizer's output (fused BiasGelu and SkipLayerNormalization, the
form onnxsim's chain matcher prunes) of all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2, and the
plain torch export of L6 (decomposed erf GELU, which onnxsim does not match).

Methods:
- onnxsim `apply_structured_pruning` (||W row||, global) - "magnitude"
- onnxsim `apply_structured_wanda_pruning` (||W row|| * ||X||, global) - "wanda"
- with --refit, the same followed by `apply_pruning_finetune` (its per-layer ridge refit, on the
  first 64 calibration documents: see REFIT_BATCHES) - "wanda+refit"
- onnx_vbp's default (--method obs) and the paper's VBP (--method vbp)

The fraction of MLP neurons each result actually removed is counted from the pruned graph
(onnx_vbp's block finder), so equal budgets are checked, not assumed.

Usage:  python tools/fetch_models.py && python tools/export_minilm_l6.py &&
        python tools/bench_peers.py [--ratios 0.2,0.35,0.5] [--refit] [--out tools/results]
Needs (tools only): onnxsim==0.8.1, scipy, matplotlib, tokenizers, torch + transformers (L6 export).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from bench_retention import SHARED, TOKENIZER, _cosines, _unit, run_all
from export_minilm_l6 import export as export_l6
from export_minilm_l6 import fetch_weights as l6_weights
from fetch_models import cache_dir, fetch
from scipy.stats import spearmanr

from onnx_vbp import find_mlp_blocks, iter_batches, model_inputs
from onnx_vbp.data import RawOptions
from onnx_vbp.pipeline import PruneOptions, prepare

ROOT = Path(__file__).resolve().parents[1]
# onnxsim's refit on all 10 calibration batches ran for over 5 minutes per model and ratio on 2
# cores without finishing, and on the first 2 batches (64 documents) over 4 minutes: it runs only
# with --refit, on those 2.
REFIT_BATCHES = 2


def optimized(path: Path, hidden: int, heads: int, target: Path, model_type: str = "bert") -> Path:
    """ORT's transformers optimizer output for a BERT (or `model_type`) export (cached)."""
    if not target.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxruntime.transformers.optimizer",
                "--input",
                str(path),
                "--output",
                str(target),
                "--model_type",
                model_type,
                "--num_heads",
                str(heads),
                "--hidden_size",
                str(hidden),
            ],
            check=True,
            capture_output=True,
        )
    return target


def forms(cache: Path) -> list[tuple[str, Path, Path, int]]:
    """(label, model, tokenizer, sentence-embedding output index) of every form compared."""
    l6, l3 = export_l6(cache), fetch("paraphrase-MiniLM-L3-v2.onnx", cache)
    l6_tokenizer = l6_weights(cache) / "tokenizer.json"
    return [
        (
            "all-MiniLM-L6-v2, ORT-optimized",
            optimized(l6, 384, 12, cache / "all-MiniLM-L6-v2.opt.onnx"),
            l6_tokenizer,
            1,
        ),
        (
            "paraphrase-MiniLM-L3-v2, ORT-optimized",
            optimized(l3, 384, 12, cache / "paraphrase-MiniLM-L3-v2.opt.onnx"),
            TOKENIZER,
            3,
        ),
        ("all-MiniLM-L6-v2, torch export", l6, l6_tokenizer, 1),
    ]


def text_folder(folder: Path, lines: list[str]) -> Path:
    folder.mkdir()
    (folder / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def mlp_neurons(model: onnx.ModelProto) -> int:
    return sum(block.width for block in find_mlp_blocks(model))


def compare(
    label: str, path: Path, tokenizer: Path, output: int, ratios: list[float], tmp: Path, refit: bool = False
) -> list[dict]:
    import onnxsim

    model = onnx.load(path)
    specs = model_inputs(model)
    raw = RawOptions(tokenizer=tokenizer, max_length=128)

    def read(name: str) -> list[str]:
        return (SHARED / "text" / name).read_text(encoding="latin-1").splitlines()

    calib_dir = text_folder(tmp / "calib", read("lee_background.cor"))
    held_dir = text_folder(
        tmp / "held", [line.split(" ", 1)[1] for line in read("pang_lee_polarity.cor") if line.strip()]
    )
    calib = list(iter_batches(calib_dir, specs, batch_size=32, raw=raw))
    held = list(iter_batches(held_dir, specs, batch_size=32, raw=raw))
    base = run_all(path.read_bytes(), held, output, 2)
    upper = np.triu_indices(len(base), k=1)
    base_sims = _cosines(base)[upper]
    neurons = mlp_neurons(model)

    def evaluate(pruned: onnx.ModelProto) -> dict:
        emb = run_all(pruned.SerializeToString(), held, output, 2)
        return {
            "cosine": float(np.mean(np.sum(_unit(emb) * _unit(base), axis=1))),
            "similarity_spearman": float(spearmanr(base_sims, _cosines(emb)[upper])[0]),
            "neurons_removed": 1 - mlp_neurons(pruned) / neurons if neurons else None,
        }

    rows = []

    def record(method: str, ratio: float, make) -> None:
        start = time.perf_counter()
        try:
            pruned = make()
        except Exception as exc:  # a peer that cannot prune this form: say so in the table
            row = {"model": label, "method": method, "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"[:200]}
        else:
            row = {
                "model": label,
                "method": method,
                "ratio": ratio,
                "seconds": time.perf_counter() - start,
                **evaluate(pruned),
            }
        print("  " + json.dumps(row), flush=True)
        rows.append(row)

    print(f"{label}: {neurons} MLP neurons in {len(find_mlp_blocks(model))} blocks", flush=True)
    ours = {
        method: prepare(path, calib_dir, PruneOptions(method=method, raw=raw, threads=2, progress=False))
        for method in ("obs", "vbp")
    }
    for ratio in ratios:
        for method, prepared in ours.items():
            options = PruneOptions(method=method, ratio=ratio, raw=raw)

            def prune_ours(prepared=prepared, options=options) -> onnx.ModelProto:
                from onnx_vbp import rewrite

                plan = prepared.plan(options)
                return rewrite(
                    prepared.model,
                    prepared.blocks,
                    prepared.stats,
                    plan,
                    compensate=options.compensate,
                    ridge_lambda=options.ridge_lambda,
                )

            record(f"onnx_vbp {method}", ratio, prune_ours)
        record(
            "onnxsim magnitude",
            ratio,
            lambda r=ratio: onnxsim.apply_structured_pruning(model, sparsity=r, global_sparsity=True),
        )
        wanda: dict = {}

        def prune_wanda(r: float = ratio, kept: dict = wanda) -> onnx.ModelProto:
            kept["model"] = onnxsim.apply_structured_wanda_pruning(
                model, calibration_data=calib, sparsity=r, global_sparsity=True
            )
            return kept["model"]

        record("onnxsim wanda", ratio, prune_wanda)
        if refit and "model" in wanda:
            record(
                "onnxsim wanda+refit",
                ratio,
                lambda kept=wanda: onnxsim.apply_pruning_finetune(
                    model, kept["model"], calibration_data=calib[:REFIT_BATCHES]
                ),
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | ratio | method | MLP neurons removed | cosine | similarity Spearman |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['ratio']} | {r['method']} | – | – | prunes nothing: {r['error']} |")
            continue
        removed = "–" if r["neurons_removed"] is None else f"{r['neurons_removed']:.1%}"
        lines.append(
            f"| {r['model']} | {r['ratio']} | {r['method']} | {removed} | {r['cosine']:.4f} | "
            f"{r['similarity_spearman']:.4f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [r for r in rows if r["model"] == model and r["method"] == method and "error" not in r]
            if points:
                # x: what was actually removed (a tool that finds no block stays at 0 %, unpruned)
                ax.plot(
                    [100 * r["neurons_removed"] for r in points],
                    [r["similarity_spearman"] for r in points],
                    marker="o",
                    label=method,
                    linestyle="-" if method.startswith("onnx_vbp") else "--",
                )
        ax.set(title=model, xlabel="MLP neurons removed (%)", ylabel="similarity Spearman")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--forms", default="0,1,2", help="indices into the forms compared (see the docstring)")
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    parser.add_argument("--refit", action="store_true", help="also run onnxsim's refit after its wanda pruning")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    chosen = [forms(cache_dir())[int(i)] for i in args.forms.split(",")]
    for index, (label, path, tokenizer, output) in enumerate(chosen):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / str(index)
            folder.mkdir()
            rows += compare(label, path, tokenizer, output, ratios, folder, args.refit)
    print("\n" + table(rows))
    (args.out / "peers.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.out / "peers.png")


if __name__ == "__main__":
    main()
