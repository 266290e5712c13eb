"""Reading run directories: ``summary.json``, ``metrics.jsonl`` and ``policy.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdaFilterError
from ..training.config import TrainConfig

__all__ = ["BOOKKEEPING", "Run", "assign_arms", "expand_run_dirs", "load_run", "number"]

#: ``TrainConfig`` fields that say where and how a run was kept, not what was trained: runs
#: that differ only in these (and the seed) are seeds of one arm.
BOOKKEEPING = frozenset(
    {
        "out",
        "seed",
        "data_root",
        "workers",
        "device",
        "eval_every",
        "checkpoint_every",
        "download",
        "quiet",
        "tensorboard",
        "resume",
        "compile_backend",
    }
)

#: Every option's default, for runs saved before an option existed.
_DEFAULTS: dict[str, Any] = TrainConfig().to_dict()


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
    variant: str = ""

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
    def arm(self) -> str:
        """The method, with the settings that set this run apart from other runs of the same
        method (:func:`assign_arms`), e.g. ``"adafilter (gate_optimizer=sgd, gate_lr=0.1)"``."""
        return f"{self.method} ({self.variant})" if self.variant else self.method

    @property
    def config_key(self) -> tuple[str, str, str]:
        """``(arm, dataset, backbone)``: runs sharing it differ only by seed."""
        return (self.arm, self.dataset, self.backbone)

    def settings(self) -> dict[str, Any]:
        """What was trained: the saved configuration without :data:`BOOKKEEPING`, with the
        method's resolved AdaFilter settings (``method_info``) flattened as ``adafilter.<field>``
        (so an override equal to the default is no difference). A setting the run's version
        did not have yet takes today's default: the option did not exist, so it was off."""
        cfg = self.summary.get("config")
        if not isinstance(cfg, dict):
            return {}
        cfg = {**_DEFAULTS, **cfg}
        out = {k: v for k, v in cfg.items() if k not in BOOKKEEPING and k != "adafilter"}
        info = self.summary.get("method_info")
        gate = info.get("adafilter") if isinstance(info, dict) else None
        gate = gate if isinstance(gate, dict) else cfg.get("adafilter")
        if isinstance(gate, dict):
            out.update({f"adafilter.{k}": v for k, v in gate.items()})
        return out

    @property
    def final_acc(self) -> float | None:
        """Final test accuracy in percent (falls back to the last epoch in ``metrics.jsonl``)."""
        acc = number(self.summary.get("final_test_acc"))
        if acc is None:
            accs = [a for a in (number(m.get("test_acc")) for m in self.metrics) if a is not None]
            acc = accs[-1] if accs else None
        return acc

    @property
    def best_acc(self) -> float | None:
        """Best test accuracy in percent (falls back to the max over ``metrics.jsonl``)."""
        acc = number(self.summary.get("best_test_acc"))
        if acc is None:
            accs = [a for a in (number(m.get("test_acc")) for m in self.metrics) if a is not None]
            acc = max(accs) if accs else None
        return acc

    @property
    def has_policies(self) -> bool:
        """The run's method writes ``policy.json`` (``summary.json``'s ``has_policies``; runs
        written before that key existed: their method info records a policy mode)."""
        recorded = self.summary.get("has_policies")
        if isinstance(recorded, bool):
            return recorded
        info = self.summary.get("method_info")
        return isinstance(info, dict) and "policy_mode" in info

    @property
    def label(self) -> str:
        seed = "?" if self.seed is None else str(self.seed)
        return f"{self.arm} · {self.dataset} · {self.backbone} · seed {seed}"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "/".join(_show(v) for v in value) or "[]"
    return "none" if value is None else str(value)


def assign_arms(runs: Sequence[Run]) -> None:
    """Tell apart runs of one method that were trained differently.

    Among the runs sharing (method, dataset, backbone), the settings whose values differ
    (:meth:`Run.settings`) become each run's :attr:`Run.variant` (``"gate_lr=0.1, ..."``), so
    that tables and figures show ``--preset paper`` beside the defaults instead of averaging
    them as seeds. Runs with no such difference keep the bare method name.

    Args:
        runs: Runs read by :func:`load_run`; their ``variant`` is set in place.
    """
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.dataset, run.backbone), []).append(run)
    for members in groups.values():
        settings = [m.settings() for m in members]
        keys = sorted({k for s in settings for k in s})
        differ = [
            k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1
        ]
        for run, s in zip(members, settings, strict=True):
            shown = (f"{k.removeprefix('adafilter.')}={_show(s.get(k))}" for k in differ)
            run.variant = ", ".join(shown)


def _cfg(summary: dict[str, Any], key: str) -> Any:
    cfg = summary.get("config")
    return cfg.get(key) if isinstance(cfg, dict) else None


def number(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (bools, strings, NaN and inf are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _not_a_run_dir(path: Path) -> AdaFilterError:
    return AdaFilterError(
        f"{path} is not a run directory (no summary.json); "
        "pass the out= folder of `adafilter train`"
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
            "no run directories given; pass the out= folder(s) of `adafilter train`"
        )
    for path in given:
        if path.is_file() and path.name == "summary.json":
            path = path.parent
        if not path.exists():
            raise AdaFilterError(
                f"{path} does not exist; pass the out= folder of `adafilter train`"
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
    if not isinstance(overall, list) or not overall or any(number(v) is None for v in overall):
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
                and all(number(v) is not None for v in row)
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
    elif run.has_policies:
        run.notes.append("no policy.json (left out of the policy figures)")
    return run
