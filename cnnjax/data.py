"""Fashion-MNIST, the data set of the d2l CNN chapters, and the batching around it.

The book reads Fashion-MNIST with ``torchvision``; here TFDS's own
``fashion_mnist`` builder is the one source. With internet TFDS downloads the
four official files as usual. Without it, the same files come from Debian's
``dataset-fashion-mnist`` package: Debian re-wrote each gzip header without the
original file name, so we restore that header into a ``manual_dir`` and TFDS's
registered checksums pass unchanged (verification is never switched off).

TFDS needs TensorFlow to prepare the data set, not to read it: we prepare it
in TFDS's ``array_record`` format and read it with ``tfds.data_source``, so a
machine without TensorFlow can train on a prepared copy (``data_dir``). Data
prepared by TFDS's default TFRecord format (earlier cnnjax, other programs) is
still read, through ``tf.data``.

The whole data set fits in memory (about 55 MB as ``uint8``), so it is loaded
once as numpy arrays; batches are then gathered by index on the device and
scaled (and, for the bigger networks, resized) by :func:`preprocess` inside
the jitted step, instead of the book's ``DataLoader`` with ``transforms``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import struct
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# TFDS's random-access file format, read by `tfds.data_source` without TensorFlow.
ARRAY_RECORD = "array_record"

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# File name -> modification time stored in the original gzip header.
_ORIGINAL_MTIMES = {
    "train-images-idx3-ubyte.gz": 0x59A7E9DE,
    "train-labels-idx1-ubyte.gz": 0x59A7E9DE,
    "t10k-images-idx3-ubyte.gz": 0x59A7E9F3,
    "t10k-labels-idx1-ubyte.gz": 0x59A7E9F3,
}

_HOW_TO_GET_IT = (
    "install Debian's copy with `apt-get install dataset-fashion-mnist` "
    "(offline), or run once on a machine with internet, where TFDS downloads it"
)


class DataUnavailableError(RuntimeError):
    """Fashion-MNIST can be neither found, downloaded nor built from Debian's files."""


class DataCorruptError(DataUnavailableError):
    """The source files do not match TFDS's registered checksums."""


@dataclasses.dataclass(frozen=True, eq=False)
class FashionMNIST:
    """Both splits in memory: images ``uint8`` (N, 28, 28, 1), labels ``int32`` (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES


def restore_debian_files(
    debian_dir: str | os.PathLike, manual_dir: str | os.PathLike
) -> list[Path]:
    """Write Debian's four Fashion-MNIST files into ``manual_dir`` with their original gzip headers.

    Debian's files differ from the official ones only in the gzip header:
    Debian's 10-byte header has no FNAME flag, no file name and its own build
    time as mtime. The deflate stream and trailer are byte-identical, so
    putting the original header back reproduces the official files bit for bit,
    which is what TFDS's registered checksums demand.
    """
    debian_dir, manual_dir = Path(debian_dir), Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, mtime in _ORIGINAL_MTIMES.items():
        payload = (debian_dir / name).read_bytes()
        # Magic 1f 8b, deflate (08), flags FNAME (08), mtime, no extra flags, OS = Unix (03).
        header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03"
        original_name = name.removesuffix(".gz").encode("ascii") + b"\x00"
        out = manual_dir / name
        out.write_bytes(header + original_name + payload[10:])
        written.append(out)
    return written


def load_fashion_mnist(
    data_dir: str | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    debian_dir: str | os.PathLike = DEBIAN_DIR,
    progress: bool | None = None,
) -> FashionMNIST:
    """Load Fashion-MNIST through TFDS, preparing it first if ``data_dir`` lacks it.

    ``data_dir`` is where TFDS keeps the prepared data set (``None``: TFDS's
    default, ``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``). Preparing happens
    once, needs TensorFlow, and writes the ``array_record`` format; later calls
    only read, without TensorFlow. If Debian's files are in ``debian_dir`` they
    are used (no network needed), otherwise TFDS downloads the official files.
    ``max_train`` / ``max_test`` keep only the first N examples of each split.
    ``progress``: TFDS's progress bars while preparing (None: only when stderr is a
    terminal).

    Raises:
      DataUnavailableError: neither a download nor Debian's files worked, or
        the data set is not prepared and TensorFlow is not installed.
      DataCorruptError: the files fail TFDS's checksums.
    """
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataUnavailableError(f"--data-dir {data_dir} is a file; give the directory "
                                   "where TFDS keeps (or is to prepare) its data sets")
    tfds = _import_tensorflow_datasets()
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if not builder.is_prepared():
        if not (sys.stderr.isatty() if progress is None else progress):
            tfds.disable_progress_bar()
        _prepare(builder, tfds, Path(debian_dir))
    if ARRAY_RECORD in {f.value for f in builder.info.available_file_formats()}:
        read = functools.partial(_read_with_data_source, builder)
    else:
        read = functools.partial(_read_with_tf_data, builder, tfds)

    def split(name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        return read(name if limit is None else f"{name}[:{limit}]")

    train_images, train_labels = split("train", max_train)
    test_images, test_labels = split("test", max_test)
    return FashionMNIST(train_images, train_labels, test_images, test_labels)


def _read_with_data_source(builder, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a split of ``array_record`` files by index: numpy only, no TensorFlow."""
    source = builder.as_data_source(split=spec)
    examples = source.__getitems__(range(len(source)))
    images = np.stack([example["image"] for example in examples])
    labels = np.array([example["label"] for example in examples])
    return images.astype(np.uint8), labels.astype(np.int32)


