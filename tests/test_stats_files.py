"""Saved, loaded and merged statistics: shards merged equal one pass; pruning from them matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import BlockSpec, build_model, random_batch

from onnx_vbp.cli import main
from onnx_vbp.stats import load_stats


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=24, act="silu", gated=True)], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    for folder, seeds in (("shard_a", (0, 1)), ("shard_b", (2,)), ("all", (0, 1, 2))):
        (tmp_path / folder).mkdir()
        for s in seeds:
            np.savez(tmp_path / folder / f"{s}.npz", **random_batch(model, batch=7 + s, seed=s))
    return tmp_path


def _run(ws: Path, *args: str) -> int:
    return main([str(ws / "net.onnx"), *args, "-q", "--min-samples", "1"])


def test_shards_merged_equal_one_pass_and_prune_the_same(ws: Path) -> None:
    for name in ("shard_a", "shard_b", "all"):
        assert (
            _run(
                ws,
                str(ws / name),
                "--compensate",
                "ridge",
                "--save-stats",
                str(ws / f"{name}.npz"),
                "-o",
                str(ws / f"{name}.onnx"),
            )
            == 0
        )
    assert main(["merge-stats", str(ws / "shard_a.npz"), str(ws / "shard_b.npz"), "-o", str(ws / "merged.npz")]) == 0

    merged, samples, feed, _ = load_stats(ws / "merged.npz")
    one_pass, one_pass_samples, _, _ = load_stats(ws / "all.npz")
    assert samples == one_pass_samples == 7 + 8 + 9 and set(feed) == {"x"}
    for name, stats in one_pass.items():
        assert merged[name].count == stats.count
        for field in ("mean", "m2", "comoment"):
            np.testing.assert_allclose(getattr(merged[name], field), getattr(stats, field), rtol=1e-12, atol=1e-12)

    assert _run(ws, "--stats", str(ws / "merged.npz"), "--compensate", "ridge", "-o", str(ws / "from_stats.onnx")) == 0
    x = random_batch(onnx.load(ws / "net.onnx"), batch=5, seed=9)
    a = ort.InferenceSession(str(ws / "all.onnx")).run(None, x)[0]
    b = ort.InferenceSession(str(ws / "from_stats.onnx")).run(None, x)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_statistics_of_another_model_are_refused(ws: Path, capsys) -> None:
    assert _run(ws, str(ws / "all"), "--save-stats", str(ws / "s.npz"), "-o", str(ws / "o.onnx")) == 0
    onnx.save(build_model([BlockSpec(hidden=16)], seq=6), ws / "other.onnx")
    rc = main([str(ws / "other.onnx"), "--stats", str(ws / "s.npz"), "-q", "-o", str(ws / "o2.onnx")])
    assert rc == 1 and "do not match this model's MLP blocks" in capsys.readouterr().err
    assert not (ws / "o2.onnx").exists()


def test_statistics_of_a_model_with_the_same_blocks_but_other_weights_are_refused(ws: Path, capsys, caplog) -> None:
    """Same architecture, other weights (another seed: as after fine-tuning) is refused; the same
    model stored with external data is the same model; an older file without a fingerprint warns."""
    assert _run(ws, str(ws / "all"), "--save-stats", str(ws / "s.npz"), "-o", str(ws / "o.onnx")) == 0
    twin = build_model([BlockSpec(hidden=32), BlockSpec(hidden=24, act="silu", gated=True)], seq=6, seed=1)
    onnx.save(twin, ws / "twin.onnx")
    rc = main([str(ws / "twin.onnx"), "--stats", str(ws / "s.npz"), "-q", "-o", str(ws / "o2.onnx")])
    assert rc == 1 and "were measured on another model" in capsys.readouterr().err
    assert not (ws / "o2.onnx").exists()

    onnx.save(
        onnx.load(ws / "net.onnx"), ws / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    assert main([str(ws / "ext.onnx"), "--stats", str(ws / "s.npz"), "-q", "-o", str(ws / "o3.onnx")]) == 0

    with np.load(ws / "s.npz") as archive:
        np.savez(ws / "old.npz", **{k: archive[k] for k in archive.files if k != "__model__"})
    assert main([str(ws / "net.onnx"), "--stats", str(ws / "old.npz"), "-q", "-o", str(ws / "o4.onnx")]) == 0
    assert "carry no model fingerprint" in caplog.text

    assert (
        main(
            [
                str(ws / "twin.onnx"),
                str(ws / "all"),
                "-q",
                "--min-samples",
                "1",
                "--save-stats",
                str(ws / "twin.npz"),
                "-o",
                str(ws / "o6.onnx"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["merge-stats", str(ws / "s.npz"), str(ws / "twin.npz"), "-o", str(ws / "m.npz")]) == 1
    assert "measured on different models" in capsys.readouterr().err and not (ws / "m.npz").exists()


def test_statistics_without_second_moments(ws: Path, capsys, caplog) -> None:
    """VBP's statistics (no covariance) refuse an explicit ridge, and make the default method
    fall back to VBP with a warning instead of failing."""
    assert (
        _run(ws, str(ws / "all"), "--method", "vbp", "--save-stats", str(ws / "s.npz"), "-o", str(ws / "o.onnx")) == 0
    )
    rc = _run(ws, "--stats", str(ws / "s.npz"), "--method", "vbp", "--compensate", "ridge", "-o", str(ws / "o3.onnx"))
    assert rc == 1 and "need second moments, and there are none" in capsys.readouterr().err
    assert not (ws / "o3.onnx").exists()
    report = ws / "r.json"
    rc = main([str(ws / "net.onnx"), "--stats", str(ws / "s.npz"), "-o", str(ws / "o4.onnx"), "--report", str(report)])
    assert rc == 0 and "no second moments: pruning with --method vbp" in caplog.text
    assert json.loads(report.read_text())["method"] == "vbp"


def test_merging_statistics_of_different_models_fails(ws: Path, capsys) -> None:
    assert _run(ws, str(ws / "all"), "--save-stats", str(ws / "a.npz"), "-o", str(ws / "o.onnx")) == 0
    onnx.save(build_model([BlockSpec(hidden=16)], seq=6), ws / "other.onnx")
    assert (
        main(
            [
                str(ws / "other.onnx"),
                str(ws / "all"),
                "-q",
                "--min-samples",
                "1",
                "--save-stats",
                str(ws / "b.npz"),
                "-o",
                str(ws / "o2.onnx"),
            ]
        )
        == 0
    )
    assert main(["merge-stats", str(ws / "a.npz"), str(ws / "b.npz"), "-o", str(ws / "m.npz")]) == 1
    assert "cover different blocks" in capsys.readouterr().err and not (ws / "m.npz").exists()


def test_neither_calibration_data_nor_statistics(ws: Path, capsys) -> None:
    assert main([str(ws / "net.onnx"), "-q", "-o", str(ws / "o.onnx")]) == 1
    assert "give CALIB or --stats" in capsys.readouterr().err


def _without(arrays: dict, key: str) -> dict:
    return {k: v for k, v in arrays.items() if k != key}


def _with(arrays: dict, key: str, value) -> dict:
    return {**arrays, key: np.asarray(value)}


def _first(arrays: dict, part: str) -> str:
    return next(k for k in sorted(arrays) if k.startswith("stats/") and k.endswith(f"/{part}"))


DAMAGE = {  # a statistics file changed by hand or by a broken disk, and what the error names
    "missing count": (lambda a: _without(a, _first(a, "count")), "is missing"),
    "string mean": (lambda a: _with(a, _first(a, "mean"), ["x"] * a[_first(a, "mean")].size), "must be a number"),
    "NaN in m2": (lambda a: _with(a, _first(a, "m2"), np.full(a[_first(a, "m2")].shape, np.nan)), "NaN or infinite"),
    "negative m2": (lambda a: _with(a, _first(a, "m2"), -np.abs(a[_first(a, "m2")]) - 1), "negative sums of squares"),
    "infinite stream": (lambda a: _with(a, _first(a, "stream"), [np.inf, 1.0]), "NaN or infinite"),
    "comoment of the wrong shape": (lambda a: _with(a, _first(a, "comoment"), np.eye(3)), "of shape"),
    "array version": (lambda a: _with(a, "__version__", [1]), "not a statistics file"),
    "negative samples": (lambda a: _with(a, "__samples__", -5), "'__samples__' must be"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_statistics_files_are_refused_in_one_line(ws: Path, capsys, damage: str) -> None:
    assert _run(ws, str(ws / "all"), "--save-stats", str(ws / "s.npz"), "-o", str(ws / "o.onnx")) == 0
    with np.load(ws / "s.npz") as archive:
        arrays = {k: archive[k] for k in archive.files}
    change, message = DAMAGE[damage]
    np.savez(ws / "bad.npz", **change(arrays))
    rc = main([str(ws / "net.onnx"), "--stats", str(ws / "bad.npz"), "-o", str(ws / "o2.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and message in err, err
    assert not (ws / "o2.onnx").exists()


def test_second_moments_are_read_one_block_at_a_time_kept_spilled_or_skipped(tmp_path: Path) -> None:
    from onnx_vbp.stats import Stats, save_stats

    rng = np.random.default_rng(0)
    stats = {}
    for name, width in (("a", 3), ("b", 5)):
        values = rng.normal(size=(40, width))
        stats[name] = Stats.of(values, comoment=True)
    save_stats(tmp_path / "s.npz", stats, 40, {"x": np.zeros((1, 2), np.float32)})
    loaded = load_stats(tmp_path / "s.npz").stats
    spilled = load_stats(tmp_path / "s.npz", "spill").stats
    skipped = load_stats(tmp_path / "s.npz", "skip").stats
    for name, block in stats.items():
        np.testing.assert_array_equal(loaded[name].comoment, block.comoment)
        assert isinstance(spilled[name].comoment, np.memmap)
        np.testing.assert_array_equal(spilled[name].comoment, block.comoment)
        assert skipped[name].comoment is None
        np.testing.assert_array_equal(skipped[name].m2, block.m2)
