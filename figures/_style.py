"""Shared plotting helpers: colours, labels, results loading, saving.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot, no GUI
backend), so plotting works headless and in worker processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "color", "label", "new_figure", "save",
           "load_ok_rows", "load_config"]

METHOD_COLORS = {"dpo": "#444444", "kldpo": "#1f77b4", "chi2dpo": "#2ca02c",
                 "wdpo1": "#d62728", "wdpo2": "#ff7f0e"}
METHOD_LABELS = {"dpo": "DPO", "kldpo": "KLDPO", "chi2dpo": "chi2-DPO",
                 "wdpo1": "WDPO (p=1)", "wdpo2": "WDPO (p=2)"}


def color(method: str) -> str:
    """Colour of a method (grey for unknown names)."""
    return METHOD_COLORS.get(method, "#7f7f7f")


def label(method: str) -> str:
    """Display name of a method."""
    return METHOD_LABELS.get(method, method)


def new_figure(n_panels: int, width: float = 4.0, height: float = 3.4, ncols: int | None = None,
               sharey: bool = False) -> tuple[Figure, list]:
    """A figure with ``n_panels`` axes on a grid (at most 3 columns by default)."""
    ncols = ncols or min(n_panels, 3)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.25)
    return fig, list(axes[:n_panels])


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (150 dpi) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def load_ok_rows(results_dir: Path, name: str) -> pd.DataFrame:
    """Rows with ``status == "ok"`` of ``results_dir/<name>.csv``."""
    df = pd.read_csv(Path(results_dir) / f"{name}.csv")
    return df[df["status"] == "ok"].reset_index(drop=True)


def load_config(results_dir: Path, name: str) -> dict:
    """The configuration saved beside the results (``<name>_config.json``)."""
    path = Path(results_dir) / f"{name}_config.json"
    return json.loads(path.read_text())["config"] if path.exists() else {}
