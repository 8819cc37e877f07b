"""Time one convolution layer's forward and backward pass: XLA's convolution, the
same layer as one matrix product (`im2col_conv`), and PyTorch's (when installed).

    python -m experiments.bench_conv

The layers are the zoo's typical shapes (LeNet's two convs, ResNet's 3x3 convs).
docs/benchmarks.md reports what this found: XLA's CPU convolutions are where the
CPU time goes, and im2col is faster layer by layer but not in the whole train step
(commit b2564db had it in the models, with `experiments/ab_im2col.py`).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

def im2col_conv(lhs, rhs, window_strides, padding):
    """A stride-`window_strides`, explicitly padded NHWC x HWIO convolution as the book
    first explains it (§6.2): every output pixel is the dot product of a kh x kw window
    with the kernel. The windows are cut out as shifted slices and laid side by side
    ("im2col"), so the layer and its gradients become matrix products."""
    kh, kw, cin, cout = rhs.shape
    n, h, w = lhs.shape[:3]
    (top, bottom), (left, right) = padding
    sh, sw = window_strides
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
               for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(windows, axis=-1)  # (n, oh, ow, kh*kw*cin), HWI order
    out = jax.lax.dot(patches.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout))
    return out.reshape(n, oh, ow, cout)


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
