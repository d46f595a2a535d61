"""Selection: global vs per-block counts, min-keep, round-to."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_vbp import Stats, select


def _stats(**variances: list[float]) -> dict[str, Stats]:
    return {name: Stats(10, np.zeros(len(v)), np.asarray(v, dtype=float) * 10) for name, v in variances.items()}


def test_global_ranks_all_blocks_together() -> None:
    stats = _stats(a=[1, 2, 3, 4, 5, 6, 7, 8], b=[0.1, 0.2, 0.3, 9, 10, 11, 12, 13])
    plan = select(stats, 0.25)  # 4 of 16 neurons: the three of b, then a's lowest
    assert list(plan.keep["a"]) == [1, 2, 3, 4, 5, 6, 7]
    assert list(plan.keep["b"]) == [3, 4, 5, 6, 7]


def test_per_block_removes_the_same_fraction_everywhere() -> None:
    stats = _stats(a=[1, 2, 3, 4, 5, 6, 7, 8], b=[0.1, 0.2, 0.3, 9, 10, 11, 12, 13])
    plan = select(stats, 0.25, scope="per-block")
    assert list(plan.keep["a"]) == [2, 3, 4, 5, 6, 7]
    assert list(plan.keep["b"]) == [2, 3, 4, 5, 6, 7]


def test_global_count_is_floor_of_ratio_times_total() -> None:
    rng = np.random.default_rng(0)
    stats = _stats(a=list(rng.random(100)), b=list(rng.random(300)), c=list(rng.random(37)))
    plan = select(stats, 0.35)
    assert sum(k.size for k in plan.keep.values()) == 437 - int(0.35 * 437)


def test_min_keep_protects_a_collapsed_block() -> None:
    stats = _stats(dead=[0.0] * 10, live=list(np.arange(1, 11)))
    plan = select(stats, 0.6, min_keep=3)
    assert plan.keep["dead"].size == 3
    assert plan.keep["live"].size == 20 - 12 - 3  # the rest of the budget comes from the live block
    assert list(plan.keep["live"]) == [5, 6, 7, 8, 9]


def test_round_to_restores_highest_variance_neurons() -> None:
    variance = [5, 1, 9, 2, 8, 3, 7, 4, 6, 0.5, 10, 0.1]
    plan = select(_stats(a=variance), 0.5, round_to=4)  # 6 kept -> rounded up to 8
    assert plan.keep["a"].size == 8
    assert set(plan.keep["a"]) == set(np.argsort(variance)[-8:])


def test_round_to_never_exceeds_width() -> None:
    plan = select(_stats(a=list(range(1, 11))), 0.1, round_to=64)
    assert plan.keep["a"].size == 10


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_invalid_ratio_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        select(_stats(a=[1.0, 2.0]), ratio)


def test_variance_x_norm_weighs_each_neuron_by_its_fc2_row() -> None:
    from graphs import BlockSpec, build_model, random_batch, readers
    from onnx import numpy_helper

    from onnx_vbp import calibrate, find_mlp_blocks, rankings

    model = build_model([BlockSpec(hidden=16, act="relu")], seed=3)
    fc2_weight = readers(model, "MatMul", "fc2").input[1]
    tensor = next(t for t in model.graph.initializer if t.name == fc2_weight)
    rows = numpy_helper.to_array(tensor).copy()
    rows[8:] *= 1e-3  # neurons 8..15 barely reach the output
    tensor.CopyFrom(numpy_helper.from_array(rows, fc2_weight))
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=32, seed=s) for s in range(2)])

    ranked = rankings(stats, "variance-x-norm", model, blocks)
    expected = stats[blocks[0].name].variance * np.square(rows).sum(axis=1)
    ranking = ranked[blocks[0].name]
    np.testing.assert_allclose(ranking.cost, expected[ranking.order], rtol=1e-6)
    assert list(select(stats, 0.5, rankings=ranked).keep[blocks[0].name]) == list(range(8))
    assert list(select(stats, 0.5).keep[blocks[0].name]) != list(range(8))  # variance alone ranks otherwise


def test_refusals_name_the_api_option_and_the_cli_shows_its_flag() -> None:
    from onnx_vbp.cli import as_flags
    from onnx_vbp.select import SelectionError

    with pytest.raises(SelectionError, match="fewer than `min_keep` 3") as refused:
        select(_stats(a=[1, 2, 3, 4]), 0.5, scope="per-block", min_keep=3)
    assert "fewer than --min-keep 3" in as_flags(str(refused.value))
    assert as_flags("use `method` vbp; give `image_size`; `not_an_option`") == (
        "use --method vbp; give --image-size; `not_an_option`"
    )
