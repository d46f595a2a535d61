"""Calibration and evaluation data: files on disk -> batches of model inputs.

Formats (one loader each), read lazily in sorted order:
- `*.npz`: one batch per file, keys = model input names, leading batch axis; extra keys with the
  same leading length (e.g. `labels`) travel along with the batch.
- `*.npy`: one batch per file, for single-input models.
- the ONNX test-data layout (`onnxruntime_perf_test`, ONNX backend tests):
  `test_data_set_*/input_*.pb`, TensorProtos matched by name, else by position.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


class DataError(ValueError):
    """Calibration / evaluation data that cannot be fed to the model."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # ints are fixed dims


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that must be fed (initializers listed as inputs excluded)."""
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims))
    return specs


def _read_npz(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _read_npy(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise DataError(f"{path}: a .npy file can only feed a single-input model; this one has inputs {names} "
                        "(use .npz)")
    return {specs[0].name: np.load(path, allow_pickle=False)}


def _pb_index(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else 0


def _read_test_data_set(folder: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    tensors = []
    for pb in sorted(folder.glob("input_*.pb"), key=_pb_index):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(pb.read_bytes())
        except Exception as exc:  # protobuf raises its own DecodeError type
            raise DataError(f"{pb}: not a TensorProto ({exc})") from exc
        tensors.append(tensor)
    names = {s.name for s in specs}
    if all(t.name in names for t in tensors):
        return {t.name: numpy_helper.to_array(t) for t in tensors}
    return {spec.name: numpy_helper.to_array(t) for spec, t in zip(specs, tensors, strict=False)}


READERS = {".npz": _read_npz, ".npy": _read_npy}


def data_files(source: Path) -> list[Path]:
    """The batch files under `source` (a file, a directory, or a test_data_set_* folder)."""
    if not source.exists():
        raise DataError(f"data path not found: {source}")
    if source.is_file():
        if source.suffix.lower() not in READERS:
            raise DataError(f"{source}: unknown data format (expected .npz or .npy)")
        return [source]
    if any(source.glob("input_*.pb")):
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in READERS)
    files += sorted(p for p in source.glob("test_data_set_*") if p.is_dir())
    if not files:
        raise DataError(f"no data files in {source} (looked for *.npz, *.npy, test_data_set_*/input_*.pb)")
    return sorted(files)


def read_file(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """One batch from one file, checked and cast against the model's inputs."""
    try:
        arrays = _read_test_data_set(path, specs) if path.is_dir() else READERS[path.suffix.lower()](path, specs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(f"{path}: no array for model input '{spec.name}' (found: {', '.join(arrays) or 'none'})")
        arrays[spec.name] = _conform(path, spec, arrays[spec.name])
    lengths = {len(arrays[s.name]) for s in specs}
    if len(lengths) > 1:
        raise DataError(f"{path}: inputs disagree on the batch size ({sorted(lengths)})")
    return arrays


def _conform(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    if array.ndim != len(spec.shape):
        raise DataError(f"{path}: input '{spec.name}' has rank {array.ndim}, the model expects {len(spec.shape)} "
                        f"(shape {list(spec.shape)})")
    for axis, (dim, expected) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if axis > 0 and isinstance(expected, int) and expected > 0 and dim != expected:
            raise DataError(f"{path}: input '{spec.name}' has shape {list(array.shape)}, the model expects "
                            f"{list(spec.shape)}")
    if array.dtype != spec.dtype:
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise DataError(f"{path}: input '{spec.name}' is {array.dtype}, the model expects {spec.dtype}")
        array = array.astype(spec.dtype)
    return array


def iter_batches(
    source: Path,
    specs: list[InputSpec],
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches from `source`, one file at a time, re-batched to `batch_size` if given and
    capped at `max_samples` samples. Arrays other than model inputs (e.g. `labels`) are kept when
    they have the batch's leading length."""
    names = [s.name for s in specs]
    pending: list[dict[str, np.ndarray]] = []
    seen = 0
    for path in data_files(source):
        arrays = read_file(path, specs)
        size = len(arrays[names[0]])
        batch = {k: v for k, v in arrays.items() if k in names or (v.ndim > 0 and len(v) == size)}
        if max_samples is not None:
            size = min(size, max_samples - seen)
            batch = {k: v[:size] for k, v in batch.items()}
        seen += size
        if batch_size is None:
            if size:
                yield batch
        else:
            pending.append(batch)
            yield from _full_batches(pending, batch_size)
        if max_samples is not None and seen >= max_samples:
            break
    if pending and len(pending[0][names[0]]):
        yield pending[0]


def _full_batches(pending: list[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate what is pending and yield every full batch, leaving the rest in `pending`."""
    keys = set.intersection(*(set(b) for b in pending))
    merged = {k: np.concatenate([b[k] for b in pending]) for k in keys}
    total = len(next(iter(merged.values())))
    start = 0
    while total - start >= batch_size:
        yield {k: v[start : start + batch_size] for k, v in merged.items()}
        start += batch_size
    pending[:] = [{k: v[start:] for k, v in merged.items()}]
