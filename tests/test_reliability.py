"""Bad input, as a matrix: every row must exit non-zero with a one-line message naming the problem,
leave the input byte-identical, and leave no output and no temporary file behind."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import BlockSpec, build_model, random_batch

import onnx_vbp.modelio
from onnx_vbp.cli import main

HIDDEN = 32


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace: net.onnx (two MLP blocks), calib/ with 24 samples, out/ for results."""
    model = build_model([BlockSpec(hidden=HIDDEN), BlockSpec(hidden=HIDDEN, act="relu")], seq=6)
    onnx.save(model, tmp_path / "net.onnx")
    (tmp_path / "calib").mkdir()
    for i in range(3):
        np.savez(tmp_path / "calib" / f"b{i}.npz", **random_batch(model, batch=8, seed=i))
    (tmp_path / "out").mkdir()
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _save_variant(ws: Path, name: str, edit: Callable[[onnx.ModelProto], None], **save) -> Path:
    model = onnx.load(ws / "net.onnx")
    edit(model)
    onnx.save(model, ws / name, **save)
    return ws / name


# --- each setup edits the workspace and returns (argv, message expected in the error line) ------


def model_missing(ws):
    return [ws / "nope.onnx", ws / "calib"], "model not found"


def model_is_directory(ws):
    return [ws / "calib", ws / "calib"], "not a file"


def model_empty(ws):
    (ws / "empty.onnx").write_bytes(b"")
    return [ws / "empty.onnx", ws / "calib"], "model file is empty"


def model_not_onnx(ws):
    (ws / "junk.onnx").write_bytes(b"\x08\x07garbage\xff\xff")
    return [ws / "junk.onnx", ws / "calib"], "not an ONNX model"


def model_truncated(ws):
    data = (ws / "net.onnx").read_bytes()
    (ws / "cut.onnx").write_bytes(data[: len(data) // 2])
    return [ws / "cut.onnx", ws / "calib"], "not an ONNX model or truncated"


def model_fails_checker(ws):
    def dangling(model):
        model.graph.node.insert(0, onnx.helper.make_node("Relu", ["undefined_tensor"], ["r"], name="dangling"))

    return [_save_variant(ws, "bad.onnx", dangling), ws / "calib"], "fails onnx.checker"


def external_data_missing(ws):
    path = _save_variant(
        ws, "ext.onnx", lambda m: None, save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    (ws / "ext.bin").unlink()
    return [path, ws / "calib"], "external data file not found"


def external_data_truncated(ws):
    path = _save_variant(
        ws, "ext.onnx", lambda m: None, save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    data = (ws / "ext.bin").read_bytes()
    (ws / "ext.bin").write_bytes(data[: len(data) - 100])
    return [path, ws / "calib"], "is truncated"


def _external_variant(ws: Path, name: str, edit: Callable[[dict[str, str]], None], folder: str = ".") -> Path:
    """The model with its weights in `w.bin`, then every tensor's external-data entries edited."""
    (ws / folder).mkdir(exist_ok=True)
    path = ws / folder / name
    onnx.save(onnx.load(ws / "net.onnx"), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        edit(entries)
        del tensor.external_data[:]
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
    onnx.save(model, path)
    return path


def external_data_absolute_path(ws):
    (ws / "secret").write_bytes(b"0" * 4096)
    path = _external_variant(ws, "abs.onnx", lambda e: e.update(location=str(ws / "secret")))
    return [path, ws / "calib"], "external data must lie in the folder of the file that names it"


def external_data_parent_path(ws):
    (ws / "secret").write_bytes(b"0" * 4096)
    path = _external_variant(ws, "up.onnx", lambda e: e.update(location="../secret"), folder="models")
    return [path, ws / "calib"], "external data must lie in the folder of the file that names it"


def external_data_link_out(ws):
    (ws / "secret").write_bytes(b"0" * 4096)
    (ws / "models").mkdir()
    (ws / "models" / "link.bin").symlink_to(ws / "secret")
    path = _external_variant(ws, "link.onnx", lambda e: e.update(location="link.bin"), folder="models")
    return [path, ws / "calib"], "a link out of"


def external_data_offset_not_a_number(ws):
    path = _external_variant(ws, "off.onnx", lambda e: e.update(offset="12abc"))
    return [path, ws / "calib"], "external data offset '12abc', not a whole number"


def external_data_negative_length(ws):
    path = _external_variant(ws, "len.onnx", lambda e: e.update(length="-4"))
    return [path, ws / "calib"], "external data length '-4', not a whole number"


def calib_pb_external_data_outside(ws):
    """A test data set's TensorProto may not read a file outside its folder (here: into --save-stats)."""
    (ws / "secret").write_bytes(np.ones((16, 6, 8), np.float32).tobytes())
    folder = ws / "pb" / "test_data_set_0"
    folder.mkdir(parents=True)
    tensor = onnx.TensorProto(
        name="x", data_type=onnx.TensorProto.FLOAT, dims=[16, 6, 8], data_location=onnx.TensorProto.EXTERNAL
    )
    tensor.external_data.add(key="location", value=str(ws / "secret"))
    (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    return [ws / "net.onnx", ws / "pb"], "external data must lie in the folder of the file that names it"


def model_ort_cannot_load(ws):
    def custom_op(model):
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
        out = model.graph.output[0].name
        model.graph.node.append(onnx.helper.make_node("Mystery", [out], ["mystery"], domain="com.example"))
        model.graph.output.append(onnx.helper.make_tensor_value_info("mystery", 1, ["b", "s", "d"]))

    return [_save_variant(ws, "custom.onnx", custom_op), ws / "calib"], "ONNX Runtime cannot load the model"


def no_mlp_block(ws):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, ["batch", 6, 8])],
        [onnx.helper.make_tensor_value_info("y", 1, ["batch", 6, 8])],
    )
    onnx.save(onnx.helper.make_model(graph), ws / "relu.onnx")
    return [ws / "relu.onnx", ws / "calib"], "looked for fc1 -> activation -> fc2"


def all_blocks_skipped(ws):
    def expose_hidden(model):
        for node in model.graph.node:
            if node.op_type == "MatMul" and "fc2" in node.name:
                model.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], 1, ["b", "s", "h"]))

    return [_save_variant(ws, "exposed.onnx", expose_hidden), ws / "calib"], "all skipped: "


