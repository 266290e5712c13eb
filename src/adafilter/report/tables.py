"""The report's tables: accuracy per method x dataset (the paper's Table 2), details, runs."""

from __future__ import annotations

import html
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runs import Run, number

__all__ = [
    "METHOD_ORDER",
    "Table",
    "accuracy_tables",
    "details_table",
    "format_cell",
    "format_table",
    "method_sort_key",
    "runs_table",
]

#: Row order of the accuracy table (the paper's Table 2 rows; a presentation order only,
#: other methods follow alphabetically). Which runs have policies comes from their summary.
METHOD_ORDER: tuple[str, ...] = (
    "finetune",
    "finetune-half",
    "random-policy",
    "l2sp",
    "adafilter",
    "standard-bn",
    "cnn-gate",
)
_PARTIAL_MARK = "*"


@dataclass
class Table:
    """A simple table rendered to Markdown or HTML.

    Attributes:
        title: Heading shown above the table.
        header: Column names.
        rows: Cell strings, one list per row.
        align: Per column ``"l"`` or ``"r"``.
        footnotes: Lines shown under the table.
    """

    title: str
    header: list[str]
    rows: list[list[str]]
    align: list[str]
    footnotes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """Render as a GitHub-flavoured Markdown table (with its title and footnotes)."""

        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        lines = [f"### {self.title}", ""] if self.title else []
        lines.append("| " + " | ".join(esc(h) for h in self.header) + " |")
        lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in self.align) + "|")
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        if self.footnotes:
            lines += [""] + [f"{note}  " for note in self.footnotes]
        return "\n".join(lines)

    def to_html(self) -> str:
        """Render as an HTML ``<table>`` (with its title and footnotes); Markdown bold kept."""

        def cell(text: str, tag: str, align: str) -> str:
            body = html.escape(text)
            if body.startswith("**") and body.endswith("**") and len(body) > 4:
                body = f"<strong>{body[2:-2]}</strong>"
            style = ' class="num"' if align == "r" else ""
            return f"<{tag}{style}>{body}</{tag}>"

        parts = [f"<h3>{html.escape(self.title)}</h3>"] if self.title else []
        parts += ["<table>", "<thead><tr>"]
        parts += [cell(h, "th", a) for h, a in zip(self.header, self.align, strict=True)]
        parts.append("</tr></thead><tbody>")
        for row in self.rows:
            cells = "".join(cell(c, "td", a) for c, a in zip(row, self.align, strict=True))
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in self.footnotes]
        return "\n".join(parts)


def method_sort_key(method: str) -> tuple[int, str]:
    """Sort key putting :data:`METHOD_ORDER` first, then other methods alphabetically; an arm
    (``"adafilter (gate_lr=0.1)"``, :attr:`Run.arm`) sorts with its method, then by its settings."""
    name, _, variant = method.partition(" (")
    try:
        return (METHOD_ORDER.index(name), variant)
    except ValueError:
        return (len(METHOD_ORDER), method)


def format_cell(values: Sequence[float], *, partial: bool = False) -> str:
    """Format accuracies (percent) of one configuration.

    One value gives ``"85.25%"``; several give ``"85.25 ± 1.03% (n=3)"`` with the sample
    standard deviation. ``partial`` appends ``*``. No value gives ``"—"``.

    Args:
        values: Accuracies in percent, one per seed.
        partial: Whether any of the runs did not complete.

    Returns:
        The cell text.
    """
    if not values:
        return "—"
    mark = _PARTIAL_MARK if partial else ""
    if len(values) == 1:
        return f"{values[0]:.2f}%{mark}"
    mean = statistics.fmean(values)
    std = statistics.stdev(values)
    return f"{mean:.2f} ± {std:.2f}% (n={len(values)}){mark}"


