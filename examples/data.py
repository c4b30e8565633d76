"""MNIST and CIFAR-10 from their standard files, as numpy arrays.

Layouts (the same for every framework; each converts them itself):

- images: ``uint8``, NHWC: MNIST ``(N, 28, 28, 1)``, CIFAR-10 ``(N, 32, 32, 3)``;
- labels: ``int64``, ``(N,)``, values 0-9.

Files read:

- MNIST: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, gzipped (``.gz``, as distributed) or plain.
- CIFAR-10: the binary version (``cifar-10-batches-bin/data_batch_{1..5}.bin``
  and ``test_batch.bin``; records of 1 label byte + 3072 pixel bytes, planar
  RGB), and ``batches.meta.txt`` for the class names when present.

Every header and size is checked (IDX magic numbers, dimensions against the
file size, matching image and label counts, CIFAR record size, label range):
a damaged, truncated or foreign file raises :class:`DataError` naming the
file; nothing is ever loaded partially.

Where the files come from (first match wins):

1. ``data_dir`` (the training CLI's ``--data-dir``), else
2. the ``POLYOPT_DATA`` environment variable, else
3. the small real subsets shipped with the repository, checked against
   their sha256 (:data:`SHIPPED_SHA256`) before use: MNIST in
   ``examples/data/mnist-small`` (8000 train / 2000 test images, a seeded
   split of the real MNIST test set, gzipped IDX) and CIFAR-10 in
   ``examples/data/cifar10-small`` (5000 train / 1000 test images, 500 / 100
   per class, the binary batches xz-compressed; how they were drawn:
   ``examples/data/make_cifar_subset.py``).

A data directory may hold the files directly or one of the usual
subdirectories (``mnist-small``, ``mnist``, ``cifar-10-batches-bin``,
``cifar10-small/cifar-10-batches-bin``), so one ``POLYOPT_DATA`` directory
serves both datasets. Files may be plain, gzipped (``.gz``) or xz-compressed
(``.xz``).

Download (opt-in, ``download=True`` or ``python -m examples.data --download``):
the official archives (MNIST from a mirror, base URL ``POLYOPT_MNIST_MIRROR``
or :data:`MNIST_MIRROR`; CIFAR-10's ``cifar-10-binary.tar.gz``) are fetched
into a cache directory (``POLYOPT_CACHE``, else ``$XDG_CACHE_HOME/polyopt``,
else ``~/.cache/polyopt``), checked against their published sha256 (a
mismatch discards the file and raises) and reused when already cached.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from polyopt import files

SHIPPED = Path(__file__).resolve().parent / "data"
SHIPPED_MNIST = SHIPPED / "mnist-small"
SHIPPED_CIFAR10 = SHIPPED / "cifar10-small"
#: the files shipped with the repository (path relative to examples/data -> sha256)
SHIPPED_SHA256 = {
    "mnist-small/train-images-idx3-ubyte.gz":
        "32cb2e763233c317e37d14b768ce5a5b92f71109ccd51ec83c8ea4afe78740fc",
    "mnist-small/train-labels-idx1-ubyte.gz":
        "0bc85850180f7fd988f2a48ece5dbfd97b7514f0d606f1de57e34f455c7caa44",
    "mnist-small/t10k-images-idx3-ubyte.gz":
        "15d953afab53e00dc059fd5231474f3f6f23211219b7fc9d98d211bb91cae4c1",
    "mnist-small/t10k-labels-idx1-ubyte.gz":
        "9e02f36b6b6d9738106ca4c661bcd4a2e72ef27d13f324e1fbec30d75b430563",
    "cifar10-small/data_batch_1.bin.xz":
        "2f55e4e407543c99ce715764b7d957a6aed89cd68229ce1027514ccafb3d8521",
    "cifar10-small/data_batch_2.bin.xz":
        "53e2c74177ecc8c7af7c3af82730ccd867e91d58bea50acb4365a206d4ddaeae",
    "cifar10-small/data_batch_3.bin.xz":
        "b51260a2099b2f99e374e8b829ce3186828f6d063275eee352ccc28848d452e3",
    "cifar10-small/data_batch_4.bin.xz":
        "f6dc3bddb38b50c1e0d24409c8055639081d19b826649e256ee2d92c4ba467bf",
    "cifar10-small/data_batch_5.bin.xz":
        "e49a0e6b4336878a5b5d13ea4dee720ffe9f1752affd3a806813a11b61f7471a",
    "cifar10-small/test_batch.bin.xz":
        "d9ac0bcd4f7454bf908c41e2288b145cb4d26e45ec792524e87eddf696edefef",
    "cifar10-small/batches.meta.txt":
        "2ce042b1e0b48db4bb214408e6414ba18b2731c24af244f2d6c112fddf31af00",
}
DATA_ENV = "POLYOPT_DATA"
CACHE_ENV = "POLYOPT_CACHE"
MIRROR_ENV = "POLYOPT_MNIST_MIRROR"

MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# sha256 of the official (60,000 / 10,000 image) files, identical on every mirror
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"

MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers: uint8 data, 3 and 1 dimensions
CIFAR_RECORD = 1 + 32 * 32 * 3
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_DIR = "cifar-10-batches-bin"
_MNIST_SUBDIRS = ("", "mnist-small", "mnist", "MNIST/raw")
_CIFAR_SUBDIRS = ("", CIFAR_DIR, "cifar10-small", f"cifar10-small/{CIFAR_DIR}",
                  f"cifar10/{CIFAR_DIR}")


class DataError(ValueError):
    """A data file is missing, damaged, or not the file it should be."""


class Dataset(NamedTuple):
    """Train and test split: images uint8 NHWC, labels int64; ``source`` is the directory."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: Path


