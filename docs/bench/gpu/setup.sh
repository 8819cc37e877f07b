# Sourced at the start of every device command (the GPU machine has JAX, flax, optax,
# orbax, chex, torch; not TensorFlow or TFDS). Installs TFDS without TensorFlow from
# the carried wheels and points at the carried, already prepared Fashion-MNIST.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DATA=$PWD/.gpu/tfds
export MPLBACKEND=Agg
python3 - <<'PY'
import importlib.metadata as md, jax, flax, optax, orbax.checkpoint, chex, tensorflow_datasets as tfds
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "tfds", md.version("tensorflow-datasets"), tfds.data_source.__name__, jax.devices())
PY
# Pack what the runs wrote (no checkpoints) into $OUT: results.tgz, one file.
pack() { tar czf "$OUT/results.tgz" --exclude=checkpoints results docs/bench 2>/dev/null; ls -la "$OUT"; }
