"""Shared fixtures: the real Fashion-MNIST, prepared once per test session."""

from pathlib import Path

import pytest

from cnnjax import data, runtime

DEBIAN_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def pytest_configure(config):
    # The XLA settings the command-line tools apply, before any test starts JAX.
    runtime.configure()


@pytest.fixture(scope="session")
def debian_dir() -> Path:
    """Debian's Fashion-MNIST files (package ``dataset-fashion-mnist``), or skip."""
    path = Path(data.DEBIAN_DIR)
    missing = [name for name in DEBIAN_FILES if not (path / name).is_file()]
    if missing:
        pytest.skip(
            f"Debian's Fashion-MNIST files are missing from {path} ({', '.join(missing)}); "
            "install them with `apt-get install dataset-fashion-mnist`"
        )
    return path


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory: pytest.TempPathFactory, debian_dir: Path) -> str:
    """A TFDS ``data_dir`` holding the prepared real data set (about 20 s, once per session)."""
    data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
    data.load_fashion_mnist(str(data_dir), max_train=1, max_test=1, debian_dir=debian_dir)
    return str(data_dir)
