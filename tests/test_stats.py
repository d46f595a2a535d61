"""Streaming statistics: Chan merges of per-batch float64 stats equal a two-pass float64 result."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import BlockSpec, build_model, random_batch

from onnx_vbp import Stats, calibrate, find_mlp_blocks, instrument
from onnx_vbp.runtime import cpu_session
from onnx_vbp.stats import CalibrationError, PooledComoment


def _stream(data: np.ndarray, sizes: list[int]) -> Stats:
    stats = Stats.empty(data.shape[1])
    for chunk in np.split(data, np.cumsum(sizes)[:-1]):
        stats = stats.merge(Stats.of(chunk))
    return stats


def test_streaming_equals_two_pass_with_large_offset() -> None:
    rng = np.random.default_rng(0)
    data = 1e4 + 1e-2 * rng.standard_normal((2000, 7))
    stats = _stream(data, [1, 7, 333, 1000, 659])
    assert stats.count == 2000
    np.testing.assert_allclose(stats.mean, data.mean(axis=0), rtol=1e-14)
    # E[x^2] - E[x]^2 would lose ~all digits here: 1e8 - 1e8 against a variance of 1e-4
    np.testing.assert_allclose(stats.variance, data.var(axis=0), rtol=1e-9)


def _two_pass(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    exact = data.astype(np.float64)
    deviations = exact - exact.mean(axis=0)
    return exact.mean(axis=0), np.square(deviations).sum(axis=0), deviations.T @ deviations


@pytest.mark.parametrize("first_rows", ["like the rest", "far from the rest"])
def test_one_pass_over_chunks_equals_two_pass(first_rows: str) -> None:
    """Wide float32 activations span many cache-sized chunks; the shift is the first chunk's mean,
    which may sit far from the batch mean: the result must still be the two-pass one."""
    rng = np.random.default_rng(2)
    width = 4096  # 64 rows per chunk: 700 rows make 11 chunks
    data = (1e3 + rng.standard_normal((700, width))).astype(np.float32)
    if first_rows == "far from the rest":
        data[:64] -= 50.0
    stats = Stats.of(data)
    mean, m2, _ = _two_pass(data)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(stats.m2, m2, rtol=1e-11)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_reduction_equals_one_thread(workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    data = (5.0 + rng.standard_normal((2000, 300)) * rng.uniform(0.01, 3, 300)).astype(np.float32)
    with ThreadPoolExecutor(workers) as pool:
        stats = Stats.of_parallel(data, pool, workers).with_comoment(data)
    mean, m2, cross = _two_pass(data)
    assert stats.count == 2000
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(stats.m2, m2, rtol=1e-11)
    assert_comoment_close(stats.comoment, cross)


def assert_comoment_close(comoment: np.ndarray, exact: np.ndarray) -> None:
    """The diagonal (m2) exact; off-diagonal terms to float32 rounding of the products, relative
    to the two neurons' standard deviations."""
    np.testing.assert_allclose(np.diag(comoment), np.diag(exact), rtol=1e-11)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.max(np.abs(comoment - exact) / scale) < 1e-5


@pytest.mark.parametrize("stride", [1, 3])
def test_pooled_comoment_equals_chan_merges_across_folds(stride: int) -> None:
    """Batches pooled by total covariance (PooledComoment, folding every FOLD_BATCHES) give the
    comoment of Chan-merging each batch's, with a large offset and batch means that drift."""
    rng = np.random.default_rng(4)
    batches = [
        (1e3 + 0.05 * i + rng.standard_normal((int(rng.integers(3, 40)), 6)) @ rng.standard_normal((6, 6))).astype(
            np.float32
        )
        for i in range(PooledComoment.FOLD_BATCHES * 2 + 5)
    ]
    merged, pooled = Stats.empty(6, comoment=True), PooledComoment(6)
    plain = Stats.empty(6)
    for batch in batches:
        stats = Stats.of(batch)
        merged = merged.merge(stats.with_comoment(batch, stride))
        pooled.add(batch, stats, stride)
        plain = plain.merge(stats)
    result = pooled.of(plain)
    np.testing.assert_array_equal(result.m2, plain.m2)
    np.testing.assert_allclose(result.comoment, merged.comoment, rtol=1e-9)
    if stride == 1:
        assert_comoment_close(result.comoment, _two_pass(np.concatenate(batches))[2])


def test_merge_with_empty_is_neutral_and_order_free() -> None:
    rng = np.random.default_rng(1)
    a, b = Stats.of(rng.normal(size=(5, 3))), Stats.of(rng.normal(3, 2, size=(9, 3)))
    assert Stats.empty(3).merge(a) is a and a.merge(Stats.empty(3)) is a
    ab, ba = a.merge(b), b.merge(a)
    np.testing.assert_allclose(ab.mean, ba.mean)
    np.testing.assert_allclose(ab.m2, ba.m2)


