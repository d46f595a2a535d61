"""The default method: structured OBS ranking, its allocation across blocks, and VBP kept as it was."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import BlockSpec, Builder, build_model, make_model, random_batch
from helpers import relative_change, run

from onnx_vbp import Ranking, Stats, calibrate, find_mlp_blocks, importance, rankings, rewrite, select
from onnx_vbp.cli import main
from onnx_vbp.graph import with_outputs
from onnx_vbp.importance import FLOAT32_WIDTH, SYMMETRIZE_ROWS, obs_ranking, spd_inverse
from onnx_vbp.report import Report, format_table
from onnx_vbp.stats import load_stats


def _covariance(rng: np.random.Generator, width: int) -> np.ndarray:
    mix = rng.normal(size=(width, width)) * rng.random(width)  # correlated, unequal variances
    return mix @ mix.T / width


def _refit_error(weight: np.ndarray, hessian: np.ndarray, removed: list[int]) -> float:
    """Output variance lost by removing `removed` and refitting the kept rows by least squares,
    computed directly: tr(W_Pᵀ (H_PP - H_PK H_KK⁻¹ H_KP) W_P)."""
    kept = [i for i in range(len(hessian)) if i not in removed]
    h_pp = hessian[np.ix_(removed, removed)]
    if kept:
        h_pk = hessian[np.ix_(removed, kept)]
        h_pp = h_pp - h_pk @ np.linalg.solve(hessian[np.ix_(kept, kept)], h_pk.T)
    return float(np.trace(weight[removed].T @ h_pp @ weight[removed]))


def test_obs_ranking_equals_brute_force_greedy() -> None:
    """Each step removes the neuron whose removal, with the best refit of all kept rows, loses
    the least output variance (searched exhaustively), and reports exactly that loss."""
    rng = np.random.default_rng(0)
    width = 9
    covariance, weight = _covariance(rng, width), rng.normal(size=(width, 3))
    ranking = obs_ranking(weight, covariance, depth=width - 1, ridge_lambda=1e-3)
    hessian = covariance + 1e-3 * np.trace(covariance) / width * np.eye(width)
    removed: list[int] = []
    for step in range(width - 1):
        errors = {j: _refit_error(weight, hessian, [*removed, j]) for j in range(width) if j not in removed}
        best = min(errors, key=errors.get)
        assert ranking.order[step] == best
        assert ranking.cost[step] == pytest.approx(
            errors[best] - _refit_error(weight, hessian, removed), rel=1e-6, abs=1e-12
        )
        removed.append(best)


def test_first_removals_are_the_best_subsets() -> None:
    rng = np.random.default_rng(1)
    width = 8
    covariance, weight = _covariance(rng, width), rng.normal(size=(width, 2))
    hessian = covariance + 1e-3 * np.trace(covariance) / width * np.eye(width)
    ranking = obs_ranking(weight, covariance, depth=1)
    exhaustive = min(range(width), key=lambda j: _refit_error(weight, hessian, [j]))
    assert ranking.order[0] == exhaustive


def test_a_shallow_ranking_is_a_prefix_of_a_deep_one() -> None:
    """Rounds of several neurons (wide blocks) depend only on what is left: ranking deeper for a
    larger ratio never changes the removals a smaller ratio made."""
    rng = np.random.default_rng(2)
    width = 300  # rounds of 4 neurons among 16 candidates
    covariance, weight = _covariance(rng, width), rng.normal(size=(width, 5))
    shallow, deep = obs_ranking(weight, covariance, depth=101), obs_ranking(weight, covariance, depth=250)
    np.testing.assert_array_equal(deep.order[:101], shallow.order)
    np.testing.assert_allclose(deep.cost[:101], shallow.cost, rtol=1e-9)
    assert len(set(deep.order)) == 250


def _scaled_copies_model(x_shape: tuple = ("batch", 5, 8)) -> onnx.ModelProto:
    """Hidden neurons 8..15 are neurons 0..7 times 0.5 (ReLU is positively homogeneous): each is an
    exact linear combination of a kept neuron, and no other neuron is."""
    rng = np.random.default_rng(3)
    half = rng.normal(size=(8, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    g = Builder()
    pre = g.op(
        "Add",
        [
            g.op("MatMul", ["x", g.const(np.concatenate([half, 0.5 * half], axis=1))], node_name="/mlp/fc1"),
            g.const(np.concatenate([bias, 0.5 * bias])),
        ],
    )
    fc2 = g.op(
        "MatMul", [g.op("Relu", [pre]), g.const(rng.normal(size=(16, 8)).astype(np.float32))], node_name="/mlp/fc2"
    )
    return make_model(g, list(x_shape), g.op("Add", [fc2, g.const(np.zeros(8, np.float32))]))


def test_removing_linear_combinations_costs_nothing_and_is_compensated_exactly() -> None:
    model = _scaled_copies_model()
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=16, seed=s) for s in range(4)], comoments=True)
    ranked = rankings(stats, "obs", model, blocks, ridge_lambda=1e-6)
    ranking = ranked[blocks[0].name]
    first = ranking.order[:8]
    assert sorted(first % 8) == list(range(8))  # one neuron of every pair, never both
    assert ranking.cost[:8].max() < 1e-6 < ranking.cost[8]
    plan = select(stats, 0.5, rankings=ranked)
    pruned = rewrite(model, blocks, stats, plan, compensate="ridge", ridge_lambda=1e-6)
    feed = random_batch(model, batch=8, seed=99)  # held out
    assert relative_change(run(model, feed)[0], run(pruned, feed)[0]) < 1e-4


def _ranking(costs: list[float]) -> Ranking:
    return Ranking(np.arange(len(costs)), np.asarray(costs, dtype=float), len(costs))


def test_allocation_takes_the_cheapest_steps_in_each_blocks_order() -> None:
    ranked = {"a": _ranking([1, 2, 3, 4, 5, 6, 7, 8]), "b": _ranking([0.5, 9, 0.1, 0.2, 10, 11, 12, 13])}
    plan = select({}, 0.25, rankings=ranked)  # 4 steps: a's 1, 2, 3 and b's 0.5; b's 0.1 waits behind its 9
    assert list(plan.keep["a"]) == [3, 4, 5, 6, 7]
    assert list(plan.keep["b"]) == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(("min_keep", "round_to"), [(5, 1), (3, 4), (0, 8), (6, 3)])
def test_allocation_respects_min_keep_and_round_to(min_keep: int, round_to: int) -> None:
    rng = np.random.default_rng(4)
    widths = {"cheap": 24, "mid": 40, "costly": 32}
    scale = {"cheap": 1e-6, "mid": 1.0, "costly": 1e3}
    ranked = {n: _ranking(list(np.sort(rng.random(w)) * scale[n])) for n, w in widths.items()}
    plan = select({}, 0.5, rankings=ranked, min_keep=min_keep, round_to=round_to)
    for name, width in widths.items():
        kept = plan.keep[name].size
        assert kept >= min_keep
        assert kept == width or kept % round_to == 0
    pre_rounding = sum(widths.values()) - int(0.5 * sum(widths.values()))
    assert pre_rounding <= sum(k.size for k in plan.keep.values()) < pre_rounding + len(widths) * round_to
    # the cheap block gives up everything it may: min_keep neurons are left, rounded up to round_to
    assert plan.keep["cheap"].size == math.ceil(min_keep / round_to) * round_to


def _select_before_obs(
    variances: dict[str, np.ndarray], ratio: float, scope: str, min_keep: int, round_to: int
) -> dict[str, np.ndarray]:
    """select() as it was before rankings (commit 3a18105): the paper's plans, for comparison."""
    if scope == "global":
        names = list(variances)
        owner = np.concatenate([np.full(variances[n].size, i) for i, n in enumerate(names)])
        index = np.concatenate([np.arange(variances[n].size) for n in names])
        order = np.argsort(np.concatenate([variances[n] for n in names]), kind="stable")
        budget = int(ratio * order.size)
        room = [variances[n].size - min_keep for n in names]
        pruned: dict[str, list[int]] = {n: [] for n in names}
        for k in order:
            if budget == 0:
                break
            if room[owner[k]] > 0:
                pruned[names[owner[k]]].append(int(index[k]))
                room[owner[k]] -= 1
                budget -= 1
    else:
        pruned = {n: list(np.argsort(v, kind="stable")[: int(ratio * v.size)]) for n, v in variances.items()}
    keep = {}
    for name, score in variances.items():
        mask = np.ones(score.size, dtype=bool)
        mask[np.asarray(pruned[name], dtype=np.int64)] = False
        target = min(score.size, math.ceil(mask.sum() / round_to) * round_to)
        if target > mask.sum():
            restore = [i for i in np.argsort(-score, kind="stable") if not mask[i]]
            mask[restore[: target - mask.sum()]] = True
        keep[name] = np.flatnonzero(mask)
    return keep