def _read_with_tf_data(builder, tfds, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a split of TFRecord files (TFDS's default format) through ``tf.data``."""
    _import_tensorflow(why=f"reading the TFRecord files in {builder.data_dir}")
    # Finite batches, not batch_size=-1: that one relies on the split's recorded
    # size, which mocked data (tfds.testing.mock_data) lacks.
    ds = builder.as_dataset(split=spec, batch_size=10_000, as_supervised=True)
    images, labels = zip(*tfds.as_numpy(ds))
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


class _DropTFDSWarnings(logging.Filter):
    """TFDS warns through absl about what is normal here (an unprepared folder, no OpenCV)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


def _import_tensorflow_datasets():
    """Import TFDS only when data is loaded; it imports TensorFlow only when it must."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # In case TF comes in later.
    import tensorflow_datasets as tfds

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropTFDSWarnings) for f in absl_logger.filters):
        absl_logger.addFilter(_DropTFDSWarnings())
    return tfds


def _import_tensorflow(why: str):
    """Import TensorFlow, quiet and kept off the GPU, or say in one line that it is missing."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise DataUnavailableError(
            f"{why} needs TensorFlow, which is not installed: `pip install tensorflow`, "
            "or prepare the data set on a machine that has it and copy its "
            "fashion_mnist folder into the data dir here"
        ) from err
    tf.get_logger().setLevel("ERROR")
    try:
        # TF only reads files here; the accelerator's memory belongs to JAX.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was already initialised by the caller; leave it.
        pass
    return tf


def _prepare(builder, tfds, debian_dir: Path) -> None:
    """Run TFDS's ``download_and_prepare`` (``array_record``) from Debian's files or the internet."""
    _import_tensorflow(why=f"preparing Fashion-MNIST in {builder.data_dir_root}")
    import requests  # A TFDS dependency; its errors are how a failed download shows.
    from tensorflow_datasets.core.download.download_manager import (
        NonMatchingChecksumError,
    )

    if all((debian_dir / name).is_file() for name in _ORIGINAL_MTIMES):
        with tempfile.TemporaryDirectory(prefix="fashion_mnist_") as tmp:
            manual_dir = Path(tmp) / "manual"
            restore_debian_files(debian_dir, manual_dir)
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            try:
                # download_dir in tmp too: TFDS's extracted copies are not needed afterwards.
                builder.download_and_prepare(
                    download_dir=tmp, download_config=config, file_format=ARRAY_RECORD
                )
            except NonMatchingChecksumError as err:
                raise DataCorruptError(
                    f"Fashion-MNIST files in {debian_dir} do not match TFDS's registered "
                    "checksums (damaged?): reinstall them with "
                    "`apt-get install --reinstall dataset-fashion-mnist` (offline), or run once "
                    "on a machine with internet, where TFDS downloads it"
                ) from err
        return

    # Without network TFDS's downloader retries with backoff for minutes before it
    # gives up, so one quick request decides first.
    url = next(iter(builder.url_infos))
    try:
        requests.head(url, timeout=10, allow_redirects=False)
        builder.download_and_prepare(file_format=ARRAY_RECORD)
    except (requests.exceptions.RequestException, tfds.download.DownloadError) as err:
        raise DataUnavailableError(
            f"Fashion-MNIST is not prepared in {builder.data_dir_root}, cannot be downloaded "
            f"({type(err).__name__}) and Debian's files are not in {debian_dir}: "
            f"{_HOW_TO_GET_IT}"
        ) from err
    except NonMatchingChecksumError as err:
        raise DataCorruptError(
            "the downloaded Fashion-MNIST files do not match TFDS's registered checksums: "
            f"delete {builder.data_dir_root}/downloads and retry, or {_HOW_TO_GET_IT}"
        ) from err


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size"))
def train_batch_indices(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Shuffle all example indices for one epoch and cut them into full batches.

    Returns int32 indices of shape (num_examples // batch_size, batch_size).
    Like d2l's ``DataLoader(shuffle=True)`` the samples themselves are
    shuffled (a fresh permutation per epoch key), not just the batch order.
    Unlike it, the last partial batch is dropped: every batch then has the same
    shape, so the jitted training step compiles once. Which samples are dropped
    changes with every epoch's permutation, so none is left out for good.
    """
    num_batches = num_examples // batch_size
    perm = jax.random.permutation(key, num_examples)
    return perm[: num_batches * batch_size].reshape(num_batches, batch_size).astype(jnp.int32)


