"""Second moments with every position against every 2nd and 4th (calibrate's COMOMENT_STRIDE), A/B.

all-MiniLM-L6-v2 (tools/export_minilm_l6.py), 6 batches of 32 x 128 random token ids, 2 threads,
in one process, the four variants alternating over 3 rounds (medians): calibration without
second moments (--method vbp), with every position in the product, and with every 2nd and 4th,
as calibrate does (COMOMENT_STRIDE) once a block has seen COMOMENT_FULL_POSITIONS per neuron
(here from the start).

Usage:  python tools/bench_comoment_stride.py
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnx
from export_minilm_l6 import export
from fetch_models import cache_dir

import onnx_vbp.calibrate  # noqa: F401  (the module; the package's `calibrate` is the function)
from onnx_vbp import find_mlp_blocks

calibration = sys.modules["onnx_vbp.calibrate"]


def main() -> None:
    model = onnx.load(export(cache_dir()))
    blocks = find_mlp_blocks(model)
    rng = np.random.default_rng(0)
    names = {i.name for i in model.graph.input}
    batches = [
        {
            k: v
            for k, v in {
                "input_ids": rng.integers(1000, 20000, (32, 128)),
                "attention_mask": np.ones((32, 128), np.int64),
                "token_type_ids": np.zeros((32, 128), np.int64),
            }.items()
            if k in names
        }
        for _ in range(6)
    ]
    variants = {"no second moments": None, "every position": (10**9, 1), "every 2nd position": (0, 2)}
    variants["every 4th position"] = (0, 4)
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(3):
        for label, full_positions in variants.items():
            start = time.perf_counter()
            if full_positions is None:
                calibration.calibrate(model, blocks, batches, threads=2)
            else:
                calibration.COMOMENT_FULL_POSITIONS, calibration.COMOMENT_STRIDE = full_positions
                calibration.calibrate(model, blocks, batches, threads=2, comoments=True)
            seconds[label].append(time.perf_counter() - start)
    base = float(np.median(seconds["no second moments"]))
    print("| calibration of 6 batches | median s | second moments add s |")
    print("|---|---|---|")
    for label, values in seconds.items():
        median = float(np.median(values))
        print(f"| {label} | {median:.2f} | {median - base:.2f} |")


if __name__ == "__main__":
    main()
