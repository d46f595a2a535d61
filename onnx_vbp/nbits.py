"""MatMulNBits (com.microsoft; ORT's int4 form, `MatMulNBitsQuantizer`): its packed weight read
as the float matrix it stands for, sliced, and packed again.

    Y = A @ W [+ bias],  W [K, N],  W[k, n] = (code[n, k] - zero[n, b]) * scale[n, b],  b = k // block

    B            uint8 [N, blocks, block * bits / 8]  codes along K, low bits first; blocks = ceil(K / block)
    scales       [N, blocks] (or flat)                A's float type; ORT's symmetric quantizer writes
                                                      negative ones (the block's extreme maps to code 0)
    zero_points  uint8 [N, ceil(blocks * bits / 8)]   packed like B (or flat); absent: 2^(bits-1)

Slicing N (fc1's neurons) takes rows of the three tensors: exact. Slicing K (fc2's inputs) or
refitting values cuts across the blocks, so those edits are made on the float matrix, which
`pack` quantizes once at the end (round to nearest per block, symmetric or not as the model was).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

NBITS_OP = "MatMulNBits"
NBITS_DOMAIN = "com.microsoft"
_BITS = (2, 4, 8)


def is_nbits(node: gs.Node) -> bool:
    return node.op == NBITS_OP and node.domain == NBITS_DOMAIN


class PackedWeight:
    """The weight of a MatMulNBits node as the float [K, N] matrix it stands for (the view a
    MatMul's weight has through `graph.trace_param`). Edits that cut across blocks are kept on
    the float matrix until `pack`."""

    def __init__(self, node: gs.Node) -> None:
        self.node = node
        self.matrix: np.ndarray | None = None  # the edited float value, not yet packed

    @classmethod
    def of(cls, node: gs.Node) -> PackedWeight | None:
        """The packed weight of a MatMulNBits node this module reads, else None: B, scales and zero
        points constants of the documented shapes, uint8 zero points, 2, 4 or 8 bits, no g_idx."""
        inputs = node.inputs
        if not is_nbits(node) or len(inputs) < 3 or any(not isinstance(t, gs.Constant) for t in inputs[1:3]):
            return None
        if len(inputs) > 4 and inputs[4].name:  # g_idx: a column order this module does not keep
            return None
        bits, block = int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 0))
        if bits not in _BITS or block <= 0 or "K" not in node.attrs or "N" not in node.attrs:
            return None
        weight = cls(node)
        k, n = weight.shape
        blocks = -(-k // block)
        if tuple(inputs[1].shape) != (n, blocks, block * bits // 8) or int(np.prod(inputs[2].shape)) != n * blocks:
            return None
        zero = weight._zero_points
        if zero is not None:
            row = -(-blocks * bits // 8)
            if not isinstance(zero, gs.Constant) or zero.dtype != np.uint8 or int(np.prod(zero.shape)) != n * row:
                return None
        return weight

    @property
    def source(self) -> gs.Constant:
        """B, the constant that names the weight (tied layers share it)."""
        return self.node.inputs[1]

    @property
    def chain(self) -> list[gs.Node]:
        return []

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N), as a MatMul's weight; read from the attributes, loading nothing."""
        return int(self.node.attrs["K"]), int(self.node.attrs["N"])

    @property
    def _zero_points(self) -> gs.Tensor | None:
        inputs = self.node.inputs
        return inputs[3] if len(inputs) > 3 and inputs[3].name else None

    def tensors(self) -> list[gs.Tensor]:
        """B, the scales and the zero points if present: what slicing the weight edits."""
        return [t for t in (self.node.inputs[1], self.node.inputs[2], self._zero_points) if t is not None]

    def value(self) -> np.ndarray:
        """W [K, N] in the scales' float type."""
        if self.matrix is not None:
            return self.matrix
        bits, block = int(self.node.attrs.get("bits", 4)), int(self.node.attrs["block_size"])
        k, n = self.shape
        scales = np.asarray(self.node.inputs[2].values)
        blocks = -(-k // block)
        codes = _unpack(np.asarray(self.source.values).reshape(n, blocks, -1), bits, block)
        zero = self._zero_points
        zeros = (
            np.full((n, blocks), 1 << (bits - 1))
            if zero is None
            else _unpack(np.asarray(zero.values).reshape(n, -1), bits, blocks)
        )
        weight = (codes - zeros[..., None]) * scales.reshape(n, blocks, 1).astype(np.float64)
        return weight.reshape(n, -1)[:, :k].T.astype(scales.dtype)

    def assign(self, value: np.ndarray) -> None:
        """Replace W (as [K, N]); packed by `pack`."""
        self.matrix = np.asarray(value)

    def take(self, keep: np.ndarray, axis: int) -> None:
        """Keep the rows `keep` of W's `axis` (0: K, 1: N). N of an unedited weight is sliced in
        its packed form, exactly."""
        axis %= 2
        if axis == 1 and self.matrix is None:
            n = self.shape[1]
            for tensor in self.tensors():
                values = np.asarray(tensor.values)
                tensor.values = np.ascontiguousarray(values.reshape(n, -1)[keep].reshape(-1, *values.shape[1:]))
            self._set_shape(self.shape[0], keep.size)
            return
        self.matrix = np.take(self.value(), keep, axis=axis)

    def pack(self) -> None:
        """Quantize an edited W back into B, scales and zero points, in blocks along K, and give
        every MatMulNBits reading B its new K and N. A no-op for an unedited weight."""
        if self.matrix is None:
            return
        bits, block = int(self.node.attrs.get("bits", 4)), int(self.node.attrs["block_size"])
        k, n = self.matrix.shape
        blocks = -(-k // block)
        zero = self._zero_points
        if zero is None:  # symmetric, zero point 2^(bits-1): each block's extreme maps to code 0
            half = 1 << (bits - 1)
            codes, scales, _ = quantize_blocks(self.matrix.T, block, -half, half - 1, symmetric=True)
            codes, zeros = codes + half, np.full((n, blocks), half)
        else:
            codes, scales, zeros = quantize_blocks(self.matrix.T, block, 0, (1 << bits) - 1, symmetric=False)
        self.source.values = _pack(codes.reshape(n, blocks, block), bits)  # B: [N, blocks, bytes]
        self.node.inputs[2].values = _as_stored(scales.astype(self.node.inputs[2].dtype), self.node.inputs[2])
        if zero is not None:
            row_codes = np.zeros((n, -(-blocks * bits // 8) * 8 // bits))
            row_codes[:, :blocks] = zeros
            zero.values = _as_stored(_pack(row_codes, bits), zero)
        self._set_shape(k, n)
        self.matrix = None

    def _set_shape(self, k: int, n: int) -> None:
        for reader in self.source.outputs:
            if is_nbits(reader):
                reader.attrs["K"], reader.attrs["N"] = k, n


def quantize_blocks(
    values: np.ndarray, block: int, lowest: int, highest: int, *, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values [..., size] as integer codes in [lowest, highest], round to nearest, one scale (and
    zero point) per block of `block` along the last axis, the last block padded with zeros:
    (codes [..., blocks * block], scales [..., blocks], zero points [..., blocks]), value =
    (code - zero) * scale. Symmetric: zero point 0 and each block's extreme at `lowest` (ORT's
    4-bit quantizers write it so, hence negative scales); else the block's range, zero included,
    spread over the codes."""
    size = values.shape[-1]
    padded = np.zeros((*values.shape[:-1], -(-size // block) * block))
    padded[..., :size] = values
    blocks = padded.reshape(*values.shape[:-1], -1, block)
    if symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        scales = extreme / (lowest if lowest < 0 else highest)
    else:
        low, high = np.minimum(blocks.min(axis=-1), 0.0), np.maximum(blocks.max(axis=-1), 0.0)
        scales = (high - low) / (highest - lowest)
    scales[scales == 0] = 1.0  # an all-zero block: any scale reads it back as zeros
    zeros = np.zeros(scales.shape) if symmetric else np.clip(np.rint(lowest - low / scales), lowest, highest)
    codes = np.clip(np.rint(blocks / scales[..., None]) + zeros[..., None], lowest, highest)
    return codes.reshape(padded.shape), scales, zeros


def _as_stored(rows: np.ndarray, tensor: gs.Constant) -> np.ndarray:
    """Per-row values [N, m] shaped as `tensor` stores them: [N, m] or flat."""
    return rows if len(tensor.shape) == 2 else rows.reshape(-1)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [..., bytes] -> the first `count` codes of each row, low bits first, as int64."""
    shifts = np.arange(8 // bits) * bits
    codes = (packed[..., None].astype(np.int64) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [..., m] (m a multiple of 8 / bits) -> uint8 [..., m * bits / 8], low bits first."""
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, 8 // bits)
    shifts = (np.arange(8 // bits) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)
