"""Small helpers for the Keras tests: the shared MNIST subset and a tiny model."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array (magic 2049 labels, 2051 images)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic})")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images as float32 in [0, 1], flattened to 784; labels as int32)."""
    prefix = "train" if split == "train" else "t10k"
    root = DATA / "mnist-small"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return (images.reshape(len(images), -1).astype(np.float32) / 255.0,
            labels.astype(np.int32))
