"""Reading and writing models: clear errors on bad input, atomic output, external data kept."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
from onnx.external_data_helper import uses_external_data

from onnx_vbp.data import external_entries, external_file
from onnx_vbp.errors import VbpError
from onnx_vbp.runtime import ORT_ERRORS, cpu_session, first_line, ort_default_domain_ops

PROTOBUF_LIMIT = 2**31 - 1
SMALL_TENSOR_BYTES = 1 << 20  # external tensors below this are read at load time
COPY_CHUNK = 64 << 20


class ModelError(VbpError):
    """A model file that cannot be read, or a result that cannot be written."""


def default_output(model_path: Path) -> Path:
    """`<stem>.vbp.onnx` next to the model."""
    return model_path.with_name(f"{model_path.stem}.vbp.onnx")


def _check_external_data(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """Every external tensor's file lies in the model's folder (see `external_file`; checked
    before any file is opened), exists and holds its bytes (onnx would read short silently)."""
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        try:
            data = external_file(tensor, folder)
        except ValueError as exc:
            raise ModelError(f"{path}: {exc}") from exc
        if not data.is_file():
            raise ModelError(f"{path}: external data file not found: {data}")
        entries = external_entries(tensor)
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        if "length" in entries and data.stat().st_size < end:
            raise ModelError(
                f"{path}: external data file {data.name} is truncated ({data.stat().st_size} bytes, "
                f"tensor '{tensor.name}' needs {end})"
            )


_PACKED_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} | (  # two values per byte
    {onnx.TensorProto.FLOAT4E2M1} if hasattr(onnx.TensorProto, "FLOAT4E2M1") else set()
)
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every constant holds as many values as its dims say, in a known type (onnx.checker does
    not look; numpy would fail deep inside a stage)."""
    tensors = list(model.graph.initializer) + [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    ]
    for tensor in tensors:
        if tensor.data_type in _PACKED_TYPES or tensor.data_type == onnx.TensorProto.STRING:
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except KeyError as exc:
            raise ModelError(f"{path}: tensor '{tensor.name}' has an unknown data type {tensor.data_type}") from exc
        if any(d < 0 for d in tensor.dims):
            raise ModelError(f"{path}: tensor '{tensor.name}' has negative dims {list(tensor.dims)}")
        count = int(np.prod(tensor.dims, dtype=np.float64))
        if uses_external_data(tensor):
            length = external_entries(tensor).get("length")
            held = None if length is None or not length.isdigit() else int(length) // itemsize
        elif tensor.HasField("raw_data"):
            held = len(tensor.raw_data) // itemsize
        else:
            typed = next((getattr(tensor, f) for f in _TYPED_FIELDS if len(getattr(tensor, f))), [])
            per_value = 2 if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
            held = len(typed) // per_value
        if held is not None and held != count:
            raise ModelError(
                f"{path}: tensor '{tensor.name}' holds {held} values, its dims {list(tensor.dims)} say {count}"
            )


def _check_names(model: onnx.ModelProto, path: Path) -> None:
    """Every name in the graph is text (protobuf hands over bytes that are not valid UTF-8 as
    bytes, which no stage expects)."""
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    names = [
        graph.name,
        *(t.name for t in graph.initializer),
        *(v.name for v in values),
        *(text for n in graph.node for text in (n.name, n.op_type, n.domain, *n.input, *n.output)),
        *(a.name for n in graph.node for a in n.attribute),
        *(o.domain for o in model.opset_import),
    ]
    if any(not isinstance(name, str) for name in names):
        raise ModelError(f"{path}: a name in the graph is not valid UTF-8 text (a damaged file?)")


def _topological_sort(graph: onnx.GraphProto) -> bool:
    """Reorder `graph`'s nodes so that each comes after the producers of its inputs (Kahn's
    algorithm, stable); False, leaving it as it was, if that is impossible (a cycle, an input
    nothing produces)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            return False
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        ordered += ready
        available.update(name for n in ready for name in n.output)
    nodes = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(nodes, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


# onnx's checker checks a node of a domain it has no schemas for as a custom op: its wiring only.
ORT_OPS_STAND_IN_DOMAIN = "onnx_vbp.ort_defined"


def ort_defined_ops(model: onnx.ModelProto) -> set[str]:
    """The default-domain ops of `model`'s graph that ONNX has no schema for at the model's opset
    and ONNX Runtime has: its session optimizer writes LayerNormalization into opset-14 models,
    where ONNX has it only from opset 17, and ORT from opset 1."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return set()
    ort_ops = ort_default_domain_ops()
    return {
        n.op_type
        for n in model.graph.node
        if n.domain in ("", "ai.onnx")
        and not onnx.defs.has(n.op_type, opset, "")
        and ort_ops.get(n.op_type, opset + 1) <= opset
    }


