"""Known-policy check, full version: does the gate route source images to S, shifted ones to F?

The task is ``adafilter.training.known_policy`` (a small conv-BN net pretrained on source
images; the target mixes source images with shifted ones whose label is flipped) at its hard
setting: a weak signal and 256 target images, where fine-tuning one set of filters for both
kinds costs accuracy. For fine-tuning and each AdaFilter configuration, over seeds, every
``--every`` steps: test accuracy and, for AdaFilter, the routing agreement of the best layer
(share of decisions that match "S for source, F for shifted") and that layer's fine-tuned share
of source / shifted images. Prints one JSON object and writes
``benchmarks/results/known-policy.json``.

    python benchmarks/known_policy.py                  # default, paper preset, finetune; 3 seeds
    python benchmarks/known_policy.py --steps 300 --seeds 0
    python benchmarks/known_policy.py --biases 1 --only "adafilter (bias 1)" --out kp-b1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import adafilter
import adafilter.training.known_policy as kp
from adafilter.training.config import PRESETS, TrainConfig
from adafilter.training.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_IMAGES = kp.TARGET_IMAGES


def _configs(biases: list[float]) -> dict[str, dict[str, Any]]:
    d = TrainConfig()
    paper = PRESETS["paper"]
    extra = {
        f"adafilter (bias {b:g})": {
            "ada": {"gate_bias_init": b},
            "gate_optimizer": d.gate_optimizer,
            "gate_lr": d.gate_lr,
        }
        for b in biases
    }
    return {
        "finetune": {},
        "adafilter (default)": {
            "ada": {},
            "gate_optimizer": d.gate_optimizer,
            "gate_lr": d.gate_lr,
        },
        "adafilter (paper preset)": {
            "ada": dict(paper["adafilter"]),
            "gate_optimizer": paper["gate_optimizer"],
            "gate_lr": paper["gate_lr"],
        },
        **extra,
    }


def run(name: str, spec: dict[str, Any], *, seed: int, steps: int, every: int) -> list[dict]:
    torch.manual_seed(seed)
    net = kp.pretrain(kp.tiny_net(), seed=seed)
    task = kp.make_task(TARGET_IMAGES, seed=1 + 10 * seed)
    test = kp.make_task(512, seed=2 + 10 * seed)
    d = TrainConfig()
    if "ada" not in spec:
        model: Any = copy.deepcopy(net)
        groups = [
            {
                "name": "network",
                "params": list(model.parameters()),
                "lr": d.lr,
                "weight_decay": d.weight_decay,
            }
        ]
        opt = build_optimizer(groups, momentum=d.momentum)
    else:
        cfg = adafilter.AdaFilterConfig(**spec["ada"])
        model = adafilter.wrap(copy.deepcopy(net), cfg, example_input=torch.zeros(1, 3, 8, 8))
        groups = model.param_groups(lr=d.lr, gate_lr=spec["gate_lr"], weight_decay=d.weight_decay)
        opt = build_optimizer(groups, momentum=d.momentum, gate_optimizer=spec["gate_optimizer"])
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, TARGET_IMAGES, (64,), generator=gen)
        loss = F.cross_entropy(model(task.x[idx]), task.y[idx])
        if "ada" in spec:
            loss = loss + model.policy_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            if "ada" in spec:
                row = kp.routing_agreement(model, test)
            else:
                model.eval()
                with torch.no_grad():
                    acc = (model(test.x).argmax(1) == test.y).float().mean()
                row = {"accuracy": float(acc)}
            curve.append(
                {
                    "step": step,
                    **{k: v if isinstance(v, str) else round(v, 4) for k, v in row.items()},
                }
            )
    return curve


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def merge(paths: list[Path], alias: dict[str, str] | None = None) -> dict[str, Any]:
    """Pool the final rows of several result files: per configuration, mean +- std over seeds.

    ``alias`` maps a configuration's name in older files to its name now (same settings).
    """
    last: dict[str, dict[str, dict[str, Any]]] = {}
    for path in paths:
        for name, curves in json.loads(path.read_text())["runs"].items():
            name = (alias or {}).get(name, name)
            for seed, curve in curves.items():
                last.setdefault(name, {})[seed] = curve[-1]
    out: dict[str, Any] = {}
    for name, rows in last.items():
        keys = [
            k
            for k in ("accuracy", "agreement", "f_source", "f_shifted")
            if k in next(iter(rows.values()))
        ]
        out[name] = {"seeds": sorted(rows, key=int)}
        out[name].update({k: _mean_std([r[k] for r in rows.values()]) for k in keys})
        out[name]["per_seed"] = {s: {k: rows[s][k] for k in keys} for s in sorted(rows, key=int)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--biases", default="", help="extra default-gate runs at these head biases")
    ap.add_argument("--only", default="", help="comma-separated configuration names to run")
    ap.add_argument("--out", default="known-policy.json", help="file name under results/")
    ap.add_argument("--merge", nargs="+", help="result files to pool per configuration and seed")
    ap.add_argument("--alias", action="append", default=[], help="OLD=NEW configuration name")
    args = ap.parse_args()
    if args.merge:
        alias = dict(a.split("=", 1) for a in args.alias)
        print(json.dumps(merge([Path(p) for p in args.merge], alias), indent=1))
        return
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict[str, Any] = {
        "signal": kp.SIGNAL,
        "target_images": TARGET_IMAGES,
        "steps": args.steps,
        "runs": {},
        "final": {},
    }
    configs = _configs([float(b) for b in args.biases.split(",") if b])
    only = set(filter(None, args.only.split(",")))
    for name, spec in configs.items():
        if only and name not in only:
            continue
        curves = {s: run(name, spec, seed=s, steps=args.steps, every=args.every) for s in seeds}
        out["runs"][name] = curves
        last = [c[-1] for c in curves.values()]
        final = {"accuracy": _mean_std([r["accuracy"] for r in last])}
        if "agreement" in last[0]:
            final["agreement"] = _mean_std([r["agreement"] for r in last])
            final["f_source"] = _mean_std([r["f_source"] for r in last])
            final["f_shifted"] = _mean_std([r["f_shifted"] for r in last])
        out["final"][name] = final
    path = RESULTS / args.out
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    print(json.dumps(out["final"]))


if __name__ == "__main__":
    main()