def model_input_is_a_sequence(ws):
    def sequence_input(model):
        model.graph.input.append(onnx.helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None))
        model.graph.node.append(onnx.helper.make_node("SequenceLength", ["s"], ["length"]))
        model.graph.output.append(onnx.helper.make_tensor_value_info("length", onnx.TensorProto.INT64, []))

    return [_save_variant(ws, "seq.onnx", sequence_input), ws / "calib"], "model input 's' is a sequence, not a tensor"


def model_without_inputs(ws):
    def constant_input(model):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((1, 6, 8), np.float32), "x"))
        del model.graph.input[:]

    return [_save_variant(ws, "noinput.onnx", constant_input), ws / "calib"], "the model has no input to feed"


def hidden_layers_without_neurons(ws):
    model = build_model([BlockSpec(hidden=HIDDEN)], seq=6)
    for tensor in model.graph.initializer:  # fc1 [8, 32] -> [8, 0], its bias and fc2 [32, 8] -> [0, 8]
        shape = [0 if d == HIDDEN else d for d in tensor.dims]
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(shape, np.float32), tensor.name))
    onnx.save(model, ws / "empty_hidden.onnx")
    return [ws / "empty_hidden.onnx", ws / "calib"], "its hidden layer has no neurons"


def calib_missing(ws):
    return [ws / "net.onnx", ws / "nowhere"], "data path not found"


def calib_empty(ws):
    (ws / "empty").mkdir()
    return [ws / "net.onnx", ws / "empty"], "no data files"


def calib_no_known_format(ws):
    (ws / "csv").mkdir()
    (ws / "csv" / "data.csv").write_text("1,2,3\n")
    return [ws / "net.onnx", ws / "csv"], "no data files"


def calib_unreadable(ws):
    (ws / "calib" / "b9.npz").write_bytes(b"PK\x03\x04 broken zip")
    return [ws / "net.onnx", ws / "calib"], "b9.npz: cannot read"


def _one_batch(ws: Path, **arrays: np.ndarray) -> Path:
    folder = ws / "one"
    folder.mkdir()
    np.savez(folder / "b.npz", **arrays)
    return folder


def calib_input_name_unknown(ws):
    return [ws / "net.onnx", _one_batch(ws, z=np.zeros((16, 6, 8), np.float32))], "no array for model input 'x'"