# --------------------------------------------------------------------------
# IDX (MNIST)


COMPRESSED = (".gz", ".xz")  # suffixes a data file may carry


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip or xz data (by its magic bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error}") from error
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
            raise DataError(f"{path}: damaged or truncated gzip data ({error})") from error
    if raw[:6] == b"\xfd7zXZ\x00":
        try:
            import lzma
        except ImportError as error:  # a Python built without liblzma
            raise DataError(f"{path}: xz data, but this Python has no lzma module") from error
        try:
            return lzma.decompress(raw)
        except (lzma.LZMAError, EOFError) as error:
            raise DataError(f"{path}: damaged or truncated xz data ({error})") from error
    return raw


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or plain), header and size checked.

    ``magic`` is the expected magic number (2051 images, 2049 labels).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "image" if magic == IDX_IMAGES else "label"
        raise DataError(f"{path}: IDX magic number {found} (0x{found:08x}), expected {magic} "
                        f"(0x{magic:08x}): not an MNIST {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: the header announces shape {shape} "
                        f"({expected} bytes), the file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_file(directory: Path, name: str) -> Path:
    for suffix in ("", *COMPRESSED):
        if (directory / f"{name}{suffix}").is_file():
            return directory / f"{name}{suffix}"
    raise DataError(f"{directory}: no {name}, {name}.gz or {name}.xz file")


def _check_labels(path: Path, labels: np.ndarray, count: int | None) -> np.ndarray:
    if count is not None and labels.shape[0] != count:
        raise DataError(f"{path}: {labels.shape[0]} labels for {count} images")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{path}: label {int(labels.max())} out of range 0-9")
    return labels.astype(np.int64)


def _load_mnist_dir(directory: Path) -> Dataset:
    splits = []
    for prefix in ("train", "t10k"):
        image_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
        label_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(image_path, IDX_IMAGES)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{image_path}: images of {images.shape[1:]}, expected (28, 28)")
        labels = _check_labels(label_path, read_idx(label_path, IDX_LABELS), images.shape[0])
        splits += [images[..., None], labels]
    return Dataset(*splits, MNIST_CLASSES, directory)


# --------------------------------------------------------------------------
# CIFAR-10 binary batches


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) of one CIFAR-10 binary batch."""
    path = Path(path)
    raw = _read_bytes(path)
    if not raw or len(raw) % CIFAR_RECORD:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of "
                        f"{CIFAR_RECORD}-byte CIFAR-10 records (truncated or not a CIFAR-10 "
                        "binary batch)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = _check_labels(path, records[:, 0], None)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels


def _load_cifar_dir(directory: Path) -> Dataset:
    parts = [read_cifar_batch(_find_file(directory, name)) for name in CIFAR_TRAIN]
    test_images, test_labels = read_cifar_batch(_find_file(directory, CIFAR_TEST))
    classes = CIFAR10_CLASSES
    meta = directory / "batches.meta.txt"
    if meta.is_file():
        names = tuple(line.strip() for line in meta.read_text().splitlines() if line.strip())
        if len(names) != 10:
            raise DataError(f"{meta}: {len(names)} class names, expected 10")
        classes = names
    return Dataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                   test_images, test_labels, classes, directory)


# --------------------------------------------------------------------------
# where the data is


def resolve_data_dir(flag: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``flag`` (``--data-dir``), else ``$POLYOPT_DATA``, else None."""
    value = flag if flag not in (None, "") else os.environ.get(DATA_ENV) or None
    return None if value is None else Path(value).expanduser()


