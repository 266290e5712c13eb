"""Seeded studies through ``adafilter train``: parallel streams, resumable, one JSON summary.

Each study is a list of runs (group, seed, TrainConfig fields). Runs go to
``benchmarks/results/<study>/<group>-s<seed>``; a completed run is skipped, an interrupted one
resumes from its checkpoint. ``--stream i/n`` runs every n-th run (start n processes with one
thread each for n parallel streams); ``--summary`` (or a full run) writes
``benchmarks/results/<study>.json``: per group the final validation and test accuracy
(mean +- std over seeds), per-seed values, SGD steps per run, per-epoch test accuracy, and for
AdaFilter runs the learned policy (per-layer fraction of fine-tuned filters, gate telemetry).

    python benchmarks/study.py precise-bn --cifar10 /tmp/cifar10-subset --stream 0/2 &
    python benchmarks/study.py precise-bn --cifar10 /tmp/cifar10-subset --stream 1/2 &
    python benchmarks/study.py precise-bn --cifar10 /tmp/cifar10-subset --summary

Data and weights come from the command line (e.g. ``../shared`` extracted), never from the
package's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from paths import relativize_json_file, repo_relative

from adafilter.training.config import PRESETS, TrainConfig
from adafilter.training.fit import fit

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_GATE = dict(PRESETS["paper"]["adafilter"])


def _lite0_cifar(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    base = dict(
        dataset="imagefolder",
        data_root=args.cifar10,
        backbone="efficientnet-lite0",
        weights="pretrained",
        resolution=64,
        batch_size=64,
    )
    return {**base, **extra}


def study_precise_bn(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 13: Lite0 on 400 CIFAR-10 images, 6 epochs (42 steps), stale vs precise BN."""
    runs = []
    for seed in (0, 1, 2):
        for method in ("finetune", "adafilter"):
            for pbn in (0, 16):
                cfg = _lite0_cifar(
                    args,
                    method=method,
                    train_per_class=40,
                    epochs=6,
                    milestones=[100],
                    precise_bn=pbn,
                    seed=seed,
                )
                runs.append((f"{method}-pbn{pbn}", seed, cfg))
    return runs


