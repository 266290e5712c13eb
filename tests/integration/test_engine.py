"""Engine: schedule, every method end to end, files, checkpoints, kill -9 + resume, eval.

Runs use the ``tiny`` fixture (``conftest.py``): the ``tiny-cnn`` backbone on a generated
16 px ImageFolder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adafilter.checkpoint import get_rng_state, load_checkpoint, set_rng_state
from adafilter.cli import build_parser, main, train_config_from_args
from adafilter.data import UnreadableImageWarning
from adafilter.methods import METHODS
from adafilter.training.optim import build_scheduler, group_lr
from helpers import make_imagefolder, read_jsonl, train_args

# ---- schedule -------------------------------------------------------------------------------


def test_schedule_decays_at_every_milestone_for_both_groups() -> None:
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [
            {"name": "network", "params": [w1], "lr": 0.01},
            {"name": "gate", "params": [w2], "lr": 0.1},
        ],
        lr=0.01,
        momentum=0.9,
    )
    sched = build_scheduler(opt, milestones=[30, 60, 90], gamma=0.1)
    seen = {}
    for epoch in range(1, 111):
        seen[epoch] = (group_lr(opt, "network"), group_lr(opt, "gate"))
        opt.step()
        sched.step()
    for epoch, factor in (
        (1, 1.0),
        (30, 1.0),
        (31, 0.1),
        (60, 0.1),
        (61, 0.01),
        (90, 0.01),
        (91, 0.001),
        (110, 0.001),
    ):
        assert seen[epoch][0] == pytest.approx(0.01 * factor, rel=1e-9), epoch
        assert seen[epoch][1] == pytest.approx(0.1 * factor, rel=1e-9), epoch
    changes = [e for e in range(2, 111) if seen[e] != seen[e - 1]]
    assert changes == [31, 61, 91]  # every decay happens, and only there


def test_recorded_lrs_follow_milestones(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        train_args(
            tiny["data"], out, "adafilter", "--epochs", "3", "--milestones", "1,2", "--quiet"
        )
    )
    assert rc == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.001, 0.0001])
    assert [r["gate_lr"] for r in rows] == pytest.approx([0.01, 0.001, 0.0001])  # default 0.01


# ---- every method end to end ----------------------------------------------------------------

METRIC_KEYS = {
    "epoch",
    "lr",
    "gate_lr",
    "train_loss",
    "train_acc",
    "steps",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "seconds",
    "images_per_second",
}
GATE_KEYS = {
    "gate_grad_norm",
    "net_grad_norm",
    "grad_norm_ratio",
    "fraction_finetuned",
    "logit_mean",
    "logit_std",
    "changed",
    "fraction_std",
    "hamming",
}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_and_writes_all_files(tiny: dict, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    assert main(train_args(tiny["data"], out, method, "--epochs", "1", "--quiet")) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    telemetry = METHODS.get(method).trains_gate
    keys = METRIC_KEYS | ({"gate"} if telemetry else set())
    assert len(rows) == 1 and set(rows[0]) == keys and rows[0]["epoch"] == 1
    if telemetry:  # gate telemetry: every key, one value per gated layer where per layer
        gate = rows[0]["gate"]
        assert set(gate) == GATE_KEYS and gate["gate_grad_norm"] > 0
        assert len(gate["fraction_finetuned"]) == len(gate["logit_std"]) > 0
    s = json.loads((out / "summary.json").read_text())
    assert s["completed"] is True and s["method"] == method and s["epochs"] == 1
    assert s["final_test_acc"] == rows[0]["test_acc"]
    assert s["config"]["method"] == method
    assert {"total", "trainable", "trainable_per_example"} <= set(s["params"])
    assert json.loads((out / "config.json").read_text())["method"] == method
    has_policy = METHODS.get(method).has_policies
    assert (out / "policy.json").exists() == has_policy
    if has_policy:
        pol = json.loads((out / "policy.json").read_text())
        assert pol["layers"] == ["conv1", "conv2", "conv3"]
        assert pol["out_channels"] == [8, 8, 16]
        assert all(0.0 <= f <= 1.0 for f in pol["overall"])
        assert pol["per_class"]["class_names"] == ["cat", "dog"]
        assert len(pol["per_class"]["fraction"]) == 2
        assert 0 < s["params"]["trainable_per_example"] <= s["params"]["trainable"]
    else:
        assert s["params"]["trainable_per_example"] is None
    assert (rows[0]["gate_lr"] is not None) == METHODS.get(method).trains_gate
    # The checkpoint is weights-only loadable (no pickled code) and complete.
    raw = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert raw["epoch"] == 1 and {
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "config",
        "metrics",
    } <= set(raw)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_finetune_half_summary_documents_frozen_layers(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "half"
    assert main(train_args(tiny["data"], out, "finetune-half", "--epochs", "1", "--quiet")) == 0
    info = json.loads((out / "summary.json").read_text())["method_info"]["finetune_half"]
    assert info["num_convs"] == 3
    assert info["frozen_convs"] == ["conv1"] and info["frozen_bns"] == ["bn1"]


# ---- resume and eval ------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adafilter", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


STABLE = ("epoch", "lr", "gate_lr", "train_loss", "train_acc", "test_loss", "test_acc")
# `fit` with an on_step callback that SIGKILLs the process: a faithful `kill -9` mid-epoch.
KILL_SCRIPT = """
import os, signal, sys