def test_calibrate_matches_two_pass_over_all_tokens() -> None:
    model = build_model([BlockSpec(hidden=16), BlockSpec(hidden=24, act="silu")], seq=5)
    blocks = find_mlp_blocks(model)
    batches = [random_batch(model, batch=b, seed=s) for s, b in enumerate((1, 4, 7))]
    stats = calibrate(model, blocks, batches)

    # reference: the raw hidden activations of all batches (the optimized graph calibration runs),
    # stacked, in one float64 two-pass
    probe = cpu_session(instrument(model, blocks), optimize=True)
    hidden = [probe.run(None, b)[1:] for b in batches]
    for i, block in enumerate(blocks):
        raw = np.concatenate([h[i].reshape(-1, block.width) for h in hidden]).astype(np.float64)
        assert stats[block.name].count == 12 * 5
        np.testing.assert_allclose(stats[block.name].mean, raw.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats[block.name].variance, raw.var(axis=0), rtol=1e-10, atol=1e-14)


def test_calibrate_comoments_of_blocks_sharing_a_product_buffer() -> None:
    """Blocks of one width share calibrate's float32 product buffer: each block's comoment is
    still its own activations' two-pass one, over several batches."""
    model = build_model([BlockSpec(hidden=16), BlockSpec(hidden=16, act="silu"), BlockSpec(hidden=24)], seq=5)
    blocks = find_mlp_blocks(model)
    batches = [random_batch(model, batch=b, seed=s) for s, b in enumerate((2, 5, 3))]
    stats = calibrate(model, blocks, batches, comoments=True)
    probe = cpu_session(instrument(model, blocks), optimize=True)
    hidden = [probe.run(None, b)[1:] for b in batches]
    for i, block in enumerate(blocks):
        raw = np.concatenate([h[i].reshape(-1, block.width) for h in hidden])
        assert_comoment_close(stats[block.name].comoment, _two_pass(raw)[2])


def test_non_finite_activation_names_block_and_batch() -> None:
    model = build_model([BlockSpec()])
    blocks = find_mlp_blocks(model)
    bad = random_batch(model, seed=3)
    bad["x"][0, 0, 0] = np.inf
    with pytest.raises(CalibrationError, match=r"block '/blocks.0/mlp' at calibration batch 1"):
        calibrate(model, blocks, [random_batch(model), bad])


def test_strided_comoment_keeps_every_rows_variance_and_the_subsets_correlations() -> None:
    """With stride 2 the product covers the even rows only: its diagonal is still every row's
    m2, its correlations are the even rows', it stays positive semi-definite, and a neuron that
    is a linear combination of others still is (the Hessian keeps the subset's rank)."""
    rng = np.random.default_rng(5)
    base = 3.0 + rng.standard_normal((999, 4)) * [1.0, 0.1, 5.0, 2.0]
    data = np.column_stack([base, base[:, 0] - 2 * base[:, 2], np.full(999, 7.0)])  # + combination, constant
    data[1::2, 5] = 8.0  # constant on the even rows, not on all
    stats = Stats.of(data, comoment=True, stride=2)
    np.testing.assert_allclose(np.diag(stats.comoment), _two_pass(data)[1], rtol=1e-11)
    covariance = stats.covariance
    std = np.sqrt(np.diag(covariance))
    even = data[::2, :5] - data[::2, :5].mean(axis=0)
    subset_correlation = (even.T @ even) / np.sqrt(np.outer(np.square(even).sum(0), np.square(even).sum(0)))
    np.testing.assert_allclose(covariance[:5, :5] / np.outer(std[:5], std[:5]), subset_correlation, atol=1e-6)
    np.testing.assert_array_equal(covariance[5, :5], 0.0)  # no correlation seen: none assumed
    assert covariance[5, 5] > 0
    eigenvalues = np.linalg.eigvalsh(covariance / np.outer(std, std))
    assert eigenvalues[0] > -1e-6
    assert np.sum(eigenvalues < 1e-6) == 1  # column 4 is still spanned by columns 0 and 2
    exact = Stats.of(data, comoment=True)
    assert np.max(np.abs(covariance - exact.covariance) / np.outer(std, std)) > 1e-4  # a subset, truly


def test_calibrate_strides_the_comoment_only_past_enough_positions_per_neuron() -> None:
    """Small calibration sets keep every position in the covariance; past COMOMENT_FULL_POSITIONS
    per neuron, each further batch contributes its strided estimate."""
    from onnx_vbp.calibrate import COMOMENT_FULL_POSITIONS, COMOMENT_STRIDE

    model = build_model([BlockSpec(hidden=16)], seq=5)
    (block,) = find_mlp_blocks(model)
    per_batch = COMOMENT_FULL_POSITIONS * block.width // 5 // 2 + 1  # samples: two batches pass the mark
    batches = [random_batch(model, batch=per_batch, seed=s) for s in range(3)]
    probe = cpu_session(instrument(model, [block]), optimize=True)
    hidden = [probe.run(None, b)[1].reshape(-1, block.width) for b in batches]
    first_two = calibrate(model, [block], batches[:2], comoments=True)[block.name]
    expected = Stats.of(hidden[0], comoment=True).merge(Stats.of(hidden[1], comoment=True))
    assert_comoment_close(first_two.comoment, expected.comoment)
    all_three = calibrate(model, [block], batches, comoments=True)[block.name]
    expected = expected.merge(Stats.of(hidden[2], comoment=True, stride=COMOMENT_STRIDE))
    assert_comoment_close(all_three.comoment, expected.comoment)
    exact = Stats.of(np.concatenate(hidden), comoment=True)
    assert not np.allclose(all_three.comoment, exact.comoment, rtol=1e-3)
