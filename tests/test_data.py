"""Tests for cnnjax.data: offline Fashion-MNIST through TFDS, batching and preprocessing."""

import gzip
import hashlib
import math
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds

from cnnjax import data


def _registered_checksums() -> dict[str, tuple[int, str]]:
    """File name -> (size, sha256), read straight from TFDS's own checksum file."""
    path = Path(tfds.__file__).parent / "url_checksums" / "fashion_mnist.txt"
    registered = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            _url, size, sha256, name = line.split("\t")
            registered[name] = (int(size), sha256)
    return registered


def _size_and_sha256(path: Path) -> tuple[int, str]:
    raw = path.read_bytes()
    return len(raw), hashlib.sha256(raw).hexdigest()


def _read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped IDX file (the MNIST format) without TFDS."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _sorted_examples(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """The split as a multiset of (image, label); TFDS stores examples shuffled."""
    rows = np.concatenate(
        [images.reshape(len(images), -1), labels.astype(np.uint8)[:, None]], axis=1
    )
    return sorted(row.tobytes() for row in rows)


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the prepared data set should have been reused")


def _assert_one_line_naming_both_ways(message: str) -> None:
    assert message and "\n" not in message
    assert "apt-get install" in message and "dataset-fashion-mnist" in message
    assert "internet" in message


# --- Getting the data -------------------------------------------------------


def test_importing_data_does_not_import_tensorflow():
    code = "import sys, cnnjax.data; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_restored_files_match_tfds_checksums(tmp_path, debian_dir):
    registered = _registered_checksums()
    written = data.restore_debian_files(debian_dir, tmp_path)

    assert sorted(p.name for p in written) == sorted(registered)
    for path in written:
        assert path.parent == tmp_path
        assert _size_and_sha256(path) == registered[path.name]
        # Only the header changed: the decompressed content is Debian's.
        debian_bytes = (debian_dir / path.name).read_bytes()
        assert gzip.decompress(path.read_bytes()) == gzip.decompress(debian_bytes)
    # Debian's files as shipped do not pass: the restoration is what makes them pass.
    assert all(_size_and_sha256(debian_dir / name) != registered[name] for name in registered)


def test_load_on_mock_data(tmp_path, monkeypatch):
    # "Online" as far as the reachability check goes; the download itself is mocked.
    monkeypatch.setattr(requests, "head", lambda *args, **kwargs: None)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_fashion_mnist(str(tmp_path), debian_dir=tmp_path / "no-debian")
        names = tfds.builder("fashion_mnist").info.features["label"].names

    for images, labels in [(ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)]:
        assert isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
        assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (12,) and labels.dtype == np.int32
        assert labels.min() >= 0 and labels.max() <= 9
    assert ds.class_names == tuple(names) and len(ds.class_names) == 10
    with pytest.raises(AttributeError):  # Frozen.
        ds.train_images = ds.test_images


def test_missing_data_fails_fast_with_one_line(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    (tmp_path / "empty").mkdir()
    start = time.perf_counter()
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_fashion_mnist(str(tmp_path / "tfds"), debian_dir=tmp_path / "empty")
    # TFDS alone retries with backoff for minutes before it gives up.
    assert time.perf_counter() - start < 30
    assert not isinstance(info.value, data.DataCorruptError)
    assert isinstance(info.value, RuntimeError)
    _assert_one_line_naming_both_ways(str(info.value))


def test_damaged_files_fail_the_checksum(tmp_path, debian_dir):
    damaged = tmp_path / "damaged"
    shutil.copytree(debian_dir, damaged)
    labels = damaged / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    labels.write_bytes(bytes(raw))

    with pytest.raises(data.DataCorruptError) as info:
        data.load_fashion_mnist(str(tmp_path / "tfds"), debian_dir=damaged)
    assert isinstance(info.value, data.DataUnavailableError)
    _assert_one_line_naming_both_ways(str(info.value))
    assert str(damaged) in str(info.value)
    assert not tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).is_prepared()


@pytest.fixture(scope="module")
def real_data(fashion_mnist_dir: str) -> data.FashionMNIST:
    """The full real data set, read from the test run's prepared copy."""
    return data.load_fashion_mnist(fashion_mnist_dir)


