"""The command line on files: outputs, report, external data, and clean failures."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import BlockSpec, build_model, quantize_static_int8, random_batch
from helpers import session_optimized

from onnx_vbp.cli import main
from onnx_vbp.report import Report


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=32, act="relu")], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        np.savez(calib / f"b{i}.npz", **random_batch(model, batch=8, seed=i))
    return tmp_path


def test_prunes_to_default_output_with_json_report(workspace: Path, capsys) -> None:
    before = _digest(workspace / "net.onnx")
    rc = main(
        [
            str(workspace / "net.onnx"),
            str(workspace / "calib"),
            "--ratio",
            "0.5",
            "--report",
            str(workspace / "r.json"),
            "--eval",
            str(workspace / "calib"),
        ]
    )
    assert rc == 0
    assert _digest(workspace / "net.onnx") == before
    out = workspace / "net.vbp.onnx"
    assert out.exists() and not list(workspace.glob(".net.vbp.onnx.*"))
    report = json.loads((workspace / "r.json").read_text())
    for key in (
        "ratio",
        "scope",
        "blocks",
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "file_bytes_before",
        "file_bytes_after",
        "calibration",
        "eval",
    ):
        assert key in report
    assert report["calibration"]["samples"] == 24
    assert sum(b["width_after"] for b in report["blocks"]) == 32
    assert {b["fc1"] for b in report["blocks"]} == {"/blocks.0/mlp/fc1/MatMul", "/blocks.1/mlp/fc1/MatMul"}
    # MACs per sample: 6 tokens x (8x32 + 32x8) per block before; half the hidden neurons after
    assert report["macs_before"] == 2 * 6 * 2 * 8 * 32
    assert report["macs_after"] == 6 * 2 * 8 * 32
    assert report["params_after"] == report["params_before"] - 32 * (8 + 1 + 8)
    assert report["file_bytes_after"] == out.stat().st_size < report["file_bytes_before"]
    assert 0.0 < report["eval"]["outputs"]["y"]["rel_l2"] < 1.0
    table = capsys.readouterr().out
    assert "MACs/sample" in table and "/blocks.0/mlp" in table


def test_ratio_zero_writes_an_equivalent_model(workspace: Path) -> None:
    assert (
        main(
            [
                str(workspace / "net.onnx"),
                str(workspace / "calib"),
                "--ratio",
                "0",
                "-q",
                "-o",
                str(workspace / "same.onnx"),
            ]
        )
        == 0
    )
    feed = dict(np.load(workspace / "calib" / "b0.npz"))
    a = ort.InferenceSession(str(workspace / "net.onnx")).run(None, feed)[0]
    b = ort.InferenceSession(str(workspace / "same.onnx")).run(None, feed)[0]
    assert np.max(np.abs(a - b)) <= 1e-6


def test_external_data_is_kept_and_travels_with_the_output(workspace: Path) -> None:
    model = build_model([BlockSpec(hidden=128), BlockSpec(hidden=128)], seq=6)
    source = workspace / "ext"
    source.mkdir()
    onnx.save(model, source / "big.onnx", save_as_external_data=True, location="big.weights", size_threshold=0)
    other = workspace / "elsewhere"
    other.mkdir()
    assert main([str(source / "big.onnx"), str(workspace / "calib"), "-q", "-o", str(other / "small.onnx")]) == 0
    assert (other / "small.onnx.data").exists()
    loaded = onnx.load(other / "small.onnx", load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in loaded.graph.initializer)
    feed = dict(np.load(workspace / "calib" / "b0.npz"))
    assert ort.InferenceSession(str(other / "small.onnx")).run(None, feed)[0].shape == feed["x"].shape
    assert sorted(p.name for p in other.iterdir()) == ["small.onnx", "small.onnx.data"]


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "onnx_vbp", "--help"], capture_output=True, text=True, check=True)
    assert "--ratio" in result.stdout and "Variance-Based Pruning" in result.stdout


def test_large_external_weights_stay_on_disk_and_prune_like_in_memory(tmp_path: Path) -> None:
    """Weights >= 1 MiB are read from their files only when sliced; the result must be the same
    model as pruning the fully loaded one."""
    from onnx.external_data_helper import uses_external_data

    from onnx_vbp import PruneOptions, prune_file
    from onnx_vbp.modelio import load_model

    model = build_model([BlockSpec(hidden=1024), BlockSpec(hidden=1024, act="relu")], dim=256, seq=4)
    onnx.save(model, tmp_path / "inline.onnx")
    (tmp_path / "ext").mkdir()  # (saving with external data moves model's weights: inline first)
    onnx.save(model, tmp_path / "ext" / "big.onnx", save_as_external_data=True, location="big.bin")
    data_digest = _digest(tmp_path / "ext" / "big.bin")
    (tmp_path / "calib").mkdir()
    for i in range(2):
        np.savez(tmp_path / "calib" / f"b{i}.npz", **random_batch(model, batch=8, seed=i))

    loaded, external = load_model(tmp_path / "ext" / "big.onnx")
    on_disk = {t.name for t in loaded.graph.initializer if uses_external_data(t)}
    assert external and len(on_disk) == 4  # the four 256 x 1024 weights; biases were read

    options = PruneOptions(ratio=0.4, progress=False)
    lazy = prune_file(tmp_path / "ext" / "big.onnx", tmp_path / "calib", tmp_path / "lazy.onnx", options)
    eager = prune_file(tmp_path / "inline.onnx", tmp_path / "calib", tmp_path / "eager.onnx", options)
    assert lazy.blocks == eager.blocks and lazy.macs_after == eager.macs_after
    assert _digest(tmp_path / "ext" / "big.bin") == data_digest
    feed = random_batch(model, batch=5, seed=7)
    a = ort.InferenceSession(str(tmp_path / "lazy.onnx")).run(None, feed)[0]
    b = ort.InferenceSession(str(tmp_path / "eager.onnx")).run(None, feed)[0]
    assert np.array_equal(a, b)


def test_report_dash_prints_the_json_report_on_stdout_with_versions_and_data(tmp_path: Path, capsys) -> None:
    import onnx_vbp

    model = build_model([BlockSpec(hidden=16)], seq=4)
    onnx.save(model, tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", **random_batch(model, batch=24))
    assert (
        main(
            [
                str(tmp_path / "net.onnx"),
                str(tmp_path / "calib.npz"),
                "--report",
                "-",
                "--eval",
                str(tmp_path / "calib.npz"),
                "-o",
                str(tmp_path / "out.onnx"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)  # stdout is the report and nothing else
    assert report["versions"]["onnx_vbp"] == onnx_vbp.__version__ and "onnxruntime" in report["versions"]
    assert report["calibration"]["data"] == str(tmp_path / "calib.npz")
    assert report["eval"]["data"] == {"data": str(tmp_path / "calib.npz")}
    assert not (tmp_path / "-").exists() and (tmp_path / "out.onnx").exists()
    # the JSON is the typed Report, in order (`reconstruct` only with --reconstruct)
    assert list(report) == [f.name for f in dataclasses.fields(Report) if f.name != "reconstruct"]
    argv = [str(tmp_path / "net.onnx"), str(tmp_path / "calib.npz"), "--json", "-o", str(tmp_path / "again.onnx")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(tmp_path / "again.onnx")  # --json: the same


def test_inspect_lists_blocks_with_macs_and_hints_for_quantized_models(tmp_path: Path, capsys, monkeypatch) -> None:
    from onnxruntime.quantization import quantize_dynamic

    model = build_model([BlockSpec(hidden=64), BlockSpec(hidden=32, act="relu")], dim=16, seq=4)
    onnx.save(model, tmp_path / "net.onnx")
    assert main(["inspect", str(tmp_path / "net.onnx"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(b["width"], b["activation"], b["sites"]) for b in found["blocks"]] == [(64, "gelu", 1), (32, "relu", 1)]
    # fc1 and fc2 of a block: 2 x tokens x dim x width MACs per sample (4 tokens at this fixed input)
    assert [b["macs"] for b in found["blocks"]] == [2 * 4 * 16 * 64, 2 * 4 * 16 * 32]
    assert found["macs"] == found["macs_in_blocks"] and found["hints"] == []
    assert found["second_moments"]["bytes"] == 8 * (64**2 + 32**2) and found["second_moments"]["fits"]
    # on a machine with less memory available than the second moments need, it says what the default would do
    monkeypatch.setattr(importlib.import_module("onnx_vbp.calibrate"), "available_memory", lambda: 8 * (64**2 + 32**2))
    assert main(["inspect", str(tmp_path / "net.onnx")]) == 0
    assert "the default would fall back to --method vbp" in capsys.readouterr().out

    quantize_static_int8(tmp_path / "net.onnx", tmp_path / "int8.onnx", model, "QOperator")  # QLinearMatMul
    assert main(["inspect", str(tmp_path / "int8.onnx")]) == 0
    out = capsys.readouterr().out
    assert "0 MLP blocks" in out and "hint: the model is quantized (QLinearMatMul)" in out
    assert "hint: no prunable MLP block" in out
    quantize_dynamic(str(tmp_path / "net.onnx"), str(tmp_path / "dynamic.onnx"))  # pruned in place: no hint
    assert main(["inspect", str(tmp_path / "dynamic.onnx"), "--json"]) == 0
    dynamic = json.loads(capsys.readouterr().out)
    assert [b["width"] for b in dynamic["blocks"]] == [64, 32] and dynamic["hints"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "0.85"], "--ratio 0.85 removes most of the MLP neurons"),
        (["--eval", "{calib}"], "--eval is the calibration data itself"),
        (["--ratio", "0.6", "--scope", "per-block", "--min-keep", "0"], None),  # control: no warning
    ],
    ids=["ratio", "eval-is-calib", "control"],
)
def test_dubious_runs_warn(workspace: Path, caplog, extra: list[str], message: str | None) -> None:
    calib = workspace / "calib"
    argv = [
        str(workspace / "net.onnx"),
        str(calib),
        "-q",
        "-o",
        str(workspace / "out.onnx"),
        *[a.format(calib=calib) for a in extra],
    ]
    assert main(argv) == 0
    if message is None:
        assert not caplog.records
    else:
        assert message in caplog.text


def test_a_block_left_with_under_a_fifth_of_its_neurons_warns(workspace: Path, caplog) -> None:
    """30 of the second block's 32 neurons are constant: vbp's global variance ranking takes them."""
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=32, act="relu", const_neurons=30)], seq=6)
    onnx.save(model, workspace / "net.onnx")
    for i, path in enumerate(sorted((workspace / "calib").iterdir())):
        np.savez(path, **random_batch(model, batch=8, seed=i))
    assert (
        main(
            [
                str(workspace / "net.onnx"),
                str(workspace / "calib"),
                "-q",
                "--ratio",
                "0.5",
                "--method",
                "vbp",
                "-o",
                str(workspace / "out.onnx"),
            ]
        )
        == 0
    )
    assert "block /blocks.1/mlp keeps only 1 of its 32 neurons" in caplog.text  # --min-keep 1 holds it


def test_statistics_with_calibration_data_say_the_data_is_unused(workspace: Path, caplog) -> None:
    stats = workspace / "s.npz"
    assert (
        main(
            [
                str(workspace / "net.onnx"),
                str(workspace / "calib"),
                "-q",
                "--save-stats",
                str(stats),
                "-o",
                str(workspace / "a.onnx"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                str(workspace / "net.onnx"),
                str(workspace / "calib"),
                "--stats",
                str(stats),
                "-q",
                "-o",
                str(workspace / "b.onnx"),
            ]
        )
        == 0
    )
    assert "is not used: pruning from the statistics in" in caplog.text


@pytest.mark.parametrize("form", ["QOperator", "QDQ saved by ORT's session optimizer"])
def test_a_quantized_model_without_blocks_is_told_to_prune_before_quantizing(
    workspace: Path, capsys, form: str
) -> None:
    """A QDQ model as ORT's session optimizer saves it, with a ReLU block (ORT folds the ReLU into
    the QuantizeLinear before fc2's QLinearMatMul, which find does not follow): prune the QDQ
    model first."""
    net = workspace / "net.onnx"
    if form == "QOperator":
        quantize_static_int8(net, workspace / "int8.onnx", onnx.load(net), "QOperator")
    else:
        relu = build_model([BlockSpec(hidden=32, act="relu")], seq=6)
        onnx.save(relu, net)
        quantize_static_int8(net, workspace / "qdq.onnx", relu, "QDQ")
        session_optimized(workspace / "qdq.onnx", workspace / "int8.onnx")
    assert main([str(workspace / "int8.onnx"), str(workspace / "calib"), "-o", str(workspace / "o.onnx")]) == 1
    err = capsys.readouterr().err
    assert "the model is quantized (QLinearMatMul): prune the float model, then quantize it (a QDQ model" in err
    assert "prune the QDQ model, then optimize it" in err
    assert (
        main([str(workspace / "int8.onnx"), str(workspace / "calib"), "--allow-empty", "-o", str(workspace / "o.onnx")])
        == 0
    )
    assert "no prunable MLP block: the output is an unchanged copy" in capsys.readouterr().out


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_with_a_static_batch_prunes_evaluates_and_benches(tmp_path: Path, capsys, batch: int) -> None:
    model = build_model([BlockSpec(hidden=16), BlockSpec(hidden=16, act="relu")], seq=4, batch=batch)
    onnx.save(model, tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(24, 4, 8)).astype(np.float32))
    assert (
        main(
            [
                str(tmp_path / "net.onnx"),
                str(tmp_path / "calib.npz"),
                "--eval",
                str(tmp_path / "calib.npz"),
                "--report",
                str(tmp_path / "r.json"),
                "-q",
                "-o",
                str(tmp_path / "out.onnx"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["eval"]["samples"] == 24 - 24 % batch and report["macs_after"] < report["macs_before"]
    assert main(["inspect", str(tmp_path / "net.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == {"x": [batch, 4, 8]}
    assert (
        main(
            ["bench", str(tmp_path / "net.onnx"), str(tmp_path / "out.onnx"), "--runs", "2", "--warmup", "0", "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mac_bound"] == report["macs_before"] / report["macs_after"]


def test_a_model_from_orts_fp16_converter_prunes(tmp_path: Path) -> None:
    """convert_float_to_float16(keep_io_types=True) appends its input Casts after their readers:
    onnx.checker refuses the order, ORT sorts it, and so does load_model."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=32, act="relu")], seq=4)
    onnx.save(convert_float_to_float16(model, keep_io_types=True), tmp_path / "fp16.onnx")
    np.savez(tmp_path / "calib.npz", **random_batch(model, batch=24))
    assert (
        main(
            [
                str(tmp_path / "fp16.onnx"),
                str(tmp_path / "calib.npz"),
                "-q",
                "--report",
                str(tmp_path / "r.json"),
                "-o",
                str(tmp_path / "out.onnx"),
            ]
        )
        == 0
    )
    pruned = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(pruned, full_check=True)  # written sorted, with consistent shapes
    weights = [t for t in pruned.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert json.loads((tmp_path / "r.json").read_text())["neurons_after"] == 64 - round(0.35 * 64)


def test_a_model_saved_by_orts_session_optimizer_below_opset_17_prunes(tmp_path: Path, capsys) -> None:
    """ORT's session optimizer fuses LayerNorm into LayerNormalization in the default domain at any
    opset (ORT defines it from opset 1, ONNX from 17): onnx.checker refuses the saved model, ORT
    runs it, and so does onnx_vbp, which checks the rest of the graph and still refuses an op that
    neither defines."""
    model = build_model([BlockSpec(hidden=32), BlockSpec(hidden=32)], seq=4, opset=14, layernorm=True)
    onnx.save(model, tmp_path / "net.onnx")
    session_optimized(tmp_path / "net.onnx", tmp_path / "optimized.onnx")
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert {n.op_type for n in optimized.graph.node if n.domain == ""} >= {"LayerNormalization"}
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for LayerNormalization"):
        onnx.checker.check_model(optimized)
    np.savez(tmp_path / "calib.npz", **random_batch(model, batch=24))
    run = [str(tmp_path / "calib.npz"), "-q", "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "out.onnx")]
    assert main([str(tmp_path / "optimized.onnx"), *run]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["neurons_after"] == 64 - round(0.35 * 64)
    feed = random_batch(model, batch=2, seed=1)
    (got,) = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    assert np.isfinite(got).all()
    for node in optimized.graph.node:
        if node.op_type == "LayerNormalization":
            node.op_type = "LayerNormalisation"  # no schema in ONNX or ORT
            break
    onnx.save(optimized, tmp_path / "unknown.onnx")
    capsys.readouterr()
    assert main([str(tmp_path / "unknown.onnx"), *run]) != 0
    assert "fails onnx.checker: No Op registered for LayerNormalisation" in capsys.readouterr().err


def test_inspect_counts_a_gemm_with_its_bias_once(tmp_path: Path, capsys) -> None:
    onnx.save(build_model([BlockSpec(hidden=64, fc="gemm")], dim=16), tmp_path / "gemm.onnx")
    assert main(["inspect", str(tmp_path / "gemm.onnx"), "--json"]) == 0
    (block,) = json.loads(capsys.readouterr().out)["blocks"]
    assert block["macs"] == 2 * 16 * 64  # fc1 and fc2 of one row; fc1's weight and bias sit on one Gemm


def test_progress_bars_know_their_totals(workspace: Path, monkeypatch) -> None:
    """Calibration and evaluation show totals (and so an ETA), counted from the files' headers."""
    from tqdm import tqdm

    import onnx_vbp.pipeline as pipeline

    bars: list[tuple[str, int | None]] = []

    def recorded(desc, total, options):
        bars.append((desc, total))
        return tqdm(disable=True)

    monkeypatch.setattr(pipeline, "progress_bar", recorded)
    assert (
        main(
            [
                str(workspace / "net.onnx"),
                str(workspace / "calib"),
                "--eval",
                str(workspace / "calib"),
                "--max-samples",
                "20",
                "-o",
                str(workspace / "o.onnx"),
            ]
        )
        == 0
    )
    assert bars == [("calibrating", 20), ("evaluating", 24)]  # eval is not capped by --max-samples
