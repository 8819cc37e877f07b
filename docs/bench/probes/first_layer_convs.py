"""The zoo's first layers (one input channel) alone: XLA's convolution against
`cnnjax.models.common.shifted_conv`, forward and forward + weight gradient, ms
(median of 5 windows). shifted_conv has stride 1; for the strided layers, the same
sum over kernel offsets with strided slices is timed, forward only (the gradients
would be XLA's convolutions either way). Run from the repository root:
    python docs/bench/probes/first_layer_convs.py   (prints JSON lines)
"""
import json
import time

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.models.common import shifted_conv


def median_ms(f, *args, calls=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return round(1e3 * sorted(times)[2], 2)


# name, batch, input side, kernel, stride, padding, output channels
LAYERS = [("lenet", 256, 28, 5, 1, 2, 6), ("lenet_bn", 256, 28, 5, 1, 0, 6),
          ("vgg11", 16, 224, 3, 1, 1, 64), ("resnet/googlenet/densenet", 64, 96, 7, 2, 3, 64),
          ("alexnet/nin", 16, 224, 11, 4, 1, 96)]

for name, batch, side, k, stride, pad, channels in LAYERS:
    x = jax.random.normal(jax.random.key(0), (batch, side, side, 1))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, channels))
    pads = ((pad, pad), (pad, pad))

    def xla(x, kernel):
        return lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def shifted(x, kernel):
        if stride == 1:
            return shifted_conv(x, kernel, pads)
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        out = (x.shape[1] - k) // stride + 1
        return sum(x[:, a:a + stride * (out - 1) + 1:stride, b:b + stride * (out - 1) + 1:stride]
                   * kernel[a, b, 0] for a in range(k) for b in range(k))

    row = {"layer": name, "batch": batch, "input": side, "kernel": k, "stride": stride,
           "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    assert jnp.allclose(jax.jit(shifted)(x, kernel), xla(x, kernel), atol=1e-3)
    for label, f in (("xla", xla), ("shifted", shifted)):
        row[f"{label}_forward_ms"] = median_ms(jax.jit(f), x, kernel)
        if stride == 1 or label == "xla":
            grad = jax.grad(lambda kernel, x, f=f: jnp.sum(f(x, kernel) ** 2))
            row[f"{label}_forward_weight_grad_ms"] = median_ms(jax.jit(grad), kernel, x)
    print(json.dumps(row), flush=True)
