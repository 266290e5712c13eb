"""Build a Markdown + self-contained HTML report (tables and figures) from training run folders.

The report reads run directories only (``summary.json``, ``metrics.jsonl``, ``policy.json`` as
written by ``adafilter train --out DIR``); it never imports torch or model code, so it runs on a
laptop without a GPU. Figures are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas,
which leaves the user's pyplot backend untouched.

Outputs in ``out_dir``: ``report.md``, ``report.html``, ``accuracy.png`` (test accuracy per epoch,
paper Fig. 3), ``policy.png`` (fraction of images using fine-tuned filters per layer, paper Fig. 4)
and ``policy_by_class.png`` (the same fraction per class and layer as heat maps).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaFilterError
from .utils.io import atomic_write_bytes

__all__ = [
    "METHOD_ORDER",
    "Run",
    "Table",
    "accuracy_tables",
    "details_table",
    "expand_run_dirs",
    "format_cell",
    "format_table",
    "load_run",
    "make_report",
    "method_sort_key",
]

#: Row order of the accuracy table (the paper's Table 2); other methods follow alphabetically.
METHOD_ORDER: tuple[str, ...] = (
    "finetune",
    "finetune-half",
    "random-policy",
    "l2sp",
    "adafilter",
    "standard-bn",
    "cnn-gate",
)
# Methods expected to write policy.json; a missing one is noted in the report.
_GATED_METHODS = frozenset({"adafilter", "standard-bn", "cnn-gate"})
_FIGURE_NAMES = ("accuracy.png", "policy.png", "policy_by_class.png", "gate.png")
_MAX_HEATMAP_PANELS = 4
_MAX_HEATMAP_ROWS = 60
_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_DPI = 110
_PARTIAL_MARK = "*"


# --------------------------------------------------------------------------------------- loading
@dataclass
class Run:
    """One training run folder, as read from disk.

    Attributes:
        path: The run directory.
        summary: Parsed ``summary.json``.
        metrics: Per-epoch records from ``metrics.jsonl`` (unparseable lines skipped).
        policy: Parsed and validated ``policy.json`` or ``None``.
        notes: Human-readable notes about skipped or malformed content.
    """

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or _cfg(self.summary, "method") or "unknown")

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or _cfg(self.summary, "dataset") or "unknown")

    @property
    def backbone(self) -> str:
        return str(self.summary.get("backbone") or _cfg(self.summary, "backbone") or "unknown")

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", _cfg(self.summary, "seed"))
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def completed(self) -> bool:
        return self.summary.get("completed") is not False

    @property
    def config_key(self) -> tuple[str, str, str]:
        """``(method, dataset, backbone)``: runs sharing it differ only by seed."""
        return (self.method, self.dataset, self.backbone)

    @property
    def final_acc(self) -> float | None:
        """Final test accuracy in percent (falls back to the last epoch in ``metrics.jsonl``)."""
        acc = _num(self.summary.get("final_test_acc"))
        if acc is None:
            accs = [a for a in (_num(m.get("test_acc")) for m in self.metrics) if a is not None]
            acc = accs[-1] if accs else None
        return acc

    @property
    def best_acc(self) -> float | None:
        """Best test accuracy in percent (falls back to the max over ``metrics.jsonl``)."""
        acc = _num(self.summary.get("best_test_acc"))
        if acc is None:
            accs = [a for a in (_num(m.get("test_acc")) for m in self.metrics) if a is not None]
            acc = max(accs) if accs else None
        return acc

    @property
    def label(self) -> str:
        seed = "?" if self.seed is None else str(self.seed)
        return f"{self.method} · {self.dataset} · {self.backbone} · seed {seed}"


def _cfg(summary: dict[str, Any], key: str) -> Any:
    cfg = summary.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else None


def _num(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (bools, strings, NaN and inf are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _not_a_run_dir(path: Path) -> AdaFilterError:
    return AdaFilterError(
        f"{path} is not a run directory (no summary.json); "
        "pass the --out folder of `adafilter train`"
    )


def _find_run_dirs(folder: Path, depth: int) -> list[Path]:
    """Run directories strictly below ``folder``, searching at most ``depth`` levels down."""
    found: list[Path] = []
    if depth <= 0:
        return found
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return found
    for child in children:
        if (child / "summary.json").is_file():
            found.append(child)
        else:
            found.extend(_find_run_dirs(child, depth - 1))
    return found


def expand_run_dirs(paths: Iterable[str | Path], *, max_depth: int = 3) -> list[Path]:
    """Resolve user-given paths to run directories.

    A directory holding ``summary.json`` is a run; a directory without one is searched (up to
    ``max_depth`` levels) for runs below it; a path to a ``summary.json`` file means its folder.
    Duplicates are dropped, order is kept.

    Args:
        paths: Run directories or parent folders of run directories.
        max_depth: How deep to search a parent folder.

    Returns:
        The run directories, each once.

    Raises:
        AdaFilterError: If no path is given, a path does not exist, or holds no run.
    """
    out: list[Path] = []
    given = [Path(p) for p in paths]
    if not given:
        raise AdaFilterError(
            "no run directories given; pass the --out folder(s) of `adafilter train`"
        )
    for path in given:
        if path.is_file() and path.name == "summary.json":
            path = path.parent
        if not path.exists():
            raise AdaFilterError(
                f"{path} does not exist; pass the --out folder of `adafilter train`"
            )
        if (path / "summary.json").is_file():
            found = [path]
        elif path.is_dir():
            found = _find_run_dirs(path, max_depth)
        else:
            found = []
        if not found:
            raise _not_a_run_dir(path)
        for run_dir in found:
            if run_dir.resolve() not in {p.resolve() for p in out}:
                out.append(run_dir)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdaFilterError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-run or delete that run"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise AdaFilterError(f"cannot read {path}: {e}") from None


def _validate_policy(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Return ``(policy, None)`` with consistent fields or ``(None, reason)``."""
    if not isinstance(raw, dict):
        return None, "not a JSON object"
    overall = raw.get("overall")
    if not isinstance(overall, list) or not overall or any(_num(v) is None for v in overall):
        return None, "'overall' is missing or not a list of numbers"
    n_layers = len(overall)
    layers = raw.get("layers")
    if not (isinstance(layers, list) and len(layers) == n_layers):
        layers = [f"layer{i + 1}" for i in range(n_layers)]
    policy: dict[str, Any] = {
        "layers": [str(name) for name in layers],
        "overall": [float(v) for v in overall],
        "per_class": None,
    }
    per_class = raw.get("per_class")
    if isinstance(per_class, dict):
        names = per_class.get("class_names")
        frac = per_class.get("fraction")
        ok = (
            isinstance(frac, list)
            and len(frac) > 0
            and all(
                isinstance(row, list)
                and len(row) == n_layers
                and all(_num(v) is not None for v in row)
                for row in frac
            )
        )
        if ok:
            if not (isinstance(names, list) and len(names) == len(frac)):
                names = [f"class {i}" for i in range(len(frac))]
            policy["per_class"] = {
                "class_names": [str(n) for n in names],
                "fraction": [[float(v) for v in row] for row in frac],
            }
    return policy, None


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory.

    ``summary.json`` is required; ``metrics.jsonl`` and ``policy.json`` are optional and
    malformed parts of them are skipped with a note.

    Args:
        run_dir: The ``--out`` folder of ``adafilter train``.

    Returns:
        The loaded :class:`Run`.

    Raises:
        AdaFilterError: If ``summary.json`` is missing or is not a JSON object.
    """
    path = Path(run_dir)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise _not_a_run_dir(path)
    summary = _read_json(summary_path)
    if not isinstance(summary, dict):
        raise AdaFilterError(f"{summary_path} is not a JSON object; re-run or delete that run")
    run = Run(path=path, summary=summary)

    metrics_path = path / "metrics.jsonl"
    if metrics_path.is_file():
        bad = 0
        try:
            lines = metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
            run.notes.append("metrics.jsonl could not be read")
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                run.metrics.append(rec)
            else:
                bad += 1
        if bad:
            run.notes.append(f"skipped {bad} unreadable line(s) in metrics.jsonl")
    else:
        run.notes.append("no metrics.jsonl (no accuracy curve)")

    policy_path = path / "policy.json"
    if policy_path.is_file():
        try:
            raw = json.loads(policy_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raw = None
        run.policy, reason = _validate_policy(raw)
        if run.policy is None:
            run.notes.append(f"policy.json skipped ({reason or 'not valid JSON'})")
    elif run.method in _GATED_METHODS:
        run.notes.append("no policy.json (left out of the policy figures)")
    return run


# ---------------------------------------------------------------------------------------- tables
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
    """Sort key putting :data:`METHOD_ORDER` first, then other methods alphabetically."""
    try:
        return (METHOD_ORDER.index(method), "")
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
    num = _num(value)
    if num is None:
        return "—"
    return f"{num:,.0f}" if float(num).is_integer() else f"{num:,.1f}"


def _mean_of(values: Iterable[Any], fmt: str) -> str:
    nums = [n for n in (_num(v) for v in values) if n is not None]
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
        epochs = sorted({e for e in (r.summary.get("epochs") for r in members) if _num(e)})
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


# --------------------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()  # release artists; the Figure is not registered with pyplot
    return buf.getvalue()


def _method_colours(runs: Sequence[Run]) -> dict[str, Any]:
    from matplotlib import colormaps

    methods = sorted({r.method for r in runs}, key=method_sort_key)
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _seed_styles(runs: Sequence[Run]) -> dict[int | None, Any]:
    seeds = sorted({r.seed for r in runs}, key=lambda s: (s is None, s or 0))
    return {s: _LINESTYLES[i % len(_LINESTYLES)] for i, s in enumerate(seeds)}


def _curve(run: Run) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i, rec in enumerate(run.metrics):
        acc = _num(rec.get("test_acc"))
        if acc is None:
            continue
        epoch = _num(rec.get("epoch"))
        xs.append(epoch if epoch is not None else float(i + 1))
        ys.append(acc)
    return xs, ys


def plot_accuracy(runs: Sequence[Run]) -> bytes | None:
    """Test accuracy per epoch, one line per run, one subplot per dataset (and backbone).

    Colour encodes the method, line style the seed; an ``x`` marks the last epoch of a partial
    run.

    Args:
        runs: Loaded runs.

    Returns:
        PNG bytes, or ``None`` if no run has per-epoch test accuracy.
    """
    from matplotlib.lines import Line2D

    curves = [(r, *_curve(r)) for r in runs]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    multi_bb = len({r.backbone for r, _, _ in curves}) > 1
    panels = sorted({(r.dataset, r.backbone) for r, _, _ in curves})
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.6 * ncols + 1.9, 3.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colours = _method_colours([c[0] for c in curves])
    styles = _seed_styles([c[0] for c in curves])
    any_partial = False
    for idx, (dataset, backbone) in enumerate(panels):
        ax = axes[idx // ncols][idx % ncols]
        members = [c for c in curves if (c[0].dataset, c[0].backbone) == (dataset, backbone)]
        members.sort(key=lambda c: (method_sort_key(c[0].method), c[0].seed or 0))
        for run, xs, ys in members:
            ax.plot(
                xs,
                ys,
                color=colours[run.method],
                linestyle=styles[run.seed],
                linewidth=1.6,
                marker="o" if len(xs) == 1 else None,
                markersize=4,
            )
            if not run.completed:
                any_partial = True
                ax.plot(xs[-1], ys[-1], marker="x", color=colours[run.method], markersize=8, mew=2)
        ax.set_title(f"{dataset} ({backbone})" if multi_bb else dataset, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for idx in range(len(panels), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    handles: list[Any] = [Line2D([], [], color=colours[m], linewidth=2.5, label=m) for m in colours]
    if len(styles) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="0.3",
                linestyle=ls,
                linewidth=1.6,
                label="seed ?" if s is None else f"seed {s}",
            )
            for s, ls in styles.items()
        ]
    if any_partial:
        handles.append(
            Line2D([], [], color="0.3", marker="x", linestyle="none", mew=2, label="partial run")
        )
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    fig.suptitle("Test accuracy per epoch", fontsize=13)
    return _png_bytes(fig)


def _gated(runs: Sequence[Run]) -> list[Run]:
    out = [r for r in runs if r.policy is not None]
    out.sort(key=lambda r: (r.backbone, r.dataset, method_sort_key(r.method), r.seed or 0))
    return out


def plot_policy(runs: Sequence[Run]) -> bytes | None:
    """Fraction of evaluation images using fine-tuned filters per gated layer (paper Fig. 4).

    One line per run with a ``policy.json``; colour encodes the configuration, line style the
    seed. Layer names label the x axis when all runs share them and there are few.

    Args:
        runs: Loaded runs.

    Returns:
        PNG bytes, or ``None`` if no run has a policy.
    """
    from matplotlib import colormaps

    gated = _gated(runs)
    if not gated:
        return None
    configs = list(dict.fromkeys(r.config_key for r in gated))
    cmap = colormaps["tab10" if len(configs) <= 10 else "tab20"]
    colour = {k: cmap(i % cmap.N) for i, k in enumerate(configs)}
    styles = _seed_styles(gated)
    multi_bb = len({r.backbone for r in gated}) > 1
    max_layers = max(len(r.policy["overall"]) for r in gated if r.policy)
    ncols = 2 if len(gated) > 3 else 1
    legend_h = 0.2 * math.ceil(len(gated) / ncols)
    fig = _new_figure(min(16.0, max(9.0, 0.22 * max_layers + 3.0)), 4.8 + legend_h)
    ax = fig.add_subplot()
    for run in gated:
        assert run.policy is not None
        ys = run.policy["overall"]
        xs = list(range(1, len(ys) + 1))
        name = f"{run.method} · {run.dataset}" + (f" · {run.backbone}" if multi_bb else "")
        seed = "?" if run.seed is None else run.seed
        partial = "" if run.completed else ", partial"
        ax.plot(
            xs,
            ys,
            color=colour[run.config_key],
            linestyle=styles[run.seed],
            marker="o",
            markersize=3,
            linewidth=1.5,
            label=f"{name} · seed {seed} (mean {statistics.fmean(ys):.2f}{partial})",
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0.5, max_layers + 0.5)
    ax.axhline(0.5, color="0.6", linewidth=0.8, linestyle=":")
    names = {tuple(r.policy["layers"]) for r in gated if r.policy}
    if len(names) == 1 and max_layers <= 24:
        ax.set_xticks(
            range(1, max_layers + 1),
            labels=list(next(iter(names))),
            rotation=60,
            ha="right",
            fontsize=7,
        )
        ax.set_xlabel("gated layer (execution order)")
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("gated layer index (execution order)")
    ax.set_ylabel("fraction using fine-tuned filters")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)
    fig.suptitle("Fraction of evaluation images using fine-tuned filters, per layer", fontsize=12)
    return _png_bytes(fig)


def _telemetry(run: Run) -> list[dict[str, Any]]:
    return [m for m in run.metrics if isinstance(m.get("gate"), dict)]


def plot_gate_telemetry(runs: Sequence[Run]) -> bytes | None:
    """The gate over epochs: a layers x epochs heat map of the fine-tuned share per run (at
    most ``_MAX_HEATMAP_PANELS``), and the diversity and decision-change curves below.

    Args:
        runs: Loaded runs; those whose ``metrics.jsonl`` carries ``gate`` telemetry are drawn.

    Returns:
        PNG bytes, or ``None`` if no run has telemetry.
    """
    rows = [(r, _telemetry(r)) for r in runs]
    rows = [(r, t) for r, t in rows if t][:_MAX_HEATMAP_PANELS]
    if not rows:
        return None
    fig = _new_figure(4.2 * len(rows) + 1.0, 6.4)
    grid = fig.add_gridspec(2, len(rows), height_ratios=(2.2, 1.0))
    for col, (run, tel) in enumerate(rows):
        ax = fig.add_subplot(grid[0, col])
        share = [t["gate"]["fraction_finetuned"] for t in tel]  # epochs x layers
        epochs = [t["epoch"] for t in tel]
        image = ax.imshow(
            list(map(list, zip(*share, strict=True))),
            aspect="auto",
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            origin="lower",
            extent=(epochs[0] - 0.5, epochs[-1] + 0.5, 0.5, len(share[0]) + 0.5),
        )
        ax.set_title(f"{run.path.name} ({run.method}, seed {run.seed})", fontsize=9)
        ax.set_xlabel("epoch")
        if col == 0:
            ax.set_ylabel("gated layer")
        low = fig.add_subplot(grid[1, col])
        low.plot(epochs, [t["gate"]["hamming"] for t in tel], label="diversity (Hamming)")
        changed = [(t["epoch"], t["gate"]["changed"]) for t in tel if t["gate"]["changed"]]
        if changed:
            low.plot(*zip(*changed, strict=True), label="decisions changed")
        low.set_ylim(bottom=0.0)
        low.set_xlabel("epoch")
        low.grid(True, alpha=0.3)
        if col == 0:
            low.legend(fontsize=7, frameon=False)
    fig.colorbar(image, ax=fig.axes[0::2], shrink=0.8, label="fine-tuned share")
    fig.suptitle("What the gate learned, per epoch", fontsize=12)
    return _png_bytes(fig)


def _heatmap_rows(
    names: list[str], frac: list[list[float]]
) -> tuple[list[str], list[list[float]], bool]:
    """Sort classes by mean fraction (descending); keep the top and bottom halves if too many."""
    order = sorted(range(len(frac)), key=lambda i: -statistics.fmean(frac[i]))
    capped = len(order) > _MAX_HEATMAP_ROWS
    if capped:
        half = _MAX_HEATMAP_ROWS // 2
        order = order[:half] + order[-half:]
    return [names[i] for i in order], [frac[i] for i in order], capped


def plot_policy_by_class(runs: Sequence[Run]) -> bytes | None:
    """Heat maps of the fine-tuned fraction per class (rows) and gated layer (columns).

    One panel per run with per-class policy data (at most 4, preferring distinct
    configurations); classes are sorted by mean fraction and capped at 60 rows (the 30 highest
    and 30 lowest), which the title states.

    Args:
        runs: Loaded runs.

    Returns:
        PNG bytes, or ``None`` if no run has per-class policy data.
    """
    import numpy as np

    gated = [r for r in _gated(runs) if r.policy and r.policy["per_class"]]
    if not gated:
        return None
    first_of_config = list({r.config_key: r for r in reversed(gated)}.values())[::-1]
    chosen = first_of_config[:_MAX_HEATMAP_PANELS]
    chosen += [r for r in gated if r not in chosen][: _MAX_HEATMAP_PANELS - len(chosen)]
    panels = []
    for run in chosen:
        assert run.policy is not None
        pc = run.policy["per_class"]
        names, frac, capped = _heatmap_rows(pc["class_names"], pc["fraction"])
        panels.append((run, names, np.asarray(frac, dtype=float), capped, len(pc["fraction"])))
    multi_bb = len({r.backbone for r in gated}) > 1
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    max_rows = max(p[2].shape[0] for p in panels)
    panel_h = max(2.6, 0.16 * max_rows + 1.4)
    fig = _new_figure(6.2 * ncols + 1.2, panel_h * nrows + 1.0)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for idx, (run, names, data, capped, n_classes) in enumerate(panels):
        ax = axes[idx // ncols][idx % ncols]
        image = ax.imshow(
            data,
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
            extent=(0.5, data.shape[1] + 0.5, data.shape[0] - 0.5, -0.5),
        )
        fontsize = 8 if len(names) <= 25 else 7 if len(names) <= 40 else 6
        ax.set_yticks(range(len(names)), labels=[n[:22] for n in names], fontsize=fontsize)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("gated layer index (execution order)")
        if capped:
            ax.axhline(len(names) / 2 - 0.5, color="white", linewidth=2)
        shown = (
            f"{len(names)} of {n_classes} classes: top/bottom {len(names) // 2}"
            if capped
            else f"{n_classes} classes"
        )
        seed = "?" if run.seed is None else run.seed
        bb = f" · {run.backbone}" if multi_bb else ""
        ax.set_title(f"{run.method} · {run.dataset}{bb} · seed {seed}\n({shown})", fontsize=10)
    for idx in range(len(panels), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.colorbar(
        image, ax=axes.ravel().tolist(), label="fraction using fine-tuned filters", shrink=0.6
    )
    title = "Fine-tuned filter usage per class and layer (classes sorted by mean fraction"
    title += f"; at most {_MAX_HEATMAP_ROWS} rows shown)" if any(p[3] for p in panels) else ")"
    if len(gated) > len(chosen):
        title += f"\nshowing {len(chosen)} of {len(gated)} runs"
    fig.suptitle(title, fontsize=12)
    return _png_bytes(fig)


# ---------------------------------------------------------------------------------------- output
def _runs_table(runs: Sequence[Run], out_dir: Path) -> Table:
    rows = []
    for run in sorted(
        runs, key=lambda r: (r.backbone, r.dataset, method_sort_key(r.method), r.seed or 0)
    ):
        try:
            where = os.path.relpath(run.path, out_dir)
        except ValueError:  # different drive on Windows
            where = str(run.path)
        final, best = run.final_acc, run.best_acc
        rows.append(
            [
                where,
                run.method,
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


_CAPTIONS = {
    "accuracy.png": "Test accuracy per epoch (colour: method, line style: seed).",
    "policy.png": "Fraction of evaluation images that use the fine-tuned filters, per gated layer.",
    "policy_by_class.png": "Fraction of evaluation images using fine-tuned filters, per class "
    "(rows, sorted by mean fraction) and gated layer (columns).",
    "gate.png": "What the gate learned over training (probe batch of training images): per run, "
    "the fine-tuned share per gated layer and epoch (heat map), and the per-example diversity "
    "(mean pairwise Hamming distance of policies) and the share of decisions that changed since "
    "the previous epoch.",
}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;background:#fff}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafa}
p.note{font-size:13px;color:#555;margin:.2em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555}
"""


