"""Figures of a run: the three curves the book's `train_ch6` animates.

Figures are drawn with matplotlib's object-oriented API and written to files, so
nothing here selects a backend or opens a window (a notebook keeps its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure


def new_figure(*args, figsize=(5, 3.5), dpi: int = 120, **kwargs) -> tuple[Figure, object]:
    """A figure and its axes, as `plt.subplots(*args, **kwargs)` makes them."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*args, **kwargs)


def plot_curves(epochs: Sequence[dict], path: str | Path, title: str) -> Figure:
    """Train loss, train accuracy and test accuracy against epoch, on one axis as
    the book plots them, saved to `path` (PNG); returns the figure."""
    x = [e["epoch"] for e in epochs]
    fig, ax = new_figure()
    ax.plot(x, [e["train_loss"] for e in epochs], "-o", ms=3, label="train loss")
    ax.plot(x, [e["train_acc"] for e in epochs], "--o", ms=3, label="train acc")
    ax.plot(x, [e["test_acc"] for e in epochs], ":o", ms=3, label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.8, max(x) + 0.2)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return fig


def save_figure(fig: Figure, path: str | Path, title: str | None = None) -> None:
    """Title a finished figure (if `title`), lay it out and save it to `path` (PNG)."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