def calib_wrong_dtype(ws):
    return [ws / "net.onnx", _one_batch(ws, x=np.zeros((16, 6, 8), np.int32))], "is int32, the model expects float32"


def calib_wrong_rank(ws):
    return [ws / "net.onnx", _one_batch(ws, x=np.zeros((16, 48), np.float32))], "has rank 2, the model expects 3"


def calib_wrong_fixed_dim(ws):
    return [ws / "net.onnx", _one_batch(ws, x=np.zeros((16, 6, 9), np.float32))], "has shape [16, 6, 9]"


def calib_too_few_samples(ws):
    return [ws / "net.onnx", _one_batch(ws, x=np.ones((4, 6, 8), np.float32))], "only 4 calibration samples"


def calib_nan_input(ws):
    x = np.ones((16, 6, 8), np.float32)
    x[3, 2, 1] = np.nan
    return [ws / "net.onnx", _one_batch(ws, x=x)], "input 'x' contains NaN or Inf"


def calib_inf_hidden(ws):
    x = np.full((16, 6, 8), 3e38, np.float32)  # finite, but fc1 overflows
    message = "non-finite hidden activation in block '/blocks.0/mlp' at calibration batch 0"
    return [ws / "net.onnx", _one_batch(ws, x=x)], message


def ratio_infeasible_with_min_keep(ws):
    return [ws / "net.onnx", ws / "calib", "--ratio", "0.9", "--min-keep", "30"], "--min-keep 30"


def per_block_ratio_below_min_keep(ws):
    return [
        ws / "net.onnx",
        ws / "calib",
        "--ratio",
        "0.5",
        "--min-keep",
        "20",
        "--scope",
        "per-block",
    ], "fewer than --min-keep 20"


def ray_with_max_samples(ws):
    return [ws / "net.onnx", ws / "calib", "--ray", "2", "--max-samples", "8"], "--max-samples cannot cap shards"


def output_is_input(ws):
    return [ws / "net.onnx", ws / "calib", "-o", ws / "net.onnx"], "the output model would overwrite an input file"


def output_folder_under_a_file(ws):
    return [ws / "net.onnx", ws / "calib", "-o", ws / "net.onnx" / "o.onnx"], "is not a folder"


def output_in_new_folders_then_a_failure(ws):
    """Folders made for -o are removed again when a later step (here --eval) fails."""
    return [
        ws / "net.onnx",
        ws / "calib",
        "-o",
        ws / "new" / "sub" / "o.onnx",
        "--eval",
        _one_batch(ws, z=np.zeros((16, 6, 8), np.float32)),
    ], "no array for model input 'x'"


def output_dir_not_writable(ws):
    return [ws / "net.onnx", ws / "calib", "-o", Path("/proc/onnx_vbp_test.onnx")], "output directory is not writable"


# --- outputs that would destroy an input or each other: refused before any work -------------------


