"""Reading and writing models: clear errors on bad input, atomic output, external data kept."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
from onnx.external_data_helper import uses_external_data

from onnx_vbp.calibrate import cpu_session

PROTOBUF_LIMIT = 2**31 - 1
SMALL_TENSOR_BYTES = 1 << 20  # external tensors below this are read at load time
COPY_CHUNK = 64 << 20


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
        if not uses_external_data(tensor):
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
    """Load and check `path`; returns (model, whether it uses external data).

    A model with external data keeps its large tensors (>= 1 MiB) on disk: the stages read them
    from `path.parent` when they need them (ORT directly, rewrite only what it slices), so a model
    of any size, past protobuf's 2 GB too, is never held twice.
    """
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
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:
        _check_external_data(model, path.parent, path)
        for tensor in model.graph.initializer:  # small constants (biases, shapes, scalars) in memory
            if uses_external_data(tensor) and _nbytes(tensor) < SMALL_TENSOR_BYTES:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
    try:  # by path: the checker reads the file itself rather than a serialized copy of `model`
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: fails onnx.checker: {str(exc).strip().splitlines()[0]}") from exc
    return model, external


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims)) * itemsize


def file_bytes(path: Path) -> int:
    """Size of a model file plus the external data files it references."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def _write_external_data(model: onnx.ModelProto, data_path: Path, source_dir: Path | None) -> None:
    """Move every initializer of >= 1 KiB (onnx's own threshold) into `data_path`, streaming.

    In-memory tensors are written from their bytes; tensors still stored in `source_dir`'s files
    are copied in chunks, so no weight passes through memory whole.
    """
    offset = 0
    with open(data_path, "wb") as sink:
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                if source_dir is None:
                    raise ModelError(f"tensor '{tensor.name}' refers to external data but no source folder is known")
                entries = _external_entries(tensor)
                length = int(entries.get("length", _nbytes(tensor)))
                with open(source_dir / entries["location"], "rb") as source:
                    source.seek(int(entries.get("offset", 0)))
                    remaining = length
                    while remaining:
                        chunk = source.read(min(remaining, COPY_CHUNK))
                        if not chunk:
                            raise ModelError(f"external data of '{tensor.name}' ends early")
                        sink.write(chunk)
                        remaining -= len(chunk)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                length = len(tensor.raw_data)
                sink.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            offset += length


def check_writable(out: Path) -> None:
    """Fail early, before any long work, if `out` cannot be written."""
    if not out.parent.is_dir():
        raise ModelError(f"output directory does not exist: {out.parent}")
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ModelError(f"output directory is not writable: {out.parent} ({exc.strerror})") from exc


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _copy_field(message, field, value) -> None:
    if field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


class _Pieces:
    """A model cut into parts that serialize one at a time: its own fields (`head`), then the
    graph's fields, each with the key and length protobuf puts before it.

    Every size is taken part by part: under upb, ByteSize() of a message encodes all of it, so a
    graph's would mean a transient copy of every weight (and a second to write it).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.head = onnx.ModelProto()
        for field, value in model.ListFields():
            if field.name != "graph":
                _copy_field(self.head, field, value)
        self.parts: list[tuple[bytes, Message]] = []
        self.graph_bytes = 0
        for field, value in model.graph.ListFields():
            if not field.is_repeated:  # the graph's name and doc_string
                part = onnx.GraphProto()
                _copy_field(part, field, value)
                self.parts.append((b"", part))
                self.graph_bytes += part.ByteSize()
                continue
            for item in value:
                size = item.ByteSize()
                prefix = _varint(field.number << 3 | 2) + _varint(size)
                self.parts.append((prefix, item))
                self.graph_bytes += len(prefix) + size
        graph_key = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number << 3 | 2  # wire type 2: length-delimited
        self.graph_prefix = _varint(graph_key) + _varint(self.graph_bytes)

    @property
    def nbytes(self) -> int:
        """The size of the serialized model."""
        return self.head.ByteSize() + len(self.graph_prefix) + self.graph_bytes


def write_proto(model: onnx.ModelProto, path: Path) -> None:
    """Serialize `model` to `path` one graph element at a time.

    Protobuf parses concatenated fields as one message, so the model's own fields, the graph's
    key and length, then each node, tensor and value info are written in turn: no serialized copy
    of the whole model, as large as its weights, is held (onnx.save_model would hold one).
    """
    pieces = _Pieces(model)
    with open(path, "wb") as sink:
        sink.write(pieces.head.SerializeToString() + pieces.graph_prefix)
        for prefix, item in pieces.parts:
            sink.write(prefix)
            sink.write(item.SerializeToString())


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write it in before renaming it into place; removed
    whatever happens, so a failure leaves neither a partial model nor a stray data file."""
    check_writable(out)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield folder
    except OSError as exc:
        raise ModelError(f"cannot write {out}: {exc}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_model(model: onnx.ModelProto, path: Path, *, external_data: bool, source_dir: Path | None = None) -> None:
    """Write `model` to `path` (in a `staging` folder). With `external_data` (or past protobuf's
    2 GB limit) the weights go to `<name>.data` beside it; tensors that still reference external
    data in `source_dir` are copied over file to file. `model` is changed by an external save: its
    weights become references to the new data file."""
    if external_data or source_dir is not None or _Pieces(model).nbytes > PROTOBUF_LIMIT:
        _write_external_data(model, path.with_name(f"{path.name}.data"), source_dir)
    write_proto(model, path)


def publish(written: Path, out: Path) -> None:
    """Check a model written by `write_model` (onnx.checker, ORT load), from its file alone, and
    rename it and its data file to `out`."""
    onnx.checker.check_model(str(written))
    cpu_session(str(written))
    data = written.with_name(f"{written.name}.data")
    if data.exists():  # absent when no tensor reached the 1 KiB threshold
        os.replace(data, out.with_name(f"{out.name}.data"))
    os.replace(written, out)


def save_model(model: onnx.ModelProto, out: Path, *, external_data: bool, source_dir: Path | None = None) -> None:
    """Write `model` to `out` atomically after checking it (onnx.checker, ORT load).

    Everything is written into a temporary folder beside `out` and renamed into place (see
    `staging`, `write_model`, `publish`).
    """
    with staging(out) as folder:
        write_model(model, folder / out.name, external_data=external_data, source_dir=source_dir)
        publish(folder / out.name, out)
