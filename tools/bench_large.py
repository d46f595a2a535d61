"""Prune a model past protobuf's 2 GB limit end to end, and record peak memory / model size.

Writes a synthetic stack of large MLP blocks (x + fc2(GELU(fc1(x))), fp32) with external data,
streaming one weight at a time so the generator itself stays small, then prunes it in a fresh
process with `prune_file` (as the CLI does) and reports that process's peak RSS.

Usage:  python tools/bench_large.py [--dim 4096] [--hidden 16384] [--blocks 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

PRUNE = """
import json, sys, time
from pathlib import Path
from onnx_vbp import PruneOptions, prune_file
work = Path(sys.argv[1])
start = time.perf_counter()
report = prune_file(work / "large.onnx", work / "calib", work / "large.vbp.onnx",
                    PruneOptions(ratio=0.35, progress=False, threads=2))
print(json.dumps({**report.to_dict(), "seconds": time.perf_counter() - start}))
"""


def external_tensor(name: str, array: np.ndarray, sink, location: str) -> TensorProto:
    offset = sink.tell()
    sink.write(array.tobytes())
    tensor = TensorProto(name=name, dims=array.shape, data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def write_model(work: Path, dim: int, hidden: int, blocks: int) -> int:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "x"
    with open(work / "large.onnx.data", "wb") as sink:
        for i in range(blocks):
            w1 = rng.standard_normal((dim, hidden), dtype=np.float32) * dim**-0.5  # Python float: stays fp32
            inits.append(external_tensor(f"w1_{i}", w1, sink, "large.onnx.data"))
            del w1
            w2 = rng.standard_normal((hidden, dim), dtype=np.float32) * hidden**-0.5
            inits.append(external_tensor(f"w2_{i}", w2, sink, "large.onnx.data"))
            del w2
            inits.append(
                helper.make_tensor(
                    f"b1_{i}", TensorProto.FLOAT, [hidden], rng.normal(0, 0.5, hidden).astype(np.float32)
                )
            )
            inits.append(helper.make_tensor(f"b2_{i}", TensorProto.FLOAT, [dim], np.zeros(dim, np.float32)))
            p = f"/blocks.{i}/mlp"
            nodes += [
                helper.make_node("MatMul", [x, f"w1_{i}"], [f"{p}/h0"], name=f"{p}/fc1/MatMul"),
                helper.make_node("Add", [f"{p}/h0", f"b1_{i}"], [f"{p}/h1"], name=f"{p}/fc1/Add"),
                helper.make_node("Gelu", [f"{p}/h1"], [f"{p}/h2"], name=f"{p}/act"),
                helper.make_node("MatMul", [f"{p}/h2", f"w2_{i}"], [f"{p}/o0"], name=f"{p}/fc2/MatMul"),
                helper.make_node("Add", [f"{p}/o0", f"b2_{i}"], [f"{p}/o1"], name=f"{p}/fc2/Add"),
                helper.make_node("Add", [x, f"{p}/o1"], [f"{p}/out"], name=f"{p}/residual"),
            ]
            x = f"{p}/out"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, work / "large.onnx")
    (work / "calib").mkdir(exist_ok=True)
    np.savez(work / "calib" / "batch.npz", x=rng.standard_normal((16, 4, dim), dtype=np.float32))
    return (work / "large.onnx").stat().st_size + (work / "large.onnx.data").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=16384)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--work", type=Path, help="folder for the model (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        size = write_model(work, args.dim, args.hidden, args.blocks)
        print(f"wrote {size / 2**30:.2f} GiB model in {time.perf_counter() - start:.0f} s", flush=True)
        result = subprocess.run([sys.executable, "-c", PRUNE, str(work)], capture_output=True, text=True)
        if result.returncode:
            sys.exit(result.stderr)
        report = json.loads(result.stdout)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        after = report["file_bytes_after"]
        print(
            f"model {size / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB in {report['seconds']:.0f} s; "
            f"peak RSS {peak / 2**30:.2f} GiB = {peak / size:.2f} x model size; "
            f"MACs {report['macs_before']:,} -> {report['macs_after']:,}"
        )


if __name__ == "__main__":
    main()