def _check_in_memory(model: onnx.ModelProto, what: str, external: bool) -> None:
    """onnx.checker on `model` in memory, ops of ort_defined_ops checked as custom ops (ORT's load
    checks them). With external data, nothing: the checker would look for the data files beside
    no path, and ORT's load checks them later."""
    if external:
        return
    ort_ops = ort_defined_ops(model)
    if ort_ops:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for node in copy.graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in ort_ops:
                node.domain = ORT_OPS_STAND_IN_DOMAIN
        copy.opset_import.add(domain=ORT_OPS_STAND_IN_DOMAIN, version=1)
        model = copy
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{what} fails onnx.checker: {first_line(exc)}") from exc


def _unknown_ort_op(model: onnx.ModelProto, exc: onnx.checker.ValidationError) -> bool:
    """Whether onnx.checker refused `model` for an op only ONNX Runtime defines (ort_defined_ops)."""
    return str(exc).startswith("No Op registered for") and bool(ort_defined_ops(model))


def _checker_refusal_ort_accepts(model: onnx.ModelProto, exc: onnx.checker.ValidationError) -> bool:
    """Whether onnx.checker refused `model` for what ONNX Runtime accepts, after sorting its nodes
    if that was the refusal: nodes out of topological order (ORT's fp16 converter appends its
    input Casts at the end; ORT sorts, so do we), or an op only ORT defines."""
    if "topologically sorted" in str(exc):
        return _topological_sort(model.graph)
    return _unknown_ort_op(model, exc)


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
    _check_names(model, path)
    _check_tensor_sizes(model, path)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    try:
        if external:
            _check_external_data(model, path.parent, path)
            for tensor in model.graph.initializer:  # small constants (biases, shapes, scalars) in memory
                if uses_external_data(tensor) and _nbytes(tensor) < SMALL_TENSOR_BYTES:
                    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
        # by path: the checker reads the file itself rather than a serialized copy of `model`
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:  # also raised by onnx's own checks of external data
        if not _checker_refusal_ort_accepts(model, exc):
            raise ModelError(f"{path}: fails onnx.checker: {first_line(exc)}") from exc
        _check_in_memory(model, f"{path}:", external)
    return model, external


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims)) * itemsize


def _data_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files the model's initializers name, each once, sorted."""
    locations = {external_entries(t).get("location") for t in model.graph.initializer if uses_external_data(t)}
    return sorted(locations - {None})


def file_bytes(path: Path) -> int:
    """Size of a model file plus the external data files it references."""
    model = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in _data_locations(model))


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
                entries = external_entries(tensor)
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


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_folder(out: Path) -> Path:
    """The nearest folder above `out` that exists (missing ones are created when it is written)."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ModelError(f"output folder {out.parent} cannot be created: {folder} is not a folder")
    return folder


def check_writable(out: Path, suffix: str = ".data") -> None:
    """Fail early, before any long work, if `out` (and, with `suffix`, its `.data` file) cannot be
    written."""
    folder = _existing_folder(out)
    if len(os.fsencode(f"{out.name}{suffix}")) > _name_max(folder):  # first: stat() fails on such a name
        raise ModelError(f"output file name is too long for its file system: {out.name}{suffix}")
    if out.is_dir():
        raise ModelError(f"output is a directory: {out}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ModelError(f"output directory is not writable: {folder} ({exc.strerror})") from exc


def model_files(path: Path) -> list[Path]:
    """The model file and the external data files it names; an unreadable model is just its file
    (`load_model` says what is wrong with it)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure is reported by load_model, with its reason
        return [path]
    return [path, *(path.parent / location for location in _data_locations(model))]


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same path after links, or hard links to one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def guard_outputs(outputs: dict[str, Path], inputs: list[Path]) -> None:
    """Refuse, before any work, an output (named by its role, e.g. "the report") that is, links
    to, or would be renamed over an input or another output, or that cannot be written."""
    claimed: dict[str, Path] = {}
    for role, out in outputs.items():
        check_writable(out, suffix="")  # a model's data file is among `outputs` itself
        for source in inputs:
            if _same_file(out, source):
                raise ModelError(f"{role} would overwrite an input file: {source}")
        for other_role, other in claimed.items():
            if _same_file(out, other):
                raise ModelError(f"{role} and {other_role} are the same file: {out}")
        claimed[role] = out


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


