"""Time one convolution layer's forward and backward pass: XLA's convolution against
`cnnjax.models.common.im2col_conv` (and PyTorch's, when installed).

    python -m experiments.bench_conv

The layers are the zoo's typical shapes (LeNet's two convs, ResNet's 3x3 convs).
This is how docs/benchmarks.md found that XLA's CPU convolution, not the rest of the
step, is where the CPU time goes.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.models.common import im2col_conv

# (batch, in channels, out channels, kernel, input size, whether the input needs a gradient)
LAYERS = [(256, 1, 6, 5, 28, False), (256, 6, 16, 5, 12, True), (64, 64, 64, 3, 26, True),
          (64, 128, 128, 3, 14, True)]


def median_ms(fn, repeats: int = 5, calls: int = 20) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - started) / calls)
    return statistics.median(times) * 1e3


def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col(x, w):
    return im2col_conv(x, w, (1, 1), ((0, 0), (0, 0)))


def main() -> int:
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}; forward + backward, ms per call")
    for batch, cin, cout, k, size, input_grad in LAYERS:
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin), np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32))
        argnums = (0, 1) if input_grad else 1
        row = []
        for conv in (lax_conv, im2col):
            grad = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2),
                                    argnums=argnums))
            row.append(median_ms(lambda grad=grad: jax.block_until_ready(grad(x, w))))
        line = (f"batch {batch}, {cin}->{cout} channels, {k}x{k} on {size}x{size}: "
                f"XLA conv {row[0]:.1f}, im2col {row[1]:.1f}")
        if torch is not None:
            tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=input_grad)
            tw = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1), requires_grad=True)

            def torch_step(tx=tx, tw=tw):
                tx.grad = tw.grad = None
                (torch.nn.functional.conv2d(tx, tw) ** 2).sum().backward()

            line += f", PyTorch {median_ms(torch_step):.1f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