@pytest.mark.parametrize(
    ("scope", "min_keep", "round_to", "ratio"),
    list(itertools.product(("global", "per-block"), (1, 7), (1, 4), (0.0, 0.3, 0.55))),
)
def test_vbp_plans_are_unchanged(scope: str, min_keep: int, round_to: int, ratio: float) -> None:
    rng = np.random.default_rng(5)
    variances = {"a": rng.random(40), "b": np.round(rng.random(24), 1), "c": np.zeros(16)}  # ties and dead neurons
    stats = {n: Stats(10, np.zeros(v.size), v * 10) for n, v in variances.items()}
    plan = select(stats, ratio, scope=scope, min_keep=min_keep, round_to=round_to)
    expected = _select_before_obs({n: s.variance for n, s in stats.items()}, ratio, scope, min_keep, round_to)
    for name in variances:
        np.testing.assert_array_equal(plan.keep[name], expected[name])


@pytest.fixture
def copies(tmp_path: Path) -> Path:
    onnx.save(_scaled_copies_model(), tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for s in range(3):
        np.savez(tmp_path / "calib" / f"{s}.npz", **random_batch(_scaled_copies_model(), batch=16, seed=s))
    return tmp_path


def _prune(ws: Path, name: str, *args: str) -> dict:
    assert (
        main(
            [
                str(ws / "m.onnx"),
                str(ws / "calib"),
                "--ratio",
                "0.5",
                "-q",
                "-o",
                str(ws / f"{name}.onnx"),
                "--eval",
                str(ws / "calib"),
                "--report",
                str(ws / f"{name}.json"),
                *args,
            ]
        )
        == 0
    )
    return json.loads((ws / f"{name}.json").read_text())


def test_default_method_is_obs_and_vbp_stays_selectable(copies: Path) -> None:
    obs = _prune(copies, "obs")
    vbp = _prune(copies, "vbp", "--method", "vbp")
    assert (obs["method"], obs["score"], obs["compensate"]) == ("obs", "obs", "ridge")
    assert (vbp["method"], vbp["score"], vbp["compensate"]) == ("vbp", "variance", "mean")
    assert obs["eval"]["outputs"]["y"]["rel_l2"] < 1e-3 < vbp["eval"]["outputs"]["y"]["rel_l2"]


def test_default_method_degrades_to_vbp_when_second_moments_do_not_fit(
    copies: Path, monkeypatch, caplog, capsys
) -> None:
    pipeline = importlib.import_module("onnx_vbp.pipeline")
    monkeypatch.setattr(pipeline, "comoments_fit", lambda blocks: False)
    monkeypatch.setattr(pipeline, "comoment_passes", lambda blocks, budget: None)  # a block alone is over it
    report = _prune(copies, "degraded")
    assert report["method"] == "vbp" and report["compensate"] == "mean"
    assert "over the" in caplog.text and "--method vbp instead" in caplog.text
    rc = main(
        [
            str(copies / "m.onnx"),
            str(copies / "calib"),
            "-q",
            "--method",
            "vbp",
            "--compensate",
            "ridge",
            "-o",
            str(copies / "refused.onnx"),
        ]
    )
    assert rc == 1 and not (copies / "refused.onnx").exists()
    assert "need second moments, and there are none (over the memory budget" in capsys.readouterr().err


def test_second_moments_fit_the_memory_available(copies: Path, monkeypatch, caplog) -> None:
    """The budget shrinks to half the memory available: on a small machine or container the
    default degrades to vbp instead of running out of memory."""
    calibrate_module = importlib.import_module("onnx_vbp.calibrate")
    blocks = find_mlp_blocks(onnx.load(copies / "m.onnx"))
    need = calibrate_module.comoment_bytes(blocks)
    monkeypatch.setattr(calibrate_module, "available_memory", lambda: 2 * need)
    assert calibrate_module.comoments_fit(blocks) and _prune(copies, "enough")["method"] == "obs"
    monkeypatch.setattr(calibrate_module, "available_memory", lambda: 2 * need - 2)
    assert not calibrate_module.comoments_fit(blocks)
    report = _prune(copies, "short")
    said = "50% of the memory available); a block alone is over the budget: pruning with --method vbp"
    assert report["method"] == "vbp" and said in caplog.text
    caplog.clear()  # the in-memory API degrades the same way, and says so
    from onnx_vbp.pipeline import prune

    batches = [dict(np.load(copies / "calib" / f"{s}.npz")) for s in range(3)]
    pruned = prune(onnx.load(copies / "m.onnx"), batches, 0.5)
    assert "pruning with --method vbp instead" in caplog.text
    assert [b.width for b in find_mlp_blocks(pruned)] == [b["width_after"] for b in report["blocks"]]
    monkeypatch.setattr(calibrate_module, "available_memory", lambda: None)  # unknown: the fixed budget
    assert calibrate_module.comoment_budget() == calibrate_module.COMOMENT_BUDGET


def test_second_moments_over_budget_are_calibrated_in_passes(tmp_path: Path, monkeypatch, caplog, capsys) -> None:
    """Blocks whose second moments fit the budget one group at a time are calibrated in one pass
    per group, each group's kept in temporary files afterwards: the same model as in one pass.
    Without room for those files, the default degrades to vbp."""
    calibrate_module = importlib.import_module("onnx_vbp.calibrate")
    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=32), BlockSpec(hidden=48, act="relu")], dim=16, seq=4)
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for s in range(3):
        np.savez(tmp_path / "calib" / f"{s}.npz", **random_batch(model, batch=16, seed=s))
    one_pass = _prune(tmp_path, "one-pass", "--save-stats", str(tmp_path / "stats.npz"))
    blocks = find_mlp_blocks(model)
    assert calibrate_module.comoment_passes(blocks, calibrate_module.comoment_bytes(blocks)) == [blocks]
    budget = 8 * 64**2  # the first block alone, then the other two
    assert calibrate_module.comoment_passes(blocks, budget) == [blocks[:1], blocks[1:]]
    assert calibrate_module.comoment_passes(blocks, 8 * 64**2 - 1) is None
    monkeypatch.setattr(calibrate_module, "available_memory", lambda: 2 * budget)
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    assert "over it, the default would calibrate in 2 passes over the data" in capsys.readouterr().out

    in_passes = _prune(tmp_path, "passes", "--save-stats", str(tmp_path / "passes.npz"))
    assert "calibrating in 2 passes over the data" in caplog.text
    saved = {path: load_stats(tmp_path / path).stats for path in ("stats.npz", "passes.npz")}
    for name, block in saved["stats.npz"].items():
        np.testing.assert_allclose(saved["passes.npz"][name].comoment, block.comoment, rtol=1e-6, atol=1e-9)
    assert (
        in_passes["method"] == "obs" and in_passes["calibration"]["samples"] == one_pass["calibration"]["samples"] == 48
    )
    assert [b["width_after"] for b in in_passes["blocks"]] == [b["width_after"] for b in one_pass["blocks"]]
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "one-pass.onnx").graph.initializer}
    caplog.clear()  # saved statistics over the budget are read one block at a time, the same way
    assert _prune(tmp_path, "from-file", "--stats", str(tmp_path / "stats.npz"))["method"] == "obs"
    assert "reading them from the statistics file one block at a time" in caplog.text
    for written in ("passes", "from-file"):
        for tensor in onnx.load(tmp_path / f"{written}.onnx").graph.initializer:
            np.testing.assert_allclose(onnx.numpy_helper.to_array(tensor), expected[tensor.name], rtol=1e-5, atol=1e-6)

    caplog.clear()
    pipeline = importlib.import_module("onnx_vbp.pipeline")
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "shutil", SimpleNamespace(disk_usage=lambda folder: SimpleNamespace(free=1000)))
        assert _prune(tmp_path, "no-room")["method"] == "vbp"
    assert "free in" in caplog.text and "is too little for them: pruning with --method vbp" in caplog.text
    caplog.clear()  # temporary folders in memory spare none of it
    monkeypatch.setattr(pipeline, "spill_folder", lambda: None)
    assert _prune(tmp_path, "in-memory")["method"] == "vbp"
    assert "are in memory (tmpfs)" in caplog.text and "set TMPDIR to a folder on disk" in caplog.text
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0  # and inspect says so beforehand
    out = capsys.readouterr().out
    assert "are in memory (tmpfs)" in out and "the default would fall back to --method vbp" in out
    caplog.clear()  # a block alone over the budget: vbp, and the saved second moments are not even read
    monkeypatch.setattr(calibrate_module, "available_memory", lambda: 2 * 8 * 64**2 - 2)
    assert _prune(tmp_path, "vbp-from-file", "--stats", str(tmp_path / "stats.npz"))["method"] == "vbp"
    assert "pruning with --method vbp instead" in caplog.text and "no second moments" not in caplog.text


