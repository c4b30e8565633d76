"""examples.data: the MNIST/CIFAR-10 subsets shipped in the repository, the loaders,
damaged files, and the opt-in download against a loopback HTTP server (never the
internet)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import lzma
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from examples import data


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    for name in (data.DATA_ENV, data.CACHE_ENV, data.MIRROR_ENV):
        monkeypatch.delenv(name, raising=False)


@functools.cache
def _mnist_shipped():
    return data.load_mnist()


@functools.cache
def _cifar_shipped():
    return data.load_cifar10()


# --------------------------------------------------------------------------
# the shipped files


def test_shipped_files_are_exactly_the_listed_ones():
    """Every file under examples/data/{mnist,cifar10}-small is listed with its sha256,
    and the files have those checksums (the loaders check them too)."""
    found = sorted(str(p.relative_to(data.SHIPPED)) for d in (data.SHIPPED_MNIST,
                   data.SHIPPED_CIFAR10) for p in d.iterdir())
    assert found == sorted(data.SHIPPED_SHA256)
    for name, sha256 in data.SHIPPED_SHA256.items():
        assert data.sha256_file(data.SHIPPED / name) == sha256, name


def test_shipped_data_is_small():
    total = sum((data.SHIPPED / name).stat().st_size for name in data.SHIPPED_SHA256)
    assert total < 16 * 2**20, f"{total} bytes shipped"


def test_altered_shipped_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    for name in data.SHIPPED_SHA256:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((data.SHIPPED / name).read_bytes())
    monkeypatch.setattr(data, "SHIPPED", copy)
    monkeypatch.setattr(data, "SHIPPED_CIFAR10", copy / "cifar10-small")
    monkeypatch.setattr(data, "SHIPPED_MNIST", copy / "mnist-small")
    assert data.load_cifar10().source == copy / "cifar10-small"
    target = copy / "cifar10-small" / "data_batch_2.bin.xz"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(data.DataError, match=re.escape(str(target)) + ": sha256 .* damaged"):
        data.load_cifar10()
    target.unlink()
    with pytest.raises(data.DataError, match=re.escape(str(target)) + ": missing"):
        data.load_cifar10()
    assert data.load_mnist().source == copy / "mnist-small"  # MNIST is not affected


def test_mnist_default_is_the_shipped_subset():
    mnist = _mnist_shipped()
    assert mnist.source == data.SHIPPED_MNIST
    assert mnist.train_images.shape == (8000, 28, 28, 1)
    assert mnist.test_images.shape == (2000, 28, 28, 1)
    assert mnist.train_images.dtype == np.uint8 and mnist.test_images.dtype == np.uint8
    assert mnist.train_labels.shape == (8000,) and mnist.test_labels.shape == (2000,)
    assert mnist.train_labels.dtype == np.int64 and mnist.test_labels.dtype == np.int64
    assert np.bincount(mnist.train_labels).sum() == 8000
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    assert set(np.unique(mnist.test_labels)) == set(range(10))
    assert mnist.train_images.max() == 255 and mnist.train_images.min() == 0
    assert mnist.classes == tuple("0123456789")


def test_mnist_from_data_dir_flag_and_env(monkeypatch):
    shipped = _mnist_shipped()
    root = data.SHIPPED  # holds mnist-small/, one of the usual subdirectories
    for loaded in (data.load_mnist(root), data.load_mnist(root / "mnist-small")):
        assert loaded.source == root / "mnist-small"
        np.testing.assert_array_equal(loaded.train_images, shipped.train_images)
        np.testing.assert_array_equal(loaded.test_labels, shipped.test_labels)
    monkeypatch.setenv(data.DATA_ENV, str(root))
    assert data.load_mnist().source == root / "mnist-small"
    # the flag wins over the environment
    monkeypatch.setenv(data.DATA_ENV, "/nonexistent")
    assert data.load_mnist(root).source == root / "mnist-small"
    with pytest.raises(data.DataError, match="/nonexistent.*--data-dir"):
        data.load_mnist()


def test_mnist_reads_plain_idx(tmp_path):
    for path in data.SHIPPED_MNIST.iterdir():
        (tmp_path / path.name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
    plain, shipped = data.load_mnist(tmp_path), _mnist_shipped()
    for got, want in zip(plain[:4], shipped[:4]):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


def test_cifar10_default_is_the_shipped_subset():
    cifar = _cifar_shipped()
    assert cifar.source == data.SHIPPED_CIFAR10
    assert cifar.train_images.shape == (5000, 32, 32, 3)
    assert cifar.test_images.shape == (1000, 32, 32, 3)
    assert cifar.train_images.dtype == np.uint8
    assert cifar.train_labels.dtype == np.int64 and cifar.test_labels.dtype == np.int64
    assert np.bincount(cifar.train_labels, minlength=10).tolist() == [500] * 10
    assert np.bincount(cifar.test_labels, minlength=10).tolist() == [100] * 10
    # every training batch is class-balanced too (100 per class)
    for i in range(5):
        batch = cifar.train_labels[1000 * i:1000 * (i + 1)]
        assert np.bincount(batch, minlength=10).tolist() == [100] * 10
    assert cifar.classes == data.CIFAR10_CLASSES
    assert len({image.tobytes() for image in cifar.train_images}) == 5000  # no repeats


def test_cifar10_layout_is_nhwc_from_planar_records():
    raw = np.frombuffer(data._read_bytes(data.SHIPPED_CIFAR10 / "test_batch.bin.xz"), np.uint8)
    record = raw.reshape(-1, data.CIFAR_RECORD)[7]
    image = _cifar_shipped().test_images[7]
    assert _cifar_shipped().test_labels[7] == record[0]
    row, col = 5, 9
    for channel in range(3):  # 1024 red, 1024 green, 1024 blue, row-major 32x32
        assert image[row, col, channel] == record[1 + channel * 1024 + row * 32 + col]


# --------------------------------------------------------------------------
# damaged files: a clear error naming the file, never a partial load


def _mnist_copy(tmp_path: Path) -> Path:
    for path in data.SHIPPED_MNIST.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _idx(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + payload


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[: len(raw) // 2], r"damaged or truncated gzip"),
    (lambda raw: raw[:-9] + b"\0" * 9, r"damaged or truncated gzip"),  # CRC/length trailer
    (lambda raw: _gz(gzip.decompress(raw)[:-100]), r"truncated: the header announces"),
    (lambda raw: _gz(gzip.decompress(raw) + b"\0"), r"trailing bytes"),
    (lambda raw: _gz(b"\0\0\x08\x01" + gzip.decompress(raw)[4:]), r"magic number 2049.*2051"),
    (lambda raw: _gz(gzip.decompress(raw)[:10]), r"truncated IDX header"),
    (lambda raw: b"", r"0 bytes, too short"),
])
def test_damaged_mnist_images_file(tmp_path, damage, message):
    directory = _mnist_copy(tmp_path)
    target = directory / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(data.DataError, match=re.escape(str(target)) + ".*" + message):
        data.load_mnist(directory)


def test_mnist_label_count_and_range_checked(tmp_path):
    directory = _mnist_copy(tmp_path)
    labels = directory / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(_gz(_idx(2049, (7999,), bytes(7999))))
    with pytest.raises(data.DataError, match=re.escape(str(labels)) + ": 7999 labels for 8000"):
        data.load_mnist(directory)
    labels.write_bytes(_gz(_idx(2049, (8000,), bytes(7999) + b"\x0a")))
    with pytest.raises(data.DataError, match=re.escape(str(labels)) + ": label 10 out of range"):
        data.load_mnist(directory)
    images = directory / "train-images-idx3-ubyte.gz"
    images.write_bytes(_gz(_idx(2051, (1, 32, 32), bytes(1024))))
    with pytest.raises(data.DataError, match=re.escape(str(images)) + r".*expected \(28, 28\)"):
        data.load_mnist(directory)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(data.DataError, match=r"no MNIST files.*--data-dir.*POLYOPT_DATA"):
        data.load_mnist(tmp_path)
    with pytest.raises(data.DataError, match=r"no CIFAR-10 files.*--data-dir"):
        data.load_cifar10(tmp_path)
    directory = _mnist_copy(tmp_path)
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="no t10k-labels-idx1-ubyte, .*gz or .*xz file"):
        data.load_mnist(directory)


def _cifar_copy(tmp_path: Path) -> Path:
    directory = tmp_path / data.CIFAR_DIR
    directory.mkdir()
    for name in (*data.CIFAR_TRAIN, data.CIFAR_TEST):
        raw = data._read_bytes(data.SHIPPED_CIFAR10 / f"{name}.xz")
        (directory / name).write_bytes(raw)
    return directory


def test_compressed_batches_read_like_plain_ones(tmp_path):
    directory = _cifar_copy(tmp_path)
    plain = data.load_cifar10(directory)
    for i, name in enumerate(data.CIFAR_TRAIN):
        raw = (directory / name).read_bytes()
        (directory / name).unlink()
        if i % 2:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / f"{name}.xz").write_bytes(lzma.compress(raw))
    mixed = data.load_cifar10(tmp_path)
    np.testing.assert_array_equal(mixed.train_images, plain.train_images)
    np.testing.assert_array_equal(mixed.train_labels, plain.train_labels)
    damaged = directory / f"{data.CIFAR_TRAIN[0]}.xz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(data.DataError, match=re.escape(str(damaged)) + ": damaged or truncated xz"):
        data.load_cifar10(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-1], r"3072999 bytes is not a whole number of 3073-byte"),
    (lambda raw: b"", r"0 bytes is not a whole number"),
    (lambda raw: b"\x0c" + raw[1:], r"label 12 out of range"),
])
def test_damaged_cifar_batch(tmp_path, damage, message):
    directory = _cifar_copy(tmp_path)
    target = directory / "data_batch_3.bin"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(data.DataError, match=re.escape(str(target)) + ": " + message):
        data.load_cifar10(tmp_path)


def test_cifar_missing_batch_and_bad_meta(tmp_path):
    directory = _cifar_copy(tmp_path)
    (directory / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(data.DataError, match=r"batches.meta.txt: 2 class names, expected 10"):
        data.load_cifar10(tmp_path)
    (directory / "test_batch.bin").unlink()
    with pytest.raises(data.DataError, match="no test_batch.bin"):
        data.load_cifar10(directory)


# --------------------------------------------------------------------------
# download: loopback server, files built here


class _Server:
    def __init__(self, root: Path):
        self.root, self.hits = root, []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.root), **kwargs)

            def do_GET(self):
                server.hits.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    running = _Server(root)
    yield running
    running.close()


def _fake_mnist(directory: Path, n_train: int = 6, n_test: int = 4) -> dict[str, str]:
    rng = np.random.default_rng(0)
    sums = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte.gz":
                _idx(2051, (n, 28, 28), rng.integers(0, 256, n * 784, np.uint8).tobytes()),
            f"{prefix}-labels-idx1-ubyte.gz": _idx(2049, (n,), bytes(range(n))),
        }
        for name, raw in files.items():
            blob = _gz(raw)
            (directory / name).write_bytes(blob)
            sums[name] = hashlib.sha256(blob).hexdigest()
    return sums


def test_download_mnist_verifies_and_caches(tmp_path, server):
    sums = _fake_mnist(server.root)
    cache = tmp_path / "cache"
    directory = data.download_mnist(cache, mirror=server.url + "/", checksums=sums)
    assert directory == cache / "mnist"
    assert sorted(server.hits) == sorted(f"/{name}" for name in sums)
    mnist = data.load_mnist(directory)
    assert mnist.train_images.shape == (6, 28, 28, 1) and mnist.test_labels.tolist() == [0, 1, 2, 3]
    # cache hit: nothing requested again
    data.download_mnist(cache, mirror=server.url, checksums=sums)
    assert len(server.hits) == 4
    # a damaged cached file is fetched again
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    data.download_mnist(cache, mirror=server.url, checksums=sums)
    assert server.hits[4:] == ["/t10k-labels-idx1-ubyte.gz"]
    assert data.sha256_file(directory / "t10k-labels-idx1-ubyte.gz") == sums[
        "t10k-labels-idx1-ubyte.gz"]


def test_download_checksum_mismatch_keeps_nothing(tmp_path, server):
    sums = _fake_mnist(server.root)
    wrong = {**sums, "train-labels-idx1-ubyte.gz": "0" * 64}
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte.gz: sha256 mismatch: "
                       r"expected 0{64}, got [0-9a-f]{64}; the download was discarded"):
        data.download_mnist(cache, mirror=server.url, checksums=wrong)
    assert not (cache / "mnist" / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (cache / "mnist").iterdir() if p.name.endswith(".tmp")]
    # the official checksums refuse these files too
    with pytest.raises(data.DataError, match="sha256 mismatch"):
        data.download_mnist(tmp_path / "other", mirror=server.url)


def test_download_missing_file_is_a_clear_error(tmp_path, server):
    with pytest.raises(data.DataError, match=r"/nothing.gz: download failed: HTTP Error 404"):
        data.fetch(server.url + "/nothing.gz", tmp_path / "nothing.gz", "0" * 64)
    assert list(tmp_path.iterdir()) == [server.root]


def test_load_mnist_download_uses_env_cache_and_mirror(tmp_path, server, monkeypatch):
    sums = _fake_mnist(server.root, n_train=3, n_test=2)
    for name, sha256 in sums.items():
        monkeypatch.setitem(data.MNIST_SHA256, name, sha256)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "envcache"))
    monkeypatch.setenv(data.MIRROR_ENV, server.url)
    mnist = data.load_mnist(download=True)
    assert mnist.source == tmp_path / "envcache" / "mnist"
    assert mnist.train_labels.tolist() == [0, 1, 2]


def _cifar_archive(path: Path, records: int = 3, extra: dict[str, bytes] | None = None) -> str:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:
        names = [*data.CIFAR_TRAIN, data.CIFAR_TEST]
        members = {}
        for name in names:
            blob = b"".join(
                bytes([i % 10]) + rng.integers(0, 256, 3072, np.uint8).tobytes()
                for i in range(records))
            members[f"{data.CIFAR_DIR}/{name}"] = blob
        members[f"{data.CIFAR_DIR}/batches.meta.txt"] = "\n".join(data.CIFAR10_CLASSES).encode()
        members.update(extra or {})
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return data.sha256_file(path)


def test_download_cifar10_extracts_verifies_and_caches(tmp_path, server):
    archive = server.root / "cifar-10-binary.tar.gz"
    sha256 = _cifar_archive(archive, extra={"../escape.bin": b"x", "other/file": b"y"})
    cache = tmp_path / "cache"
    url = server.url + "/cifar-10-binary.tar.gz"
    directory = data.download_cifar10(cache, url=url, sha256=sha256)
    assert directory == cache / "cifar10" / data.CIFAR_DIR
    cifar = data.load_cifar10(directory)
    assert cifar.train_images.shape == (15, 32, 32, 3) and cifar.test_labels.tolist() == [0, 1, 2]
    assert not (cache / "escape.bin").exists() and not (cache / "cifar10" / "other").exists()
    assert data.load_cifar10(cache / "cifar10").source == directory  # found as a subdirectory
    data.download_cifar10(cache, url=url, sha256=sha256)
    assert server.hits == ["/cifar-10-binary.tar.gz"]  # cache hit
    with pytest.raises(data.DataError, match="cifar-10-binary.tar.gz: sha256 mismatch"):
        data.download_cifar10(tmp_path / "other", url=url)  # the official checksum


def test_cli_reports_shapes_and_errors(tmp_path, capsys):
    assert data.main(["mnist", "cifar10", "--data-dir", str(data.SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "mnist: " in out and "(8000, 28, 28, 1)" in out and "(5000, 32, 32, 3)" in out
    assert "[500, 500," in out
    assert data.main(["mnist", "--data-dir", str(tmp_path)]) == 1
    assert "no MNIST files" in capsys.readouterr().err
