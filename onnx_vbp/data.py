"""Calibration and evaluation data: files on disk -> batches of model inputs.

Formats (one loader each), read lazily in sorted order:
- `*.npz`: one batch per file, keys = model input names, leading batch axis; a `labels` array
  with the same leading length travels along with the batch; other members are never read.
- `*.npy`: one batch per file, for single-input models.
- the ONNX test-data layout (`onnxruntime_perf_test`, ONNX backend tests):
  `test_data_set_*/input_*.pb`, TensorProtos matched by name, else by position.
- raw images (`*.png`, `*.jpg`, `*.jpeg`; Pillow, extra `[images]`), one sample per file, for a
  model with one 4-D image input: shorter side resized and center-cropped to the input's H x W,
  scaled to [0, 1], normalized by mean/std, NCHW or NHWC and grey or RGB as the input says.
- raw text (`*.txt` one sample per line, `*.jsonl` with a `text` field; tokenizers, extra
  `[text]`) for models fed `input_ids` / `attention_mask` / `token_type_ids`: tokenized with a
  `tokenizer.json`, padded to the longest sample of each batch. A line longer than `max_length`
  tokens becomes several samples, consecutive windows cut between words (`long_text="split"`,
  the default: calibration sees all of the text), or is truncated (`long_text="truncate"`).
Raw samples are grouped into batches of `batch_size` (default 32).
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from onnx_vbp.errors import VbpError


class DataError(VbpError):
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
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            kind = kind.removesuffix("_type").replace("_", " ") if kind else "value without a type"
            raise DataError(f"model input '{value.name}' is a {kind}, not a tensor: only tensor inputs can be fed")
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        except KeyError as exc:
            raise DataError(f"model input '{value.name}' has no numpy type (element type {tensor.elem_type})") from exc
        specs.append(InputSpec(value.name, dtype, dims))
    if not specs:
        raise DataError("the model has no input to feed: every graph input is an initializer, or there is none")
    return specs


def read_npz(path: Path, wanted: Callable[[str], bool]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The members of an .npz file that `wanted` accepts (no other member is decompressed), and
    the names of all of them. Any damage to the archive is one DataError."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files if wanted(key)}, list(archive.files)
    except Exception as exc:  # zipfile and numpy raise a zoo of types for damaged archives
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _read_npz(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """The model's inputs and the labels: other members are never decompressed."""
    wanted = {s.name for s in specs} | {LABELS}
    arrays, members = read_npz(path, wanted.__contains__)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(f"{path}: no array for model input '{missing[0]}' (found: {', '.join(members) or 'none'})")
    return arrays


