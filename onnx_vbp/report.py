"""Stage 6, report: what changed (widths, params, MACs, file size) as JSON-ready data and a table."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from onnx_vbp.calibrate import ORT_ERRORS, CalibrationError, cpu_session, first_line
from onnx_vbp.find import MlpBlock
from onnx_vbp.instrument import with_outputs
from onnx_vbp.select import Plan

MAC_OPS = ("MatMul", "Gemm", "Conv")


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point constant (initializers and Constant nodes)."""
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)


def node_macs(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], external_dir: Path | None = None
) -> dict[str, int]:
    """Multiply-accumulates per sample of each MatMul/Gemm/Conv (keyed by its first output), from
    the shapes seen running `feed`."""
    known = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in MAC_OPS]
    if not nodes:
        return {}
    wanted = sorted({name for n in nodes for name in (n.input[0], n.input[1], n.output[0])} - set(known))
    session = cpu_session(with_outputs(model, wanted), external_dir=external_dir)
    try:
        values = session.run(wanted, dict(feed))
    except ORT_ERRORS as exc:
        raise CalibrationError(f"ONNX Runtime failed while counting MACs on one sample: {first_line(exc)}") from exc
    shapes = {**known, **{name: v.shape for name, v in zip(wanted, values, strict=True)}}
    batch = max(len(next(iter(feed.values()))), 1)
    macs = {}
    for n in nodes:
        out = int(np.prod(shapes[n.output[0]]))
        if n.op_type == "Conv":
            inner = int(np.prod(shapes[n.input[1]][1:]))
        elif n.op_type == "Gemm":
            trans_a = any(a.name == "transA" and a.i for a in n.attribute)
            inner = shapes[n.input[0]][0 if trans_a else -1]
        else:
            inner = shapes[n.input[0]][-1]
        macs[n.output[0]] = out * inner // batch
    return macs


def pruned_macs(macs: dict[str, int], blocks: list[MlpBlock], plan: Plan) -> int:
    """MACs after pruning: each block's fc1 (gate, up) and fc2 scale exactly by kept / width."""
    kept = {}
    for block in blocks:
        for site in block.sites:
            for ref in (*site.fc1_params, site.fc2_weight):
                kept[ref.node] = (plan.keep[block.name].size, block.width)
    return sum(m * kept[k][0] // kept[k][1] if k in kept else m for k, m in macs.items())


def block_rows(blocks: list[MlpBlock], plan: Plan) -> list[dict]:
    return [
        {
            "name": b.name,
            "fc1": b.fc1,
            "fc2": b.fc2,
            "activation": b.activation,
            "gated": b.gated,
            "sites": len(b.sites),
            "width_before": b.width,
            "width_after": int(plan.keep[b.name].size),
        }
        for b in blocks
    ]


def format_inspection(found: Mapping) -> str:
    """`inspect_model`'s result as a short table."""
    lines = [
        f"{found['model']}: {len(found['blocks'])} MLP blocks, {found['neurons']} hidden neurons; "
        f"{found['macs'] / 1e6:,.1f} M MACs per sample at inputs "
        + ", ".join(f"{name} {shape}" for name, shape in found["inputs"].items())
        + (f", {found['macs_in_blocks'] / max(found['macs'], 1):.0%} of them in the blocks" if found["blocks"] else "")
    ]
    if found["blocks"]:
        lines.append(f"{'block':<36} {'activation':<11} {'width':>6} {'sites':>5} {'MACs/sample':>12}")
        for b in found["blocks"]:
            activation = b["activation"] + (" (gated)" if b["gated"] else "")
            lines.append(f"{b['name']:<36} {activation:<11} {b['width']:>6} {b['sites']:>5} {b['macs']:>12,}")
    lines += [f"skipped {s['name']}: {s['reason']}" for s in found["skipped"]]
    lines += [f"hint: {hint}" for hint in found["hints"]]
    return "\n".join(lines)


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def format_table(report: Mapping) -> str:
    """The report as a short human-readable table."""
    lines = [f"{'block':<36} {'activation':<11} {'width':>13}"]
    for b in report["blocks"]:
        lines.append(f"{b['name'][-36:]:<36} {b['activation']:<11} {b['width_before']:>6} -> {b['width_after']:<5}")
    lines.append("")
    lines.append(f"{'':<14} {'before':>14} {'after':>14} {'change':>8}")
    for key, label in (("params", "params"), ("macs", "MACs/sample"), ("file_bytes", "file bytes")):
        before, after = report[f"{key}_before"], report[f"{key}_after"]
        lines.append(f"{label:<14} {before:>14,} {after:>14,} {_change(before, after):>8}")
    evaluation = report.get("eval")
    if evaluation:
        if "top1_before" in evaluation:
            lines.append(
                f"{'top-1':<14} {evaluation['top1_before']:>14.4f} {evaluation['top1_after']:>14.4f} "
                f"{evaluation['top1_after'] - evaluation['top1_before']:>+8.4f}"
            )
        for name, metrics in evaluation["outputs"].items():
            extras = "".join(
                f", {label} {metrics[key]:.4f}"
                for key, label in (
                    ("top1_agreement", "top-1 agreement"),
                    ("similarity_spearman", "similarity Spearman"),
                )
                if key in metrics
            )
            lines.append(
                f"output {name[:30]}: cosine {metrics['cosine']:.5f}, relative L2 {metrics['rel_l2']:.5f}" + extras
            )
    cal = report["calibration"]
    lines.append(
        f"calibrated on {cal['samples']} samples in {cal['seconds']:.1f} s; "
        f"pruned {report['neurons_before'] - report['neurons_after']} of {report['neurons_before']} "
        f"MLP neurons (--method {report['method']}, {report['scope']}, ratio {report['ratio']})"
    )
    return "\n".join(lines)
