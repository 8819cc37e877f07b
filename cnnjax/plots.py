"""Figures of a run: the three curves the book's `train_ch6` animates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only; never open a window.
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(epochs: Sequence[dict], path: str | Path, title: str) -> None:
    """Train loss, train accuracy and test accuracy against epoch, on one axis as
    the book plots them, saved to `path` (PNG)."""
    x = [e["epoch"] for e in epochs]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(x, [e["train_loss"] for e in epochs], "-o", ms=3, label="train loss")
    ax.plot(x, [e["train_acc"] for e in epochs], "--o", ms=3, label="train acc")
    ax.plot(x, [e["test_acc"] for e in epochs], ":o", ms=3, label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.8, max(x) + 0.2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_figure(fig, path: str | Path, title: str) -> None:
    """Title a finished multi-panel figure, save it to `path` (PNG) and free it."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
