"""What diverged first when a training loss stops being finite.

A non-finite loss is the last link of a chain: a parameter the previous step made infinite, a
BN that stores a non-positive variance, the gate's logits or one layer's activations. The
message names the first link it finds, so the user is pointed at the cause rather than always
at the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["explain_divergence"]

_BN = nn.modules.batchnorm._BatchNorm


def _finite(t: Any) -> bool:
    return not (isinstance(t, Tensor) and t.is_floating_point() and not bool(t.isfinite().all()))


def _bad_parameter(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if not _finite(p):
            return f"parameter {name} is not finite (the previous step's update)"
    return None


def _bad_statistics(model: nn.Module, *, overflow: bool) -> str | None:
    """A BN storing a variance <= 0 (a writer that saw too few values), or, with
    ``overflow``, non-finite statistics (what exploding activations leave behind)."""
    for name, m in model.named_modules():
        if not isinstance(m, _BN) or m.running_var is None:
            continue
        stats = torch.stack([m.running_mean, m.running_var])
        if overflow:
            bad = ~stats.isfinite().all(0)
            what = "non-finite statistics"
        else:
            bad = m.running_var <= 0
            what = "a variance that is not positive"
        if bool(bad.any()):
            return f"BN statistics of {name}: {int(bad.sum())} channel(s) store {what}"
    return None


def _first_bad_output(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Run the forward again and name the first module (in call order) whose output is not
    finite."""
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(_m: nn.Module, _args: Any, out: Any) -> None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not found and not all(_finite(o) for o in outs):
                found.append(name)

        return check

    # A module's hook fires when it returns, so children report before their parent: the
    # first non-finite output is the innermost module that produced it.
    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - a diagnosis must never mask the divergence itself
        pass
    finally:
        for h in handles:
            h.remove()
    if not found:
        return None
    name = found[0]
    if "gate." in f"{name}.":
        return f"the gate's logits ({name}) are not finite"
    kind = type(model.get_submodule(name)).__name__
    return f"the output of {name} ({kind}) is not finite"


def explain_divergence(model: nn.Module, run: Callable[[], Any], loss: float) -> str:
    """Name what diverged first and what to try.

    Args:
        model: The unwrapped model (no DDP wrapper), as it stands after the failing forward.
        run: Repeats the failing forward (no gradient is taken).
        loss: The non-finite loss.

    Returns:
        One line, e.g. ``"BN statistics of layer4.0.conv1.bn_s: ..."``.
    """
    cause = _bad_parameter(model)
    if cause is not None:
        return f"{cause}; lower lr=/gate_lr="
    cause = _bad_statistics(model, overflow=False)
    if cause is not None:
        return f"{cause}; a degenerate branch divides by it: report it, precise_bn=0 avoids it"
    cause = _first_bad_output(model, run) or _bad_statistics(model, overflow=True)
    if cause is not None:
        hint = "lower gate_lr=" if "gate" in cause else "lower lr=/gate_lr= or use amp=off"
        return f"{cause}; {hint}"
    return f"the loss is {loss} with finite activations; lower lr=/gate_lr= or use amp=off"
