"""The bench's PyTorch side: the book's training loop timed in a process of its own.

`training_timer` times `train_ch6`'s step for a network of `experiments.torch_reference`
(SGD, cross-entropy, resizing inside the loop), either eagerly as the book writes it
("book") or with the usual PyTorch speed-ups ("tuned": channels-last, bfloat16
autocast, `torch.compile`, resizing on the device); `time_training` runs its windows.
`serve_timers` runs such timers in a child process, as `experiments.bench --torch`
does, so that PyTorch runs as its users run it (not with the settings
`cnnjax.runtime.configure()` gives the bench's process). Only that process imports
this module, and with it PyTorch.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from experiments.torch_reference import build

__all__ = ["serve_timers", "time_training", "training_timer"]


def _synchronize(device: torch.device, loss: torch.Tensor) -> float:
    """Wait for the device and return the loss (the `.item()` syncs on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss.item()


def training_timer(arch: str, *, batch_size: int, resize: int, lr: float,
                   flavour: str = "book", device: str = "cpu", warmup_steps: int = 3,
                   seed: int = 0, images=None, labels=None
                   ) -> tuple[Callable[[int], float], dict]:
    """`train_ch6`'s training step for network `arch`, warmed up and ready to time:
    returns `window` and `info`. `window(steps)` runs `steps` steps, waits for the
    device and returns their images per second; `info` says how (flavour,
    compiled, threads, device, torch_version, warmup_seconds) and holds the
    final_loss of the last window.

    Each step draws `batch_size` random examples of `images` (uint8, N x 28 x 28
    or N x 28 x 28 x 1; default 60000 random images), scales them to [0, 1],
    resizes them bilinearly to `resize` x `resize`, then runs forward,
    cross-entropy, backward and an SGD step at `lr`. flavour "book": eager
    NCHW float32 with the resize on the CPU, as the book's DataLoader does it;
    "tuned": channels-last, bfloat16 autocast, `torch.compile` (eager if
    compiling fails: "compiled" is then False) and the resize on `device`.
    `warmup_steps` untimed steps (at least one; compilation included) run first.
    """
    if flavour not in ("book", "tuned"):
        raise ValueError(f"unknown flavour {flavour!r}; valid: book, tuned")
    tuned = flavour == "tuned"
    dev = torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if (images is None) != (labels is None):
        raise ValueError("give both images and labels, or neither")
    if images is None:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (60_000, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, 60_000)
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"images must be N x H x W (x 1), got shape {images.shape}")
    images_u8 = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # N, 1, H, W
    labels_i64 = torch.from_numpy(np.asarray(labels).astype(np.int64))
    num_examples = images_u8.shape[0]

    model = build(arch, resize=resize).to(dev)
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    forward, compiled = model, False
    if tuned:
        try:
            forward, compiled = torch.compile(model), True
        except Exception:  # noqa: BLE001 -- no compiler backend: time eager instead.
            forward, compiled = model, False

    def autocast():
        if tuned:
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def resized(x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[-1] != resize or x.shape[-2] != resize:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear",
                              align_corners=False, antialias=False)
        return x

    def step() -> torch.Tensor:
        idx = torch.randint(num_examples, (batch_size,), generator=generator)
        x, y = images_u8[idx], labels_i64[idx]
        if tuned:
            x = resized(x.to(dev, non_blocking=True)).contiguous(
                memory_format=torch.channels_last)
        else:
            x = resized(x).to(dev)
        y = y.to(dev)
        optimizer.zero_grad()
        with autocast():
            loss = loss_fn(forward(x), y)
        loss.backward()
        optimizer.step()
        return loss

    def first_step() -> torch.Tensor:
        # torch.compile is lazy: a missing backend shows up on the first call.
        nonlocal forward, compiled
        if compiled:
            try:
                return step()
            except Exception:  # noqa: BLE001 -- e.g. no C++ toolchain for inductor.
                forward, compiled = model, False
        return step()

    start = time.perf_counter()
    loss = first_step()
    for _ in range(warmup_steps - 1):
        loss = step()
    _synchronize(dev, loss)

    info = {"flavour": flavour, "compiled": compiled, "threads": torch.get_num_threads(),
            "device": str(dev), "torch_version": str(torch.__version__),
            "warmup_seconds": time.perf_counter() - start, "final_loss": float("nan")}

    def window(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        info["final_loss"] = _synchronize(dev, loss)
        return batch_size * steps / (time.perf_counter() - started)

    return window, info


def time_training(arch: str, *, windows: int = 5, steps_per_window: int = 10,
                  **settings) -> dict:
    """Images per second of `training_timer(arch, **settings)`: the median of
    `windows` timed windows of `steps_per_window` steps, with each window's rate
    and the timer's `info`."""
    window, info = training_timer(arch, **settings)
    rates = [window(steps_per_window) for _ in range(windows)]
    return {"img_per_s": statistics.median(rates), "window_img_per_s": rates, **info}


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when its parent dies, even by
    SIGKILL (it would otherwise keep timing, and on a GPU keep its memory, until
    its next reply finds the pipe closed)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # it died before the call
            os._exit(1)


def serve_timers(conn, arch: str, flavours: list[str], **settings) -> None:
    """Serve `training_timer(arch, flavour=f, device=d, **settings)` for each f of
    `flavours` ([]: book, and tuned on a GPU), d the GPU if there is one, over the
    pipe end `conn`, the body of a process of their own: first replies with
    {flavour: info}, then answers each request (flavour, steps) with that window's
    images per second, until the request None. A failure is replied as
    ("error", its traceback) and ends the process; every other reply is ("ok", value)."""
    # Ctrl-C reaches every process of the terminal's group: the parent ends this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flavours = [f for f in ("book", "tuned")
                    if f in (flavours or ["book"] + (["tuned"] if device == "cuda" else []))]
        timers = {f: training_timer(arch, flavour=f, device=device, **settings)
                  for f in flavours}
        conn.send(("ok", {f: info for f, (_, info) in timers.items()}))
        while (request := conn.recv()) is not None:
            flavour, steps = request
            conn.send(("ok", timers[flavour][0](steps)))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the parent is gone (killed): there is no one to answer
    except Exception:  # noqa: BLE001 -- reported to the parent, which fails with it.
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
