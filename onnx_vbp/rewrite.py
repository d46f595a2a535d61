"""Stage 5, rewrite: slice the pruned neurons out of each block and fold their mean into fc2's bias.

For a block with hidden activation h (fc2's input), pruned neurons P and kept neurons K:

    fc2(h) = W2[K]ᵀ h[K] + W2[P]ᵀ h[P] + b2  ≈  W2[K]ᵀ h[K] + (b2 + W2[P]ᵀ mean[P])

so a neuron whose activation is constant is removed exactly. Constants are edited in place only
when no node outside the block reads them; otherwise (exporters merge identical initializers, e.g.
all-zero biases or reshape targets) the block gets its own copy first.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_vbp.graph import (
    DEQUANTIZERS,
    DiskWeights,
    TracedParam,
    block_axis,
    dequantized_rows,
    export_model,
    import_graph,
    indexed_axes,
    nodes_by_key,
    param_input,
    quantize,
    quantizer_inputs,
    trace_input,
    trace_param,
)
from onnx_vbp.nbits import PackedWeight
from onnx_vbp.options import COMPENSATIONS, DEFAULT_RIDGE_LAMBDA
from onnx_vbp.records import BiasRef, BlockWeights, MlpBlock, MlpSite, ParamRef, Plan, Refit
from onnx_vbp.stats import Stats


class _Editor:
    """The live graph plus what rewriting it needs: nodes by key, fresh names, and the external
    tensors of a model whose weights are still on disk (read one at a time, only when edited)."""

    def __init__(self, model: onnx.ModelProto, external_dir: Path | None) -> None:
        self.disk = DiskWeights(model, external_dir)
        self.graph = import_graph(model)
        self.nodes = nodes_by_key(self.graph)
        self.tensors = self.graph.tensors()
        self.graph_outputs = {id(t) for t in self.graph.outputs}
        self._taken = set(self.tensors) | {n.name for n in self.graph.nodes}
        self.edited: set[str] = set()  # constants handed out for editing (export converts only these)
        self._done: set[tuple[str, int]] = set()  # (edit, id of the constant) already applied
        self.packed: dict[int, PackedWeight] = {}  # MatMulNBits weights handed out, by id of B

    def once(self, edit: str, constant: gs.Constant) -> bool:
        """True the first time `edit` is asked for on `constant`: the sites of a tied block reach
        the same constants, which are sliced, refit or given a bias once."""
        key = (edit, id(constant))
        if key in self._done:
            return False
        self._done.add(key)
        return True

    def fresh(self, base: str) -> str:
        for i in itertools.count():
            name = f"{base}_vbp{i}"
            if name not in self._taken:
                self._taken.add(name)
                return name
        raise AssertionError("unreachable")

    def owned(self, node: gs.Node, index: int, readers: set[int]) -> TracedParam | PackedWeight:
        """The constant feeding `node.inputs[index]`, copied first if anything outside `readers`
        (ids of the block's nodes) reads it or the pass-through chain in between."""
        traced = trace_input(node, index)
        if isinstance(traced, PackedWeight):
            return self._owned_packed(node, readers)
        self.disk.load(traced.source)
        allowed = readers | {id(n) for n in traced.chain}
        shared = any(
            id(t) in self.graph_outputs or any(id(c) not in allowed for c in t.outputs) for t in traced.tensors()
        )
        if shared:
            tensor: gs.Tensor = gs.Constant(self.fresh(traced.source.name), np.array(traced.source.values))
            position = self.graph.nodes.index(node)
            for link in reversed(traced.chain):
                out = gs.Variable(self.fresh(link.outputs[0].name), link.outputs[0].dtype, link.outputs[0].shape)
                inputs = list(link.inputs)
                inputs[param_input(link)] = tensor
                name = self.fresh(link.name or link.op)
                clone = gs.Node(link.op, name, dict(link.attrs), inputs, [out], domain=link.domain)
                self.graph.nodes.insert(position, clone)
                position += 1
                tensor = out
            node.inputs[index] = tensor
            traced = trace_param(tensor)
        self.edited.add(traced.source.name)
        for link in traced.chain:
            if link.op in DEQUANTIZERS:  # its scale and zero point are sliced or widened with the weight
                self._own_inputs(link, quantizer_inputs(link), {id(link)})
        return traced

    def _owned_packed(self, node: gs.Node, readers: set[int]) -> PackedWeight:
        """A MatMulNBits' weight, its B, scales and zero points copied first where a node outside
        `readers` reads them; one record per B, edited until `pack_all`."""
        self._own_inputs(node, [i for i in (1, 2, 3) if i < len(node.inputs) and node.inputs[i].name], readers)
        return self.packed.setdefault(id(node.inputs[1]), PackedWeight.of(node))

    def pack_all(self) -> None:
        """Quantize every edited MatMulNBits weight back into its blocks."""
        for packed in self.packed.values():
            packed.pack()

    def _own_inputs(self, node: gs.Node, indices: list[int], allowed: set[int]) -> None:
        """Give `node` its own copy of its constant inputs `indices` (a dequantizer's scale and
        zero point, a MatMulNBits' packed weight) where a node outside `allowed` (ids) reads them
        too, and mark them edited."""
        for index in indices:
            constant = node.inputs[index]
            self.disk.load(constant)
            if any(id(reader) not in allowed for reader in constant.outputs):
                constant = gs.Constant(self.fresh(constant.name), np.array(constant.values))
                node.inputs[index] = constant
            self.edited.add(constant.name)

    def own_node(self, node: gs.Node, region: set[str]) -> gs.Node:
        """`node`, or a copy of it for this block's nodes (those writing a tensor named in
        `region`) when other nodes read its outputs too: torch's dynamic export builds a shape
        once by Concat and hands it to the Reshapes of every block, which keep different widths."""
        consumers = [c for t in node.outputs for c in t.outputs]
        mine = [c for c in consumers if any(o.name in region for o in c.outputs)]
        if len(mine) == len(consumers) and not any(id(t) in self.graph_outputs for t in node.outputs):
            return node
        outputs = [gs.Variable(self.fresh(t.name), t.dtype, t.shape) for t in node.outputs]
        clone = gs.Node(
            node.op, self.fresh(node.name or node.op), dict(node.attrs), list(node.inputs), outputs, domain=node.domain
        )
        self.graph.nodes.insert(self.graph.nodes.index(node) + 1, clone)
        replacement = {id(old): new for old, new in zip(node.outputs, outputs, strict=True)}
        for consumer in mine:
            for index, tensor in enumerate(consumer.inputs):
                if id(tensor) in replacement:
                    consumer.inputs[index] = replacement[id(tensor)]
        return clone

    def insert_bias_add(self, node: gs.Node, bias: np.ndarray) -> None:
        """Give a bias-less MatMul one: MatMul -> Add(bias) -> (former consumers)."""
        out = node.outputs[0]
        inner = gs.Variable(self.fresh(out.name), out.dtype, out.shape)
        node.outputs.clear()
        node.outputs.append(inner)
        const = gs.Constant(self.fresh(f"{node.name or 'fc2'}.bias"), bias)
        add = gs.Node("Add", self.fresh(f"{node.name or 'fc2'}/bias"), inputs=[inner, const], outputs=[out])
        self.graph.nodes.insert(self.graph.nodes.index(node) + 1, add)


def rewrite(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    stats: dict[str, Stats],
    plan: Plan,
    *,
    compensate: str = "mean",
    ridge_lambda: float = DEFAULT_RIDGE_LAMBDA,
    external_dir: Path | None = None,
) -> onnx.ModelProto:
    """Return a pruned copy of `model` keeping `plan.keep[block.name]` neurons of each block.

    With `compensate="mean"` the pruned neurons' mean contribution is folded into fc2's bias
    (created if fc2 had none); `"ridge"` also updates fc2's kept rows by a ridge regression of
    the pruned neurons on the kept ones (needs `calibrate(..., comoments=True)`, see
    `compensation`); `"none"` drops them outright. `model` is not modified. For a model
    loaded without its external data, `external_dir` is its folder: only the weights that are
    sliced are read, and the others stay references to the original data files.
    """
    if compensate not in COMPENSATIONS:
        raise ValueError(f"compensate must be one of {COMPENSATIONS}, got {compensate!r}")
    editor = _Editor(model, external_dir)
    for block in blocks:
        keep = plan.keep[block.name]
        if keep.size == block.width:
            continue
        pruned = plan.pruned(block.name, block.width)
        readers = _block_readers(editor, block)
        if compensate != "none":
            _compensate(editor, block, stats[block.name], keep, pruned, readers, compensate, ridge_lambda)
        _slice(editor, block, keep, readers)
    editor.pack_all()
    pruned = export_model(editor.graph, model, editor.edited)
    # A gs graph is a web of reference cycles (nodes <-> tensors): collect it now, or a large
    # model's sliced weights linger beside their exported copy until the next GC pass.
    del editor
    gc.collect()
    return pruned


def refit_weights(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    fit: Callable[[MlpBlock, BlockWeights], Refit],
    *,
    external_dir: Path | None = None,
) -> tuple[onnx.ModelProto, dict[str, Refit | str]]:
    """Return a copy of `model` in which each block's fc1 and fc2 weights (and fc1's bias) are
    what `fit(block, weights)` makes of them, and its delta is added to fc2's bias; with each
    block's outcome, or why it was not offered to `fit`. Only float weights, of plain MatMul or
    Gemm nodes (alpha = beta = 1), are refit. `model` is not modified."""
    editor = _Editor(model, external_dir)
    outcomes: dict[str, Refit | str] = {}
    for block in blocks:
        found = _refit_params(editor, block)
        if isinstance(found, str):
            outcomes[block.name] = found
            continue
        refs, params, readers = found
        site = block.sites[0]
        values = [param.value() for param in params]
        fc1 = np.moveaxis(values[0], refs[0].axis, -1)
        fc2 = np.moveaxis(values[1], refs[1].axis, 0)
        fc1_bias = values[2].reshape(-1) if len(values) > 2 else None
        refit = fit(block, BlockWeights(fc1, fc1_bias, fc2))
        outcomes[block.name] = refit
        if refit.weights is None:
            continue
        new = [np.moveaxis(refit.weights.fc1, -1, refs[0].axis), np.moveaxis(refit.weights.fc2, 0, refs[1].axis)]
        if fc1_bias is not None:
            new.append(refit.weights.fc1_bias.reshape(values[2].shape))
        for param, value, old in zip(params, new, values, strict=True):
            param.assign(np.asarray(value, dtype=old.dtype))
        _add_to_bias(editor, site.fc2_bias, refit.fc2_bias_delta * site.fc2_bias.scale, values[1].dtype, readers)
    refit_model = export_model(editor.graph, model, editor.edited)
    del editor
    gc.collect()
    return refit_model, outcomes


def refit_blockers(model: onnx.ModelProto, blocks: list[MlpBlock]) -> dict[str, str]:
    """Why `refit_weights` would not offer a block's weights to its fit, by block name (a block
    it would offer is absent): known from the graph alone, before any data is read for it. No
    weight is read from external data or copied: the constants' dtypes and shapes suffice."""
    nodes = nodes_by_key(import_graph(model))
    reasons = {}
    for block in blocks:
        refs = _refit_refs(block)
        reason = _unrefittable(nodes, refs, [trace_param(nodes[ref.node].inputs[ref.input]) for ref in refs])
        if reason is not None:
            reasons[block.name] = reason
    return reasons


def _refit_refs(block: MlpBlock) -> list[ParamRef]:
    """fc1's weight, fc2's weight, then fc1's bias (and an integer fc1's scale and zero point)."""
    site = block.sites[0]
    return [site.fc1_params[0], site.fc2_weight, *site.fc1_params[1:]]


def _refit_params(editor: _Editor, block: MlpBlock) -> tuple[list[ParamRef], list, set[int]] | str:
    """The block's fc1 weight, fc2 weight and fc1 bias (refs and editable params) and the nodes
    that may read them, or why they cannot be refit in place."""
    readers = _block_readers(editor, block)
    refs = _refit_refs(block)
    params = [editor.owned(editor.nodes[ref.node], ref.input, readers) for ref in refs]
    reason = _unrefittable(editor.nodes, refs, params)
    return (refs, params, readers) if reason is None else reason


# The nodes whose weights `refit_weights` edits: fc1's and fc2's products, and the nodes that may
# hold fc1's bias (an Add, or ORT's fused BiasGelu / FastGelu).
REFIT_READERS = ("MatMul", "Gemm", "Add", "BiasGelu", "FastGelu")


def _unrefittable(nodes: dict[str, gs.Node], refs: list[ParamRef], params: list) -> str | None:
    """Why these weights cannot be refit in place: quantized, scaled by a Gemm, or not 2-D."""
    if len(refs) > 3:
        return "fc1 is quantized"
    for ref, param in zip(refs, params, strict=True):
        node = nodes[ref.node]
        scaled = node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0
        if node.op not in REFIT_READERS or scaled:
            return f"its weights are read by {node.op}, not a plain {'/'.join(REFIT_READERS)}"
        if not isinstance(param, TracedParam) or any(link.op in DEQUANTIZERS for link in param.chain):
            return "its weights are quantized"
        if not np.issubdtype(np.dtype(param.source.dtype), np.floating):
            return "its weights are not floating point"
    if len(params[0].shape) != 2 or len(params[1].shape) != 2:
        return "its weights are not matrices"
    return None


def _block_readers(editor: _Editor, block: MlpBlock) -> set[int]:
    """Ids of the nodes that may read the block's constants without forcing a copy: every node
    that edits one, and the Transpose/Cast chains between a constant and its readers at every
    site. Tied sites (ALBERT) reading one weight through chains of their own then share one
    sliced weight, and the full-size original does not stay behind."""
    readers = set()
    for site in block.sites:
        for ref in _block_refs(site):
            node = editor.nodes[ref.node]
            readers.add(id(node))
            traced = trace_input(node, ref.input) if ref.input < len(node.inputs) else None
            readers.update(id(link) for link in (traced.chain if traced else ()))
    return readers


def _block_refs(site: MlpSite) -> list[ParamRef]:
    """Every constant the block edits at this site: they may only be shared within the block."""
    refs = [*site.fc1_params, site.fc2_weight, *site.width_literals]
    refs += [ref for ref in site.fc2_dequantize or () if ref is not None]
    if site.fc2_bias.input is not None:
        refs.append(ParamRef(site.fc2_bias.node, site.fc2_bias.input, -1))
    return refs


def compensation(
    weight: np.ndarray,
    stats: Stats,
    keep: np.ndarray,
    pruned: np.ndarray,
    method: str,
    ridge_lambda: float = DEFAULT_RIDGE_LAMBDA,
) -> tuple[np.ndarray | None, np.ndarray]:
    """How fc2 absorbs the pruned neurons: (new rows for the kept neurons or None, bias change).

    `weight` is fc2's [width, out] matrix (float64). "mean" folds the pruned neurons' mean:
    b += W_pᵀ μ_p. "ridge" also regresses the pruned neurons on the kept ones, with the covariance
    Σ and λ = ridge_lambda · trace(Σ_kk) / |K|:
        W_k' = W_k + (Σ_kk + λI)⁻¹ Σ_kp W_p,   b += W_pᵀ μ_p - (W_k' - W_k)ᵀ μ_k
    which keeps the mean output exact, and is the mean fold when Σ_kp = 0.
    """
    mean = stats.mean
    bias_delta = weight[pruned].T @ mean[pruned]
    if method != "ridge" or keep.size == 0:
        return None, bias_delta
    covariance = stats.covariance
    c_kk = covariance[np.ix_(keep, keep)]
    scale = np.trace(c_kk) / keep.size
    if scale == 0.0:  # every kept neuron is constant: nothing to regress on
        return None, bias_delta
    update = np.linalg.solve(
        c_kk + ridge_lambda * scale * np.eye(keep.size), covariance[np.ix_(keep, pruned)] @ weight[pruned]
    )
    return weight[keep] + update, bias_delta - update.T @ mean[keep]


def _compensate(
    editor: _Editor,
    block: MlpBlock,
    stats: Stats,
    keep: np.ndarray,
    pruned: np.ndarray,
    readers: set[int],
    method: str,
    ridge_lambda: float,
) -> None:
    new_rows = bias_delta = None
    for site in block.sites:
        fc2 = editor.nodes[site.fc2_weight.node]
        traced = editor.owned(fc2, site.fc2_weight.input, readers)
        axis = site.fc2_weight.axis
        effective = traced.value()
        matrix = np.moveaxis(effective.astype(np.float64), axis, 0)  # [width, out, (1, 1)]
        dtype = effective.dtype
        if site.fc2_dequantize is not None:  # an integer fc2 (2-D): its float weight, by output
            scale_ref, zero_ref = site.fc2_dequantize
            scale = editor.owned(editor.nodes[scale_ref.node], scale_ref.input, readers)
            scale_row = scale.value().reshape(1, -1)
            zero = None if zero_ref is None else editor.owned(editor.nodes[zero_ref.node], zero_ref.input, readers)
            zero_row = np.zeros((1, 1)) if zero is None else zero.value().astype(np.float64).reshape(1, -1)
            dtype = scale_row.dtype
            matrix = dequantized_rows(matrix, scale_row, zero_row)
        if bias_delta is None:  # tied sites share fc2's weight: one solution serves all
            new_rows, bias_delta = compensation(
                matrix.reshape(block.width, -1), stats, keep, pruned, method, ridge_lambda
            )
        if new_rows is not None and editor.once("refit", traced.source):
            matrix[keep] = new_rows.reshape(matrix[keep].shape)
            if site.fc2_dequantize is not None:  # back to integers, widening an output's scale where needed
                matrix, wider = quantize(matrix, scale_row, zero_row, effective.dtype)
                scale.assign(wider.reshape(scale.shape))
            traced.assign(np.moveaxis(matrix, 0, axis))
        _add_to_bias(editor, site.fc2_bias, bias_delta * site.fc2_bias.scale, dtype, readers)


def _add_to_bias(editor: _Editor, ref: BiasRef, delta: np.ndarray, dtype: np.dtype, readers: set[int]) -> None:
    node = editor.nodes[ref.node]
    if ref.input is None:
        editor.insert_bias_add(node, delta.astype(dtype))
        return
    if len(node.inputs) <= ref.input or not node.inputs[ref.input].name:
        while len(node.inputs) < ref.input:
            node.inputs.append(gs.Variable.empty())
        bias = gs.Constant(editor.fresh(f"{node.name or node.op}.bias"), delta.astype(dtype))
        if len(node.inputs) == ref.input:
            node.inputs.append(bias)
        else:
            node.inputs[ref.input] = bias
        return
    traced = editor.owned(node, ref.input, readers)
    if not editor.once("bias", traced.source):  # tied sites reading one bias: fold once
        return
    value = traced.value()
    traced.assign(value.astype(np.float64) + delta.reshape(value.shape))


def _slice(editor: _Editor, block: MlpBlock, keep: np.ndarray, readers: set[int]) -> None:
    for site in block.sites:
        for ref in (*site.fc1_params, site.fc2_weight):
            traced = editor.owned(editor.nodes[ref.node], ref.input, readers)
            if not editor.once("slice", traced.source):
                continue
            if isinstance(traced, PackedWeight):
                traced.take(keep, ref.axis)
                continue
            axes = traced.link_axes(ref.axis)
            rank = len(traced.source.shape)  # of every dequantizer's input: it reads the source (through a Cast)
            if any(block_axis(link) == axes[-1] for link in traced.chain):  # cutting across blocks
                traced.assign(np.take(traced.value(), keep, axis=ref.axis))  # quantized into new blocks
                continue
            traced.source.values = np.take(np.asarray(traced.source.values), keep, axis=axes[-1])
            for position, link in enumerate(traced.chain):  # the width at link's output is axes[position]
                if link.op == "Reshape":  # a unit reshape of a bias ([C] -> [1, C, 1, 1]) names the width
                    literal = editor.owned(link, 1, readers | {id(link)}).source
                    target = np.array(literal.values)
                    if target[axes[position]] > 0:  # 0 and -1 follow the sliced input
                        target[axes[position]] = keep.size
                    literal.values = target
                elif link.op in DEQUANTIZERS and axes[-1] in indexed_axes(link, rank):
                    for index in quantizer_inputs(link):  # a scale and zero point per neuron (or per block of each)
                        quantizer = link.inputs[index]
                        values = np.asarray(quantizer.values)  # its shape aligned with the weight's from the right
                        quantizer.values = np.take(values, keep, axis=axes[-1] - (rank - values.ndim))
        for ref in site.width_literals:
            holder = editor.nodes[ref.node]
            if holder.op != "Reshape":  # a Concat building the Reshape's shape: may serve other blocks
                holder = editor.own_node(holder, {name for name, _ in site.width_tensors})
            source = editor.owned(holder, ref.input, readers | {id(holder)}).source
            shape = np.array(source.values)
            shape.reshape(-1)[-1] = keep.size
            source.values = shape
        for name, axis in site.width_tensors:  # shape annotations (value_info) of the hidden tensors
            tensor = editor.tensors.get(name)
            if tensor is None or not tensor.shape or not -len(tensor.shape) <= axis < len(tensor.shape):
                continue
            if tensor.shape[axis] == block.width:
                shape = list(tensor.shape)
                shape[axis] = keep.size
                tensor.shape = shape
