"""Figures of the simulator's experiments, drawn from saved results only.

``python -m figures [--results DIR] [--out DIR]`` draws, for every registered
experiment whose results file ``DIR/<name>.csv`` exists, the figures of its figure
modules (``figures.<name>`` by default), as PNG files in
``--out`` (default ``figures/``). Nothing is recomputed.

A figure module exposes ``plot(results_dir: Path, out_dir: Path) -> list[Path]``
returning the files it wrote; :mod:`figures._style` holds shared helpers. An
experiment with several figure modules lists them in ``figures.__main__.FIGURE_MODULES``.
"""