import adafilter_tiny_plugin  # noqa: F401  (registers tiny-cnn)
from adafilter.cli import build_parser, train_config_from_args
from adafilter.training.fit import fit

at = tuple(int(v) for v in sys.argv[1].split(":"))


def kill(epoch, step):
    if (epoch, step) == at:
        os.kill(os.getpid(), signal.SIGKILL)


fit(train_config_from_args(build_parser().parse_args(sys.argv[2:])), on_step=kill)
"""


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_matches_uninterrupted(tiny: dict, tmp_path: Path) -> None:
    env = tiny["env"]
    extra = ("--epochs", "3", "--milestones", "2", "--quiet")
    full = tmp_path / "full"
    assert _run(train_args(tiny["data"], full, "adafilter", *extra), env).returncode == 0

    cut = tmp_path / "cut"
    script = tmp_path / "kill_at.py"
    script.write_text(KILL_SCRIPT)
    killed = subprocess.run(  # SIGKILL after step 1 of epoch 2 (of 2)
        [sys.executable, str(script), "2:1", *train_args(tiny["data"], cut, "adafilter", *extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 1
    assert json.loads((cut / "summary.json").read_text())["completed"] is False

    resumed = _run(train_args(tiny["data"], cut, "adafilter", *extra, "--resume"), env)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [[r[k] for k in STABLE] for r in a] == [[r[k] for k in STABLE] for r in b]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert sb["completed"] is True and sb["final_test_acc"] == sa["final_test_acc"]
    assert json.loads((full / "policy.json").read_text()) == json.loads(
        (cut / "policy.json").read_text()
    )
    fa = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    fb = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)

    ev = _run(["eval", "--checkpoint", str(cut / "checkpoint.pt"), "--device", "cpu"], env)
    assert ev.returncode == 0, ev.stderr
    lines = ev.stdout.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["test_acc"] == b[-1]["test_acc"]


@pytest.mark.parametrize("method", ["adafilter", "finetune"])
def test_training_builds_the_cpu_code_first_and_nothing_beside_it(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A CPU run of a gated method compiles the CPU code in the foreground before training
    where it is missing (its gated BN passes speed training up; fine-tuning needs none), and
    nothing else builds it (nor does a lookup afterwards). Every CPU ``adafilter train`` run
    (any method) keeps freed memory in the process for reuse first (glibc's thresholds,
    ``utils/allocator.py``; set by the CLI, not by ``fit``)."""
    from adafilter.cli import train as cli_train
    from adafilter.layers import cpu_gate

    built: list[int] = []
    kept: list[int] = []
    monkeypatch.setattr(cli_train, "keep_freed_memory", lambda **kw: kept.append(1) or True)
    monkeypatch.setenv("ADAFILTER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cpu_gate, "_module", None)
    monkeypatch.setattr(cpu_gate, "_looked", False)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    monkeypatch.setattr(cpu_gate, "AUTO_BUILD", True)
    monkeypatch.setattr(cpu_gate, "find_compiler", lambda: "/bin/c++")
    monkeypatch.setattr(cpu_gate, "find_ninja", lambda: Path("/bin/ninja"))
    monkeypatch.setattr(cpu_gate, "build", lambda **kw: built.append(1))  # builds nothing
    out = tmp_path / "run"
    assert main(train_args(tiny["data"], out, method, "--epochs", "1", "--quiet")) == 0
    assert built == ([1] if method == "adafilter" else []) and kept == [1]
    monkeypatch.setattr(cpu_gate, "_looked", False)
    assert cpu_gate.get() is None and built == ([1] if method == "adafilter" else [])


@pytest.mark.parametrize("method", ["random-policy", "l2sp"])
def test_eval_reproduces_recorded_accuracy(
    tiny: dict, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / method
    assert main(train_args(tiny["data"], out, method, "--epochs", "1", "--quiet")) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--device",
                "cpu",
                "--data-root",
                str(tiny["data"]),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip())
    assert res["test_acc"] == read_jsonl(out / "metrics.jsonl")[-1]["test_acc"]
    assert res["images"] == 4


def test_resume_of_finished_run_is_a_noop(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "done"
    args = train_args(tiny["data"], out, "adafilter", "--epochs", "1", "--quiet")
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main([*args, "--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == before
    s = json.loads((out / "summary.json").read_text())
    assert s["completed"] and s["params"]["trainable_per_example"] is not None


# ---- configuration and checkpoint helpers ---------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_flags_override(tmp_path: Path, suffix: str) -> None:

    f = tmp_path / f"cfg{suffix}"
    if suffix == ".toml":
        f.write_text(
            'method = "l2sp"\ndataset = "imagefolder"\nout = "o"\nepochs = 7\n'
            "milestones = [2, 4]\nlr = 0.5\n[adafilter]\nembed_dim = 8\n"
        )
    else:
        f.write_text(
            "method: l2sp\ndataset: imagefolder\nout: o\nepochs: 7\n"
            "milestones: [2, 4]\nlr: 0.5\nadafilter: {embed_dim: 8}\n"
        )
    args = build_parser().parse_args(["train", "--config", str(f), "--epochs", "9"])
    cfg = train_config_from_args(args)
    assert (cfg.method, cfg.epochs, cfg.lr, cfg.milestones) == ("l2sp", 9, 0.5, [2, 4])
    assert cfg.adafilter == {"embed_dim": 8} and cfg.gate_lr == 0.01  # untouched default


def test_preset_and_gate_flags() -> None:
    """--preset paper < --config < flags; gate flags land in the AdaFilter options."""
    args = build_parser().parse_args(["train", "--preset", "paper", "--dataset", "d", "--out", "o"])
    cfg = train_config_from_args(args)
    assert (cfg.gate_optimizer, cfg.gate_lr, cfg.precise_bn) == ("sgd", 0.1, 0)
    assert cfg.adafilter["gate_bias_init"] == 0.0 and cfg.adafilter["policy_cost"] == 0.0
    args = build_parser().parse_args(
        ["train", "--preset", "paper", "--dataset", "d", "--out", "o", "--gate-lr", "0.3"]
        + ["--gate-bias-init", "2", "--gate-ste", "sigmoid", "--policy-cost", "0.05"]
        + ["--gate-optimizer", "adam", "--precise-bn", "4", "--val-fraction", "0.1"]
    )
    cfg = train_config_from_args(args)
    assert (cfg.gate_optimizer, cfg.gate_lr, cfg.precise_bn, cfg.val_fraction) == (
        "adam",
        0.3,
        4,
        0.1,
    )
    assert cfg.adafilter == {
        "gate_bias_init": 2.0,
        "ste": "sigmoid",
        "gate_noise": 0.0,
        "policy_cost": 0.05,
    }
    default = train_config_from_args(
        build_parser().parse_args(["train", "--dataset", "d", "--out", "o"])
    )
    assert (default.gate_optimizer, default.gate_lr, default.precise_bn) == ("adam", 0.01, 16)


def test_rng_state_round_trip_is_weights_only(tmp_path: Path) -> None:
    import random

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_amp_is_a_warned_noop_on_cpu(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "amp"
    argv = train_args(tiny["data"], out, "adafilter", "--epochs", "1", "--amp", "fp16")
    assert main([*argv, "--quiet"]) == 0
    assert "--amp fp16 ignored on cpu" in capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["completed"] and s["config"]["amp"] == "fp16"


def test_cuda_graphs_are_a_warned_noop_on_cpu(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = train_args(tiny["data"], tmp_path / "g", "adafilter", "--epochs", "1", "--cuda-graphs")
    assert main([*argv, "--quiet"]) == 0
    assert "--cuda-graphs ignored on cpu" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["finetune", "adafilter", "standard-bn"])
def test_cuda_graphs_train_like_eager(tiny: dict, tmp_path: Path, method: str) -> None:
    """Replayed CUDA graphs compute the same steps as eager training (batch 3 of 8 images:
    two replayed batches and a short one run eagerly)."""
    rows = {}
    for graphs in (False, True):
        out = tmp_path / f"{method}-{graphs}"
        argv = train_args(tiny["data"], out, method, "--epochs", "2", "--batch-size", "3")
        argv[argv.index("--device") + 1] = "cuda"
        argv += ["--cuda-graphs"] if graphs else []
        assert main([*argv, "--quiet"]) == 0
        rows[graphs] = read_jsonl(out / "metrics.jsonl")
    for eager, graphed in zip(rows[False], rows[True], strict=True):
        assert graphed["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4, abs=1e-5)
        assert graphed["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method", ["finetune", "adafilter"])
def test_channels_last_runs(tiny: dict, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    argv = train_args(tiny["data"], out, method, "--epochs", "1", "--channels-last", "--quiet")
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["channels_last"] is True


def test_unreadable_eval_image_is_dropped_and_counted(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreadable evaluation image is left out (not replaced by another one, which would
    then count twice) and reported: a warning, metrics, summary and `adafilter eval`."""
    data = make_imagefolder(tmp_path / "data")
    (data / "val" / "cat" / "0.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    with pytest.warns(UnreadableImageWarning) as record:
        assert main(train_args(data, out, "finetune", "--epochs", "1", "--quiet")) == 0
    said = [str(w.message) for w in record]
    assert any("dropped from the evaluation" in m for m in said)
    assert any("skipped 1 unreadable image(s)" in m for m in said)  # the epoch's count
    row = read_jsonl(out / "metrics.jsonl")[0]
    assert row["test_dropped"] == 1 and "val_dropped" not in row
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_images_dropped"] == 1 and s["has_policies"] is False
    capsys.readouterr()
    with pytest.warns(UnreadableImageWarning):
        assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["images"] == 3 and res["dropped"] == 1 and res["test_acc"] == row["test_acc"]