def output_data_file_over_input_weights(ws):
    """A renamed model keeps its weights in `model.onnx.data`: `-o model.onnx` would rename the new
    data over them."""
    path = _save_variant(
        ws, "renamed.onnx", lambda m: None, save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    return [path, ws / "calib", "-o", ws / "model.onnx"], "the output model's data file would overwrite an input"


def output_over_input_data_file(ws):
    path = _save_variant(
        ws, "ext.onnx", lambda m: None, save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    return [path, ws / "calib", "-o", ws / "ext.bin"], "the output model would overwrite an input file"


def output_links_to_input(ws):
    (ws / "out" / "link.onnx").symlink_to(ws / "net.onnx")
    return [ws / "net.onnx", ws / "calib", "-o", ws / "out" / "link.onnx"], "would overwrite an input file"


def output_hard_links_to_input(ws):
    (ws / "out" / "hard.onnx").hardlink_to(ws / "net.onnx")
    return [ws / "net.onnx", ws / "calib", "-o", ws / "out" / "hard.onnx"], "would overwrite an input file"


def save_stats_over_model(ws):
    return [
        ws / "net.onnx",
        ws / "calib",
        "--save-stats",
        ws / "net.onnx",
    ], "the statistics file would overwrite an input file"


def save_stats_over_calibration_file(ws):
    return [ws / "net.onnx", ws / "calib", "--save-stats", ws / "calib" / "b0.npz"], "would overwrite an input file"


def report_over_model(ws):
    return [ws / "net.onnx", ws / "calib", "--report", ws / "net.onnx"], "the report would overwrite an input file"


def report_over_output(ws):
    out = ws / "out" / "result.onnx"
    return [ws / "net.onnx", ws / "calib", "--report", out, "-o", out], "the report and the output model are the same"


def report_folder_under_a_file(ws):
    return [ws / "net.onnx", ws / "calib", "--report", ws / "net.onnx" / "r.json"], "is not a folder"


def output_name_too_long(ws):
    """Legal as a name, but its data file's name would not be: refused before calibration."""
    return [ws / "net.onnx", ws / "calib", "-o", ws / "out" / ("x" * 250 + ".onnx")], "file name is too long"


def eval_data_unusable(ws):
    """--eval fails after pruning: the pruned model was written only to staging, so nothing remains."""
    return [
        ws / "net.onnx",
        ws / "calib",
        "--eval",
        _one_batch(ws, z=np.zeros((16, 6, 8), np.float32)),
    ], "no array for model input 'x'"


def stats_feed_no_longer_fits(ws):
    main([str(ws / "net.onnx"), str(ws / "calib"), "-q", "--save-stats", str(ws / "s.npz"), "-o", str(ws / "t.onnx")])
    (ws / "t.onnx").unlink()
    with np.load(ws / "s.npz") as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["feed/x"] = np.zeros((1, 6, 9), np.float32)
    np.savez(ws / "s.npz", **arrays)
    return [ws / "net.onnx", "--stats", ws / "s.npz"], "s.npz: input 'x' has shape [1, 6, 9], the model expects"


ROWS = [
    model_missing,
    model_is_directory,
    model_empty,
    model_not_onnx,
    model_truncated,
    model_fails_checker,
    external_data_missing,
    external_data_truncated,
    external_data_absolute_path,
    external_data_parent_path,
    external_data_link_out,
    external_data_offset_not_a_number,
    external_data_negative_length,
    calib_pb_external_data_outside,
    model_input_is_a_sequence,
    model_without_inputs,
    hidden_layers_without_neurons,
    model_ort_cannot_load,
    no_mlp_block,
    all_blocks_skipped,
    calib_missing,
    calib_empty,
    calib_no_known_format,
    calib_unreadable,
    calib_input_name_unknown,
    calib_wrong_dtype,
    calib_wrong_rank,
    calib_wrong_fixed_dim,
    calib_too_few_samples,
    calib_nan_input,
    calib_inf_hidden,
    ratio_infeasible_with_min_keep,
    per_block_ratio_below_min_keep,
    ray_with_max_samples,
    output_is_input,
    output_folder_under_a_file,
    output_in_new_folders_then_a_failure,
    output_dir_not_writable,
    output_data_file_over_input_weights,
    output_over_input_data_file,
    output_links_to_input,
    output_hard_links_to_input,
    save_stats_over_model,
    save_stats_over_calibration_file,
    report_over_model,
    report_over_output,
    report_folder_under_a_file,
    output_name_too_long,
    eval_data_unusable,
    stats_feed_no_longer_fits,
]


def _fails_cleanly(ws: Path, capsys, argv: list, message: str, code: int = 1) -> None:
    before = _snapshot(ws)
    argv = [str(a) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(ws / "out" / "result.onnx")]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("onnx-vbp: ") and message in err, err
    assert _snapshot(ws) == before  # inputs byte-identical, no output, no temporary file


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__ for r in ROWS])
def test_bad_input_fails_cleanly(ws: Path, capsys, row) -> None:
    argv, message = row(ws)
    _fails_cleanly(ws, capsys, argv, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "1"], "must be in [0, 1)"),
        (["--ratio", "-0.1"], "must be in [0, 1)"),
        (["--round-to", "0"], "must be >= 1"),
        (["--ridge-lambda", "nan"], "must be a finite number >= 0"),
        (["--ridge-lambda", "inf"], "must be a finite number >= 0"),
        (["--ridge-lambda=-1e-3"], "must be a finite number >= 0"),
        (["--ranking-lambda", "nan"], "must be a finite number >= 0"),
    ],
)
def test_invalid_options_are_usage_errors(ws: Path, capsys, args: list[str], message: str) -> None:
    before = _snapshot(ws)
    with pytest.raises(SystemExit) as exc:
        main([str(ws / "net.onnx"), str(ws / "calib"), *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert _snapshot(ws) == before


def test_disk_full_during_write(ws: Path, capsys, monkeypatch) -> None:
    def full_disk(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_vbp.modelio, "write_proto", full_disk)
    _fails_cleanly(ws, capsys, [ws / "net.onnx", ws / "calib"], "No space left on device")


def test_interrupt_during_calibration_exits_130(ws: Path, capsys, monkeypatch) -> None:
    import onnx_vbp.pipeline as pipeline

    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "iter_batches", interrupted)
    _fails_cleanly(ws, capsys, [ws / "net.onnx", ws / "calib"], "interrupted; nothing written", code=130)


def test_allow_empty_writes_an_unchanged_copy(ws: Path, capsys) -> None:
    argv, _ = no_mlp_block(ws)
    out = ws / "out" / "copy.onnx"
    assert main([*map(str, argv), "--allow-empty", "-q", "-o", str(out)]) == 0
    copy, original = onnx.load(out), onnx.load(argv[0])
    assert [n.op_type for n in copy.graph.node] == [n.op_type for n in original.graph.node]


# --- a written model is verified from its files before it is published ---------------------------


def _nan_weight(model: onnx.ModelProto) -> None:
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0, 0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))