def test_spilled_second_moments_leave_no_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    comoment = np.random.default_rng(0).normal(size=(6, 6))
    spilled = Stats(3, np.zeros(6), np.ones(6), comoment).spilled()
    assert isinstance(spilled.comoment, np.memmap) and not spilled.comoment.flags.writeable
    np.testing.assert_array_equal(spilled.comoment, comoment)
    assert list(tmp_path.iterdir()) == []  # an anonymous file: it goes with the map


def test_second_moments_are_spilled_to_disk_not_to_a_tmpfs(tmp_path: Path, monkeypatch) -> None:
    """A filesystem in memory is told by the deepest mount point holding the folder; /var/tmp
    stands in for a temporary folder held in memory, and nothing does where both are."""
    from onnx_vbp import runtime
    from onnx_vbp.stats import spill_folder

    mounts = tmp_path / "mounts"
    monkeypatch.setattr(runtime, "MOUNTS", mounts)
    disk = tmp_path / "on disk"  # mounted inside the tmpfs; the table escapes its space
    disk.mkdir()

    def table(*in_memory: Path | str) -> None:
        lines = ["/dev/vda / ext4 rw 0 0", *(f"tmpfs {folder} tmpfs rw 0 0" for folder in in_memory)]
        mounts.write_text("\n".join([*lines, f"/dev/vdb {str(disk).replace(' ', chr(92) + '040')} ext4 rw 0 0"]))

    table(tmp_path)
    assert runtime.in_memory(tmp_path) and runtime.in_memory(tmp_path / "sub")
    assert not runtime.in_memory(disk) and not runtime.in_memory("/usr")
    mounts.unlink()  # not Linux: nothing is known to be in memory
    assert not runtime.in_memory(tmp_path)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    table(tmp_path)
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK):
        assert spill_folder() == "/var/tmp"
    table(tmp_path, "/var/tmp")
    assert spill_folder() is None
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    assert spill_folder() == str(disk)


