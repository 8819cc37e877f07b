"""CifarResNet's 3x3 convolutions (batch 128; 16, 32 and 64 channels on 28x28, 14x14 and 7x7),
forward + both gradients, XLA:CPU against PyTorch on the same cores: is there a slow path
like the 2x2 one (conv_2x2.py), or only the general 2x gap?

Run from the repository root: python docs/bench/probes/cifar_convs.py (prints JSON lines; needs torch).
"""
import json, statistics, time
import jax, jax.numpy as jnp, torch
torch.set_num_threads(2)
def med(f, n=5):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(ts), 2)
for b, hw, c in [(128, 28, 16), (128, 14, 32), (128, 7, 64)]:
    x = jnp.ones((b, hw, hw, c)); w = 0.01 * jnp.ones((3, 3, c, c))
    loss = lambda x, w: (jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2).sum()
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    xt = torch.ones(b, c, hw, hw, requires_grad=True); wt = (0.01 * torch.ones(c, c, 3, 3)).requires_grad_()
    def tstep():
        xt.grad = None; wt.grad = None
        (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()
    flops = 3 * 2 * b * hw * hw * c * c * 9
    j = med(lambda: jax.block_until_ready(step(x, w))); t = med(tstep)
    print(json.dumps({"shape": f"b{b} {c}->{c} 3x3 on {hw}x{hw}", "jax_ms": j, "torch_ms": t, "jax_gflops": round(flops / j / 1e6, 1), "torch_gflops": round(flops / t / 1e6, 1)}))