def _locate(directory: Path, subdirs: Sequence[str], marker: str, what: str) -> Path:
    for sub in subdirs:
        candidate = directory / sub if sub else directory
        if any((candidate / f"{marker}{suffix}").is_file() for suffix in ("", *COMPRESSED)):
            return candidate
    looked = ", ".join(str(directory / s) if s else str(directory) for s in subdirs)
    raise DataError(f"no {what} files ({marker}[.gz|.xz]) found; looked in: {looked}. Pass "
                    f"--data-dir DIR or set {DATA_ENV}, or download the official files "
                    "(python -m examples.data --download)")


def load_mnist(directory: str | os.PathLike | None = None, *, download: bool = False) -> Dataset:
    """MNIST: images uint8 (N, 28, 28, 1), labels int64 (N,).

    From ``directory`` (or ``$POLYOPT_DATA``), else the small files shipped in
    the repository; ``download=True`` fetches the official files into the cache.
    """
    if download:
        return _load_mnist_dir(download_mnist())
    directory = resolve_data_dir(directory)
    if directory is None:
        return _load_mnist_dir(check_shipped(SHIPPED_MNIST))
    return _load_mnist_dir(_locate(directory, _MNIST_SUBDIRS, "train-images-idx3-ubyte",
                                   "MNIST"))


def load_cifar10(directory: str | os.PathLike | None = None, *, download: bool = False) -> Dataset:
    """CIFAR-10: images uint8 (N, 32, 32, 3), labels int64 (N,).

    From ``directory`` (or ``$POLYOPT_DATA``), else the small subset shipped in
    the repository; ``download=True`` fetches the official archive into the cache.
    """
    if download:
        return _load_cifar_dir(download_cifar10())
    directory = resolve_data_dir(directory)
    if directory is None:
        return _load_cifar_dir(check_shipped(SHIPPED_CIFAR10))
    return _load_cifar_dir(_locate(directory, _CIFAR_SUBDIRS, CIFAR_TRAIN[0], "CIFAR-10"))


LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10}


def check_shipped(directory: Path) -> Path:
    """``directory`` (one of the shipped subsets) after checking every file of it
    listed in :data:`SHIPPED_SHA256`; DataError names a missing or altered file."""
    for name, sha256 in SHIPPED_SHA256.items():
        path = SHIPPED / name
        if path.parent != directory:
            continue
        if not path.is_file():
            raise DataError(f"{path}: missing from the repository's shipped data")
        found = sha256_file(path)
        if found != sha256:
            raise DataError(f"{path}: sha256 {found}, expected {sha256}: the shipped file "
                            "is damaged (a partial clone or checkout?)")
    return directory


