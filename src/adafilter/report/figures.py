"""The report's figures, drawn with :class:`matplotlib.figure.Figure` on an Agg canvas (the
user's pyplot backend is left untouched); each returns PNG bytes or ``None`` (no data)."""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from typing import Any

from .runs import Run, number
from .tables import method_sort_key

__all__ = [
    "FIGURE_NAMES",
    "plot_accuracy",
    "plot_gate_telemetry",
    "plot_policy",
    "plot_policy_by_class",
]

FIGURE_NAMES = ("accuracy.png", "policy.png", "policy_by_class.png", "gate.png")
_MAX_HEATMAP_PANELS = 4
_MAX_HEATMAP_ROWS = 60
_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_DPI = 110


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

    methods = sorted({r.arm for r in runs}, key=method_sort_key)
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _seed_styles(runs: Sequence[Run]) -> dict[int | None, Any]:
    seeds = sorted({r.seed for r in runs}, key=lambda s: (s is None, s or 0))
    return {s: _LINESTYLES[i % len(_LINESTYLES)] for i, s in enumerate(seeds)}


def _curve(run: Run) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i, rec in enumerate(run.metrics):
        acc = number(rec.get("test_acc"))
        if acc is None:
            continue
        epoch = number(rec.get("epoch"))
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
        members.sort(key=lambda c: (method_sort_key(c[0].arm), c[0].seed or 0))
        for run, xs, ys in members:
            ax.plot(
                xs,
                ys,
                color=colours[run.arm],
                linestyle=styles[run.seed],
                linewidth=1.6,
                marker="o" if len(xs) == 1 else None,
                markersize=4,
            )
            if not run.completed:
                any_partial = True
                ax.plot(xs[-1], ys[-1], marker="x", color=colours[run.arm], markersize=8, mew=2)
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
    out.sort(key=lambda r: (r.backbone, r.dataset, method_sort_key(r.arm), r.seed or 0))
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
        name = f"{run.arm} · {run.dataset}" + (f" · {run.backbone}" if multi_bb else "")
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
        ax.set_title(f"{run.path.name} ({run.arm}, seed {run.seed})", fontsize=9)
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
        ax.set_title(f"{run.arm} · {run.dataset}{bb} · seed {seed}\n({shown})", fontsize=10)
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