def _read_npy(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise DataError(
            f"{path}: a .npy file can only feed a single-input model; this one has inputs {names} (use .npz)"
        )
    return {specs[0].name: np.load(path, allow_pickle=False)}


def _pb_index(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else 0


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's external-data fields (location, offset, length, ...) by key."""
    return {entry.key: entry.value for entry in tensor.external_data}


def external_file(tensor: onnx.TensorProto, folder: Path) -> Path:
    """The file holding `tensor`'s external data, after checking that it lies in `folder`: no
    absolute path, no `..`, no link out of it, and a whole-number offset and length. A model or
    a test data set may not make us read, or even look at, a file elsewhere. Raises ValueError."""
    entries = external_entries(tensor)
    location = entries.get("location", "")
    relative = Path(location)
    if not location or relative.is_absolute() or ".." in relative.parts:
        raise ValueError(
            f"tensor '{tensor.name}' has its data at {location!r}: external data must lie in the "
            "folder of the file that names it"
        )
    for key in ("offset", "length"):
        if key in entries and not entries[key].isdigit():
            raise ValueError(f"tensor '{tensor.name}' has external data {key} {entries[key]!r}, not a whole number")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"tensor '{tensor.name}' has its data in {location}, a link out of {folder}")
    return path


def _read_test_data_set(folder: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    tensors = []
    for pb in sorted(folder.glob("input_*.pb"), key=_pb_index):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(pb.read_bytes())
        except Exception as exc:  # protobuf raises its own DecodeError type
            raise DataError(f"{pb}: not a TensorProto ({exc})") from exc
        if uses_external_data(tensor):
            try:
                external_file(tensor, folder)
            except ValueError as exc:
                raise DataError(f"{pb}: {exc}") from exc
            load_external_data_for_tensor(tensor, str(folder))
        tensors.append(tensor)
    names = {s.name for s in specs}
    if all(t.name in names for t in tensors):
        return {t.name: numpy_helper.to_array(t) for t in tensors}
    return {spec.name: numpy_helper.to_array(t) for spec, t in zip(specs, tensors, strict=False)}


READERS = {".npz": _read_npz, ".npy": _read_npy}
LABELS = "labels"  # the one array besides the inputs that an .npz batch may carry (for top-1)
MAX_IMAGE_PIXELS = 50_000_000  # a 48 Mpx phone photo fits; decoding more would take gigabytes
CHARS_PER_TOKEN = 32  # text is tokenized at most max_length x this characters at a time
LONG_TEXT = ("split", "truncate")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEXT_SUFFIXES = (".txt", ".jsonl")
RAW_BATCH_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class RawOptions:
    """How raw images and text become model inputs."""

    tokenizer: Path | None = None
    max_length: int = 128
    long_text: str = "split"  # a line past max_length tokens: windows of it ("split"), or its start
    image_size: tuple[int, int] | None = None  # (H, W) when the model's input does not fix them
    mean: tuple[float, ...] | None = None  # per channel, or one for all; default: see `normalization`
    std: tuple[float, ...] | None = None

    def normalization(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per channel for photos scaled to [0, 1]: as given (one value, or one per
        channel), else ImageNet's for RGB and none (0, 1) for grey, which ImageNet's would skew."""
        default = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,), (1.0,))
        values = []
        for given, fallback, option in ((self.mean, default[0], "mean"), (self.std, default[1], "std")):
            chosen = np.asarray(fallback if given is None else given, np.float32)
            if chosen.size not in (1, channels):
                raise DataError(f"`{option}` has {chosen.size} values; the image input has {channels} channels")
            values.append(np.broadcast_to(chosen, (channels,)).copy())
        if not (values[1] > 0).all():
            raise DataError("`std` must be positive")
        return values[0], values[1]

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.long_text not in LONG_TEXT:
            raise DataError(f"`long_text` is {self.long_text!r}; it must be one of {', '.join(LONG_TEXT)}")


def _kind(path: Path) -> str:
    if path.is_dir():
        return "tensors"
    suffix = path.suffix.lower()
    return "tensors" if suffix in READERS else "images" if suffix in IMAGE_SUFFIXES else "text"


def data_kind(source: Path | str) -> str:
    """ "tensors", "images" or "text": what `source` holds (see `data_files`)."""
    return _kind(data_files(source)[0])


def data_files(source: Path | str) -> list[Path]:
    """The data files under `source` (a file, a directory, or a test_data_set_* folder)."""
    source = Path(source)
    known = (*READERS, *IMAGE_SUFFIXES, *TEXT_SUFFIXES)
    if not source.exists():
        raise DataError(f"data path not found: {source}")
    if source.is_file():
        if source.suffix.lower() not in known:
            raise DataError(f"{source}: unknown data format (expected one of {', '.join(known)})")
        return [source]
    if any(source.glob("input_*.pb")):
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in known)
    files += sorted(p for p in source.glob("test_data_set_*") if p.is_dir())
    if not files:
        raise DataError(
            f"no data files in {source} (looked for *.npz, *.npy, test_data_set_*/input_*.pb, "
            "*.png/*.jpg/*.jpeg, *.txt/*.jsonl)"
        )
    kinds = {_kind(p) for p in files}
    if len(kinds) > 1:
        raise DataError(f"{source} mixes data formats ({', '.join(sorted(kinds))}); use one per directory")
    return sorted(files)


class ImageEncoder:
    """Decode, resize, crop and normalize photos for a model with one 4-D image input."""

    def __init__(self, specs: list[InputSpec], options: RawOptions) -> None:
        if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].dtype.kind != "f":
            raise DataError(
                "image data needs a model with a single 4-D float input; this one has "
                + ", ".join(f"'{s.name}' {list(s.shape)}" for s in specs)
            )
        try:
            from PIL import Image
        except ImportError as exc:
            raise DataError("image data needs Pillow: pip install 'onnx_vbp[images]'") from exc
        self._image = Image
        self.spec = specs[0]
        shape = self.spec.shape
        self.channels_last = shape[3] in (1, 3) and shape[1] not in (1, 3)
        channels, *size = (shape[3], shape[1], shape[2]) if self.channels_last else shape[1:]
        if channels not in (1, 3):
            raise DataError(f"image input '{self.spec.name}' has {channels} channels; expected 1 or 3")
        self.grey = channels == 1
        fixed = all(isinstance(d, int) and d > 0 for d in size)
        self.size = tuple(size) if fixed else options.image_size
        if self.size is None:
            raise DataError(f"image input '{self.spec.name}' has no fixed height and width; give `image_size`")
        self.mean, self.std = options.normalization(channels)

    def samples(self, path: Path) -> Iterator[np.ndarray]:
        height, width = self.size
        try:
            with warnings.catch_warnings():  # over Pillow's own limit: our error below says it in one line
                warnings.simplefilter("ignore", self._image.DecompressionBombWarning)
                image = self._image.open(path)  # reads the header only
            with image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{path}: {image.width} x {image.height} pixels is over the limit of "
                        f"{MAX_IMAGE_PIXELS // 10**6} Mpx; downscale the photos first"
                    )
                image.draft("L" if self.grey else "RGB", (width, height))  # JPEG: decode at a smaller scale
                image = image.convert("L" if self.grey else "RGB")
                scale = max(height / image.height, width / image.width)
                resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
                image = image.resize(resized, self._image.Resampling.BILINEAR)
                left, top = (image.width - width) // 2, (image.height - height) // 2
                pixels = np.asarray(image.crop((left, top, left + width, top + height)), np.float32) / 255.0
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, self._image.DecompressionBombError) as exc:  # bad files
            raise DataError(f"{path}: not a readable image ({exc})") from exc
        pixels = ((pixels.reshape(height, width, -1) - self.mean) / self.std).astype(self.spec.dtype)
        yield pixels if self.channels_last else pixels.transpose(2, 0, 1)

    def encode(self, samples: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {self.spec.name: np.stack(samples)}


class TextEncoder:
    """Tokenize lines of text for a model fed input_ids / attention_mask / token_type_ids."""

    def __init__(self, specs: list[InputSpec], options: RawOptions) -> None:
        unknown = [s.name for s in specs if s.name not in TEXT_INPUTS]
        if unknown:
            raise DataError(
                f"text data needs a model whose inputs are {', '.join(TEXT_INPUTS)}; "
                f"this one also takes {', '.join(unknown)}"
            )
        if options.tokenizer is None:
            raise DataError("text data needs a tokenizer: give `tokenizer` (a tokenizer.json)")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise DataError("text data needs the tokenizers package: pip install 'onnx_vbp[text]'") from exc
        try:
            self.tokenizer = Tokenizer.from_file(str(options.tokenizer))
        except Exception as exc:  # tokenizers raises plain Exception for missing or bad files
            raise DataError(f"cannot load tokenizer {options.tokenizer}: {exc}") from exc
        self.splitter = None  # finds the windows: a second copy that neither truncates nor pads
        if options.long_text == "split":
            self.splitter = Tokenizer.from_file(str(options.tokenizer))
            self.splitter.no_truncation()
            self.splitter.no_padding()
        self.window_tokens = options.max_length - self.tokenizer.num_special_tokens_to_add(False)
        self.tokenizer.enable_truncation(options.max_length)
        self.tokenizer.enable_padding()  # to the longest sample of each batch
        self.specs = specs
        self.max_chars = options.max_length * CHARS_PER_TOKEN
        self.source = options.tokenizer

    def samples(self, path: Path) -> Iterator[str]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = path.read_text(encoding="latin-1")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{path}: empty text file")
        for number, line in enumerate(lines, 1):
            if path.suffix.lower() == ".jsonl":
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
                    raise DataError(f"{path}:{number}: expected a JSON object with a 'text' field") from exc
                if not isinstance(line, str):
                    raise DataError(f"{path}:{number}: 'text' is {type(line).__name__}, not a string")
            if self.splitter is None or self.window_tokens < 1:
                yield line[: self.max_chars]  # the tokenizer truncates; the rest could not fit anyway
            else:
                yield from self._windows(line)

    def _windows(self, line: str) -> Iterator[str]:
        """`line` as consecutive pieces of at most `window_tokens` tokens, cut between words.

        The line is tokenized one stretch of `max_chars` characters at a time, so that a huge
        line costs no more memory than a short one. A stretch that stops short of the line's end
        may have cut its last word in two: the next stretch starts at that word, or at the last
        window's, so that windows stay full.
        """
        start = 0
        while start < len(line):
            stretch = line[start : start + self.max_chars]
            (encoding,) = self._tokenize(self.splitter, [stretch], add_special_tokens=False)
            word_ids, offsets = encoding.word_ids, encoding.offsets
            end = len(word_ids)
            if start + len(stretch) < len(line):
                end = _last_word_start(word_ids) or end  # that word may go on past the stretch
            bounds = _window_bounds(word_ids[:end], self.window_tokens)
            if end < len(word_ids) and len(bounds) > 1:
                end = bounds.pop()[0]  # a window left short goes to the next stretch, to be filled
            start += max(offsets[end][0], 1) if end < len(word_ids) else len(stretch)
            for first, stop in bounds:
                piece = stretch[offsets[first][0] : offsets[stop - 1][1]]
                if piece.strip():
                    yield piece

    def _tokenize(self, tokenizer, texts: list[str], **kwargs) -> list:
        try:
            return tokenizer.encode_batch(texts, **kwargs)
        except Exception as exc:  # tokenizers raises plain Exception, e.g. for a vocabulary without [UNK]
            raise DataError(f"tokenizer {self.source} fails on the text: {exc}") from exc

    def encode(self, samples: list[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenize(self.tokenizer, samples)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {s.name: np.array([getattr(e, fields[s.name]) for e in encodings], s.dtype) for s in self.specs}


def _last_word_start(word_ids: list[int | None]) -> int:
    """The index of the first token of the last word (0 for none)."""
    first = len(word_ids) - 1
    while first > 0 and word_ids[first - 1] == word_ids[-1]:
        first -= 1
    return max(first, 0)


def _window_bounds(word_ids: list[int | None], size: int) -> list[tuple[int, int]]:
    """Consecutive [first, stop) token ranges of at most `size` tokens that cover `word_ids`,
    each ending where a word ends (a word longer than `size` is cut)."""
    bounds, first = [], 0
    while first < len(word_ids):
        stop = min(first + size, len(word_ids))
        if stop < len(word_ids):
            word_start = next((i for i in range(stop, first, -1) if word_ids[i] != word_ids[i - 1]), stop)
            stop = word_start
        bounds.append((first, stop))
        first = stop
    return bounds


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
        arrays[spec.name] = conform(path, spec, arrays[spec.name])
    lengths = {len(arrays[s.name]) for s in specs}
    if len(lengths) > 1:
        raise DataError(f"{path}: inputs disagree on the batch size ({sorted(lengths)})")
    return arrays


def conform(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """`array` checked against the model input `spec` (rank, fixed dims, dtype kind, finite) and cast to its dtype."""
    if array.ndim != len(spec.shape):
        raise DataError(
            f"{path}: input '{spec.name}' has rank {array.ndim}, the model expects {len(spec.shape)} "
            f"(shape {list(spec.shape)})"
        )
    for axis, (dim, expected) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if axis > 0 and isinstance(expected, int) and expected > 0 and dim != expected:
            raise DataError(
                f"{path}: input '{spec.name}' has shape {list(array.shape)}, the model expects {list(spec.shape)}"
            )
    if array.dtype != spec.dtype:
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise DataError(f"{path}: input '{spec.name}' is {array.dtype}, the model expects {spec.dtype}")
        array = array.astype(spec.dtype)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{path}: input '{spec.name}' contains NaN or Inf")
    return array


def count_samples(
    source: Path | str, specs: list[InputSpec], raw: RawOptions = RawOptions(), limit: int | None = None
) -> int | None:
    """How many samples `source` holds (at most `limit`), for a progress bar's total: read from
    headers and line counts without decoding the data, except text split into windows, which is
    tokenized up to `limit` samples to count them. None when that cannot be told."""
    try:
        files = data_files(source)
        kind = _kind(files[0])
        if kind == "images":
            return len(files)
        if kind == "text" and raw.long_text == "split":
            encoder = TextEncoder(specs, raw)
            windows = itertools.chain.from_iterable(encoder.samples(path) for path in files)
            return sum(1 for _ in itertools.islice(windows, limit))
        if kind == "text":
            return sum(sum(1 for line in path.open("rb") if line.strip()) for path in files)
        return sum(_leading_length(path, specs[0].name) for path in files)
    except Exception:  # a progress total is never worth an error: the real read reports it
        return None


def _leading_length(path: Path, name: str) -> int:
    if path.is_dir():  # test_data_set_*: one protobuf per input, small enough to parse
        tensor = onnx.TensorProto()
        tensor.ParseFromString(sorted(path.glob("input_*.pb"), key=_pb_index)[0].read_bytes())
        return int(tensor.dims[0])
    if path.suffix.lower() == ".npy":
        return len(np.load(path, mmap_mode="r"))
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return int(header(member)[0][0])


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size the model's inputs fix (their first dim), or None when it is free."""
    fixed = sorted({s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0})
    if len(fixed) > 1:
        raise DataError(f"the model's inputs fix different batch sizes {fixed}: they cannot be fed together")
    return fixed[0] if fixed else None


def one_sample(specs: list[InputSpec], batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs of the first sample of `batch`: its first rows, as many as the model
    fixes its batch to (one when it is free)."""
    size = fixed_batch(specs) or 1
    return {s.name: batch[s.name][:size] for s in specs}


def iter_batches(
    source: Path | str,
    specs: list[InputSpec],
    *,
    batch_size: int | None = None,
    max_samples: int | None = None,
    raw: RawOptions = RawOptions(),
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches of model inputs from `source`, reading one file at a time.

    Tensor files give one batch each, re-batched to `batch_size` if given; raw images and text are
    grouped into batches of `batch_size` (default 32) and encoded as `raw` says. At most
    `max_samples` samples are read. A model with a static batch dimension is fed batches of exactly
    that size (a smaller remainder is dropped: the model cannot take it). Arrays other than model
    inputs (`labels`) are kept when they have the batch's leading length.
    """
    fixed = fixed_batch(specs)
    if fixed and batch_size not in (None, fixed):
        raise DataError(
            f"the model's inputs have a fixed batch size of {fixed}; batch size {batch_size} cannot feed it"
        )
    batch_size = fixed or batch_size
    files = data_files(source)
    kind = _kind(files[0])
    if kind == "tensors":
        yield from _tensor_batches(files, specs, batch_size, max_samples, keep_remainder=not fixed)
        return
    encoder = ImageEncoder(specs, raw) if kind == "images" else TextEncoder(specs, raw)
    stream = itertools.chain.from_iterable(encoder.samples(path) for path in files)
    stream = itertools.islice(stream, max_samples)
    batch_size = batch_size or RAW_BATCH_SIZE
    while chunk := list(itertools.islice(stream, batch_size)):
        if len(chunk) == batch_size or not fixed:
            yield encoder.encode(chunk)


def _tensor_batches(
    files: list[Path], specs: list[InputSpec], batch_size: int | None, max_samples: int | None, keep_remainder: bool
) -> Iterator[dict[str, np.ndarray]]:
    names = [s.name for s in specs]
    pending: list[dict[str, np.ndarray]] = []
    seen = 0
    for path in files:
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
            leftover = pending[0] if pending and len(pending[0][names[0]]) else None
            if (
                leftover is not None
                and keep_remainder
                and any(leftover[n].shape[1:] != batch[n].shape[1:] for n in names)
            ):
                yield leftover  # samples of another length cannot join it: it goes as a smaller batch
                pending.clear()
            pending.append(batch)
            yield from _full_batches(pending, batch_size)
        if max_samples is not None and seen >= max_samples:
            break
    if pending and len(pending[0][names[0]]) and keep_remainder:
        yield pending[0]


def _full_batches(pending: list[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate what is pending and yield every full batch, leaving the rest in `pending`.
    Samples of different shapes (variable-length files) cannot share a batch: those are refused."""
    pending[:] = [b for b in pending if len(next(iter(b.values())))] or pending[-1:]  # empty leftovers
    keys = set.intersection(*(set(b) for b in pending))
    for key in keys:
        shapes = {b[key].shape[1:] for b in pending}
        if len(shapes) > 1:
            raise DataError(
                f"'{key}' has shapes {sorted(shapes)} in different files: samples of different "
                "lengths cannot be re-batched together (pad them to one length, or give batches whole)"
            )
    merged = {k: np.concatenate([b[k] for b in pending]) for k in keys}
    total = len(next(iter(merged.values())))
    start = 0
    while total - start >= batch_size:
        yield {k: v[start : start + batch_size] for k, v in merged.items()}
        start += batch_size
    pending[:] = [{k: v[start:] for k, v in merged.items()}]


def make_inputs(
    specs: list[InputSpec], batch_size: int, seq: int, data: Path | None, seed: int = 0, raw: RawOptions = RawOptions()
) -> dict[str, np.ndarray]:
    """One batch of inputs: the first batch of `data` (repeated to `batch_size`, or to the batch
    size the model fixes), else random values (symbolic dims after the batch become `seq`; integer
    inputs in [0, 100), masks of 1, token types of 0). `raw`: how photos and text in `data` are
    encoded."""
    batch_size = fixed_batch(specs) or batch_size
    if data is not None:
        first = next(iter_batches(data, specs, raw=raw))
        return {s.name: np.resize(first[s.name], (batch_size, *first[s.name].shape[1:])) for s in specs}
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = [batch_size] + [d if isinstance(d, int) and d > 0 else seq for d in spec.shape[1:]]
        if spec.dtype.kind in "iu":
            # token types index a table of 2 rows in BERT: 0 is always valid
            values = (
                np.ones(shape)
                if "mask" in spec.name
                else np.zeros(shape)
                if "type" in spec.name
                else rng.integers(0, 100, shape)
            )
            feed[spec.name] = values.astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed
