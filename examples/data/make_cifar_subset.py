"""How examples/data/cifar10-small was made (a record of the derivation, not run by anything).

    python examples/data/make_cifar_subset.py SOURCE_DIR examples/data/cifar10-small

SOURCE_DIR holds CIFAR-10 binary batches (``data_batch_{1..5}.bin``,
``test_batch.bin``, ``batches.meta.txt``): the official ones or any subset in
that format. The shipped subset came from the developers' 10,000/2000-image
class-balanced CIFAR-10 subset (real images, one JPEG round trip), drawn with
``numpy.random.default_rng(SEED)``: per class, ``TRAIN_PER_CLASS`` training and
``TEST_PER_CLASS`` test records, shuffled, the training ones dealt into five
batches of equal class balance. Files are xz-compressed (``.bin.xz``), which
examples.data reads as they are; their sha256 are in examples.data.SHIPPED_CIFAR10_SHA256.
"""

from __future__ import annotations

import lzma
import sys
from pathlib import Path

import numpy as np

SEED = 0
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
RECORD = 3073


def _records(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, RECORD)


def _pick(records: np.ndarray, per_class: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, ``per_class`` records drawn without replacement."""
    return [records[rng.choice(np.flatnonzero(records[:, 0] == c), per_class, replace=False)]
            for c in range(10)]


def main(source: str, target: str) -> None:
    source, target = Path(source), Path(target)
    rng = np.random.default_rng(SEED)
    train = np.concatenate([_records(source / f"data_batch_{i}.bin") for i in range(1, 6)])
    test = _records(source / "test_batch.bin")
    by_class = _pick(train, TRAIN_PER_CLASS, rng)
    target.mkdir(parents=True, exist_ok=True)
    share = TRAIN_PER_CLASS // 5
    for i in range(5):
        batch = np.concatenate([records[i * share:(i + 1) * share] for records in by_class])
        _write(target / f"data_batch_{i + 1}.bin.xz", batch[rng.permutation(len(batch))])
    test_batch = np.concatenate(_pick(test, TEST_PER_CLASS, rng))
    _write(target / "test_batch.bin.xz", test_batch[rng.permutation(len(test_batch))])
    (target / "batches.meta.txt").write_bytes((source / "batches.meta.txt").read_bytes())


def _write(path: Path, records: np.ndarray) -> None:
    path.write_bytes(lzma.compress(records.tobytes(), preset=9 | lzma.PRESET_EXTREME))


if __name__ == "__main__":
    main(*sys.argv[1:])
