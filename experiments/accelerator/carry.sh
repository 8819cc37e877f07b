#!/usr/bin/env bash
# Builds .gpu/, what `python -m experiments.accelerator` carries to an accelerator
# machine that has JAX, Flax, optax, orbax, chex and PyTorch but no TensorFlow, no
# TFDS and no network:
#   .gpu/whl   TFDS and the packages it needs that such a machine lacks, as wheels for
#              its Python (PYTHON_VERSION, default 3.12), installed there without TensorFlow;
#   .gpu/tfds  Fashion-MNIST prepared by TFDS here (array_record files, which cnnjax
#              reads without TensorFlow), from Debian's dataset-fashion-mnist files.
# Run from the repository root on a machine with cnnjax installed:
#   bash experiments/accelerator/carry.sh
# .gpu/ is git-ignored; it is about 40 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON_VERSION:-3.12}
rm -rf .gpu/whl && mkdir -p .gpu/whl
python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$py" --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl \
  tensorflow-datasets==4.9.10 array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1 \
  simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 importlib-resources==7.1.0
# promise has no wheel on PyPI (and pip download --only-binary skips it): build one.
ls .gpu/whl/promise-*.whl >/dev/null 2>&1 || \
  python -m pip wheel -q --disable-pip-version-check --no-deps -w .gpu/whl promise==2.3
python -c "from cnnjax import data; data.load_fashion_mnist('.gpu/tfds', max_train=1, max_test=1, progress=False)"
ls .gpu/whl
du -sh .gpu/whl .gpu/tfds
