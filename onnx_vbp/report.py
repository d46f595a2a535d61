"""Stage 6, report: what changed (widths, params, MACs, file size) as JSON-ready data and a table."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_vbp.graph import with_outputs
from onnx_vbp.records import BlockList, MlpBlock, Plan, Refit
from onnx_vbp.runtime import ORT_ERRORS, cpu_session, first_line
from onnx_vbp.stats import CalibrationError

# Ops whose work is multiply-accumulates, by domain: the float ones, ORT's fused and quantized
# forms of a MatMul, and its fused attention (projections and the two attention products).
MAC_OPS = ("MatMul", "Gemm", "Conv", "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger", "Einsum")
MS_MAC_OPS = (
    "FusedMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "Attention",
    "MultiHeadAttention",
    "QGemm",
)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point constant (initializers and Constant nodes), of every
    integer one a DequantizeLinear, a Cast (weight-only int8), an integer MatMul or a QOperator op
    reads as its data (a quantized weight or bias) or a Gather reads as its table (a quantized
    embedding), and the K x N weights packed in each MatMulNBits' B."""
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    data_input = {
        "DequantizeLinear": 0,
        "Cast": 0,
        "MatMulInteger": 1,
        "DynamicQuantizeMatMul": 1,
        "MatMulIntegerToFloat": 1,
        "QLinearMatMul": 3,  # QOperator ops' weights (ORT's session optimizer writes QLinearMatMul from QDQ)
        "QGemm": 3,
        "QLinearConv": 3,
        "Gather": 0,  # a quantized embedding table (quantize_dynamic): rows gathered, then dequantized
    }
    read = {
        n.input[data_input[n.op_type]]
        for n in model.graph.node
        if n.op_type in data_input and len(n.input) > data_input[n.op_type]
    }
    integers = {
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
    }
    quantized = {t.name for t in tensors if t.name in read and t.data_type in integers}
    packed = {
        n.input[1]: int(np.prod([onnx.helper.get_attribute_value(a) for a in n.attribute if a.name in ("K", "N")]))
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    counted = (t for t in tensors if t.data_type in floats or t.name in quantized)
    return sum(int(np.prod(t.dims)) for t in counted) + sum(packed.values())


@dataclass(frozen=True)
class SampleRun:
    """The original model run once on one sample: its outputs (by name, in the graph's order)
    and the multiply-accumulates per sample of each MatMul/Gemm/Conv (keyed by its first output),
    from the shapes seen on the way."""

    outputs: dict[str, np.ndarray]
    macs: dict[str, int]


def run_sample(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    external_dir: Path | None = None,
    where: str = "one sample",
) -> SampleRun:
    """Run `model` on `feed` once, with the inputs and outputs of its MAC ops fetched too: the
    outputs a written model is verified against and the MACs the report counts, in one session.
    `where` names the sample in the error raised when ORT fails on it."""
    known = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in (MS_MAC_OPS if n.domain == "com.microsoft" else MAC_OPS)]
    outputs = [o.name for o in model.graph.output]
    wanted = sorted({name for n in nodes for name in (*n.input[:4], n.output[0]) if name} - set(known) - set(outputs))
    session = cpu_session(with_outputs(model, wanted), external_dir=external_dir)
    try:
        values = dict(zip(outputs + wanted, session.run(outputs + wanted, dict(feed)), strict=True))
    except ORT_ERRORS as exc:
        raise CalibrationError(f"the model fails to run on {where}: {first_line(exc)}") from exc
    # a graph output may be a sequence or a map (no shape): no MAC op reads those
    shapes = {**known, **{name: v.shape for name, v in values.items() if isinstance(v, np.ndarray)}}
    batch = max(len(next(iter(feed.values()))), 1)
    return SampleRun({name: values[name] for name in outputs}, {n.output[0]: _macs(n, shapes) // batch for n in nodes})


def node_macs(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], external_dir: Path | None = None
) -> dict[str, int]:
    """Multiply-accumulates per sample of each MatMul/Gemm/Conv (keyed by its first output), from
    the shapes seen running `feed`."""
    return run_sample(model, feed, external_dir).macs


def _macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one MAC op, from the shapes of its inputs and output."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    out = int(np.prod(shapes[node.output[0]]))
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        return out * int(np.prod(shapes[node.input[3 if op == "QLinearConv" else 1]][1:]))
    if op in ("Gemm", "QGemm"):
        return out * shapes[node.input[0]][0 if attrs.get("transA") else -1]
    if op == "FusedMatMul":
        return out * shapes[node.input[0]][-2 if attrs.get("transA") else -1]
    if op == "MatMulNBits":
        return out * int(attrs["K"])
    if op in ("Attention", "MultiHeadAttention"):
        return _attention_macs(node, shapes, attrs)
    if op == "Einsum":
        return _einsum_macs(attrs["equation"].decode(), [shapes[name] for name in node.input])
    return out * shapes[node.input[0]][-1]  # MatMul and its quantized forms: [..., K] x [K, N]


def _einsum_macs(equation: str, operands: list[tuple[int, ...]]) -> int:
    """Multiply-accumulates of an Einsum: the product of the sizes of every index (and of the
    broadcast `...` dims), which is exact for two operands (`bsd,df->bsf` is a MatMul) and the
    naive, unfactored cost for more. One operand (a transpose or a sum) does none."""
    terms = equation.replace(" ", "").split("->")[0].split(",")
    if len(terms) < 2:
        return 0
    sizes: dict[str, int] = {}
    broadcast: tuple[int, ...] = ()
    for term, shape in zip(terms, operands, strict=True):
        head, _, tail = term.partition("...")
        middle = shape[len(head) : len(shape) - len(tail)] if "..." in term else ()
        labelled = list(zip(head, shape[: len(head)], strict=True)) + list(
            zip(tail, shape[len(shape) - len(tail) :], strict=True)
        )
        for label, size in labelled:
            sizes[label] = max(sizes.get(label, 1), size)
        broadcast = tuple(np.broadcast_shapes(broadcast, tuple(middle)))
    return int(np.prod(list(sizes.values()), dtype=np.int64) * np.prod(broadcast, dtype=np.int64))


def _attention_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]], attrs: dict) -> int:
    """com.microsoft Attention: the packed QKV projection of input [B, S, D] by weights [D, 3H],
    then Q·Kᵀ and the weighted sum of V ([B, S, S, H] each). MultiHeadAttention gets Q, K, V
    already projected: only the two products."""
    query = shapes[node.input[0]]
    batch, length = query[0], query[1]
    if node.op_type == "Attention":
        inner, packed = shapes[node.input[1]]
        width = packed // 3
        return batch * length * inner * packed + 2 * batch * length * length * width
    key = shapes.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    key_length = key[1] if key is not None and len(key) == 3 else length
    return 2 * batch * length * key_length * query[-1]