def _group(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config_key, []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
    return groups


def _sorted_backbones(runs: Sequence[Run]) -> list[str]:
    return sorted({r.backbone for r in runs})


def accuracy_tables(runs: Sequence[Run]) -> list[Table]:
    """Final test accuracy tables (rows = methods, columns = datasets), one per backbone.

    The best mean in each dataset column is bold; ``*`` marks cells that include partial runs.

    Args:
        runs: Loaded runs.

    Returns:
        One :class:`Table` per backbone.
    """
    groups = _group(runs)
    tables: list[Table] = []
    for backbone in _sorted_backbones(runs):
        keys = [k for k in groups if k[2] == backbone]
        methods = sorted({k[0] for k in keys}, key=method_sort_key)
        datasets = sorted({k[1] for k in keys})
        cells: dict[tuple[str, str], tuple[list[float], bool]] = {}
        for method, dataset, _ in keys:
            members = groups[(method, dataset, backbone)]
            accs = [a for a in (r.final_acc for r in members) if a is not None]
            cells[(method, dataset)] = (accs, any(not r.completed for r in members))
        best: dict[str, float] = {}
        for dataset in datasets:
            means = [statistics.fmean(v) for (m, d), (v, _) in cells.items() if d == dataset and v]
            if means:
                best[dataset] = max(means)
        rows: list[list[str]] = []
        any_partial = any_bold = False
        for method in methods:
            row = [method]
            for dataset in datasets:
                accs, partial = cells.get((method, dataset), ([], False))
                any_partial |= partial and bool(accs)
                text = format_cell(accs, partial=partial)
                n_configs = sum(1 for (_, d), (v, _) in cells.items() if d == dataset and v)
                if accs and n_configs > 1 and statistics.fmean(accs) == best.get(dataset):
                    text = f"**{text}**"
                    any_bold = True
                row.append(text)
            rows.append(row)
        notes = ["Final test accuracy (top-1). Several seeds: mean ± sample std (n = seeds)."]
        if any_bold:
            notes.append("Bold: best mean in the column.")
        if any_partial:
            notes.append(
                f"Cells marked {_PARTIAL_MARK} include a partial run (training did not complete)."
            )
        tables.append(
            Table(
                title=f"Final test accuracy — backbone {backbone}",
                header=["Method", *datasets],
                rows=rows,
                align=["l"] + ["r"] * len(datasets),
                footnotes=notes,
            )
        )
    return tables


def _fmt_count(value: Any) -> str:
    num = number(value)
    if num is None:
        return "—"
    return f"{num:,.0f}" if float(num).is_integer() else f"{num:,.1f}"


def _mean_of(values: Iterable[Any], fmt: str) -> str:
    nums = [n for n in (number(v) for v in values) if n is not None]
    return format(statistics.fmean(nums), fmt) if nums else "—"


def details_table(runs: Sequence[Run]) -> Table:
    """Per-configuration details: best accuracy, epochs, time, throughput and parameters.

    Times and throughput are means over seeds; parameter counts come from the first seed.

    Args:
        runs: Loaded runs.

    Returns:
        The :class:`Table`.
    """
    groups = _group(runs)
    keys = sorted(groups, key=lambda k: (k[2], k[1], method_sort_key(k[0])))
    rows: list[list[str]] = []
    for key in keys:
        members = groups[key]
        method, dataset, backbone = key
        seeds = ",".join("?" if r.seed is None else str(r.seed) for r in members)
        n_partial = sum(not r.completed for r in members)
        status = "complete" if not n_partial else f"{n_partial} partial"
        best = [a for a in (r.best_acc for r in members) if a is not None]
        params = members[0].summary.get("params")
        params = params if isinstance(params, dict) else {}
        epochs = sorted({e for e in (r.summary.get("epochs") for r in members) if number(e)})
        rows.append(
            [
                method,
                dataset,
                backbone,
                seeds,
                status,
                "/".join(str(e) for e in epochs) or "—",
                format_cell(best),
                _mean_of((r.summary.get("wall_time_s") for r in members), ",.0f"),
                _mean_of((r.summary.get("images_per_second") for r in members), ",.1f"),
                _fmt_count(params.get("total")),
                _fmt_count(params.get("trainable")),
                _fmt_count(params.get("trainable_per_example")),
            ]
        )
    return Table(
        title="Run configurations",
        header=[
            "Method",
            "Dataset",
            "Backbone",
            "Seeds",
            "Status",
            "Epochs",
            "Best test acc",
            "Train time (s)",
            "Images/s",
            "Params total",
            "Trainable",
            "Trainable / example",
        ],
        rows=rows,
        align=list("lllllrrrrrrr"),
        footnotes=[
            "Best test acc: highest test accuracy over epochs (mean ± std over seeds). "
            "Train time and images/s: mean over seeds. Params: first seed."
        ],
    )


def format_table(runs: Sequence[Run]) -> str:
    """The Markdown accuracy table(s) (the paper's Table 2 shape), one per backbone.

    Args:
        runs: Loaded runs.

    Returns:
        Markdown text.
    """
    return "\n\n".join(t.to_markdown() for t in accuracy_tables(runs))


def runs_table(runs: Sequence[Run], out_dir: Path) -> Table:
    rows = []
    for run in sorted(
        runs, key=lambda r: (r.backbone, r.dataset, method_sort_key(r.arm), r.seed or 0)
    ):
        try:
            where = os.path.relpath(run.path, out_dir)
        except ValueError:  # different drive on Windows
            where = str(run.path)
        final, best = run.final_acc, run.best_acc
        rows.append(
            [
                where,
                run.arm,
                run.dataset,
                run.backbone,
                "?" if run.seed is None else str(run.seed),
                "yes" if run.completed else "no (partial)",
                "—" if final is None else f"{final:.2f}%",
                "—" if best is None else f"{best:.2f}%",
                "; ".join(run.notes) or "",
            ]
        )
    return Table(
        title="",
        header=[
            "Run directory",
            "Method",
            "Dataset",
            "Backbone",
            "Seed",
            "Completed",
            "Final test acc",
            "Best test acc",
            "Notes",
        ],
        rows=rows,
        align=list("llllrlrrl"),
    )
