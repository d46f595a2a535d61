"""Reading and writing models: clear errors on bad input, atomic output, external data kept."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnx_vbp.calibrate import cpu_session

PROTOBUF_LIMIT = 2**31 - 1


class ModelError(ValueError):
    """A model file that cannot be read, or a result that cannot be written."""


def default_output(model_path: Path) -> Path:
    """`<stem>.vbp.onnx` next to the model."""
    return model_path.with_name(f"{model_path.stem}.vbp.onnx")


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _check_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """Every external tensor's file exists and holds its bytes (onnx would read short silently)."""
    for tensor in model.graph.initializer:
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        entries = _external_entries(tensor)
        data = folder / entries.get("location", "")
        if not data.is_file():
            raise ModelError(f"{path}: external data file not found: {data}")
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        if "length" in entries and data.stat().st_size < end:
            raise ModelError(f"{path}: external data file {data.name} is truncated ({data.stat().st_size} bytes, "
                             f"tensor '{tensor.name}' needs {end})")


def load_model(path: Path) -> tuple[onnx.ModelProto, bool]:
    """Load `path` with its external data and check it; returns (model, whether it used external data)."""
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ModelError(f"{path}: not an ONNX model or truncated ({exc})") from exc
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes)")
    external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    if external:
        _check_external_data(model, path.parent, path)
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: fails onnx.checker: {str(exc).strip().splitlines()[0]}") from exc
    return model, external


def file_bytes(path: Path) -> int:
    """Size of a model file plus the external data files it references."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if onnx.external_data_helper.uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def check_writable(out: Path) -> None:
    """Fail early, before any long work, if `out` cannot be written."""
    if not out.parent.is_dir():
        raise ModelError(f"output directory does not exist: {out.parent}")
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ModelError(f"output directory is not writable: {out.parent} ({exc.strerror})") from exc


def save_model(model: onnx.ModelProto, out: Path, *, external_data: bool) -> None:
    """Write `model` to `out` atomically after checking it (onnx.checker, ORT load).

    Everything is written into a temporary folder beside `out` and renamed into place, so a
    failure leaves neither a partial model nor a stray data file. With `external_data` (or for
    models past protobuf's 2 GB limit) the weights go to `<out name>.data` next to `out`.
    `model` may be changed (its weights moved to external references) by an external save.
    """
    check_writable(out)
    external_data = external_data or model.ByteSize() > PROTOBUF_LIMIT
    location = f"{out.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = staging / out.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged))
        cpu_session(str(staged))
        if (staging / location).exists():  # absent when no tensor reached the 1 KiB threshold
            os.replace(staging / location, out.parent / location)
        os.replace(staged, out)
    except OSError as exc:
        raise ModelError(f"cannot write {out}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