def study_allf(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 15: fine-tuning vs AdaFilter forced all-F, 60 images/class, 40 epochs, 5 seeds."""
    runs = []
    for seed in range(5):
        for method in ("finetune", "adafilter-all-f"):
            cfg = _lite0_cifar(
                args,
                method=method,
                train_per_class=60,
                epochs=40,
                milestones=[11, 22, 33],
                seed=seed,
                eval_every=10,
            )
            runs.append((method, seed, cfg))
    return runs


NEAR = dict(train_per_class=60, val_fraction=0.2, batch_size=32)  # 480 train images, 15 steps


def study_gate_pilot(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 16: choose the gate's settings on validation data (300 steps, Lite0 -> CIFAR)."""
    sched = dict(epochs=20, milestones=[5, 11, 16], eval_every=5)
    variants = {
        "finetune": dict(method="finetune"),
        "ada-paper": dict(method="adafilter", gate_optimizer="sgd", adafilter=PAPER_GATE),
        "ada-sgd-b3": dict(
            method="adafilter", gate_optimizer="sgd", adafilter={"gate_bias_init": 3.0}
        ),
        "ada-adam": dict(
            method="adafilter",
            gate_optimizer="adam",
            gate_lr=0.01,
            adafilter={"gate_bias_init": 3.0},
        ),
        "ada-adam-b1": dict(
            method="adafilter",
            gate_optimizer="adam",
            gate_lr=0.01,
            adafilter={"gate_bias_init": 1.0},
        ),
        "ada-adam-b0": dict(
            method="adafilter",
            gate_optimizer="adam",
            gate_lr=0.01,
            adafilter={"gate_bias_init": 0.0},
        ),
        "ada-adam-cost": dict(
            method="adafilter",
            gate_optimizer="adam",
            gate_lr=0.01,
            adafilter={"gate_bias_init": 3.0, "policy_cost": 0.1},
        ),
    }
    return [
        (name, 0, _lite0_cifar(args, **NEAR, **sched, **v, seed=0)) for name, v in variants.items()
    ]


def study_near(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 16: near-domain, Lite0 -> CIFAR-10 subset, 70 epochs x 15 steps = 1,050 steps."""
    sched = dict(epochs=70, milestones=[19, 38, 57], eval_every=5)
    runs = []
    for seed in (0, 1, 2):
        for name, v in (
            ("finetune", {"method": "finetune"}),
            ("adafilter", {"method": "adafilter"}),
        ):
            runs.append((name, seed, _lite0_cifar(args, **NEAR, **sched, **v, seed=seed)))
    paper = dict(
        method="adafilter", gate_optimizer="sgd", gate_lr=0.1, precise_bn=16, adafilter=PAPER_GATE
    )
    runs.append(("adafilter-paper", 0, _lite0_cifar(args, **NEAR, **sched, **paper, seed=0)))
    runs.append(
        ("random-policy", 0, _lite0_cifar(args, **NEAR, **sched, method="random-policy", seed=0))
    )
    # Head bias 1 (the policy starts ~0.73 F): the alternative to the default bias 0 (README).
    for seed in (0, 1, 2):
        gate = {"gate_bias_init": 1.0}
        cfg = _lite0_cifar(args, **NEAR, **sched, method="adafilter", adafilter=gate, seed=seed)
        runs.append(("adafilter-b1", seed, cfg))
    # The paper's other baselines and ablations, one seed each (issue 16, item 6).
    for method in ("l2sp", "standard-bn", "cnn-gate", "finetune-half"):
        runs.append((method, 0, _lite0_cifar(args, **NEAR, **sched, method=method, seed=0)))
    return runs


def study_near_pad(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """The near-domain pair (and four one-seed baselines) with ``augment="pad-crop"``: at
    64 px from 32 px CIFAR images RandomResizedCrop keeps as little as 8% of an image; pad-crop
    keeps all of it."""
    keep = ("finetune", "adafilter", "l2sp", "finetune-half", "standard-bn", "random-policy")
    return _pad_crop([r for r in study_near(args) if r[0] in keep])


def study_near_issue28(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 28: seed 0 of the near-domain AdaFilter run again after the precise-BN fix
    (Lite0 at 64 px has 2x2 maps, where branches are degenerate and precise BN now runs
    several passes), to compare with the recorded ``near/adafilter-s0``."""
    return [r for r in study_near(args) if r[0] == "adafilter" and r[1] == 0]


def study_far(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 16: far-domain, CIFAR ResNet-20 -> omniglot-small, 32 px, 40 epochs (1,040 steps)."""
    runs = []
    for seed in (0, 1, 2):
        for method in ("finetune", "adafilter"):
            cfg = dict(
                method=method,
                dataset="omniglot-small",
                data_root=args.omniglot,
                backbone="cifar-resnet20",
                weights=args.cifar_weights,
                resolution=32,
                batch_size=64,
                epochs=40,
                milestones=[11, 22, 33],
                eval_every=5,
                val_fraction=0.2,
                seed=seed,
            )
            runs.append((method, seed, cfg))
    return runs


def study_far_pad(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """The far-domain study with ``augment="pad-crop"`` (the CIFAR recipe) instead of
    RandomResizedCrop, which at 32 px leaves both methods underfit (README, *Far-domain*)."""
    return _pad_crop(study_far(args))


def _pad_crop(runs: list[tuple[str, int, dict[str, Any]]]) -> list[tuple[str, int, dict[str, Any]]]:
    """The same runs trained with ``augment="pad-crop"``."""
    return [(group, seed, {**cfg, "augment": "pad-crop"}) for group, seed, cfg in runs]


# Issue 29: ImageNet Lite0 -> Imagewoof (10 ImageNet dog breeds), the paper's near-domain regime.
# 128 px: the smallest resolution where S is nearly right (10-way zero-shot 84% at 128 px, 71%
# at 96) that fits the CPU budget (benchmarks/results/regime-throughput.json: 1-thread training
# 25 img/s fine-tuning, 14 img/s AdaFilter at 128 px against 13 / 9 at 160).
WOOF = dict(
    dataset="imagefolder",
    backbone="efficientnet-lite0",
    weights="pretrained",
    resolution=128,
    batch_size=64,
    val_fraction=0.2,
)
PAPER_SCHEDULE = dict(epochs=110, milestones=[30, 60, 90], eval_every=5)


def _woof(args: argparse.Namespace, per_class: int, **extra: Any) -> dict[str, Any]:
    return {**WOOF, "data_root": args.imagewoof, "train_per_class": per_class, **extra}


def study_woof_aug(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: the augmentation, chosen on validation with fine-tuning (Imagewoof-30, 30
    epochs, x0.1 after 10/20: 120 SGD steps)."""
    sched = dict(epochs=30, milestones=[10, 20], eval_every=10)
    return [
        (aug, 0, _woof(args, 30, method="finetune", augment=aug, seed=0, **sched))
        for aug in ("resized-crop", "random-crop", "pad-crop")
    ]


WOOF_AUGMENT = "random-crop"  # chosen by study_woof_aug on validation (README, Studies)


def study_woof30(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: Imagewoof-30 (24 training images per class after validation), the paper's
    110-epoch schedule at batch 64 (4 steps an epoch, 440 SGD steps), 3 seeds of the four
    main rows (seed-major, so that every method has seed 0 first), then the Table 3 rows."""
    base = dict(augment=WOOF_AUGMENT, **PAPER_SCHEDULE)
    paper = dict(
        method="adafilter", gate_optimizer="sgd", gate_lr=0.1, precise_bn=0, adafilter=PAPER_GATE
    )
    rows = {
        "finetune": dict(method="finetune"),
        "random-policy": dict(method="random-policy"),
        "adafilter": dict(method="adafilter"),
        "adafilter-paper": paper,
    }
    runs = [
        (name, seed, _woof(args, 30, **base, **v, seed=seed))
        for seed in (0, 1, 2)
        for name, v in rows.items()
    ]
    for method in ("finetune-half", "l2sp", "standard-bn"):
        runs.append((method, 0, _woof(args, 30, **base, method=method, seed=0)))
    for seed in (0, 1, 2):  # the reference line: what frozen S knows with a trained head
        runs.append(
            ("linear-probe", seed, _woof(args, 30, **base, method="linear-probe", seed=seed))
        )
    return runs


def study_woof_bn(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: is the paper preset's early lead (test after 5 epochs ~67% against
    fine-tuning's ~55%) its gate or its evaluation BN statistics (``precise_bn=0``: running
    averages, still close to ImageNet's, against statistics recomputed on the 240 training
    images)? The first 5 epochs of ``woof30``'s runs (20 SGD steps, the same lr) with the other
    BN choice: the weights are those of the ``woof30`` runs at epoch 5 (precise BN does not
    change training without degenerate branches), only the statistics they are evaluated with
    differ."""
    runs = []
    for group, seed, cfg in study_woof30(args):
        if seed in (0, 1) and group in ("finetune", "adafilter-paper"):
            other = 16 if cfg.get("precise_bn") == 0 else 0
            runs.append((f"{group}-pbn{other}", seed, {**cfg, "epochs": 5, "precise_bn": other}))
    return runs


def study_woof30_pbn0(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: ``woof30``'s main rows evaluated with the running BN statistics
    (``precise_bn=0``) over the whole schedule: ``woof-bn`` found precise BN (recomputed on the
    240 training images) 15 points worse after 5 epochs in this regime. Fine-tuning trains
    identically either way (only evaluation differs); the gated methods do not."""
    keep = ("finetune", "random-policy", "adafilter")
    return [
        (group, seed, {**cfg, "precise_bn": 0})
        for group, seed, cfg in study_woof30(args)
        if group in keep
    ]


def study_flowers17(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: Flowers-17 (60 training images per class, 48 after validation: 816 images,
    13 steps an epoch at batch 64, 1,430 SGD steps over the paper's schedule), 3 seeds."""
    base = dict(augment=WOOF_AUGMENT, **PAPER_SCHEDULE)
    rows = ("finetune", "random-policy", "adafilter")
    return [
        (m, seed, {**WOOF, "data_root": args.flowers17, **base, "method": m, "seed": seed})
        for seed in (0, 1, 2)
        for m in rows
    ]


def study_woof100(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: Imagewoof-100 (the Stanford Dogs regime: 80 training images per class after
    validation, 13 steps an epoch, 1,430 SGD steps), 1 seed."""
    base = dict(augment=WOOF_AUGMENT, **PAPER_SCHEDULE)
    rows = ("finetune", "random-policy", "adafilter")
    return [(m, 0, _woof(args, 100, **base, method=m, seed=0)) for m in rows]


# Issue 29, item 5: the default start of the gate, chosen on validation across regimes. The
# CIFAR kind as a new user would run it (Lite0 at 64 px, 60 training images per class after a
# 15-image validation split, 40 epochs of the CLI defaults: 10 steps an epoch, 400 SGD steps);
# the far domain as `far-pad`; the dogs as `woof30`. Candidates: the heads' bias 0 (every
# filter at the threshold: the random policy's start) and 2 (every filter fine-tuned: the
# start is fine-tuning; Adam at 0.01 needs ~200 steps of one-signed gradient to cross).
DEFAULTS_CIFAR = dict(train_per_class=75, val_fraction=0.2, epochs=40, eval_every=10)
START_B2 = dict(method="adafilter", adafilter={"gate_bias_init": 2.0})


def study_defaults(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29 item 5: fine-tuning vs AdaFilter's bias-0 and bias-2 starts on CIFAR at 64 px
    (400 steps, 3 seeds), the bias-2 start on the far domain (`far-pad`'s runs, 1,040 steps)
    and on Imagewoof-30 (`woof30`'s runs, 440 steps)."""
    cifar = {
        "cifar64-finetune": dict(method="finetune"),
        "cifar64-adafilter": dict(method="adafilter"),
        "cifar64-adafilter-b2": START_B2,
    }
    runs = [
        (name, seed, _lite0_cifar(args, **DEFAULTS_CIFAR, **v, seed=seed))
        for seed in (0, 1)
        for name, v in cifar.items()
    ]
    runs += [
        ("far-adafilter-b2", seed, {**cfg, **START_B2})
        for group, seed, cfg in study_far_pad(args)
        if group == "adafilter"
    ]
    runs += [
        (name, 2, _lite0_cifar(args, **DEFAULTS_CIFAR, **v, seed=2)) for name, v in cifar.items()
    ]
    runs += [
        ("woof30-adafilter-b2", seed, {**cfg, **START_B2})
        for group, seed, cfg in study_woof30(args)
        if group == "adafilter"
    ]
    return runs


def study_bn_choice(args: argparse.Namespace) -> list[tuple[str, int, dict[str, Any]]]:
    """Issue 29: ``--choose-bn-stats`` (validation picks the running or the precise BN
    statistics at every evaluation) in both regimes: the CIFAR kind of ``defaults`` (400 SGD
    steps), where precise BN was worth ~40 points over the pretrained statistics, and
    ``woof30`` (440 SGD steps), where the running ones were worth up to 15 points over precise
    BN. The same runs as those studies' but for the choice; gated methods first on the dogs
    (fine-tuning's choice only changes its evaluation)."""
    choose = {"choose_bn_stats": True}
    cifar = [
        (group, seed, {**cfg, **choose})
        for group, seed, cfg in study_defaults(args)
        if group in ("cifar64-finetune", "cifar64-adafilter")
    ]
    woof = {
        group: {s: {**cfg, **choose} for g, s, cfg in study_woof30(args) if g == group}
        for group in ("finetune", "random-policy", "adafilter")
    }
    runs = []
    for seed in (0, 1, 2):
        runs += [r for r in cifar if r[1] == seed]
        runs += [(f"woof30-{g}", seed, woof[g][seed]) for g in ("adafilter", "random-policy")]
        runs.append(("woof30-finetune", seed, woof["finetune"][seed]))
    return runs


STUDIES = {
    "flowers17": study_flowers17,
    "woof100": study_woof100,
    "woof-aug": study_woof_aug,
    "woof30": study_woof30,
    "woof-bn": study_woof_bn,
    "woof30-pbn0": study_woof30_pbn0,
    "bn-choice": study_bn_choice,
    "defaults": study_defaults,
    "precise-bn": study_precise_bn,
    "allf": study_allf,
    "gate-pilot": study_gate_pilot,
    "near": study_near,
    "near-pad": study_near_pad,
    "near-issue28": study_near_issue28,
    "far": study_far,
    "far-pad": study_far_pad,
}


def _steps(summary: dict[str, Any]) -> int:
    cfg = summary["config"]
    n = summary.get("num_train") or 0
    per_epoch = math.ceil(n / cfg["batch_size"]) if n else None
    return per_epoch * summary["epochs"] if per_epoch else -1


def _mean_std(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 2), "std": round(sd, 2), "n": len(values)}


def _class_spread(policy: dict[str, Any]) -> float | None:
    """The std over classes of each class's share of fine-tuned filters (all layers pooled,
    weighted by filters): 0 = every class uses the same share."""
    per_class = policy.get("per_class") or {}
    fractions, widths = per_class.get("fraction"), policy.get("out_channels")
    if not fractions or not widths:
        return None
    total = sum(widths)
    shares = [sum(f * w for f, w in zip(row, widths, strict=True)) / total for row in fractions]
    return round(statistics.pstdev(shares), 4)


def _early_stopped(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Early stopping on validation: the first evaluated epoch with the best validation
    accuracy, and the test accuracy there (a choice made without test data)."""
    evals = [m for m in metrics if m.get("val_acc") is not None and m.get("test_acc") is not None]
    if not evals:
        return {}
    best = max(evals, key=lambda m: (m["val_acc"], -m["epoch"]))
    return {"best_val_epoch": best["epoch"], "test_at_best_val": round(best["test_acc"], 2)}


def summarise(study: str, runs: list[tuple[str, int, dict[str, Any]]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for group, seed, _ in runs:
        d = RESULTS / study / f"{group}-s{seed}"
        if not (d / "summary.json").exists():
            continue
        s = json.loads((d / "summary.json").read_text())
        if not s.get("completed"):
            continue
        metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x]
        row = {
            "seed": seed,
            "final_test_acc": s["final_test_acc"],
            "final_val_acc": s.get("final_val_acc"),
            "test_acc_by_epoch": {
                m["epoch"]: m["test_acc"] for m in metrics if m.get("test_acc") is not None
            },
            "train_images": s.get("num_train"),
            "sgd_steps": s.get("sgd_steps"),
            "wall_time_s": round(s["wall_time_s"], 1),
        }
        row["final_train_acc"] = round(metrics[-1]["train_acc"], 2) if metrics else None
        row.update(_early_stopped(metrics))
        chosen = [m["bn_stats"]["stats"] for m in metrics if m.get("bn_stats")]
        if chosen:  # --choose-bn-stats: what validation picked, evaluation by evaluation
            row["bn_stats_chosen"] = chosen
        if (d / "policy.json").exists():
            pol = json.loads((d / "policy.json").read_text())
            row["policy_overall"] = [round(v, 3) for v in pol["overall"]]
            row["policy_class_spread"] = _class_spread(pol)
        if metrics and metrics[-1].get("gate"):
            g = metrics[-1]["gate"]
            row["gate_last_epoch"] = {
                k: g[k] for k in ("grad_norm_ratio", "changed", "fraction_std", "hamming")
            }
        groups.setdefault(group, []).append(row)
    out = {"study": study, "groups": {}}
    for group, rows in groups.items():
        entry = {
            "final_test_acc": _mean_std([r["final_test_acc"] for r in rows]),
            "final_val_acc": _mean_std([r["final_val_acc"] for r in rows]),
            "test_at_best_val": _mean_std([r.get("test_at_best_val") for r in rows]),
            "seeds": rows,
        }
        out["groups"][group] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--cifar10", default="", help="extracted cifar10-subset folder")
    ap.add_argument("--omniglot", default="", help="omniglot-small zip")
    ap.add_argument("--cifar-weights", default="", help="CIFAR ResNet-20 weights file")
    ap.add_argument("--imagewoof", default="", help="extracted imagewoof-mini folder")
    ap.add_argument("--flowers17", default="", help="extracted flowers17 folder")
    ap.add_argument("--stream", default="0/1", help="i/n: run every n-th run starting at i")
    ap.add_argument("--summary", action="store_true", help="only write the summary JSON")
    ap.add_argument("--only", default="", help="comma-separated groups to run")
    ap.add_argument("--seeds", default="", help="comma-separated seeds to run (default all)")
    args = ap.parse_args()
    runs = STUDIES[args.study](args)
    if not args.summary:
        torch.set_num_threads(1)
        i, n = (int(x) for x in args.stream.split("/"))
        only = set(filter(None, args.only.split(",")))
        seeds = {int(x) for x in args.seeds.split(",") if x}
        todo = [r for r in runs if (not only or r[0] in only) and (not seeds or r[1] in seeds)]
        for k, (group, seed, fields) in enumerate(todo):
            if k % n != i:
                continue
            out = RESULTS / args.study / f"{group}-s{seed}"
            done = out / "summary.json"
            if done.exists() and json.loads(done.read_text()).get("completed"):
                continue
            t0 = time.time()
            cfg = TrainConfig(
                out=str(out),
                device="cpu",
                workers=0,
                quiet=True,
                resume=(out / "checkpoint.pt").exists(),
                **fields,
            )
            s = fit(cfg)
            for name in ("config.json", "summary.json"):  # committed: no machine paths
                relativize_json_file(out / name)
            print(
                json.dumps(
                    {
                        "group": group,
                        "seed": seed,
                        "test": s["final_test_acc"],
                        "s": round(time.time() - t0),
                    }
                ),
                flush=True,
            )
        if n > 1:
            return
    result = summarise(args.study, runs)
    path = RESULTS / f"{args.study}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(repo_relative(result), indent=1) + "\n")
    os.replace(tmp, path)
    json.dump({g: v["final_test_acc"] for g, v in result["groups"].items()}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