def pruned_macs(macs: dict[str, int], blocks: list[MlpBlock], plan: Plan) -> int:
    """MACs after pruning: each block's fc1 (gate, up) and fc2 scale exactly by kept / width."""
    kept = {}
    for block in blocks:
        for site in block.sites:
            for ref in (*site.fc1_params, site.fc2_weight):
                kept[ref.node] = (plan.keep[block.name].size, block.width)
    return sum(m * kept[k][0] // kept[k][1] if k in kept else m for k, m in macs.items())


@dataclass
class Report:
    """What one pruning run did: its options, the model before and after, and where the
    statistics came from; `eval` once the result is evaluated. `to_dict` is its JSON form (the
    field order is the JSON's; README, "JSON report", lists the fields)."""

    ratio: float
    method: str
    scope: str
    min_keep: int
    round_to: int
    compensate: str
    ridge_lambda: float
    ranking_lambda: float
    score: str
    model: str
    output: str
    blocks: list[dict]  # block_rows
    skipped: list[dict]  # {"name", "reason"} of each structural match that cannot be pruned
    neurons_before: int
    neurons_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    file_bytes_before: int
    file_bytes_after: int
    calibration: dict  # samples, seconds, and the data (or statistics file) they came from
    versions: dict
    allocation: dict | None = None  # obs's global allocation: which (and the errors, when measured)
    reconstruct: list[dict] | None = None  # refit_rows, with --reconstruct
    eval: dict | None = None  # evaluate's result and its data

    def to_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        for optional in ("allocation", "reconstruct", "eval"):
            if fields[optional] is None:
                del fields[optional]
        return fields


def refit_rows(outcomes: dict[str, Refit | str]) -> list[dict]:
    """Each block's `--reconstruct` outcome as the report lists it: whether it was refit, its
    held-out errors (relative to its output's variance) before and after, the step kept, the
    loss they are measured by, and why not where it was not."""
    rows = []
    for name, outcome in outcomes.items():
        if isinstance(outcome, str):
            rows.append({"block": name, "refit": False, "reason": outcome})
            continue
        row = {
            "block": name,
            "refit": outcome.weights is not None,
            # NaN (no held-out samples) is not JSON
            "held_error_before": None if math.isnan(outcome.held_error_before) else outcome.held_error_before,
            "held_error_after": None if math.isnan(outcome.held_error_after) else outcome.held_error_after,
            "step": outcome.step,
            "loss": outcome.loss,
        }
        if outcome.reason:
            row["reason"] = outcome.reason
        rows.append(row)
    return rows


def skipped_rows(blocks: BlockList) -> list[dict]:
    """Each structural match that cannot be pruned, with the reason, as the report lists it."""
    return [{"name": s.name, "reason": s.reason} for s in blocks.skipped]


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
    if found["blocks"]:
        moments = found["second_moments"]
        lines.append(
            f"second moments (--method obs): {moments['bytes'] / 2**30:.2f} GiB of a "
            f"{moments['budget'] / 2**30:.1f} GiB budget"
            + (
                ""
                if moments["fits"]
                else f": over it, the default would calibrate in {moments['passes']} passes over the data"
                if moments["passes"]
                else f": over it ({moments['fallback']}), the default would fall back to --method vbp"
            )
        )
    lines += [f"hint: {hint}" for hint in found["hints"]]
    return "\n".join(lines)


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def format_table(report: Report) -> str:
    """The report as a short human-readable table."""
    lines = [f"{'block':<36} {'activation':<11} {'width':>13}"]
    for b in report.blocks:
        lines.append(f"{b['name'][-36:]:<36} {b['activation']:<11} {b['width_before']:>6} -> {b['width_after']:<5}")
    lines.append("")
    lines.append(f"{'':<14} {'before':>14} {'after':>14} {'change':>8}")
    for key, label in (("params", "params"), ("macs", "MACs/sample"), ("file_bytes", "file bytes")):
        before, after = getattr(report, f"{key}_before"), getattr(report, f"{key}_after")
        lines.append(f"{label:<14} {before:>14,} {after:>14,} {_change(before, after):>8}")
    evaluation = report.eval
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
    cal = report.calibration
    if "images" in cal:
        images = cal["images"]
        lines.append(f"photos scaled to [0, 1], then normalized with mean {images['mean']} and std {images['std']}")
    settings = [f"--method {report.method}", report.scope, f"ratio {report.ratio}"]
    allocation = (report.allocation or {}).get("allocation", "stream")
    if allocation != "stream":
        settings.append(f"allocation {allocation}")
    if report.score == "obs" and report.ranking_lambda != report.ridge_lambda:
        settings.append(f"ranking λ {report.ranking_lambda:g}")
    lines.append(
        f"calibrated on {cal['samples']} samples in {cal['seconds']:.1f} s; "
        f"pruned {report.neurons_before - report.neurons_after} of {report.neurons_before} "
        f"MLP neurons ({', '.join(settings)})"
    )
    return "\n".join(lines)