def test_available_memory_is_capped_by_the_container(tmp_path: Path, monkeypatch) -> None:
    runtime = importlib.import_module("onnx_vbp.runtime")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemAvailable:    4194304 kB\n")
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    monkeypatch.setattr(runtime, "MEMINFO", meminfo)
    cgroups = (
        (v2, "memory.max", "memory.current", "memory.stat", "inactive_file"),
        (v1, "limit", "usage", "stat", "total_inactive_file"),
    )
    monkeypatch.setattr(runtime, "CGROUP_MEMORY", cgroups)
    assert runtime.available_memory() == 4 << 30  # no container files
    (v1 / "limit").write_text("9223372036854771712\n")  # cgroup v1 without a limit
    (v1 / "usage").write_text(str(5 << 30))
    assert runtime.available_memory() == 4 << 30
    (v2 / "memory.max").write_text(f"{3 << 30}\n")  # cgroup v2, read first: 3 GiB, 1 GiB used
    (v2 / "memory.current").write_text(f"{1 << 30}\n")
    assert runtime.available_memory() == 2 << 30
    # of 2.5 GiB used, 1 GiB is page cache the kernel reclaims first: the working set is 1.5 GiB
    (v2 / "memory.current").write_text(f"{5 << 29}\n")
    (v2 / "memory.stat").write_text(f"anon {3 << 29}\nactive_file 0\ninactive_file {1 << 30}\n")
    assert runtime.available_memory() == 3 << 29
    (v2 / "memory.max").write_text("max\n")
    assert runtime.available_memory() == 4 << 30
    monkeypatch.setattr(runtime, "MEMINFO", tmp_path / "absent")
    assert runtime.available_memory() is None  # v2 says "max" and there is no meminfo
    (v2 / "memory.max").write_text(f"{3 << 30}\n")
    assert runtime.available_memory() == 3 << 29


