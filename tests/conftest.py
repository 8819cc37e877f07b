"""Shared fixtures: the real Fashion-MNIST, prepared once per test session."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Many tests compile the same small programs, in this process and in the command-line
# tools they start: JAX's persistent cache keeps each compiled program on disk once.
# Set before JAX is imported (it reads these once); subprocesses inherit them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cnnjax-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

from cnnjax import data, runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# `python -m module args...`, sending itself `sig` during its `at`-th training step: a
# signal at a known step on any machine (one sent from outside lands wherever the run
# has got to by then, and a fast machine may have queued a whole epoch).
SIGNAL_AT_STEP = textwrap.dedent("""
    import os, runpy, sys
    from cnnjax import prepared

    sig, at, module = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    train_step, calls = prepared.Prepared.train_step, [0]

    def signalling_train_step(self, *args):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), sig)
        return train_step(self, *args)

    prepared.Prepared.train_step = signalling_train_step
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


def signalled_command(module: str, args: list[str], sig: int, at_step: int) -> list[str]:
    """The command line of `python -m module *args` that sends itself `sig` during its
    `at_step`-th training step (counted from 1 over all the runs it trains)."""
    return [sys.executable, "-c", SIGNAL_AT_STEP, str(int(sig)), str(at_step), module, *args]


def run_signalled(module: str, args: list[str], sig: int, at_step: int
                  ) -> subprocess.CompletedProcess:
    """Run `signalled_command(module, args, sig, at_step)` to its end."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(signalled_command(module, args, sig, at_step), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


DEBIAN_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def pytest_configure(config):
    # The XLA settings the command-line tools apply, before any test starts JAX.
    runtime.configure()
    # The tests in this process compile many programs and run each for a few steps:
    # XLA's CPU backend without its LLVM optimisations compiles them about twice as
    # fast. Only this process gets that (XLA reads the flag once, when JAX starts its
    # CPU backend, here); the command-line tools that tests start as processes, which
    # train for longer, get the flags back unchanged.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    jax.devices()
    os.environ["XLA_FLAGS"] = flags


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


# What preparing the data set printed (see `fashion_mnist_dir`).
PREPARED = {}


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory: pytest.TempPathFactory, debian_dir: Path) -> str:
    """A TFDS ``data_dir`` holding the prepared real data set (about 25 s, once per
    test run, shared by the parallel workers), prepared in a fresh process with
    progress off; what it printed is kept in PREPARED for the test that checks it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    data_dir, record = root / "tensorflow_datasets", root / "tensorflow_datasets.json"
    with FileLock(str(root / "tensorflow_datasets.lock")):
        if not record.exists():
            code = ("from cnnjax import data; "
                    f"data.load_fashion_mnist({str(data_dir)!r}, max_train=1, max_test=1, "
                    f"debian_dir={str(debian_dir)!r}, progress=False)")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, cwd=Path(__file__).resolve().parents[1])
            assert proc.returncode == 0, proc.stderr[-3000:]
            record.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
    PREPARED.update(json.loads(record.read_text()))
    return str(data_dir)