def test_second_load_reuses_prepared_data(fashion_mnist_dir, monkeypatch):
    assert tfds.builder("fashion_mnist", data_dir=fashion_mnist_dir).is_prepared()
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _fail_if_called)
    monkeypatch.setattr(data, "restore_debian_files", _fail_if_called)
    ds = data.load_fashion_mnist(
        fashion_mnist_dir, max_train=10, max_test=10, debian_dir="/nonexistent"
    )
    assert ds.train_images.shape == (10, 28, 28, 1) and ds.test_images.shape == (10, 28, 28, 1)


def test_real_data_is_the_official_data_set(real_data, debian_dir):
    ds = real_data
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28, 1) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert np.array_equal(np.bincount(ds.train_labels, minlength=10), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.test_labels, minlength=10), np.full(10, 1000))
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255

    # Same examples as Debian's files decoded independently (TFDS shuffles their order).
    for images, labels, prefix in [
        (ds.train_images, ds.train_labels, "train"),
        (ds.test_images, ds.test_labels, "t10k"),
    ]:
        raw_images = _read_idx(debian_dir / f"{prefix}-images-idx3-ubyte.gz")
        raw_labels = _read_idx(debian_dir / f"{prefix}-labels-idx1-ubyte.gz")
        assert _sorted_examples(images, labels) == _sorted_examples(raw_images, raw_labels)


def test_subsets_are_prefixes_of_the_splits(real_data, fashion_mnist_dir):
    small = data.load_fashion_mnist(fashion_mnist_dir, max_train=100, max_test=30)
    assert np.array_equal(small.train_images, real_data.train_images[:100])
    assert np.array_equal(small.train_labels, real_data.train_labels[:100])
    assert np.array_equal(small.test_images, real_data.test_images[:30])
    assert np.array_equal(small.test_labels, real_data.test_labels[:30])


# Runs Python as on a machine where TensorFlow is not installed: the import
# system finds no `tensorflow`, exactly as importlib.util.find_spec would report.
_WITHOUT_TENSORFLOW = """
import importlib.machinery, sys
class _NoTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return super().find_spec(name, path, target)
sys.meta_path = [_NoTensorFlow if f is importlib.machinery.PathFinder else f
                 for f in sys.meta_path]
"""


def _run_without_tensorflow(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW + code],
                          capture_output=True, text=True)