def eval_batch_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices that visit every example exactly once, in order, in equal-shaped batches.

    Returns ``(indices, mask)``, both (ceil(num_examples / batch_size), batch_size).
    The last batch is padded with index 0; ``mask`` is False on that padding so
    that evaluation can count (and average over) exactly ``num_examples``
    examples while the jitted step still sees a single shape.
    """
    num_batches = -(-num_examples // batch_size)
    flat = np.arange(num_batches * batch_size, dtype=np.int32)
    mask = flat < num_examples
    indices = np.where(mask, flat, 0).astype(np.int32)
    return indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def preprocess(images_uint8: jax.Array, resize: int | None) -> jax.Array:
    """Scale ``uint8`` images (N, H, W, C) to float32 in [0, 1], resizing to (N, resize, resize, C).

    The device-side counterpart of d2l's ``transforms.Resize`` +
    ``transforms.ToTensor``: AlexNet, VGG and NiN take 224x224 inputs, GoogLeNet,
    ResNet and DenseNet 96x96 in the book. ``resize=None`` keeps the size.
    Meant to run inside ``jit``, on one batch at a time.
    """
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    n, height, width, channels = x.shape
    if resize is not None and (height, width) != (resize, resize):
        x = jax.image.resize(x, (n, resize, resize, channels), method="bilinear")
    return x


def random_crop_flip(images: jax.Array, key: jax.Array, padding: int = 2) -> jax.Array:
    """Random-crop and random-flip augmentation of a batch (N, H, W, C), on the device.

    Each image is padded with `padding` zero pixels on every side and cropped back
    to H x W at a random offset (torchvision's ``RandomCrop(H, padding)``), then
    mirrored left-right with probability 1/2 (``RandomHorizontalFlip()``). Used by
    the modern recipe, before `preprocess`; works on any dtype.
    """
    n, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    crops = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, channels)))(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
