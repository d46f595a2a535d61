"""Fashion-MNIST from ../shared/data/fashion-mnist (IDX format), for the tools/ scripts."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str, data: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, 28, 28] float32 in [0, 1] and int64 labels of the train or test split."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(data / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = read_idx(data / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images[:, None], labels