def test_padding_positions_are_not_observed() -> None:
    model = _scaled_copies_model(("batch", "sequence", 8))
    blocks = find_mlp_blocks(model)
    tokens = np.random.default_rng(6).normal(size=(6, 3, 8)).astype(np.float32)
    mask = np.ones((6, 5), dtype=np.int64)
    mask[:, 3:] = 0
    padded = np.concatenate([tokens, np.full((6, 2, 8), 1e3, np.float32)], axis=1)  # padding must not matter
    with_mask = calibrate(model, blocks, [{"x": padded, "attention_mask": mask}])[blocks[0].name]
    expected = calibrate(model, blocks, [{"x": tokens}])[blocks[0].name]
    assert with_mask.count == expected.count == 18
    np.testing.assert_allclose(with_mask.mean, expected.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(with_mask.m2, expected.m2, rtol=1e-6, atol=1e-9)


def test_padding_is_not_observed_where_a_layout_reshape_folded_the_tokens() -> None:
    model = build_model([BlockSpec(fc="gemm", layout=True)], dim=8)  # hidden: [batch * sequence, width]
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[1].dim_param = "sequence"
    blocks = find_mlp_blocks(model)
    tokens = np.random.default_rng(7).normal(size=(6, 3, 8)).astype(np.float32)
    mask = np.ones((6, 5), dtype=np.int64)
    mask[:, 3:] = 0
    padded = np.concatenate([tokens, np.full((6, 2, 8), 1e3, np.float32)], axis=1)
    with_mask = calibrate(model, blocks, [{"x": padded, "attention_mask": mask}])[blocks[0].name]
    expected = calibrate(model, blocks, [{"x": tokens}])[blocks[0].name]
    assert with_mask.count == expected.count == 18
    np.testing.assert_allclose(with_mask.mean, expected.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(with_mask.m2, expected.m2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("spec", "residual", "scaled"),
    [
        (BlockSpec(), True, False),
        (BlockSpec(fc="gemm"), True, False),
        (BlockSpec(fc="conv"), True, False),
        (BlockSpec(layer_scale=0.1), True, True),
        (BlockSpec(fc2_bias="none", layer_scale=0.1), True, True),
        (BlockSpec(fc="gemm", layout=True), True, False),  # fc2's output reshaped back first
        (BlockSpec(fc2_bias="skip_layernorm"), True, False),  # the sum is the fused op's output 3
    ],
)
def test_where_the_block_joins_the_residual_stream(spec: BlockSpec, residual: bool, scaled: bool) -> None:
    (block,) = find_mlp_blocks(build_model([spec]))
    assert (block.sites[0].residual is not None, block.sites[0].output_scale is not None) == (residual, scaled)
    assert (block.sites[0].residual_node is not None) == (spec.fc2_bias == "skip_layernorm")
    if spec.fc2_bias != "skip_layernorm":  # the fused op normalizes whatever it is given: always a stream
        (alone,) = find_mlp_blocks(build_model([spec], residual=False))
        assert alone.sites[0].residual is None


def test_the_stream_inside_a_skip_layernorm_is_its_sum_output() -> None:
    """ORT's optimizer fuses the residual Add into SkipLayerNormalization, which writes the sum
    (input + skip + bias) only as its optional output 3: calibration asks for it, on a copy."""
    model = build_model([BlockSpec(hidden=16, fc2_bias="skip_layernorm")] * 2, dim=8)
    original = model.SerializeToString()
    blocks = find_mlp_blocks(model)
    batches = [random_batch(model, batch=8, seed=s) for s in range(2)]
    stats = calibrate(model, blocks, batches, comoments=True)
    assert model.SerializeToString() == original
    for block in blocks:
        site = block.sites[0]
        fused = next(n for n in model.graph.node if n.output[0] == site.residual_node)
        fc2 = next(n for n in model.graph.node if n.name == site.fc2)
        bias = next(t for t in model.graph.initializer if t.name == fused.input[4])
        names = [fc2.output[0], fused.input[1]]
        session = ort.InferenceSession(with_outputs(model, names), providers=["CPUExecutionProvider"])
        parts = [session.run(names, b) for b in batches]
        z = np.concatenate([(out + skip + onnx.numpy_helper.to_array(bias)).reshape(-1, 8) for out, skip in parts])
        z = z.astype(np.float64)
        expected = np.mean(np.sum((z - z.mean(axis=1, keepdims=True)) ** 2, axis=1))
        assert stats[block.name].stream_energy == pytest.approx(expected, rel=1e-5)


def test_stream_energy_is_what_a_layernorm_divides_by() -> None:
    model = build_model([BlockSpec(hidden=16), BlockSpec(hidden=16, act="relu")], layernorm=True)
    blocks = find_mlp_blocks(model)
    batches = [random_batch(model, batch=8, seed=s) for s in range(3)]
    stats = calibrate(model, blocks, batches, comoments=True)
    names = [b.sites[0].residual for b in blocks]
    session = ort.InferenceSession(with_outputs(model, names), providers=["CPUExecutionProvider"])
    for block, name in zip(blocks, names, strict=True):
        z = np.concatenate([session.run([name], b)[0].reshape(-1, 8) for b in batches]).astype(np.float64)
        expected = np.mean(np.sum((z - z.mean(axis=1, keepdims=True)) ** 2, axis=1))
        assert stats[block.name].stream_energy == pytest.approx(expected, rel=1e-6)
    assert all(s.stream_energy is None for s in calibrate(model, blocks, batches).values())


def test_a_small_layer_scale_makes_a_block_cheap() -> None:
    """Two blocks alike but for the layer scale on their output: obs takes the budget from the
    block whose neurons barely reach the residual stream."""
    model = build_model([BlockSpec(hidden=16, layer_scale=1e-3), BlockSpec(hidden=16, layer_scale=1.0)], seed=7)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=16, seed=s) for s in range(3)], comoments=True)
    plan = select(stats, 0.4, rankings=rankings(stats, "obs", model, blocks))
    assert [plan.keep[b.name].size for b in blocks] == [16 - 12, 16]


def test_rankings_are_deepened_until_no_block_is_cut_short(copies: Path) -> None:
    """The pipeline ranks obs removals only as deep as the plan needs; the plan must equal the one
    from a full-depth ranking, including a block that gives up nearly all of its neurons."""
    from onnx_vbp.pipeline import FIRST_DEPTH, PruneOptions, prepare

    model = build_model([BlockSpec(hidden=64, layer_scale=1e-4), BlockSpec(hidden=64)], seed=8)
    onnx.save(model, copies / "two.onnx")
    (copies / "two").mkdir()
    for s in range(3):
        np.savez(copies / "two" / f"{s}.npz", **random_batch(model, batch=16, seed=s))
    options = PruneOptions(ratio=0.45, min_keep=2)
    prepared = prepare(copies / "two.onnx", copies / "two", options)
    plan = prepared.plan(options)
    cheap, dear = (prepared._rankings[(options.score, options.ridge_lambda)][b.name] for b in prepared.blocks)
    full = select(prepared.stats, 0.45, min_keep=2, rankings=rankings(prepared.stats, "obs", model, prepared.blocks))
    first_depth = math.ceil(FIRST_DEPTH * 0.45 * 64) + 1
    assert cheap.order.size > first_depth  # the first depth cut the scaled-down block short: deepened
    assert dear.order.size == first_depth  # the other one was not
    for block in prepared.blocks:
        np.testing.assert_array_equal(plan.keep[block.name], full.keep[block.name])
    assert plan.keep[prepared.blocks[0].name].size == 64 - int(0.45 * 128)  # the whole budget from the cheap block


def test_ranking_some_blocks_gives_the_costs_of_ranking_them_all() -> None:
    """A mapping of depths ranks only the blocks it names, in the units of the whole model (each
    block's own residual stream, or every block's output variance when one stream is unknown)."""
    model = build_model([BlockSpec(hidden=16), BlockSpec(hidden=24)], seed=9)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=16, seed=s) for s in range(3)], comoments=True)
    first, second = (b.name for b in blocks)
    for stats_used in (stats, {**stats, first: dataclasses.replace(stats[first], stream=None)}):
        whole = rankings(stats_used, "obs", model, blocks)
        (name, ranking), *others = rankings(stats_used, "obs", model, blocks, depth={second: 10}).items()
        assert name == second and not others
        np.testing.assert_array_equal(ranking.order, whole[second].order[:10])
        np.testing.assert_allclose(ranking.cost, whole[second].cost[:10], rtol=1e-9)