def _rewire_output(model: onnx.ModelProto, make_node: Callable[[str, str], list[onnx.NodeProto]]) -> None:
    """Insert nodes between the graph output and what computes it, keeping the output's name."""
    name = model.graph.output[0].name
    producer = next(n for n in model.graph.node if name in n.output)
    producer.output[list(producer.output).index(name)] = "inner"
    model.graph.node.extend(make_node("inner", name))


def _doubled_width(model: onnx.ModelProto) -> None:
    _rewire_output(model, lambda inner, out: [onnx.helper.make_node("Concat", [inner, inner], [out], axis=-1)])


def _fails_at_run_time(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape"))
    _rewire_output(
        model,
        lambda inner, out: [
            onnx.helper.make_node("Reshape", [inner, "bad_shape"], ["flat"]),
            onnx.helper.make_node("Reshape", ["flat", "shape_of_out"], [out]),
        ],
    )
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 6, 8], np.int64), "shape_of_out"))


def _grown(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4096, np.float32), "unused"))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (
            _nan_weight,
            "output 'y' of the pruned model holds NaN or Inf on a calibration sample where the original's is "
            "finite (its constant '",
        ),
        (
            _doubled_width,
            "output 'y' of the pruned model is float32 [1, 6, 16] on a calibration sample, the original's "
            "float32 [1, 6, 8]",
        ),
        (_fails_at_run_time, "the pruned model fails to run on a calibration sample"),
        (_grown, "the pruned model would be larger than the original"),
    ],
    ids=["nan", "shape", "run", "grows"],
)
def test_a_faulty_rewrite_is_never_published(ws: Path, capsys, monkeypatch, fault, message) -> None:
    import onnx_vbp.pipeline as pipeline

    real = pipeline.rewrite

    def faulty(*args, **kwargs):
        model = real(*args, **kwargs)
        fault(model)
        return model

    monkeypatch.setattr(pipeline, "rewrite", faulty)
    _fails_cleanly(
        ws,
        capsys,
        [ws / "net.onnx", ws / "calib", "--report", ws / "out" / "r.json", "--save-stats", ws / "out" / "s.npz"],
        message,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(ws: Path, capsys, monkeypatch, signum: int) -> None:
    import onnx_vbp.pipeline as pipeline

    real = pipeline.write_model

    def killed_while_writing(model, path, **kwargs):
        real(model, path, **kwargs)  # a staged model on disk, about to be verified and published
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(pipeline, "write_model", killed_while_writing)
    before = signal.getsignal(signum)
    _fails_cleanly(
        ws,
        capsys,
        [ws / "net.onnx", ws / "calib"],
        f"stopped by {signal.Signals(signum).name}; nothing written",
        code=128 + signum,
    )
    assert signal.getsignal(signum) == before  # the handler is the CLI's only while it runs


def test_merge_stats_refuses_a_part_twice_and_an_output_over_a_part(ws: Path, capsys) -> None:
    for name in ("a", "b"):
        main(
            [
                str(ws / "net.onnx"),
                str(ws / "calib"),
                "-q",
                "--save-stats",
                str(ws / f"{name}.npz"),
                "-o",
                str(ws / f"{name}.onnx"),
            ]
        )
    for argv, message in (
        (["merge-stats", ws / "a.npz", ws / "a.npz", "-o", ws / "out" / "m.npz"], "given twice"),
        (
            ["merge-stats", ws / "a.npz", ws / "b.npz", "-o", ws / "b.npz"],
            "the merged statistics file would overwrite an input file",
        ),
    ):
        _fails_cleanly(ws, capsys, argv, message)
    assert main(["merge-stats", str(ws / "a.npz"), str(ws / "b.npz"), "-o", str(ws / "out" / "m.npz")]) == 0
    assert "merged 2 statistics files" in capsys.readouterr().out


def test_bench_refuses_to_overwrite_perf_test_data_and_models_with_other_inputs(ws: Path, capsys) -> None:
    main([str(ws / "net.onnx"), str(ws / "calib"), "-q", "-o", str(ws / "small.onnx")])
    (ws / "test_data_set_0").mkdir()
    (ws / "test_data_set_0" / "input_0.pb").write_bytes(b"the user's own data")

    def rename_input(model: onnx.ModelProto) -> None:
        model.graph.input[0].name = "pixels"
        for node in model.graph.node:
            node.input[:] = ["pixels" if name == "x" else name for name in node.input]

    renamed = _save_variant(ws, "renamed.onnx", rename_input)
    for argv, message in (
        (["bench", ws / "net.onnx", ws / "small.onnx", "--perf-test-data"], "already exists"),
        (["bench", ws / "net.onnx", renamed], "the two models take different inputs"),
    ):
        before = _snapshot(ws)
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert _snapshot(ws) == before


def test_output_folder_gets_the_default_name_inside(ws: Path) -> None:
    assert main([str(ws / "net.onnx"), str(ws / "calib"), "-q", "-o", str(ws / "out")]) == 0
    assert sorted(p.name for p in (ws / "out").iterdir()) == ["net.vbp.onnx"]


def test_the_longest_legal_output_name_works(ws: Path) -> None:
    """250 bytes: OUT.data is 255, the limit; the staging folder's own name is short."""
    out = ws / "out" / ("x" * 245 + ".onnx")
    assert main([str(ws / "net.onnx"), str(ws / "calib"), "-q", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_missing_output_folders_are_created(ws: Path) -> None:
    out = ws / "new" / "sub" / "pruned.onnx"
    assert (
        main(
            [str(ws / "net.onnx"), str(ws / "calib"), "-q", "-o", str(out), "--report", str(ws / "reports" / "r.json")]
        )
        == 0
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx"] and (ws / "reports" / "r.json").exists()


def test_threads_are_clamped_to_the_cores_this_process_may_use(ws: Path) -> None:
    from onnx_vbp.runtime import available_cores, cpu_session

    session = cpu_session(str(ws / "net.onnx"), threads=100_000)
    assert session.get_session_options().intra_op_num_threads == available_cores()


def test_external_data_model_prunes_from_any_working_directory(ws: Path, monkeypatch) -> None:
    """Large external weights stay on disk until a stage reads them from the model's folder; none
    is ever resolved against the working directory (every one is "large" here)."""
    monkeypatch.setattr(onnx_vbp.modelio, "SMALL_TENSOR_BYTES", 0)
    (ws / "models").mkdir()
    onnx.save(
        onnx.load(ws / "net.onnx"),
        ws / "models" / "ext.onnx",
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    monkeypatch.chdir(ws / "out")
    assert main([str(ws / "models" / "ext.onnx"), str(ws / "calib"), "-q", "-o", str(ws / "pruned.onnx")]) == 0
    assert onnx.load(ws / "pruned.onnx").graph.node


def test_every_library_error_has_one_root_the_cli_catches() -> None:
    from onnx_vbp import VbpError
    from onnx_vbp.cli import USER_ERRORS
    from onnx_vbp.data import DataError
    from onnx_vbp.modelio import ModelError
    from onnx_vbp.pipeline import NoBlocksError
    from onnx_vbp.runtime import RuntimeLoadError
    from onnx_vbp.select import SelectionError
    from onnx_vbp.stats import CalibrationError

    for error in (CalibrationError, RuntimeLoadError, DataError, ModelError, NoBlocksError, SelectionError):
        assert issubclass(error, VbpError) and issubclass(error, ValueError)  # ValueError: as before, for the API
    assert VbpError in USER_ERRORS
