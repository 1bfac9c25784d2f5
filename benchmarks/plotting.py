"""Small matplotlib helpers (Agg backend) for the benchmarks' PNG plots.

matplotlib is only in the ``bench`` extra, so it is imported when a plot is drawn, through
``importlib``: the runner's ``--no-plots`` (and the smoke test) never needs it, and type checking
does not depend on it being installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Colours: the figure (our stack) and its baseline, the same in every plot.
FIGURE_COLOUR = "#1f77b4"
BASELINE_COLOUR = "#7f7f7f"
EXTRA_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def grouped_bars(
    ax: Any,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    colours: Sequence[str] | None = None,
    ylabel: str = "",
    title: str = "",
    log: bool = False,
    value_format: str = "{:.3g}",
) -> None:
    """Bars for each category, one per series side by side, each labelled with its value."""
    names = list(series)
    width = 0.8 / max(1, len(names))
    palette = list(colours) if colours else [FIGURE_COLOUR, BASELINE_COLOUR, *EXTRA_COLOURS]
    for index, name in enumerate(names):
        xs = [c + (index - (len(names) - 1) / 2) * width for c in range(len(categories))]
        values = [0.0 if v is None else float(v) for v in series[name]]
        bars = ax.bar(xs, values, width, label=name, color=palette[index % len(palette)])
        labels = ["" if v is None else value_format.format(v) for v in series[name]]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(list(categories))
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.25)  # room for the value labels and the legend
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def save(fig: Any, path: Path, suptitle: str, footer: str = "") -> None:
    """Title, footer (machine line), tight layout, write ``path`` and close the figure."""
    fig.suptitle(suptitle, fontsize=12)
    if footer:
        fig.text(0.01, 0.005, footer, fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    temp = path.with_name(path.name + ".tmp")
    fig.savefig(temp, dpi=110, format="png")
    temp.replace(path)
    pyplot().close(fig)


def machine_footer(document: dict[str, Any]) -> str:
    """A one-line description of the machine and the run, for the bottom of a plot."""
    machine = document.get("machine", {})
    return (
        f"{document.get('started', '')}  |  {machine.get('cores')} cores "
        f"({machine.get('cpu_model') or 'unknown CPU'})  |  Python {machine.get('python')}  |  "
        f"load {', '.join(f'{x:.2f}' for x in machine.get('load_average', []))}"
        + ("  |  SMOKE (tiny sizes)" if document.get("params", {}).get("smoke") else "")
    )
