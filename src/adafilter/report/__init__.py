"""Build a Markdown + self-contained HTML report (tables and figures) from training run folders.

The report reads run directories only (``summary.json``, ``metrics.jsonl``, ``policy.json`` as
written by ``adafilter train --out DIR``); it never imports torch or model code, so it runs on a
laptop without a GPU. Figures are drawn with :class:`matplotlib.figure.Figure` on an Agg canvas,
which leaves the user's pyplot backend untouched.

Outputs in ``out_dir``: ``report.md``, ``report.html``, ``accuracy.png`` (test accuracy per epoch,
paper Fig. 3), ``policy.png`` (fraction of images using fine-tuned filters per layer, paper Fig. 4)
and ``policy_by_class.png`` (the same fraction per class and layer as heat maps).

Layout: ``runs`` (reading run directories), ``tables``, ``figures``, ``render`` (the files).
"""

from .figures import plot_accuracy, plot_gate_telemetry, plot_policy, plot_policy_by_class
from .render import make_report
from .runs import Run, assign_arms, expand_run_dirs, load_run
from .tables import (
    METHOD_ORDER,
    Table,
    accuracy_tables,
    details_table,
    format_cell,
    format_table,
    method_sort_key,
)

__all__ = [
    "METHOD_ORDER",
    "Run",
    "Table",
    "accuracy_tables",
    "assign_arms",
    "details_table",
    "expand_run_dirs",
    "format_cell",
    "format_table",
    "load_run",
    "make_report",
    "method_sort_key",
    "plot_accuracy",
    "plot_gate_telemetry",
    "plot_policy",
    "plot_policy_by_class",
]