def make_report(
    run_dirs: list[str | Path], out_dir: str | Path, *, title: str = "AdaFilter report"
) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and figures summarising training runs.

    Args:
        run_dirs: Run directories (``--out`` of ``adafilter train``) or parent folders of them.
        out_dir: Where to write the report (created if needed).
        title: Report heading.

    Returns:
        ``{"report_md": Path, "report_html": Path, "figures": [Path, ...], "table": str}``
        where ``table`` is the Markdown accuracy table(s).

    Raises:
        AdaFilterError: If a path is not a run directory or a ``summary.json`` is unreadable.
    """
    runs = [load_run(p) for p in expand_run_dirs(run_dirs)]
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdaFilterError(f"cannot create report folder {out}: {e.strerror}") from None

    acc_tables = accuracy_tables(runs)
    detail = details_table(runs)
    runs_tab = _runs_table(runs, out)
    table_md = "\n\n".join(t.to_markdown() for t in acc_tables)

    pngs: dict[str, bytes] = {}
    for name, plot in zip(
        _FIGURE_NAMES,
        (plot_accuracy, plot_policy, plot_policy_by_class, plot_gate_telemetry),
        strict=True,
    ):
        data = plot(runs)
        if data is not None:
            pngs[name] = data
    figures: list[Path] = []
    for name in _FIGURE_NAMES:
        path = out / name
        if name in pngs:
            atomic_write_bytes(path, pngs[name])
            figures.append(path)
        else:
            path.unlink(missing_ok=True)  # a stale figure from an earlier report would mislead

    n_partial = sum(not r.completed for r in runs)
    intro = f"{len(runs)} run(s)" + (f", {n_partial} partial" if n_partial else "") + "."
    missing = [n for n in _FIGURE_NAMES if n not in pngs]
    missing_note = "Not drawn (no data in the runs): " + ", ".join(missing) + "." if missing else ""

    md = [f"# {title}", "", intro, "", "## Results", "", table_md, "", detail.to_markdown(), ""]
    md += ["## Figures", ""]
    for name in pngs:
        md += [f"![{name[:-4]}]({name})", "", f"*{_CAPTIONS[name]}*", ""]
    if missing_note:
        md += [missing_note, ""]
    md += ["## Runs", "", runs_tab.to_markdown(), ""]
    md_path = out / "report.md"
    atomic_write_bytes(md_path, "\n".join(md).encode("utf-8"))

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", f"<p>{esc(intro)}</p>", "<h2>Results</h2>"]
    body += [t.to_html() for t in acc_tables] + [detail.to_html(), "<h2>Figures</h2>"]
    for name, data in pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        body.append(
            f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{esc(_CAPTIONS[name])}</figcaption></figure>"
        )
    if missing_note:
        body.append(f'<p class="note">{esc(missing_note)}</p>')
    body += ["<h2>Runs</h2>", runs_tab.to_html()]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    html_path = out / "report.html"
    atomic_write_bytes(html_path, page.encode("utf-8"))
    return {"report_md": md_path, "report_html": html_path, "figures": figures, "table": table_md}