def test_prepared_data_is_read_without_tensorflow(fashion_mnist_dir):
    # What a GPU box or container without TensorFlow does with a copied data dir.
    out = _run_without_tensorflow(
        "import importlib.util\n"
        "assert importlib.util.find_spec('tensorflow') is None\n"
        "from cnnjax import data\n"
        f"ds = data.load_fashion_mnist({fashion_mnist_dir!r}, max_train=100, max_test=10)\n"
        "print(ds.train_images.shape, ds.test_labels.shape, 'tensorflow' in sys.modules)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "(100, 28, 28, 1) (10,) False"


def test_preparing_without_tensorflow_is_one_line_and_exit_2(tmp_path, debian_dir):
    out = _run_without_tensorflow(
        "import runpy\n"
        "sys.argv = ['run', '--arch', 'lenet', '--epochs', '1', '--no-progress',\n"
        f"            '--data-dir', {str(tmp_path / 'tfds')!r}, '--out', {str(tmp_path / 'run')!r}]\n"
        "runpy.run_module('experiments.run', run_name='__main__')\n"
    )
    assert out.returncode == 2, out.stderr
    message = out.stderr.strip()  # TFDS's own warnings included: there should be none.
    assert "\n" not in message and message.startswith("python -m experiments.run: error: ")
    assert "needs TensorFlow" in message and "pip install tensorflow" in message
    assert str(tmp_path / "tfds") in message


# --- Batching ---------------------------------------------------------------


@pytest.mark.parametrize("num_examples, batch_size", [(10, 4), (8, 4), (3, 5), (10000, 256)])
def test_eval_batch_indices_cover_every_example_once(num_examples, batch_size):
    indices, mask = data.eval_batch_indices(num_examples, batch_size)

    num_batches = math.ceil(num_examples / batch_size)
    assert indices.shape == mask.shape == (num_batches, batch_size)
    assert indices.dtype == np.int32 and mask.dtype == np.bool_
    assert mask.sum() == num_examples
    assert np.array_equal(np.sort(indices[mask]), np.arange(num_examples))
    assert np.all((indices >= 0) & (indices < num_examples))
    assert np.all(mask[:-1])  # Only the last batch is padded.
    assert mask[-1].sum() == num_examples - (num_batches - 1) * batch_size


def test_train_batch_indices_is_a_fresh_permutation_per_epoch():
    num_examples, batch_size = 1000, 64
    epoch1 = np.asarray(data.train_batch_indices(jax.random.key(1), num_examples, batch_size))
    epoch2 = np.asarray(data.train_batch_indices(jax.random.key(2), num_examples, batch_size))

    for batches in (epoch1, epoch2):
        assert batches.shape == (num_examples // batch_size, batch_size)  # Partial batch dropped.
        assert batches.dtype == np.int32
        assert np.unique(batches).size == batches.size  # No duplicates...
        assert batches.min() >= 0 and batches.max() < num_examples  # ...all in range.
        # Samples are shuffled, not only the batches: rows are not runs of neighbours.
        assert not all(row.max() - row.min() == batch_size - 1 for row in batches)
    assert not np.array_equal(epoch1, epoch2)
    dropped1 = set(range(num_examples)) - set(epoch1.ravel().tolist())
    dropped2 = set(range(num_examples)) - set(epoch2.ravel().tolist())
    assert len(dropped1) == num_examples % batch_size and dropped1 != dropped2
    # Deterministic in the key, and usable inside another jitted function.
    jitted = jax.jit(lambda key: data.train_batch_indices(key, num_examples, batch_size))
    again = jitted(jax.random.key(1))
    assert np.array_equal(np.asarray(again), epoch1)


# --- Preprocessing ----------------------------------------------------------


def test_preprocess_scales_and_resizes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 0, 255
    expected = images.astype(np.float32) / 255.0

    for resize in (None, 28):
        out = data.preprocess(images, resize)
        assert out.shape == images.shape and out.dtype == np.float32
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)

    jitted = jax.jit(data.preprocess, static_argnums=1)
    for size in (96, 224, 14):
        out = np.asarray(jitted(images, size))
        assert out.shape == (4, size, size, 1) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0

    # Bilinear resizing keeps a constant image constant.
    flat = np.full((2, 28, 28, 1), 51, np.uint8)
    np.testing.assert_allclose(np.asarray(jitted(flat, 96)), 0.2, rtol=1e-6)


def test_random_crop_flip_is_a_shifted_and_maybe_mirrored_window():
    images = np.random.default_rng(0).integers(1, 256, (64, 28, 28, 1), dtype=np.uint8)
    out = np.asarray(data.random_crop_flip(jnp.asarray(images), jax.random.key(0), padding=2))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    seen_offsets, flips = set(), 0
    for image, result in zip(padded, out):
        # Exactly one of the 5 x 5 windows, possibly mirrored, is the output.
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (0, 1)
                   if np.array_equal(image[dy:dy + 28, dx:dx + 28][:, ::-1] if flip
                                     else image[dy:dy + 28, dx:dx + 28], result)]
        assert len(matches) == 1
        dy, dx, flip = matches[0]
        seen_offsets.add((dy, dx))
        flips += flip
    assert len(seen_offsets) > 10 and 16 < flips < 48  # offsets vary; about half flipped
    # The same key gives the same batch (so a resumed run sees the same crops).
    again = data.random_crop_flip(jnp.asarray(images), jax.random.key(0), padding=2)
    np.testing.assert_array_equal(out, again)


def test_preparing_with_progress_off_prints_no_progress_bars(fashion_mnist_dir):
    # The test run's data set was prepared with progress=False (what --no-progress and
    # a non-terminal stderr give); TFDS's bars would print "Generating splits..." and
    # "Shuffling ..." lines with their percentages.
    from conftest import PREPARED

    output = PREPARED["stdout"] + PREPARED["stderr"]
    for bar in ("Generating", "Shuffling", "%|"):
        assert bar not in output, output[-2000:]
