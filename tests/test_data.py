"""Data loading: npz / npy / ONNX test-data layout, re-batching, caps, validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_vbp.data import DataError, InputSpec, iter_batches

IMAGE = InputSpec("image", np.dtype(np.float32), ("batch", 2, 3))
IDS = InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq"))


def _images(start: int, count: int) -> np.ndarray:
    return np.arange(start * 6, (start + count) * 6, dtype=np.float32).reshape(count, 2, 3)


def _write_npz(folder: Path, sizes: list[int], labels: bool = True) -> None:
    start = 0
    for i, size in enumerate(sizes):
        arrays = {"image": _images(start, size)}
        if labels:
            arrays["labels"] = np.arange(start, start + size)
        np.savez(folder / f"part_{i:02d}.npz", **arrays)
        start += size


def test_npz_files_in_sorted_order_with_labels(tmp_path: Path) -> None:
    _write_npz(tmp_path, [3, 5, 2])
    batches = list(iter_batches(tmp_path, [IMAGE]))
    assert [len(b["image"]) for b in batches] == [3, 5, 2]
    assert np.array_equal(np.concatenate([b["labels"] for b in batches]), np.arange(10))


def test_rebatching_keeps_samples_and_labels_aligned(tmp_path: Path) -> None:
    _write_npz(tmp_path, [3, 5, 2])
    batches = list(iter_batches(tmp_path, [IMAGE], batch_size=4))
    assert [len(b["image"]) for b in batches] == [4, 4, 2]
    images = np.concatenate([b["image"] for b in batches])
    assert np.array_equal(images, _images(0, 10))
    assert np.array_equal(np.concatenate([b["labels"] for b in batches]), np.arange(10))


def test_max_samples_caps_the_stream(tmp_path: Path) -> None:
    _write_npz(tmp_path, [3, 5, 2])
    assert sum(len(b["image"]) for b in iter_batches(tmp_path, [IMAGE], max_samples=6)) == 6
    assert sum(len(b["image"]) for b in iter_batches(tmp_path, [IMAGE], batch_size=4, max_samples=6)) == 6


def test_static_batch_dimension_is_fed_exactly(tmp_path: Path) -> None:
    _write_npz(tmp_path, [3, 5, 2])
    static = InputSpec("image", np.dtype(np.float32), (4, 2, 3))
    assert [len(b["image"]) for b in iter_batches(tmp_path, [static])] == [4, 4]
    with pytest.raises(DataError, match="fixed batch size of 4; batch size 8 cannot feed it"):
        list(iter_batches(tmp_path, [static], batch_size=8))


def test_npy_feeds_a_single_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _images(0, 2).astype(np.float64))
    (batch,) = iter_batches(tmp_path, [IMAGE])
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (2, 2, 3)
    with pytest.raises(DataError, match="single-input"):
        list(iter_batches(tmp_path, [IMAGE, IDS]))


def _write_pb(folder: Path, arrays: list[np.ndarray], names: list[str]) -> None:
    folder.mkdir()
    for i, (array, name) in enumerate(zip(arrays, names, strict=True)):
        (folder / f"input_{i}.pb").write_bytes(numpy_helper.from_array(array, name).SerializeToString())


def test_onnx_test_data_layout_by_name_and_by_position(tmp_path: Path) -> None:
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    _write_pb(tmp_path / "test_data_set_0", [ids, _images(0, 1)], ["input_ids", "image"])
    _write_pb(tmp_path / "test_data_set_1", [_images(1, 1), ids + 1], ["a", "b"])  # unnamed: by position
    batches = list(iter_batches(tmp_path, [IMAGE, IDS]))
    assert [b["input_ids"].tolist() for b in batches] == [[[1, 2, 3]], [[2, 3, 4]]]
    assert np.array_equal(batches[1]["image"], _images(1, 1))
    # a single test_data_set folder works as the data path too
    assert len(list(iter_batches(tmp_path / "test_data_set_0", [IMAGE, IDS]))) == 1


def test_int32_ids_are_widened_but_floats_for_ids_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "ok.npz", input_ids=np.ones((2, 4), np.int32))
    (batch,) = iter_batches(tmp_path / "ok.npz", [IDS])
    assert batch["input_ids"].dtype == np.int64
    np.savez(tmp_path / "bad.npz", input_ids=np.ones((2, 4), np.float32))
    with pytest.raises(DataError, match=r"'input_ids' is float32, the model expects int64"):
        list(iter_batches(tmp_path / "bad.npz", [IDS]))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"other": np.zeros((2, 2, 3), np.float32)}, r"no array for model input 'image' \(found: other\)"),
        ({"image": np.zeros((2, 6), np.float32)}, r"rank 2, the model expects 3"),
        ({"image": np.zeros((2, 2, 4), np.float32)}, r"shape \[2, 2, 4\], the model expects \['batch', 2, 3\]"),
    ],
    ids=["missing-input", "wrong-rank", "wrong-fixed-dim"],
)
def test_bad_batches_name_the_problem(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(DataError, match=message):
        list(iter_batches(tmp_path, [IMAGE]))


def test_empty_or_missing_data_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data files"):
        list(iter_batches(tmp_path, [IMAGE]))
    with pytest.raises(DataError, match="not found"):
        list(iter_batches(tmp_path / "nope", [IMAGE]))
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        list(iter_batches(tmp_path, [IMAGE]))


def test_model_inputs_skip_initializers() -> None:
    from graphs import BlockSpec, build_model

    from onnx_vbp import model_inputs

    model = build_model([BlockSpec()])
    model.graph.input.append(onnx.helper.make_tensor_value_info(model.graph.initializer[0].name, 1, None))
    (spec,) = model_inputs(model)
    assert spec.name == "x" and spec.shape == ("batch", 5, 8) and spec.dtype == np.float32


def test_npz_members_other_than_inputs_and_labels_are_never_read(tmp_path: Path, monkeypatch) -> None:
    np.savez(tmp_path / "b.npz", x=np.ones((2, 3), np.float32), labels=np.arange(2), huge=np.zeros(10))
    read: list[str] = []
    real = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):
        read.append(key)
        return real(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    (batch,) = iter_batches(tmp_path, [InputSpec("x", np.dtype(np.float32), ("batch", 3))])
    assert sorted(batch) == ["labels", "x"] and sorted(read) == ["labels", "x"]


def test_variable_length_files_rebatch_without_mixing_lengths(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((3, 5, 8), np.float32))
    np.savez(tmp_path / "b.npz", x=np.ones((2, 7, 8), np.float32))
    one = InputSpec("x", np.dtype(np.float32), (1, "s", 8))  # batch fixed at 1, sequence free
    assert [b["x"].shape for b in iter_batches(tmp_path, [one])] == [(1, 5, 8)] * 3 + [(1, 7, 8)] * 2
    free = InputSpec("x", np.dtype(np.float32), ("b", "s", 8))
    assert [b["x"].shape for b in iter_batches(tmp_path, [free], batch_size=2)] == [(2, 5, 8), (1, 5, 8), (2, 7, 8)]
    two = InputSpec("x", np.dtype(np.float32), (2, "s", 8))  # a leftover of 1 cannot be fed, nor joined
    with pytest.raises(DataError, match=r"'x' has shapes \[\(5, 8\), \(7, 8\)\] in different files"):
        list(iter_batches(tmp_path, [two]))


def test_samples_are_counted_from_headers_for_a_progress_total(tmp_path: Path) -> None:
    from onnx_vbp.data import count_samples

    spec = InputSpec("x", np.dtype(np.float32), ("batch", 3))
    np.savez(tmp_path / "a.npz", labels=np.arange(7), x=np.zeros((7, 3), np.float32))
    np.savez_compressed(tmp_path / "b.npz", x=np.zeros((5, 3), np.float32))
    assert count_samples(tmp_path, [spec]) == 12
    np.save(tmp_path / "one.npy", np.zeros((4, 3), np.float32))
    assert count_samples(tmp_path / "one.npy", [spec]) == 4
    folder = tmp_path / "sets" / "test_data_set_0"
    folder.mkdir(parents=True)
    (folder / "input_0.pb").write_bytes(numpy_helper.from_array(np.zeros((6, 3), np.float32), "x").SerializeToString())
    assert count_samples(tmp_path / "sets", [spec]) == 6
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    assert count_samples(tmp_path / "broken.npz", [spec]) is None  # no total, no error: the read reports it
