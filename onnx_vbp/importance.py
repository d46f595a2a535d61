"""Importance criteria for select: in which order each block's neurons are removed, and at what cost.

Kept apart from the pruner (as Torch-Pruning does): select only merges the blocks' rankings by
cost and cuts at the budget.
- "variance" (the paper, VBP): Var(h_j), the hidden activation's variance after the nonlinearity.
- "variance-x-norm" (FLAP's fluctuation metric): Var(h_j) * ||W2[j, :]||^2, the variance of
  neuron j's contribution to fc2's output.
- "obs" (structured Optimal Brain Surgeon, as in OB²C/DVBP, ZipLM, SlimGPT): with fc2's output
  y = W2ᵀh + b and the hidden covariance Σ, removing neuron j and optimally re-fitting the kept
  rows of W2 (the ridge compensation) costs

      E_j = ||W2[j]||² / [Σ⁻¹]_jj        (added output variance, summed over fc2's outputs)

  Neurons are removed greedily, each removal downdating Σ⁻¹ and moving its row into the others
  (the OBS update), so a neuron that the kept ones can reproduce costs nothing. W2's columns
  are first multiplied by any layer scale between fc2 and the residual stream, and each block's
  costs are divided by the energy of the residual stream its output joins (per position, the
  sum of squared deviations from the position's mean: what the next LayerNorm divides by). The
  global budget thus goes where the error relative to the stream is smallest: the same units in
  every block, pre-LN or post-LN (a fused SkipLayerNormalization's sum included). Where a
  block's stream is unknown (no residual Add after it), every block's costs are divided by its
  output variance tr(W2ᵀΣW2).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from onnx_vbp.graph import ConstantReader, dequantized_rows
from onnx_vbp.options import DEFAULT_RIDGE_LAMBDA, SCORES
from onnx_vbp.records import MlpBlock, ParamRef, Ranking
from onnx_vbp.runtime import available_cores
from onnx_vbp.stats import Stats


def fc2_rows(
    model: onnx.ModelProto, blocks: list[MlpBlock], external_dir: Path | None = None, *, to_residual: bool = False
) -> dict[str, np.ndarray]:
    """fc2's weight of every block as a float64 [width, outputs] matrix (first site; tied sites
    share it). `to_residual`: each output column times the layer scale that multiplies it before
    the residual stream (MlpSite.output_scale), so the rows say what a neuron adds to the stream."""
    reader = ConstantReader(model, external_dir)

    def constant(ref: ParamRef) -> np.ndarray:
        return reader.value(ref.node, ref.input).astype(np.float64)

    rows = {}
    for block in blocks:
        site = block.sites[0]
        weight = np.moveaxis(constant(site.fc2_weight), site.fc2_weight.axis, 0).reshape(block.width, -1)
        if site.fc2_dequantize is not None:
            scale, zero_point = site.fc2_dequantize
            weight = dequantized_rows(weight, constant(scale), None if zero_point is None else constant(zero_point))
        if to_residual and site.output_scale is not None:
            weight = weight * constant(site.output_scale).reshape(1, -1)
        rows[block.name] = weight
    return rows


def obs_ranking(
    weight: np.ndarray,
    covariance: np.ndarray,
    depth: int,
    ridge_lambda: float = DEFAULT_RIDGE_LAMBDA,
    precision: type | None = None,
) -> Ranking:
    """Greedy structured OBS removal order of the rows of `weight` [width, outputs] (fc2, fed by a
    hidden activation of covariance `covariance`), `depth` steps deep, costs not yet normalized:
    `greedy_obs` on `hessian_inverse`."""
    return greedy_obs(weight, hessian_inverse(covariance, ridge_lambda, precision), depth)


def hessian_inverse(
    covariance: np.ndarray, ridge_lambda: float = DEFAULT_RIDGE_LAMBDA, precision: type | None = None, count: float = 1
) -> np.ndarray | None:
    """S, the inverse of the OBS Hessian Σ + λI (λ = ridge_lambda x mean variance, as rewrite's
    ridge), with Σ = `covariance` / `count` (a comoment and its count: Σ is formed in S's precision
    in one pass); None when every neuron is constant (removing any costs nothing once its mean is
    folded).

    `precision` of S: by default float32 for blocks at least FLOAT32_WIDTH wide whose relative λ is
    at least FLOAT32_LAMBDA, where the ranking takes 40 % less time and keeps about 7 - log10(1/λ)
    digits of each cost; float64 otherwise.
    """
    width = covariance.shape[0]
    scale = np.trace(covariance) / max(count, 1) / max(width, 1)
    if scale == 0.0:
        return None
    relative_lambda = max(ridge_lambda, MIN_RANKING_LAMBDA)
    if precision is None:
        wide_enough = width >= FLOAT32_WIDTH and relative_lambda >= FLOAT32_LAMBDA
        precision = np.float32 if wide_enough else np.float64
    hessian = np.multiply(covariance, 1.0 / max(count, 1), dtype=precision)
    hessian[np.diag_indices(width)] += relative_lambda * scale
    return spd_inverse(hessian)


def greedy_obs(weight: np.ndarray, inverse: np.ndarray | None, depth: int) -> Ranking:
    """Greedy structured OBS removal order of the rows of `weight` [width, outputs], `depth` steps
    deep, from S = `inverse` (`hessian_inverse`, not modified).

    Each round picks the next few neurons P by exact greedy OBS among the cheapest candidates (a
    rank-1 downdate of the candidates' part of S per pick), then removes P from every kept neuron
    at once: S -= S[:,P] S[P,P]⁻¹ S[P,:] (the Schur complement: S stays the inverse of the kept
    neurons' Hessian) and W2 -= S[:,P] S[P,P]⁻¹ W2[P] (the OBS update). The downdates are kept as
    low-rank factors, S = S₀ - GGᵀ, never applied to the whole matrix: a round costs O(width x
    removed so far), not O(width²). The result equals removing one neuron at a time unless a
    neuron outside the candidates became the cheapest within a round. W2's rows and the factors
    are kept in S's precision; the candidates' picks are always float64.
    """
    width = weight.shape[0]
    depth = min(depth, width)
    if inverse is None:
        return Ranking(np.arange(depth), np.zeros(depth), width)
    precision = inverse.dtype
    diagonal = np.diag(inverse).astype(np.float64)  # of the current S
    rows = np.array(weight, dtype=precision)  # current (compensated) rows of W2
    norms = np.einsum("ij,ij->i", rows, rows)  # their squared norms
    factors = np.empty((width, depth), dtype=precision)  # G
    # W2's rows are updated a cache-sized slice at a time, their norms taken while it is in cache:
    # one pass over W2 per round instead of four (memory bandwidth, not arithmetic, limits blocks
    # ranked in parallel)
    slice_rows = max(1, UPDATE_SLICE_BYTES // max(rows.shape[1] * rows.itemsize, 1))
    update_slice = np.empty((min(slice_rows, width), rows.shape[1]), dtype=precision)
    active = np.ones(width, dtype=bool)
    order, costs = np.empty(depth, dtype=np.int64), np.empty(depth)
    done = 0
    while done < depth:
        left = np.flatnonzero(active)
        # the round's size and candidates depend only on what is left, so a shallower ranking is a prefix
        round_size = max(1, left.size // ROUND_FRACTION)
        count = min(depth - done, round_size)
        cost = norms[left].astype(np.float64) / diagonal[left]
        pool = left[np.argsort(cost, kind="stable")[: POOL_FACTOR * round_size]]
        g_pool = factors[pool, :done]
        sub_inverse = (inverse[np.ix_(pool, pool)] - g_pool @ g_pool.T).astype(np.float64)
        # the candidates' rows only matter through their inner products: their Gram matrix,
        # downdated with them, is pool² per pick instead of pool x outputs
        pool_rows = rows[pool]
        gram = (pool_rows @ pool_rows.T).astype(np.float64)
        alive = np.ones(pool.size, dtype=bool)
        picked = np.empty(count, dtype=np.int64)
        gram_diagonal, inverse_diagonal = gram.diagonal(), sub_inverse.diagonal()  # views
        pool_cost, update = np.full(pool.size, np.inf), np.empty_like(gram)
        with np.errstate(divide="ignore", invalid="ignore"):
            for step in range(count):
                np.divide(gram_diagonal, inverse_diagonal, out=pool_cost, where=alive)  # the picked stay at inf
                j = int(np.argmin(pool_cost))
                picked[step], costs[done + step] = j, pool_cost[j]
                alive[j], pool_cost[j] = False, np.inf
                column = sub_inverse[j] / sub_inverse[j, j]  # both matrices are symmetric: row j is column j
                # rows -= column rowⱼᵀ, so gram -= column gⱼᵀ + gⱼ columnᵀ - gram_jj column columnᵀ
                np.multiply.outer(column, gram[j] - 0.5 * gram[j, j] * column, out=update)
                gram -= update
                gram -= update.T
                np.multiply.outer(column, sub_inverse[j], out=update)
                sub_inverse -= update
        removed = pool[picked]
        # S[:, P], from S's rows (S is symmetric): a row gather reads memory in order, a column gather does not
        columns = (inverse[removed] - factors[removed, :done] @ factors[:, :done].T).T
        # S[P,P]⁻¹ = half halfᵀ, from its eigenvectors: rounding can leave it barely indefinite
        values, vectors = np.linalg.eigh(columns[removed].astype(np.float64))
        usable = values > max(values[-1], 0.0) * 1e-12
        half = (vectors[:, usable] / np.sqrt(values[usable])).astype(precision)
        new = columns @ half  # G Gᵀ += S[:,P] S[P,P]⁻¹ S[P,:]
        mixed_rows = half.T @ rows[removed]  # rows -= new @ mixed_rows
        for start in range(0, width, slice_rows):
            stop = min(start + slice_rows, width)
            np.matmul(new[start:stop], mixed_rows, out=update_slice[: stop - start])
            rows[start:stop] -= update_slice[: stop - start]
            norms[start:stop] = np.einsum("ij,ij->i", rows[start:stop], rows[start:stop])
        factors[:, done : done + count] = 0.0
        factors[:, done : done + usable.sum()] = new
        diagonal -= np.einsum("ij,ij->i", new, new)
        order[done : done + count] = removed
        active[removed] = False
        done += count
    return Ranking(order, np.maximum(costs, 0.0), width)


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix, exactly symmetric, in the matrix's
    precision, by its Cholesky factor (LAPACK potrf and potri: n³/2 multiply-adds against about
    1.4 n³ for numpy's LU inverse), without holding the GIL (`_cholesky_inverse`). A matrix that
    is not positive definite in floating point falls back to the LU inverse."""
    if matrix.shape[0] == 0:
        return np.array(matrix)
    # symmetric: a C-ordered matrix's transpose is itself in Fortran order, copied without a transpose
    factor = (matrix.T if matrix.flags.c_contiguous else matrix).copy(order="F")
    if factor.dtype not in (np.float32, np.float64) or _cholesky_inverse(factor) != 0:
        return np.linalg.inv(matrix)
    inverse = factor.T  # C order; potri wrote the lower triangle of the Fortran matrix
    for start in range(0, inverse.shape[0], SYMMETRIZE_ROWS):
        stop = start + SYMMETRIZE_ROWS
        diagonal_block = inverse[start:stop, start:stop]
        diagonal_block[...] = np.triu(diagonal_block) + np.triu(diagonal_block, 1).T
        inverse[stop:, start:stop] = inverse[start:stop, stop:].T
    return inverse


def _cholesky_inverse(factor: np.ndarray) -> int:
    """Overwrite the lower triangle of the Fortran-ordered float32/float64 `factor` with its
    inverse (LAPACK potrf, then potri); LAPACK's info, 0 when positive definite.

    Through SciPy's Cython LAPACK (its C function pointers, called by ctypes), which releases the
    GIL, so that blocks take their inverses in parallel threads; SciPy's Python wrappers hold it
    (two threads calling them took 3.69 s against 3.46 s one after the other). Where those
    pointers cannot be had, the Python wrappers."""
    prefix = "s" if factor.dtype == np.float32 else "d"
    potrf, potri = _nogil_lapack(prefix + "potrf"), _nogil_lapack(prefix + "potri")
    if potrf is None or potri is None:
        potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (factor,))
        inverse, info = potrf(factor, lower=True, overwrite_a=True, clean=False)
        if info == 0:
            inverse, info = potri(inverse, lower=True, overwrite_c=True)
        if inverse is not factor:  # the wrapper worked on a copy
            factor[...] = inverse
        return info
    width, info = ctypes.c_int(factor.shape[0]), ctypes.c_int(0)
    potrf(b"L", ctypes.byref(width), factor.ctypes.data, ctypes.byref(width), ctypes.byref(info))
    if info.value == 0:
        potri(b"L", ctypes.byref(width), factor.ctypes.data, ctypes.byref(width), ctypes.byref(info))
    return info.value


@functools.cache
def _nogil_lapack(name: str) -> Callable | None:
    """SciPy's Cython LAPACK routine `name` (uplo, n, a, lda, info), as a ctypes function."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
        pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi)
        )(capsule, capsule_name(capsule))
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return None
    integer = ctypes.POINTER(ctypes.c_int)
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, integer, ctypes.c_void_p, integer, integer)(pointer)


SYMMETRIZE_ROWS = 256  # rows of the upper triangle mirrored at once: cache-sized transposes

# The ranking's Hessian is regularized by at least this (relative) λ: each Schur downdate of S
# cancels about log10(1/λ) digits, so a smaller λ would leave rounding noise in place of S.
MIN_RANKING_LAMBDA = 1e-6
# A round removes at most 1/ROUND_FRACTION of the remaining neurons, chosen among POOL_FACTOR
# times as many candidates: fine enough that rounds match one-at-a-time greedy on real models,
# coarse enough that a 3072-wide block needs a few hundred matrix products, not thousands.
ROUND_FRACTION = 64
POOL_FACTOR = 4
# Wide blocks are ranked in float32 (the inverse is most of their time) unless λ is so small that
# the downdates would cancel most of float32's 7 digits.
FLOAT32_WIDTH = 1024
FLOAT32_LAMBDA = 1e-4
# Blocks ranked at once share this much memory, each at most this many bytes per entry of its
# [width, width] Hessian (float64: the Hessian, its inverse, the downdate factors and W2's rows).
RANKING_MEMORY = 2 << 30
RANKING_BYTES_PER_ENTRY = 24
UPDATE_SLICE_BYTES = 512 << 10  # half a core's L2 cache


def rankings(
    stats: dict[str, Stats],
    score: str = "variance",
    model: onnx.ModelProto | None = None,
    blocks: list[MlpBlock] | None = None,
    *,
    depth: int | Mapping[str, int] | None = None,
    external_dir: Path | None = None,
    ridge_lambda: float = DEFAULT_RIDGE_LAMBDA,
) -> dict[str, Ranking]:
    """Each block's removal order and step costs under criterion `score`.

    "variance-x-norm" and "obs" also need `model` and `blocks` (fc2's weights); "obs" needs
    statistics with second moments (`calibrate(..., comoments=True)`). `depth` bounds how many
    removals "obs" ranks per block (default: all); a mapping ranks only the blocks it names, each
    to its own depth, with the costs every block would have (same units as ranking them all). The
    other criteria always rank every neuron of every block.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "variance":
        return {name: Ranking.by_score(s.variance) for name, s in stats.items()}
    if score == "variance-x-norm":
        weights = fc2_rows(model, blocks, external_dir)
        return {name: Ranking.by_score(s.variance * np.square(weights[name]).sum(axis=1)) for name, s in stats.items()}
    depths = (
        depth
        if isinstance(depth, Mapping)
        else {name: s.mean.size if depth is None else depth for name, s in stats.items()}
    )
    without = [name for name in depths if stats[name].comoment is None]
    if without:
        raise ValueError(f"'obs' needs statistics with second moments; block {without[0]!r} was calibrated without")
    weights = fc2_rows(model, [b for b in blocks if b.name in depths], external_dir, to_residual=True)
    # every block's stream must be known to use them: a subset's costs stay in the whole model's units
    streams_known = all(s.stream_energy for s in stats.values())

    def rank(name: str) -> Ranking:
        block = stats[name]
        if streams_known:
            scale = block.stream_energy
        else:  # some block's residual stream is unknown: relative to the block's own output variance
            scale = float(np.sum((block.covariance @ weights[name]) * weights[name]))  # tr(W2ᵀΣW2)
        inverse = hessian_inverse(block.comoment, ridge_lambda, count=block.count)
        ranking = greedy_obs(weights[name], inverse, depths[name])
        return Ranking(ranking.order, ranking.cost / max(scale, np.finfo(float).tiny), ranking.width)

    # blocks in parallel threads, one BLAS thread each: LAPACK (`_cholesky_inverse`) and numpy's
    # products run without the GIL, and more BLAS threads per block would only contend for the cores
    widest = max((stats[name].mean.size for name in depths), default=1)
    workers = min(available_cores(), len(depths), RANKING_MEMORY // (RANKING_BYTES_PER_ENTRY * widest**2))
    with threadpool_limits(1), ThreadPoolExecutor(max(workers, 1)) as pool:
        return dict(zip(depths, pool.map(rank, depths), strict=True))
