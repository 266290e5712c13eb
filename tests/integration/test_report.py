"""Tests for :mod:`adafilter.report` on fake run directories (no torch needed)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread

from adafilter.errors import AdaFilterError
from adafilter.report import (
    accuracy_tables,
    assign_arms,
    format_cell,
    format_table,
    load_run,
    make_report,
)

DATASETS = ("aircraft", "dogs")
# Final test accuracy per (method, dataset) for seeds 0, 1, 2.
FINAL: dict[tuple[str, str], list[float]] = {
    ("finetune", "dogs"): [80.0, 82.0, 84.0],
    ("finetune", "aircraft"): [70.0, 71.0, 75.0],
    ("l2sp", "dogs"): [81.0, 82.0, 83.0],
    ("l2sp", "aircraft"): [73.5, 73.5, 73.5],
    ("adafilter", "dogs"): [85.0, 86.0, 87.5],
    ("adafilter", "aircraft"): [76.0, 77.0, 78.0],
}
N_CLASSES = {"dogs": 10, "aircraft": 70}  # aircraft exceeds the 60-row heat-map cap
N_LAYERS = 16


def _policy(dataset: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 10 * len(dataset))
    depth = np.linspace(0.0, 1.0, N_LAYERS)
    overall = np.clip(0.25 + 0.55 * depth + 0.05 * seed + rng.normal(0, 0.03, N_LAYERS), 0, 1)
    n = N_CLASSES[dataset]
    per_class = np.clip(overall[None, :] + rng.normal(0, 0.15, (n, N_LAYERS)), 0, 1)
    return {
        "layers": [f"layer{1 + i // 4}.{i % 4}.conv{1 + i % 2}" for i in range(N_LAYERS)],
        "out_channels": [64 * 2 ** (i // 4) for i in range(N_LAYERS)],
        "overall": overall.round(4).tolist(),
        "per_class": {
            "class_names": [f"{dataset}_class_{c:03d}" for c in range(n)],
            "fraction": per_class.round(4).tolist(),
        },
    }


def _write_run(
    root: Path,
    method: str,
    dataset: str,
    seed: int,
    final: float,
    *,
    backbone: str = "resnet50",
    epochs: int = 5,
    completed: bool = True,
    policy: bool = False,
    has_policies: bool | None = None,
) -> Path:
    run = root / dataset / f"{method}-{backbone}-s{seed}"
    run.mkdir(parents=True)
    done = epochs if completed else epochs - 2
    accs = [final - 3.0 * (done - e) ** 1.2 for e in range(1, done + 1)]
    summary = {
        "method": method,
        "dataset": dataset,
        "backbone": backbone,
        "seed": seed,
        "final_test_acc": final,
        "best_test_acc": max(accs) + 0.5,
        "epochs": epochs,
        "params": {"total": 23_528_522, "trainable": 23_528_522, "trainable_per_example": None},
        "wall_time_s": 100.0 + seed,
        "images_per_second": 250.0,
        "config": {"lr": 0.01},
        "completed": completed,
        "has_policies": policy if has_policies is None else has_policies,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    n_layers = len(_policy(dataset, seed)["overall"])

    def gate(e: int) -> dict[str, Any]:  # telemetry of a gate whose layers drift apart
        share = [min(1.0, 0.5 + 0.05 * e * (i % 3)) for i in range(n_layers)]
        return {
            "gate_grad_norm": 0.5,
            "net_grad_norm": 5.0,
            "grad_norm_ratio": 0.1,
            "fraction_finetuned": share,
            "logit_mean": [0.0] * n_layers,
            "logit_std": [0.1] * n_layers,
            "changed": None if e == 1 else 0.1 / e,
            "fraction_std": 0.05,
            "hamming": 0.02 * e,
        }

    lines = [
        json.dumps(
            {
                "epoch": e,
                "lr": 0.01,
                "gate_lr": None,
                "train_loss": 1.0 / e,
                "train_acc": acc,
                "test_loss": 1.2 / e,
                "test_acc": acc,
                "seconds": 20.0,
                "images_per_second": 250.0,
                **({"gate": gate(e)} if policy else {}),
            }
        )
        for e, acc in enumerate(accs, start=1)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if policy:
        (run / "policy.json").write_text(json.dumps(_policy(dataset, seed)))
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rep")
    runs = root / "runs"
    for (method, dataset), finals in FINAL.items():
        for seed, final in enumerate(finals):
            # adafilter aircraft seed 2 lacks policy.json
            gated = method == "adafilter" and not (dataset == "aircraft" and seed == 2)
            _write_run(
                runs, method, dataset, seed, final, policy=gated, has_policies=method == "adafilter"
            )
    _write_run(runs, "cnn-gate", "dogs", 0, 60.25, completed=False, policy=True)
    _write_run(runs, "zeta-custom", "dogs", 0, 50.0)
    _write_run(runs, "beta-custom", "dogs", 0, 55.556)
    out = root / "out"
    result = make_report([runs], out, title="Test report")
    return {"result": result, "out": out, "runs": runs}


def _table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_table_numbers_and_order(report: dict[str, Any]) -> None:
    table = report["result"]["table"]
    assert "| Method | aircraft | dogs |" in table
    rows = _table_rows(table)
    assert list(rows) == [
        "finetune",
        "l2sp",
        "adafilter",
        "cnn-gate",
        "beta-custom",
        "zeta-custom",
    ]
    # Hand-computed mean ± sample std.
    assert rows["finetune"] == ["72.00 ± 2.65% (n=3)", "82.00 ± 2.00% (n=3)"]
    assert rows["l2sp"] == ["73.50 ± 0.00% (n=3)", "82.00 ± 1.00% (n=3)"]
    assert rows["adafilter"] == ["**77.00 ± 1.00% (n=3)**", "**86.17 ± 1.26% (n=3)**"]
    assert rows["cnn-gate"] == ["—", "60.25%*"]
    assert rows["beta-custom"] == ["—", "55.56%"]
    assert "partial run" in table


def test_files_and_markdown(report: dict[str, Any]) -> None:
    result, out = report["result"], report["out"]
    assert Path(result["report_md"]) == out / "report.md"
    assert Path(result["report_html"]) == out / "report.html"
    assert [Path(p).name for p in result["figures"]] == [
        "accuracy.png",
        "policy.png",
        "policy_by_class.png",
        "gate.png",
    ]
    for path in [result["report_md"], result["report_html"], *result["figures"]]:
        assert Path(path).is_file() and Path(path).stat().st_size > 1000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    md = Path(result["report_md"]).read_text()
    assert result["table"] in md
    assert "![accuracy](accuracy.png)" in md and "(policy_by_class.png)" in md
    assert "Run configurations" in md and "23,528,522" in md
    assert "no policy.json" in md  # adafilter aircraft seed 2
    assert "no (partial)" in md
    assert "21 run(s), 1 partial." in md


def _colour_counts(img: np.ndarray) -> dict[tuple[int, ...], int]:
    rgb = (img[..., :3] * 255).round().astype(np.int32).reshape(-1, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    keys, counts = np.unique(packed, return_counts=True)
    return {
        (int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255): int(c)
        for k, c in zip(keys, counts, strict=True)
    }


def _has_colour(counts: dict[tuple[int, ...], int], rgb: tuple[float, ...], min_px: int) -> bool:
    target = np.array(rgb[:3]) * 255
    near = sum(c for k, c in counts.items() if np.abs(np.array(k) - target).max() <= 6)
    return near >= min_px


@pytest.mark.parametrize(
    ("name", "min_colours"),
    [("accuracy.png", 6), ("policy.png", 5), ("policy_by_class.png", 30), ("gate.png", 20)],
)
def test_figures_not_blank(report: dict[str, Any], name: str, min_colours: int) -> None:
    img = imread(report["out"] / name)
    h, w = img.shape[:2]
    assert 400 <= h <= 4000 and 600 <= w <= 4000
    assert img[..., :3].std() > 0.05
    counts = _colour_counts(img)
    frequent = [k for k, c in counts.items() if c >= 40]
    assert len(frequent) >= min_colours


def test_accuracy_figure_has_method_colours(report: dict[str, Any]) -> None:
    counts = _colour_counts(imread(report["out"] / "accuracy.png"))
    tab10 = colormaps["tab10"]
    # Five methods in table order -> first five tab10 colours, each drawn as lines.
    for i in range(5):
        assert _has_colour(counts, tab10(i), min_px=30), f"method colour {i} missing"


def test_html_self_contained(report: dict[str, Any]) -> None:
    result = report["result"]
    page = Path(result["report_html"]).read_text(encoding="utf-8")
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(blobs) == 4  # accuracy, policy, policy by class, gate telemetry
    for blob, fig in zip(blobs, result["figures"], strict=True):
        assert base64.b64decode(blob) == Path(fig).read_bytes()
    assert "<table>" in page and "<th>Method</th>" in page
    assert "<strong>86.17 ± 1.26% (n=3)</strong>" in page
    assert '<td class="num">60.25%*</td>' in page
    assert "http://" not in page and "https://" not in page and "href=" not in page


def test_not_a_run_dir(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(AdaFilterError) as info:
        make_report([tmp_path / "empty"], tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg
    assert "is not a run directory (no summary.json)" in msg and "adafilter train" in msg
    with pytest.raises(AdaFilterError, match="does not exist"):
        make_report([tmp_path / "nope"], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(AdaFilterError, match="not valid JSON") as info:
        load_run(bad)
    assert "\n" not in str(info.value)


def test_minimal_runs_and_stale_figures(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"method": "finetune", "dataset": "dogs"}))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 40.0}\n{"epoch": 2, "te')
    (run / "policy.json").write_text('{"overall": "garbage"}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "policy.png").write_bytes(b"stale")
    result = make_report([run / "summary.json"], out)
    # final accuracy falls back to the last readable epoch; bad policy and bad line are noted
    assert _table_rows(result["table"])["finetune"] == ["40.00%"]
    md = Path(result["report_md"]).read_text()
    assert "skipped 1 unreadable line(s)" in md and "policy.json skipped" in md
    assert [Path(p).name for p in result["figures"]] == ["accuracy.png"]
    assert not (out / "policy.png").exists()


def test_backbones_get_separate_tables(tmp_path: Path) -> None:
    runs = [
        _write_run(tmp_path, "finetune", "dogs", 0, 80.0, backbone="resnet50"),
        _write_run(tmp_path, "finetune", "dogs", 0, 70.0, backbone="mobilenet_v2"),
    ]
    loaded = [load_run(r) for r in runs]
    tables = accuracy_tables(loaded)
    assert [t.title for t in tables] == [
        "Final test accuracy — backbone mobilenet_v2",
        "Final test accuracy — backbone resnet50",
    ]
    assert "80.00%" in format_table(loaded) and "70.00%" in format_table(loaded)


def test_format_cell() -> None:
    assert format_cell([]) == "—"
    assert format_cell([85.254]) == "85.25%"
    assert format_cell([1.0, 2.0, 3.0], partial=True) == "2.00 ± 1.00% (n=3)*"


def test_html_renders_in_chromium(report: dict[str, Any], tmp_path: Path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium / chromium-browser not on PATH")
    shot = tmp_path / "shot.png"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        Path(report["result"]["report_html"]).resolve().as_uri(),
    ]
    # chromium is there: a crash or a hang is a failure (the report may be what breaks it)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not render the report within 90 s")
    assert shot.is_file(), f"no screenshot (rc={proc.returncode}): {proc.stderr[-300:]}"
    img = imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert img[..., :3].std() > 0.05
    # The embedded figures render: many distinct colours (text alone is near-greyscale).
    counts = _colour_counts(img)
    assert len([k for k, c in counts.items() if c >= 20]) >= 20


def test_runs_with_policies_come_from_the_summary(tmp_path: Path) -> None:
    """``has_policies`` in summary.json, else (older runs) a policy mode in the method info;
    never a list of method names."""
    new = _write_run(tmp_path, "my-gated", "dogs", 0, 50.0, has_policies=True)
    plain = _write_run(tmp_path, "adafilter", "dogs", 1, 50.0, has_policies=False)
    old = _write_run(tmp_path, "custom", "dogs", 2, 50.0)
    summary = json.loads((old / "summary.json").read_text())
    del summary["has_policies"]
    summary["method_info"] = {"policy_mode": "learned"}
    (old / "summary.json").write_text(json.dumps(summary))
    assert load_run(new).has_policies and "no policy.json" in "; ".join(load_run(new).notes)
    assert not load_run(plain).has_policies and not load_run(plain).notes
    assert load_run(old).has_policies and "no policy.json" in "; ".join(load_run(old).notes)


def _arm_run(root: Path, name: str, seed: int, acc: float, **config: Any) -> Path:
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    gate = {"gate_bias_init": 0.0, "ste": "identity"}
    gate.update(config.pop("resolved", {}))
    summary = {
        "method": "adafilter",
        "dataset": "dogs",
        "backbone": "lite0",
        "seed": seed,
        "final_test_acc": acc,
        "method_info": {"adafilter": gate, "policy_mode": "learned"},
        # bookkeeping (out, seed, eval_every) differs between seeds and is no setting
        "config": {"lr": 0.01, "gate_lr": 0.01, "out": str(run), "seed": seed, "eval_every": 1}
        | config,
        "completed": True,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_runs_trained_differently_are_separate_arms_not_seeds(tmp_path: Path) -> None:
    runs = [
        _arm_run(tmp_path, "default", 0, 60.0),
        _arm_run(tmp_path, "default", 1, 62.0, eval_every=5, adafilter={}),
        # the paper preset: another gate lr, and an override equal to the resolved default
        _arm_run(tmp_path, "paper", 0, 70.0, gate_lr=0.1, adafilter={"gate_bias_init": 0.0}),
        _arm_run(tmp_path, "b2", 0, 50.0, resolved={"gate_bias_init": 2.0}),
    ]
    loaded = [load_run(r) for r in runs]
    assign_arms(loaded)
    assert [r.arm for r in loaded] == [
        "adafilter (gate_bias_init=0.0, gate_lr=0.01)",
        "adafilter (gate_bias_init=0.0, gate_lr=0.01)",
        "adafilter (gate_bias_init=0.0, gate_lr=0.1)",
        "adafilter (gate_bias_init=2.0, gate_lr=0.01)",
    ]
    [table] = accuracy_tables(loaded)
    cells = {row[0]: row[1] for row in table.rows}
    assert cells["adafilter (gate_bias_init=0.0, gate_lr=0.01)"] == "61.00 ± 1.41% (n=2)"
    assert cells["adafilter (gate_bias_init=0.0, gate_lr=0.1)"] == "**70.00%**"
    assert len(cells) == 3
    # the same runs of one arm only keep the bare method name
    alone = [load_run(r) for r in runs[:2]]
    assign_arms(alone)
    assert {r.arm for r in alone} == {"adafilter"}
    out = make_report(runs, tmp_path / "report")
    assert "gate_lr=0.1" in out["table"] and "n=2" in out["table"]
