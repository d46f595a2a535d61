"""Hostile input, fuzzed: damaged models, calibration batches and statistics files.

Whatever the damage, the command line either prunes (and then the written model runs) or fails
with exit status 1 and one line `onnx-vbp: error: ...`; an exception escaping `main` is a bug.
The inputs stay byte-identical and nothing but the asked-for output is left behind.

CI runs 25 fixed examples per kind of damage; HOSTILE_EXAMPLES=N runs N fresh ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import BlockSpec, build_model, random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_vbp.cli import main

# Few examples each in CI (every one runs the whole command, ORT sessions included); set
# HOSTILE_EXAMPLES=1000 to search longer, with fresh random examples.
EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "0"))
hostile = settings(
    max_examples=EXAMPLES or 25,
    deadline=None,
    derandomize=not EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

OPS = ["Relu", "Gelu", "Add", "Mul", "MatMul", "Sigmoid", "Identity", "Transpose", "Reshape", "Erf", "Div"]
DTYPES = [np.float16, np.float64, np.int64, np.int8, np.bool_, np.complex64, np.uint8]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """net.onnx (two blocks), calib/ and stats.npz saved from it: copied afresh for each example."""
    root = tmp_path_factory.mktemp("clean")
    model = build_model([BlockSpec(hidden=16), BlockSpec(hidden=12, act="silu", gated=True)], seq=4)
    onnx.save(model, root / "net.onnx")
    (root / "calib").mkdir()
    for seed in range(2):
        np.savez(root / "calib" / f"b{seed}.npz", **random_batch(model, batch=10, seed=seed))
    assert (
        main(
            [
                str(root / "net.onnx"),
                str(root / "calib"),
                "-q",
                "--save-stats",
                str(root / "stats.npz"),
                "-o",
                str(root / "first.onnx"),
            ]
        )
        == 0
    )
    (root / "first.onnx").unlink()
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _run_hostile(ws: Path, argv: list[str], capsys) -> None:
    out = ws / "out" / "pruned.onnx"
    before = _snapshot(ws)
    rc = main([*argv, "-q", "--min-samples", "1", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    if rc == 0:
        session = ort.InferenceSession(str(out))  # what was written loads and runs on what calibrated it
        with np.load(ws / "calib" / "b0.npz") as batch:  # as many samples as a fixed batch axis asks
            feed = {
                i.name: batch[i.name][: i.shape[0] if isinstance(i.shape[0], int) else 2].astype(np.float32)
                for i in session.get_inputs()
                if i.name in batch
            }
        if len(feed) == len(session.get_inputs()):
            session.run(None, feed)
        assert sorted(p.name for p in (ws / "out").iterdir()) in (["pruned.onnx"], ["pruned.onnx", "pruned.onnx.data"])
    else:
        assert rc == 1, err
        assert len(err.splitlines()) == 1 and err.startswith("onnx-vbp: error: "), err
        assert not any((ws / "out").iterdir())
    after = _snapshot(ws)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == {
        k: v for k, v in before.items() if not k.startswith("out")
    }


def _workspace(clean: Path, tmp_path: Path) -> Path:
    ws = Path(tempfile.mkdtemp(dir=tmp_path)) / "ws"  # one per example: hypothesis reuses tmp_path
    shutil.copytree(clean, ws)
    (ws / "out").mkdir()
    return ws


# --- model damage: each edit takes the model and a seeded generator ------------------------------


def _retype_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensor = model.graph.initializer[rng.integers(len(model.graph.initializer))]
    shape = rng.integers(0, 5, size=rng.integers(0, 4)).tolist()
    with np.errstate(all="ignore"):  # overflowing casts are the point
        values = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 40)).astype(DTYPES[rng.integers(len(DTYPES))])
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))


def _poison_initializer(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensor = model.graph.initializer[rng.integers(len(model.graph.initializer))]
    try:
        values = onnx.numpy_helper.to_array(tensor).copy()
    except ValueError:  # an earlier edit broke it already
        return
    if values.size and values.dtype.kind == "f":
        values.reshape(-1)[rng.integers(values.size)] = [np.nan, np.inf, -np.inf, 0.0, 1e38][rng.integers(5)]
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))


def _bad_dims(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    tensor = model.graph.initializer[rng.integers(len(model.graph.initializer))]
    if tensor.dims:
        tensor.dims[rng.integers(len(tensor.dims))] = int(rng.integers(0, 40))


def _swap_op(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = model.graph.node[rng.integers(len(model.graph.node))]
    node.op_type = OPS[rng.integers(len(OPS))]
    del node.attribute[:]


def _drop_node(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    del model.graph.node[int(rng.integers(len(model.graph.node)))]


def _rewire(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    names = [name for node in model.graph.node for name in node.output]
    names += [t.name for t in model.graph.initializer] + [i.name for i in model.graph.input]
    node = model.graph.node[rng.integers(len(model.graph.node))]
    if node.input:
        node.input[rng.integers(len(node.input))] = names[rng.integers(len(names))]


def _retype_input(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.graph.input[0].type.tensor_type.elem_type = int(rng.integers(0, 24))


def _reshape_input(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dim = dims[rng.integers(len(dims))]
    if rng.integers(2):
        dim.dim_value = int(rng.integers(0, 9))
    else:
        dim.dim_param = "n"


def _opset(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    model.opset_import[0].version = int(rng.integers(1, 30))


def _bad_attribute(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    node = model.graph.node[rng.integers(len(model.graph.node))]
    node.attribute.append(
        onnx.helper.make_attribute(["axis", "transB", "perm", "approximate"][rng.integers(4)], int(rng.integers(-3, 4)))
    )


MODEL_EDITS: list[Callable[[onnx.ModelProto, np.random.Generator], None]] = [
    _retype_initializer,
    _poison_initializer,
    _bad_dims,
    _swap_op,
    _drop_node,
    _rewire,
    _retype_input,
    _reshape_input,
    _opset,
    _bad_attribute,
]


@hostile
@given(edits=st.lists(st.tuples(st.sampled_from(MODEL_EDITS), st.integers(0, 2**32 - 1)), min_size=1, max_size=3))
def test_damaged_models(clean: Path, tmp_path: Path, capsys, edits) -> None:
    ws = _workspace(clean, tmp_path)
    model = onnx.load(ws / "net.onnx")
    for edit, seed in edits:
        edit(model, np.random.default_rng(seed))
    (ws / "net.onnx").write_bytes(model.SerializeToString())
    _run_hostile(ws, [str(ws / "net.onnx"), str(ws / "calib")], capsys)


@hostile
@given(
    data=st.binary(min_size=0, max_size=64),
    at=st.floats(0, 1),
    mode=st.sampled_from(["flip", "cut", "insert"]),
    target=st.sampled_from(["net.onnx", "calib/b0.npz", "stats.npz"]),
)
def test_damaged_bytes(clean: Path, tmp_path: Path, capsys, data: bytes, at: float, mode: str, target: str) -> None:
    ws = _workspace(clean, tmp_path)
    raw = (ws / target).read_bytes()
    cut = int(at * len(raw))
    changed = {
        "flip": raw[:cut] + bytes(b ^ 0xFF for b in data) + raw[cut + len(data) :],
        "cut": raw[:cut],
        "insert": raw[:cut] + data + raw[cut:],
    }[mode]
    (ws / target).write_bytes(changed)
    calib = ["--stats", str(ws / "stats.npz")] if target == "stats.npz" else [str(ws / "calib")]
    _run_hostile(ws, [str(ws / "net.onnx"), *calib], capsys)


def _arrays(draw) -> np.ndarray:
    shape = draw(st.lists(st.integers(0, 12), min_size=0, max_size=4))
    dtype = draw(st.sampled_from([np.float32, *DTYPES]))
    scale = draw(st.sampled_from([0.0, 1.0, 1e30, np.nan, np.inf]))
    with np.errstate(all="ignore"):
        return (np.ones(shape) * scale).astype(dtype)


@st.composite
def stats_damage(draw) -> tuple[str, str, np.ndarray | None]:
    part = draw(
        st.sampled_from(
            ["count", "mean", "m2", "comoment", "stream", "__samples__", "__version__", "__model__", "feed/x"]
        )
    )
    action = draw(st.sampled_from(["replace", "delete"]))
    return part, action, _arrays(draw) if action == "replace" else None


@hostile
@given(damage=st.lists(stats_damage(), min_size=1, max_size=3))
def test_damaged_statistics_files(clean: Path, tmp_path: Path, capsys, damage) -> None:
    ws = _workspace(clean, tmp_path)
    with np.load(ws / "stats.npz") as archive:
        arrays = {key: archive[key] for key in archive.files}
    for part, action, value in damage:
        keys = [k for k in sorted(arrays) if k == part or k.endswith(f"/{part}")][:1] or [part]
        for key in keys:
            if action == "delete":
                arrays.pop(key, None)
            else:
                arrays[key] = value
    np.savez(ws / "stats.npz", **arrays)
    _run_hostile(ws, [str(ws / "net.onnx"), "--stats", str(ws / "stats.npz")], capsys)


@st.composite
def batches(draw) -> dict[str, np.ndarray]:
    arrays = {"x": _arrays(draw)}
    if draw(st.booleans()):
        arrays["labels"] = _arrays(draw)
    if draw(st.booleans()):
        arrays["other"] = _arrays(draw)
    return arrays


@hostile
@given(batch=batches())
def test_damaged_calibration_batches(clean: Path, tmp_path: Path, capsys, batch) -> None:
    ws = _workspace(clean, tmp_path)
    np.savez(ws / "calib" / "b1.npz", **batch)
    _run_hostile(ws, [str(ws / "net.onnx"), str(ws / "calib")], capsys)