def test_float32_ranks_a_wide_block_as_float64_does() -> None:
    """Wide blocks are ranked in float32 by default: the same removals, costs within 1e-3."""
    rng = np.random.default_rng(10)
    width = FLOAT32_WIDTH
    basis = np.linalg.qr(rng.standard_normal((width, width)))[0]
    covariance = (basis * (1.0 + np.arange(width)) ** -1.2) @ basis.T  # a decaying spectrum, as GELU's
    weight = rng.standard_normal((width, 64))
    single = obs_ranking(weight, covariance, depth=width // 2)
    double = obs_ranking(weight, covariance, depth=width // 2, precision=np.float64)
    assert single.order.size == double.order.size == width // 2
    assert len(set(single.order) & set(double.order)) >= 0.99 * (width // 2)
    np.testing.assert_allclose(np.sort(single.cost), np.sort(double.cost), rtol=1e-3)
    narrow = (weight[:100], covariance[:100, :100], 50)  # narrow blocks stay in float64, bit for bit
    np.testing.assert_array_equal(obs_ranking(*narrow).cost, obs_ranking(*narrow, precision=np.float64).cost)


def test_too_few_positions_for_a_covariance_are_warned_about(copies: Path, caplog) -> None:
    (copies / "tiny").mkdir()
    np.savez(copies / "tiny" / "0.npz", **random_batch(_scaled_copies_model(), batch=8, seed=0))  # 40 positions
    assert (
        main([str(copies / "m.onnx"), str(copies / "tiny"), "--min-samples", "1", "-q", "-o", str(copies / "o.onnx")])
        == 0
    )
    assert "covariance comes from only 40 positions" in caplog.text
    caplog.clear()
    assert main([str(copies / "m.onnx"), str(copies / "calib"), "-q", "-o", str(copies / "o2.onnx")]) == 0
    assert "covariance comes from only" not in caplog.text  # 240 positions for 16 neurons


def test_blocks_short_of_positions_alike_are_warned_about_in_one_line(caplog) -> None:
    from onnx_vbp import PruneOptions
    from onnx_vbp.pipeline import Measured, _check_sample_count

    def stats(width: int, count: int) -> Stats:
        return dataclasses.replace(Stats.empty(width, comoment=True), count=count)

    blocks = {f"/b{i}/mlp": stats(16, 40) for i in range(3)} | {"/narrow/mlp": stats(8, 20), "/fed/mlp": stats(8, 64)}
    _check_sample_count(Measured(blocks, 8, 0.1, {}, {}), Path("calib"), PruneOptions(min_samples=1))
    lines = [r.getMessage() for r in caplog.records if "covariance comes from only" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("3 blocks (/b0/mlp to /b2/mlp): each 16 x 16 covariance comes from only 40 positions")
    assert lines[1].startswith("block /narrow/mlp: its 8 x 8 covariance comes from only 20 positions")


def test_a_skip_layernorm_without_a_skip_input_is_no_stream() -> None:
    """A damaged fused op (one input) reads as no residual stream, not as an error."""
    model = build_model([BlockSpec(hidden=16, fc2_bias="skip_layernorm")])
    fused = next(n for n in model.graph.node if n.op_type == "SkipLayerNormalization")
    del fused.input[1:]
    (block,) = find_mlp_blocks(model)
    assert block.sites[0].residual is None and block.sites[0].residual_node is None


def test_the_cholesky_inverse_is_the_inverse_and_exactly_symmetric(monkeypatch) -> None:
    rng = np.random.default_rng(5)
    width = 2 * SYMMETRIZE_ROWS + 37  # three row blocks mirrored, the last one short
    factor = rng.standard_normal((width, width)) * np.geomspace(1, 1e-3, width)
    spd = factor @ factor.T + 1e-6 * np.eye(width)
    before = spd.copy()
    inverse = spd_inverse(spd)
    np.testing.assert_array_equal(spd, before)  # the input is left alone
    np.testing.assert_array_equal(inverse, inverse.T)
    assert np.abs(inverse @ spd - np.eye(width)).max() < 1e-6
    single = (spd + 1e-2 * np.eye(width)).astype(np.float32)  # within float32's reach
    single_inverse = spd_inverse(single)
    assert single_inverse.dtype == np.float32 and single_inverse.flags.c_contiguous
    np.testing.assert_array_equal(single_inverse, single_inverse.T)
    reference = np.linalg.inv(single.astype(np.float64))
    assert np.abs(np.diag(single_inverse) / np.diag(reference) - 1).max() < 1e-2
    indefinite = np.diag([2.0, -1.0, 4.0]) + 0.1  # not positive definite: the LU inverse
    np.testing.assert_allclose(spd_inverse(indefinite), np.linalg.inv(indefinite))
    assert spd_inverse(np.zeros((0, 0))).shape == (0, 0)
    # LAPACK is called without the GIL here; SciPy's Python wrappers, where it cannot be, give the same
    assert importance._nogil_lapack("spotrf") is not None and importance._nogil_lapack("dpotri") is not None
    monkeypatch.setattr(importance, "_nogil_lapack", lambda name: None)
    np.testing.assert_array_equal(spd_inverse(spd), inverse)
    np.testing.assert_array_equal(spd_inverse(single), single_inverse)
    np.testing.assert_allclose(spd_inverse(indefinite), np.linalg.inv(indefinite))


def test_rankings_are_the_same_on_any_number_of_cores(monkeypatch) -> None:
    """Blocks are ranked in parallel threads, as many as the cores and RANKING_MEMORY allow:
    neither changes a ranking, bit for bit."""
    model = build_model([BlockSpec(hidden=48), BlockSpec(hidden=32), BlockSpec(hidden=40)], seed=12)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=16, seed=s) for s in range(3)], comoments=True)
    monkeypatch.setattr(importance, "available_cores", lambda: 1)
    serial = rankings(stats, "obs", model, blocks)
    monkeypatch.setattr(importance, "available_cores", lambda: 3)
    parallel = [rankings(stats, "obs", model, blocks), rankings(stats, "obs", model, blocks, depth=20)]
    monkeypatch.setattr(importance, "RANKING_MEMORY", 1)  # less than one block: one at a time
    for ranking in [*parallel, rankings(stats, "obs", model, blocks)]:
        for name, expected in serial.items():
            np.testing.assert_array_equal(ranking[name].order, expected.order[: ranking[name].order.size])
            np.testing.assert_array_equal(ranking[name].cost, expected.cost[: ranking[name].cost.size])
    first = blocks[0].name
    with pytest.raises(ValueError, match="second moments"):
        rankings({**stats, first: dataclasses.replace(stats[first], comoment=None)}, "obs", model, blocks)
    # the Hessian from a comoment and its count is the one from the covariance
    np.testing.assert_allclose(
        importance.hessian_inverse(stats[first].comoment, count=stats[first].count),
        importance.hessian_inverse(stats[first].covariance),
        rtol=1e-9,
    )


def _streamed_blocks(tmp_path: Path) -> tuple[Path, onnx.ModelProto]:
    """Three residual blocks with very different layer scales (so different streams and costs),
    and a folder of calibration batches for them."""
    model = build_model([BlockSpec(hidden=24, layer_scale=s) for s in (0.05, 1.0, 8.0)], seed=12)
    onnx.save(model, tmp_path / "s.onnx")
    (tmp_path / "s").mkdir()
    for s in range(3):
        np.savez(tmp_path / "s" / f"{s}.npz", **random_batch(model, batch=16, seed=s))
    return tmp_path / "s.onnx", model


def test_each_allocation_divides_the_costs_by_the_stream_energy_to_its_power(tmp_path: Path) -> None:
    from onnx_vbp.options import STREAM_POWERS
    from onnx_vbp.pipeline import PruneOptions, allocated_plan

    _, model = _streamed_blocks(tmp_path)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=16, seed=s) for s in range(3)], comoments=True)
    relative = rankings(stats, "obs", model, blocks)  # costs ÷ stream energy
    energies = {name: s.stream_energy for name, s in stats.items()}
    assert max(energies.values()) > 10 * min(energies.values())
    plans = {}
    for allocation, power in STREAM_POWERS.items():
        options = PruneOptions(ratio=0.4, allocation=allocation)
        plan, chosen = allocated_plan(stats, blocks, options, lambda depths: relative)
        assert chosen == {"allocation": allocation}
        raw = {n: Ranking(r.order, r.cost * energies[n], r.width) for n, r in relative.items()}  # absolute costs
        expected = select(
            stats, 0.4, rankings={n: Ranking(r.order, r.cost / energies[n] ** power, r.width) for n, r in raw.items()}
        )
        for name in relative:
            np.testing.assert_array_equal(plan.keep[name], expected.keep[name])
        plans[allocation] = [plan.keep[b.name].size for b in blocks]
    assert plans["stream"] != plans["absolute"]  # the powers matter here