class Publication:
    """Every file of one command, written under hidden names beside where it goes and renamed into
    place together by `commit`, only after every step that can fail has run. Whatever is not
    committed is removed, so a failure (or a signal the CLI turns into an exception) leaves neither
    a partial output nor a stray temporary file."""

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}  # destination folder -> its hidden staging folder
        self._created: list[Path] = []  # destination folders made for this publication, outermost first
        self._moves: list[tuple[Path, Path]] = []  # (written, destination)

    def stage(self, out: Path) -> Path:
        """Where to write `out` (and, for a model, its `.data` file beside it)."""
        check_writable(out)
        missing = [f for f in (out.parent, *out.parent.parents) if not f.exists()]
        for created in reversed(missing):  # `-o new/folder/model.onnx` makes the folders
            created.mkdir()
            self._created.append(created)
        folder = self._folders.get(out.parent)
        if folder is None:  # a short name: `out`'s own may already be as long as the file system allows
            folder = Path(tempfile.mkdtemp(prefix=".onnx_vbp.", dir=out.parent))
            self._folders[out.parent] = folder
        self._moves.append((folder / out.name, out))
        return folder / out.name

    def adopt(self, written: Path, out: Path) -> None:
        """Publish `written` (already complete, with its `.data` file if any) as `out` on commit.
        Its data file must keep its name relative to the model: `written` has `out`'s name."""
        if written.name != out.name:
            raise ValueError(f"{written} cannot be published as {out}: its data file name would not match")
        self._moves.append((written, out))

    def commit(self) -> None:
        """Rename every written file into place (a model's data file before the model)."""
        try:
            for written, out in self._moves:
                data = written.with_name(f"{written.name}.data")
                if data.exists():  # absent when no tensor reached the 1 KiB threshold
                    os.replace(data, out.with_name(f"{out.name}.data"))
                if written.exists():
                    os.replace(written, out)
        except OSError as exc:
            raise ModelError(f"cannot publish {out}: {exc}") from exc
        self._moves.clear()
        self._created.clear()  # they hold the outputs now

    def discard(self) -> None:
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        for created in reversed(self._created):  # innermost first; only if nothing else was put there
            with contextlib.suppress(OSError):
                created.rmdir()
        self._folders.clear()
        self._moves.clear()
        self._created.clear()


@contextmanager
def publishing(publication: Publication | None = None) -> Iterator[Publication]:
    """A `Publication` committed when the block ends without error and discarded in any case;
    given one, it is used as is and left to its owner to commit."""
    if publication is not None:
        yield publication
        return
    publication = Publication()
    try:  # an OSError in the block (a read as much as a write) passes unchanged: it says which file
        yield publication
        publication.commit()
    finally:
        publication.discard()


def write_model(model: onnx.ModelProto, path: Path, *, external_data: bool, source_dir: Path | None = None) -> None:
    """Write `model` to `path` (a `Publication.stage`d path). With `external_data` (or past
    protobuf's 2 GB limit) the weights go to `<name>.data` beside it; tensors that still reference
    external data in `source_dir` are copied over file to file. `model` is changed by an external
    save: its weights become references to the new data file."""
    if external_data or source_dir is not None or _Pieces(model).nbytes > PROTOBUF_LIMIT:
        _write_external_data(model, path.with_name(f"{path.name}.data"), source_dir)
    write_proto(model, path)


def verify_model(written: Path, feed: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    """Check a written model from its files alone: onnx.checker, an ORT load, and one run on `feed`
    whose outputs have the names, dtypes and shapes of `expected` (the original's on the same feed)
    and are finite wherever those are."""
    try:
        onnx.checker.check_model(str(written))
    except onnx.checker.ValidationError as exc:
        model = onnx.load(str(written), load_external_data=False)
        if not _unknown_ort_op(model, exc):
            raise ModelError(f"the pruned model fails onnx.checker: {first_line(exc)}") from exc
        _check_in_memory(model, "the pruned model", any(uses_external_data(t) for t in model.graph.initializer))
    session = cpu_session(str(written))
    try:
        outputs = session.run(None, dict(feed))
    except ORT_ERRORS as exc:
        raise ModelError(f"the pruned model fails to run on a calibration sample: {first_line(exc)}") from exc
    names = [output.name for output in session.get_outputs()]
    if names != list(expected):
        raise ModelError(f"the pruned model's outputs are {names}, the original's {list(expected)}")
    for name, got in zip(names, outputs, strict=True):
        want = expected[name]
        if not isinstance(got, np.ndarray) or not isinstance(want, np.ndarray):
            continue  # sequences and maps: ORT checked their types when it ran
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ModelError(
                f"output '{name}' of the pruned model is {got.dtype} {list(got.shape)} on a calibration "
                f"sample, the original's {want.dtype} {list(want.shape)}"
            )
        if got.dtype.kind in "fc" and not np.isfinite(got).all() and np.isfinite(want).all():
            culprit = _first_non_finite_constant(written)
            raise ModelError(
                f"output '{name}' of the pruned model holds NaN or Inf on a calibration sample where "
                "the original's is finite" + (f" (its constant '{culprit}' does)" if culprit else "")
            )


def _first_non_finite_constant(path: Path) -> str | None:
    """The name of the first floating-point initializer of the model at `path` holding NaN or
    Inf: where a failed verification points (read one tensor at a time)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind == "f":
            if uses_external_data(tensor):
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(path.parent))
            if not np.isfinite(onnx.numpy_helper.to_array(tensor)).all():
                return tensor.name
    return None
