"""Study: does a sequential, error-correcting refit beat the one-pass obs default on all-MiniLM-L6-v2?
(Result in BENCHMARKS.md, "Tried and not kept": no.)

One pass: every block's statistics come from the original model (what onnx_vbp does). Sequential:
the allocation (kept width per block) is the one-pass obs plan; then block by block, the
statistics of block l come from the model whose blocks < l are already pruned (h'), its kept
neurons are re-ranked by obs on Cov(h'), and fc2 is refit to the ORIGINAL block's output:
    W'_K = (Cov(h'_K) + λI)⁻¹ Cov(h'_K, h) W2,   b' = b2 + μ_h W2 - μ_h'_K W'_K
so each block also makes up for the error its pruned predecessors left in its input.

Usage: python tools/proto_sequential.py [--ratio 0.35]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from bench_retention import SHARED, _cosines, run_all
from export_minilm_l6 import export as export_l6
from export_minilm_l6 import fetch_weights as l6_weights
from fetch_models import cache_dir
from scipy.stats import spearmanr

from onnx_vbp import calibrate, find_mlp_blocks, iter_batches, model_inputs, rankings, rewrite, select
from onnx_vbp.data import RawOptions
from onnx_vbp.graph import with_outputs
from onnx_vbp.importance import fc2_rows, obs_ranking
from onnx_vbp.records import Plan
from onnx_vbp.runtime import cpu_session

LAMBDA = 1e-3


def hidden_moments(model_bytes: bytes, original_bytes: bytes, hidden: str, batches: list[dict]):
    """Means and (cross-)covariances of the hidden tensor in the current and the original model."""
    current = cpu_session(model_bytes, 2, optimize=True)
    original = cpu_session(original_bytes, 2, optimize=True)
    names = [i.name for i in current.get_inputs()]
    n, s_c, s_o, cc, co = 0, 0.0, 0.0, 0.0, 0.0
    for batch in batches:
        feed = {k: batch[k] for k in names}
        mask = batch["attention_mask"].reshape(-1).astype(bool)
        (h_c,), (h_o,) = current.run([hidden], feed), original.run([hidden], feed)
        h_c = h_c.reshape(-1, h_c.shape[-1])[mask].astype(np.float64)
        h_o = h_o.reshape(-1, h_o.shape[-1])[mask].astype(np.float64)
        n += len(h_c)
        s_c, s_o = s_c + h_c.sum(0), s_o + h_o.sum(0)
        cc, co = cc + h_c.T @ h_c, co + h_c.T @ h_o
    mu_c, mu_o = s_c / n, s_o / n
    return mu_c, mu_o, cc / n - np.outer(mu_c, mu_c), co / n - np.outer(mu_c, mu_o)


def set_fc2(model: onnx.ModelProto, block, weight: np.ndarray, bias: np.ndarray) -> None:
    """Overwrite the pruned fc2's weight [kept, out] and bias (torch export: MatMul + Add)."""
    nodes = {n.output[0]: n for n in model.graph.node}
    site = block.sites[0]
    w_name = nodes[site.fc2_weight.node].input[site.fc2_weight.input]
    b_name = nodes[site.fc2_bias.node].input[site.fc2_bias.input]
    for tensor in model.graph.initializer:
        if tensor.name == w_name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(weight.astype(np.float32), w_name))
        if tensor.name == b_name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), b_name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.35)
    args = parser.parse_args()
    path = export_l6(cache_dir())
    tokenizer = l6_weights(cache_dir()) / "tokenizer.json"
    model = onnx.load(path)
    specs = model_inputs(model)
    raw = RawOptions(tokenizer=tokenizer, max_length=128)
    tmp = Path(tempfile.mkdtemp())

    def batches(name: str, lines: list[str]) -> list[dict]:
        (tmp / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return list(iter_batches(tmp / f"{name}.txt", specs, batch_size=32, raw=raw))

    def read(name: str) -> list[str]:
        return (SHARED / "text" / name).read_text(encoding="latin-1").splitlines()

    calib = batches("lee", read("lee_background.cor"))
    polarity = [line.split(" ", 1)[1] for line in read("pang_lee_polarity.cor") if line.strip()]
    held = batches("polarity", polarity)
    base = run_all(path.read_bytes(), held, 1, 2)
    upper = np.triu_indices(len(base), k=1)
    base_sims = _cosines(base)[upper]

    def score(pruned: onnx.ModelProto) -> float:
        return float(spearmanr(base_sims, _cosines(run_all(pruned.SerializeToString(), held, 1, 2))[upper])[0])

    blocks = find_mlp_blocks(model)
    start = time.perf_counter()
    stats = calibrate(model, blocks, iter(calib), threads=2, comoments=True)
    ranked = rankings(stats, "obs", model, blocks)
    plan = select(stats, args.ratio, rankings=ranked)
    one_pass = rewrite(model, blocks, stats, plan, compensate="ridge")
    print(f"one pass: {score(one_pass):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = fc2_rows(model, blocks)
    current = model
    for index, block in enumerate(blocks):
        start = time.perf_counter()
        hidden = block.sites[0].hidden
        mu_c, mu_o, cov_c, cross = hidden_moments(
            with_outputs(current, [hidden]), with_outputs(model, [hidden]), hidden, calib
        )
        width, kept = block.width, plan.keep[block.name].size
        order = obs_ranking(rows[block.name], cov_c, width - kept, LAMBDA).order
        keep = np.setdiff1d(np.arange(width), order[: width - kept])
        w2 = rows[block.name]
        c_kk = cov_c[np.ix_(keep, keep)]
        lam = LAMBDA * np.trace(c_kk) / keep.size
        new_w = np.linalg.solve(c_kk + lam * np.eye(keep.size), cross[keep] @ w2)
        nodes = {n.output[0]: n for n in model.graph.node}
        b_name = nodes[block.sites[0].fc2_bias.node].input[block.sites[0].fc2_bias.input]
        b2 = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == b_name)
        new_b = b2 + mu_o @ w2 - mu_c[keep] @ new_w
        current = rewrite(
            current, [block], {block.name: stats[block.name]}, Plan({block.name: keep}), compensate="none"
        )
        set_fc2(current, block, new_w, new_b)
        print(f"  block {index}: kept {kept} of {width} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"sequential: {score(current):.4f}", flush=True)


if __name__ == "__main__":
    main()
