"""Writing the report: ``report.md``, a self-contained ``report.html`` and the figures."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdaFilterError
from ..utils.io import atomic_write_bytes
from .figures import (
    FIGURE_NAMES,
    plot_accuracy,
    plot_gate_telemetry,
    plot_policy,
    plot_policy_by_class,
)
from .runs import assign_arms, expand_run_dirs, load_run
from .tables import Table, accuracy_tables, details_table, runs_table

__all__ = ["make_report"]


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
    assign_arms(runs)  # --preset paper beside the defaults, not averaged with them
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdaFilterError(f"cannot create report folder {out}: {e.strerror}") from None

    acc_tables = accuracy_tables(runs)
    detail = details_table(runs)
    runs_tab = runs_table(runs, out)
    table_md = "\n\n".join(t.to_markdown() for t in acc_tables)

    pngs: dict[str, bytes] = {}
    for name, plot in zip(
        FIGURE_NAMES,
        (plot_accuracy, plot_policy, plot_policy_by_class, plot_gate_telemetry),
        strict=True,
    ):
        data = plot(runs)
        if data is not None:
            pngs[name] = data
    figures: list[Path] = []
    for name in FIGURE_NAMES:
        path = out / name
        if name in pngs:
            atomic_write_bytes(path, pngs[name])
            figures.append(path)
        else:
            path.unlink(missing_ok=True)  # a stale figure from an earlier report would mislead

    n_partial = sum(not r.completed for r in runs)
    parts = _Parts(
        title=title,
        intro=f"{len(runs)} run(s)" + (f", {n_partial} partial" if n_partial else "") + ".",
        accuracy=acc_tables,
        detail=detail,
        runs=runs_tab,
        pngs=pngs,
    )
    md_path = out / "report.md"
    atomic_write_bytes(md_path, _markdown(parts).encode("utf-8"))
    html_path = out / "report.html"
    atomic_write_bytes(html_path, _html(parts).encode("utf-8"))
    return {"report_md": md_path, "report_html": html_path, "figures": figures, "table": table_md}


@dataclass
class _Parts:
    """What both renderings show."""

    title: str
    intro: str
    accuracy: list[Table]
    detail: Table
    runs: Table
    pngs: dict[str, bytes]

    @property
    def missing_note(self) -> str:
        missing = [n for n in FIGURE_NAMES if n not in self.pngs]
        return "Not drawn (no data in the runs): " + ", ".join(missing) + "." if missing else ""


def _markdown(p: _Parts) -> str:
    table_md = "\n\n".join(t.to_markdown() for t in p.accuracy)
    md = [f"# {p.title}", "", p.intro, "", "## Results", "", table_md, ""]
    md += [p.detail.to_markdown(), "", "## Figures", ""]
    for name in p.pngs:
        md += [f"![{name[:-4]}]({name})", "", f"*{_CAPTIONS[name]}*", ""]
    if p.missing_note:
        md += [p.missing_note, ""]
    md += ["## Runs", "", p.runs.to_markdown(), ""]
    return "\n".join(md)


def _html(p: _Parts) -> str:
    """A self-contained page: inline CSS, figures as data URIs."""
    esc = html.escape
    body = [f"<h1>{esc(p.title)}</h1>", f"<p>{esc(p.intro)}</p>", "<h2>Results</h2>"]
    body += [t.to_html() for t in p.accuracy] + [p.detail.to_html(), "<h2>Figures</h2>"]
    for name, data in p.pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        body.append(
            f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{esc(_CAPTIONS[name])}</figcaption></figure>"
        )
    if p.missing_note:
        body.append(f'<p class="note">{esc(p.missing_note)}</p>')
    body += ["<h2>Runs</h2>", p.runs.to_html()]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(p.title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