def load(name: str, directory: str | os.PathLike | None = None, *,
         download: bool = False) -> Dataset:
    """``load_mnist`` or ``load_cifar10`` by name."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](directory, download=download)


# --------------------------------------------------------------------------
# opt-in download with checksum and cache


def cache_dir() -> Path:
    """``$POLYOPT_CACHE``, else ``$XDG_CACHE_HOME/polyopt``, else ``~/.cache/polyopt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "polyopt"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, destination: Path, sha256: str, *, timeout: float = 60) -> Path:
    """``destination``, downloaded from ``url`` unless a copy with ``sha256`` is there.

    The download goes to a temporary file beside ``destination`` and replaces
    it (polyopt.files.atomic_write) only when its sha256 matches; otherwise
    it is deleted and DataError raised. A cached file with the wrong checksum
    is downloaded again.
    """
    destination = Path(destination)
    if destination.is_file() and sha256_file(destination) == sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {destination}", file=sys.stderr)
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as r, \
                files.atomic_write(destination) as out:
            for block in iter(lambda: r.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
            if digest.hexdigest() != sha256:  # raised inside: the target is not replaced
                raise DataError(f"{url}: sha256 mismatch: expected {sha256}, got "
                                f"{digest.hexdigest()}; the download was discarded")
    except OSError as error:
        raise DataError(f"{url}: download failed: {error}") from error
    return destination


def download_mnist(cache: str | os.PathLike | None = None, mirror: str | None = None,
                   checksums: Mapping[str, str] = MNIST_SHA256) -> Path:
    """The directory of the four official MNIST files, downloaded into the cache if needed.

    ``mirror``: base URL (default ``$POLYOPT_MNIST_MIRROR`` or :data:`MNIST_MIRROR`).
    """
    base = mirror or os.environ.get(MIRROR_ENV) or MNIST_MIRROR
    directory = Path(cache or cache_dir()) / "mnist"
    for name, sha256 in checksums.items():
        fetch(base.rstrip("/") + "/" + name, directory / name, sha256)
    return directory


def download_cifar10(cache: str | os.PathLike | None = None, url: str = CIFAR10_URL,
                     sha256: str = CIFAR10_SHA256) -> Path:
    """The ``cifar-10-batches-bin`` directory, from the official archive (cached)."""
    root = Path(cache or cache_dir()) / "cifar10"
    archive = fetch(url, root / url.rsplit("/", 1)[-1], sha256)
    target = root / CIFAR_DIR
    stamp = target / ".sha256"
    if stamp.is_file() and stamp.read_text().strip() == sha256:
        return target
    if target.exists():
        shutil.rmtree(target)
    _extract_cifar(archive, root)
    files.write_text(stamp, sha256 + "\n")
    return target


def _extract_cifar(archive: Path, root: Path) -> None:
    """Extract the regular files under cifar-10-batches-bin/ only (no links, no ``..``)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            wanted = [m for m in members if m.name.startswith(CIFAR_DIR + "/")
                      and ".." not in Path(m.name).parts and "/" not in m.name[len(CIFAR_DIR) + 1:]]
            if not any(m.name.endswith("/" + CIFAR_TEST) for m in wanted):
                raise DataError(f"{archive}: no {CIFAR_DIR}/{CIFAR_TEST} in the archive")
            (root / CIFAR_DIR).mkdir(parents=True, exist_ok=True)
            for member in wanted:
                with tar.extractfile(member) as source, \
                        files.atomic_write(root / member.name) as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise DataError(f"{archive}: damaged archive ({error})") from error


# --------------------------------------------------------------------------
# python -m examples.data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.data", description="Check (and optionally download) the data.")
    parser.add_argument("datasets", nargs="*", help=f"{', '.join(LOADERS)} (default: all)")
    parser.add_argument("--data-dir", help=f"data directory (default: ${DATA_ENV}, then the "
                        "subsets shipped in examples/data)")
    parser.add_argument("--download", action="store_true",
                        help=f"download the official files into {cache_dir()} (${CACHE_ENV})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.datasets) - set(LOADERS))
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(LOADERS)}")
    for name in args.datasets or list(LOADERS):
        try:
            data = load(name, args.data_dir, download=args.download)
        except DataError as error:
            print(f"{name}: {error}", file=sys.stderr)
            return 1
        counts = np.bincount(data.train_labels, minlength=10)
        print(f"{name}: {data.source}: train {data.train_images.shape} "
              f"test {data.test_images.shape}; train images per class {counts.tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
