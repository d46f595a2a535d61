"""onnx-vbp sweep: one calibration, several ratios, retention, the largest ratio meeting a target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import BlockSpec, build_model, random_batch

from onnx_vbp import find_mlp_blocks
from onnx_vbp.cli import main
from onnx_vbp.data import DataError
from onnx_vbp.sweep import pick, retention, retention_metric


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=32, act="relu")], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    for folder, seeds in (("calib", (0, 1, 2)), ("held_out", (5,))):
        (tmp_path / folder).mkdir()
        for s in seeds:
            np.savez(tmp_path / folder / f"{s}.npz", **random_batch(model, batch=8, seed=s))
    return tmp_path


def _sweep(ws: Path, ratios: str | None = None) -> list[str]:
    """The sweep command line on the workspace's model and data, at `ratios` (else the default ones)."""
    argv = ["sweep", str(ws / "net.onnx"), str(ws / "calib"), "--eval", str(ws / "held_out")]
    return argv if ratios is None else [*argv, "--ratios", ratios]


def test_sweep_table_report_target_and_plot(ws: Path, capsys) -> None:
    argv = [
        *_sweep(ws, "0,0.25,0.5,0.75"),
        "--target-retention",
        "0.95",
        "-o",
        str(ws / "best.onnx"),
        "--report",
        str(ws / "sweep.json"),
        "--plot",
        str(ws / "sweep.png"),
    ]
    assert main(argv) == 0
    rows = json.loads((ws / "sweep.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0, 0.25, 0.5, 0.75]
    assert rows[0]["retention"] == pytest.approx(1.0) and rows[0]["macs_after"] == rows[0]["macs_before"]
    assert [r["macs_after"] for r in rows] == sorted((r["macs_after"] for r in rows), reverse=True)
    best = max((r for r in rows if r["retention"] >= 0.95), key=lambda r: r["ratio"])
    widths = [b.width for b in find_mlp_blocks(onnx.load(ws / "best.onnx"))]
    assert sum(widths) == best["neurons_after"]
    assert (ws / "sweep.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert f"largest ratio with retention >= 0.95: {best['ratio']:g}" in out
    assert sorted(p.name for p in ws.iterdir()) == [
        "best.onnx",
        "calib",
        "held_out",
        "net.onnx",
        "sweep.json",
        "sweep.png",
    ]


def test_output_needs_a_target(ws: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*_sweep(ws), "-o", str(ws / "x.onnx")])
    assert exc.value.code == 2


def test_retention_and_pick() -> None:
    labelled = {"top1_before": 0.8, "top1_after": 0.6, "outputs": {"y": {"cosine": 0.9}}}
    assert retention(labelled) == pytest.approx(0.75)
    assert retention({"outputs": {"logits": {"cosine": 0.97}, "z": {"cosine": 0.5}}}) == 0.97
    # an encoder: token embeddings first, the pooled sentence embedding (2-D: top1_agreement) second
    encoder = {"outputs": {"tokens": {"cosine": 0.9}, "sentence": {"cosine": 0.95, "top1_agreement": 1.0}}}
    assert retention(encoder) == 0.95 and retention_metric(encoder) == "cosine of sentence"
    assert retention(encoder, "tokens") == 0.9 and retention(labelled, "y") == 0.9  # asked: that output's cosine
    with pytest.raises(DataError, match="no float output named 'pooled'"):
        retention(encoder, "pooled")
    rows = [{"ratio": 0.1, "retention": 0.99}, {"ratio": 0.3, "retention": 0.97}, {"ratio": 0.2, "retention": 0.96}]
    assert pick(rows, 0.965)["ratio"] == 0.3
    assert pick(rows, 0.999) is None
    assert pick([{"ratio": 0.0, "retention": 1.0}, *rows], 0.999) is None  # the baseline meets any target
    for row in rows:
        row.update(macs_before=100, macs_after=100 - 60 * row["ratio"])  # 94, 82, 88
    assert pick(rows, max_macs=0.9)["ratio"] == 0.2  # the smallest ratio within the budget
    assert pick(rows, target=0.96, max_macs=0.9)["ratio"] == 0.3  # the largest meeting both
    assert pick(rows, target=0.98, max_macs=0.9) is None


def test_the_chosen_model_of_an_external_data_model_loads_from_its_own_name(ws: Path) -> None:
    """The chosen ratio's data file is renamed with it: `best.onnx` names `best.onnx.data`."""
    model = build_model([BlockSpec(hidden=128), BlockSpec(hidden=128, act="relu")], seq=6)  # weights >= 1 KiB
    onnx.save(model, ws / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    argv = [
        "sweep",
        str(ws / "ext.onnx"),
        str(ws / "calib"),
        "--eval",
        str(ws / "held_out"),
        "-q",
        "--ratios",
        "0.25,0.5",
        "--target-retention",
        "0",
        "-o",
        str(ws / "best.onnx"),
    ]
    assert main(argv) == 0
    header = onnx.load(ws / "best.onnx", load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    best = onnx.load(ws / "best.onnx")  # reads its external data: fails if the named file is missing
    assert locations == {"best.onnx.data"}
    assert sum(b.width for b in find_mlp_blocks(best)) == 128  # the 0.5 row: largest meeting the target


def test_plot_without_matplotlib_fails_before_the_sweep(ws: Path, capsys, monkeypatch) -> None:
    import onnx_vbp.sweep as sweep_module

    def no_matplotlib():
        raise sweep_module.DataError("plotting needs matplotlib: pip install 'onnx_vbp[plot]'")

    monkeypatch.setattr(sweep_module, "_pyplot", no_matplotlib)
    monkeypatch.setattr(sweep_module, "prepare", lambda *a, **k: pytest.fail("calibrated before failing"))
    argv = [*_sweep(ws), "--plot", str(ws / "p.png")]
    assert main(argv) == 1
    assert "plotting needs matplotlib" in capsys.readouterr().err


def test_an_unmet_target_exits_3_and_writes_nothing(ws: Path, capsys) -> None:
    argv = [
        *_sweep(ws, "0.5,0.75"),
        "--target-retention",
        "1.5",
        "-o",
        str(ws / "best.onnx"),
    ]
    assert main(argv) == 3
    assert "largest ratio with retention >= 1.5: none" in capsys.readouterr().out
    assert not (ws / "best.onnx").exists()


def test_verbose_sweep_logs_each_ratio_and_its_evaluation(ws: Path, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="onnx_vbp")
    argv = _sweep(ws, "0.25,0.5")
    assert main(argv) == 0
    assert "ratio 0.25 (1 of 2): retention" in caplog.text and "ratio 0.5 (2 of 2): retention" in caplog.text
    assert caplog.text.count("evaluated on 8 held-out samples") == 2


def test_metric_names_the_output_retention_is_measured_on(ws: Path, capsys) -> None:
    argv = _sweep(ws, "0.25")
    assert main([*argv, "--metric", "y"]) == 0
    assert "cosine of y" in capsys.readouterr().out
    assert main([*argv, "--metric", "pooled"]) == 1
    assert "--metric pooled: the model has no such output (y)" in capsys.readouterr().err


def test_output_dir_keeps_every_ratios_model(ws: Path, capsys) -> None:
    base = _sweep(ws, "0,0.5")
    argv = [*base, "--output-dir", str(ws / "models" / "net"), "--report", str(ws / "s.json")]
    assert main(argv) == 0
    rows = json.loads((ws / "s.json").read_text())["rows"]
    assert sorted(p.name for p in (ws / "models" / "net").iterdir()) == ["net.r0.5.onnx", "net.r0.onnx"]
    for row in rows:
        assert row["output"] == str(ws / "models" / "net" / f"net.r{row['ratio']:g}.onnx")
        widths = [b.width for b in find_mlp_blocks(onnx.load(row["output"]))]
        assert sum(widths) == row["neurons_after"]
    assert [r["neurons_after"] for r in rows] == [64, 32]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--target-retention", "0.9", "-o", str(ws / "x.onnx"), "--output-dir", str(ws / "d")])
    assert exc.value.code == 2


def test_plot_marks_the_target_and_the_chosen_ratio(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import onnx_vbp.sweep as sweep_module

    plt = sweep_module._pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [
        {"model": "m.onnx", "ratio": r, "macs_after": 100 - 60 * r, "macs_before": 100, "retention": 1 - r}
        for r in (0, 0.2)
    ]
    sweep_module.plot_sweep(rows, tmp_path / "p.png", target=0.75, best=rows[1])
    (axes,) = figures[0].axes
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["target 0.75", "chosen: 0.2"]
    assert axes.lines[-1].get_xydata().tolist() == [[12.0, 0.8]]


def test_target_macs_picks_the_smallest_ratio_within_the_budget(ws: Path, capsys) -> None:
    base = _sweep(ws, "0,0.25,0.5,0.75")
    assert main([*base, "--target-macs", "0.9", "-o", str(ws / "fit.onnx"), "--report", str(ws / "s.json")]) == 0
    summary = json.loads((ws / "s.json").read_text())
    fitting = [r for r in summary["rows"] if r["ratio"] > 0 and r["macs_after"] <= 0.9 * r["macs_before"]]
    assert summary["best_ratio"] == min(r["ratio"] for r in fitting)
    best = next(r for r in summary["rows"] if r["ratio"] == summary["best_ratio"])
    assert sum(b.width for b in find_mlp_blocks(onnx.load(ws / "fit.onnx"))) == best["neurons_after"]
    assert f"smallest ratio with MACs <= 0.9 x original: {best['ratio']:g}" in capsys.readouterr().out
    assert main([*base, "--target-macs", "0.01"]) == 3  # no ratio is that small


def test_target_latency_times_every_model_and_picks_within_the_budget(ws: Path, capsys) -> None:
    held_out = dict(np.load(ws / "held_out" / "5.npz"))
    np.savez(ws / "held_out" / "5.npz", **held_out, labels=np.arange(len(held_out["x"])) % 3)  # timed without them
    base = _sweep(ws, "0,0.5")
    assert main([*base, "--target-latency", "1e6", "--report", str(ws / "s.json")]) == 0
    summary = json.loads((ws / "s.json").read_text())
    assert all(r["latency_ms"] > 0 and r["original_latency_ms"] > 0 for r in summary["rows"])
    assert summary["best_ratio"] == 0.5  # the only ratio above 0: any latency meets 1e6 ms
    out = capsys.readouterr().out
    assert "smallest ratio with latency <= 1e+06 ms: 0.5" in out and " ms " in out.splitlines()[0] + " "
    assert main([*base, "--target-latency", "1e-9"]) == 3  # nothing runs in a picosecond


def test_sweep_progress_counts_ratios_with_a_total(ws: Path, monkeypatch) -> None:
    import onnx_vbp.sweep as sweep_module

    bars, steps = [], []
    real = sweep_module.progress_bar

    def recording(desc, total, options, unit="sample"):
        bar = real(desc, total, options, unit)
        bar.update = steps.append  # a bar off the terminal is disabled: count its steps here
        bars.append((desc, total, unit))
        return bar

    monkeypatch.setattr(sweep_module, "progress_bar", recording)
    assert main([*_sweep(ws, "0,0.25,0.5"), "-q"]) == 0
    assert bars == [("sweep", 3, "ratio")] and steps == [1, 1, 1]


def test_a_ratio_given_twice_is_swept_once(ws: Path) -> None:
    assert main([*_sweep(ws, "0.5,0.25,0.5"), "-q", "--report", str(ws / "s.json")]) == 0
    assert [r["ratio"] for r in json.loads((ws / "s.json").read_text())["rows"]] == [0.5, 0.25]