def test_measured_allocation_keeps_the_candidate_with_the_least_error(tmp_path: Path) -> None:
    from onnx_vbp.pipeline import PruneOptions, allocated_plan

    _, model = _streamed_blocks(tmp_path)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [random_batch(model, batch=16, seed=s) for s in range(3)], comoments=True)
    relative = rankings(stats, "obs", model, blocks)
    measured, by_name = PruneOptions(ratio=0.4, allocation="measured"), {}
    for name in ("stream", "sqrt-stream", "absolute"):
        by_name[name] = allocated_plan(stats, blocks, PruneOptions(ratio=0.4, allocation=name), lambda d: relative)[0]
    widths = {name: tuple(plan.keep[b.name].size for b in blocks) for name, plan in by_name.items()}
    assert len(set(widths.values())) == 3  # three different candidates
    for made_up, best in (
        ({"stream": 3.0, "sqrt-stream": 1.0, "absolute": 2.0}, "sqrt-stream"),
        ({"stream": 2.0, "sqrt-stream": 5.0, "absolute": 1.0}, "absolute"),
        ({"stream": 1.0, "sqrt-stream": 0.995, "absolute": 1.2}, "stream"),  # within MEASURED_MARGIN
    ):

        def error(plan, made_up=made_up) -> float:
            return made_up[next(n for n, w in widths.items() if w == tuple(plan.keep[b.name].size for b in blocks))]

        plan, chosen = allocated_plan(stats, blocks, measured, lambda d: relative, error)
        assert chosen == {"allocation": best, "output_errors": made_up}
        for block in blocks:
            np.testing.assert_array_equal(plan.keep[block.name], by_name[best].keep[block.name])


def test_output_error_is_relative_to_the_spread_over_samples() -> None:
    from onnx_vbp.pipeline import output_error

    rng = np.random.default_rng(0)
    # two batches whose token outputs differ in length (text is padded per batch), with an int
    # and a constant output beside them
    reference = [[rng.normal(size=(3, n, 4)), np.arange(3), np.ones((3, 2))] for n in (5, 7)]
    noise = [rng.normal(size=(3, n, 4)) for n in (5, 7)]
    outputs = [[ref[0] + e, ref[1] + 1, np.full((3, 2), 7.0)] for ref, e in zip(reference, noise, strict=True)]
    spread = sum(np.sum(np.square(ref[0] - ref[0].mean(axis=0))) for ref in reference)
    assert output_error(reference, outputs) == pytest.approx(sum(np.sum(e**2) for e in noise) / spread)
    assert output_error(reference, reference) == 0.0


def test_measured_allocation_through_the_cli_the_api_and_a_statistics_file(tmp_path: Path, caplog) -> None:
    from onnx_vbp.pipeline import PruneOptions, prune

    path, model = _streamed_blocks(tmp_path)

    def cli(name: str, *args: str) -> dict:
        out = tmp_path / f"{name}.json"
        rc = main(
            [str(path), *args, "--ratio", "0.4", "-q", "-o", str(tmp_path / f"{name}.onnx"), "--report", str(out)]
        )
        assert rc == 0
        return json.loads(out.read_text())

    report = cli("measured", str(tmp_path / "s"), "--allocation", "measured", "--save-stats", str(tmp_path / "s.npz"))
    errors = report["allocation"]["output_errors"]
    assert set(errors) == {"stream", "sqrt-stream", "absolute"} and all(e > 0 for e in errors.values())
    chosen = report["allocation"]["allocation"]
    assert errors[chosen] == min(errors.values())
    # the CLI's last line names an allocation other than the default's
    for allocation, ending in (("stream", "ratio 0.4)"), ("absolute", "ratio 0.4, allocation absolute)")):
        relabelled = Report(**{**report, "allocation": {"allocation": allocation}})
        assert format_table(relabelled).splitlines()[-1].endswith(ending)
    alone = cli("alone", str(tmp_path / "s"), "--allocation", chosen)
    assert alone["allocation"] == {"allocation": chosen}
    assert [b["width_after"] for b in alone["blocks"]] == [b["width_after"] for b in report["blocks"]]
    # the API takes its validation samples from the same first batches
    batches = [dict(np.load(tmp_path / "s" / f"{s}.npz")) for s in range(3)]
    pruned = prune(model, batches, 0.4, options=PruneOptions(allocation="measured"))
    widths = [b.width for b in find_mlp_blocks(pruned)]
    assert widths == [b["width_after"] for b in report["blocks"]]
    # statistics alone carry no samples to measure on: the stream allocation, said so
    fallback = cli("fallback", "--stats", str(tmp_path / "s.npz"), "--allocation", "measured")
    assert fallback["allocation"] == {"allocation": "stream"}
    assert "--allocation measured needs calibration samples" in caplog.text


def test_measured_allocation_takes_batches_of_different_lengths() -> None:
    """Text batches are padded each to its own longest sample: the validation outputs of two
    batches need not stack."""
    from onnx_vbp.pipeline import PruneOptions, prune

    model = build_model([BlockSpec(hidden=24, layer_scale=s) for s in (0.05, 1.0, 8.0)], seq="seq", seed=12)
    batches = [random_batch(model, batch=n, seed=n) for n in (16, 12, 20, 16)]  # the sequence is as long as the batch
    assert len({b["x"].shape[1] for b in batches}) == 3
    pruned = prune(model, batches, 0.4, options=PruneOptions(allocation="measured"))
    assert sum(b.width for b in find_mlp_blocks(pruned)) == 72 - int(0.4 * 72)


def test_ranking_lambda_ranks_and_ridge_lambda_refits(tmp_path: Path) -> None:
    """`--ranking-lambda` changes the obs ranking's ridge term alone: the plan is the one ranked
    with it, and fc2 is refit with `ridge_lambda` as before."""
    from onnx_vbp.pipeline import PruneOptions, allocated_plan, prune

    path, model = _streamed_blocks(tmp_path)
    blocks = find_mlp_blocks(model)
    batches = [random_batch(model, batch=16, seed=s) for s in range(3)]
    stats = calibrate(model, blocks, batches, comoments=True)

    def expected(rank_lambda: float) -> tuple[dict, onnx.ModelProto]:
        ranked = rankings(stats, "obs", model, blocks, ridge_lambda=rank_lambda)
        plan = allocated_plan(stats, blocks, PruneOptions(ratio=0.4), lambda depths: ranked)[0]
        return plan.keep, rewrite(model, blocks, stats, plan, compensate="ridge", ridge_lambda=1e-3)

    default_keep, _ = expected(1e-3)
    keep, manual = expected(1.0)
    assert any(not np.array_equal(keep[n], default_keep[n]) for n in keep)  # λ = 1 ranks differently here
    pruned = prune(model, batches, 0.4, options=PruneOptions(ranking_lambda=1.0))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in manual.graph.initializer}
    for init in pruned.graph.initializer:
        np.testing.assert_allclose(onnx.numpy_helper.to_array(init), weights[init.name], rtol=1e-5, atol=1e-6)
    # through the CLI: the report says which λ ranked, and --ranking-lambda equal to
    # --ridge-lambda is the default exactly
    reports = {}
    for name, args in (("default", []), ("same", ["--ranking-lambda", "1e-3"]), ("one", ["--ranking-lambda", "1"])):
        out = tmp_path / f"{name}.json"
        argv = [str(path), str(tmp_path / "s"), "--ratio", "0.4", "-q", "-o", str(tmp_path / f"{name}.onnx")]
        assert main([*argv, "--report", str(out), *args]) == 0
        reports[name] = json.loads(out.read_text())
    assert [r["ranking_lambda"] for r in reports.values()] == [1e-3, 1e-3, 1.0]
    assert all(r["ridge_lambda"] == 1e-3 for r in reports.values())
    widths = {name: [b["width_after"] for b in r["blocks"]] for name, r in reports.items()}
    assert widths["same"] == widths["default"] == [default_keep[b.name].size for b in blocks]
    assert widths["one"] == [keep[b.name].size for b in blocks]
    assert (tmp_path / "same.onnx").read_bytes() == (tmp_path / "default.onnx").read_bytes()
    summary = format_table(Report(**reports["one"])).splitlines()[-1]  # the CLI's last line says so
    assert summary.endswith("(--method obs, global, ratio 0.4, ranking λ 1)")
    assert format_table(Report(**reports["same"])).splitlines()[-1].endswith("(--method obs, global, ratio 0.4)")
    with pytest.raises(ValueError, match="ranking_lambda"):
        PruneOptions(ranking_lambda=float("nan"))
