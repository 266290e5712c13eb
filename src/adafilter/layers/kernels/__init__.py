"""Triton kernels for the gated BN (Eq. 5) and the gate's steps, on CUDA.

The eager forward materialises the selection ``z = where(G, F(x), S(x))`` (Eq. 1), reduces it
per (example, channel) plane and normalises it: three full passes plus a few small launches.
Two kernels do the same reading, per plane, only the branch the policy selects:

* :func:`plane_stats`: mean and biased variance of every selected plane (two passes over the
  plane, like ATen's BN statistics, never ``E[x^2] - E[x]^2``), in float32;
* :func:`select_affine`: ``y = x_sel * scale + shift`` with ``x_sel`` the selected branch and
  that branch's per-channel affine map, i.e. Eq. 5 with each BN folded into scale and shift.

and two for the backward, which the eager path does in five reductions and four fused
multiply-adds:

* :func:`plane_sums`: ``sum_hw dy`` and ``sum_hw dy * x`` of both branches per plane, in one
  pass (the BN backward's sums and the policy gradient's);
* :func:`branch_grads`: both branches' input gradients in one pass, reading only the routed
  branch's input per plane.

Between them, the per-channel arithmetic on (B, C) tensors -- about sixty small launches per
layer and step in the eager path, which a GPU step is bound by -- is two more kernels:

* :func:`branch_stats`: both branches' statistics from the per-plane ones (Chan's formula),
  the degenerate- and whole-branch rules, scale and shift, and the running-statistics update;
* :func:`branch_coeffs`: the backward's per-branch coefficients, the affine gradients and the
  policy gradient.

:func:`gate_step` is the recurrent gate's eval step (one program per example). Used by default
for CUDA tensors in eager mode when Triton is importable; the first call on a device compiles
and runs each kernel on tiny inputs, and turns them off there with a warning if that fails.
``ADAFILTER_TRITON=0`` (or ``kernels.ENABLED = False``) turns them off. Under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (tests).

The kernels live by concern: :mod:`.bn_planes` (per-plane passes), :mod:`.bn_branches`
(per-channel arithmetic), :mod:`.gate_eval` and :mod:`.gate_train` (the recurrent gate),
:mod:`.common` (the optional Triton import and shared helpers); this module holds the switch
and the first-use check, and names the wrappers.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from ..capture import is_compiling
from .bn_branches import branch_coeffs, branch_stats
from .bn_planes import branch_grads, plane_stats, plane_sums, select_affine
from .common import triton
from .gate_eval import gate_step
from .gate_train import gate_train_backward, gate_train_forward, pack_cell

__all__ = [
    "ENABLED",
    "available",
    "branch_coeffs",
    "branch_grads",
    "branch_stats",
    "gate_step",
    "gate_train_backward",
    "gate_train_forward",
    "interpreted",
    "pack_cell",
    "plane_stats",
    "plane_sums",
    "select_affine",
]

#: Set to ``False`` to keep the eager ATen path on CUDA too.
ENABLED = os.environ.get("ADAFILTER_TRITON", "1") != "0"
# CUDA device index -> every kernel compiled and ran there (see _works_on)
_VERIFIED: dict[int, bool] = {}


def interpreted() -> bool:
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: Tensor) -> bool:
    """The kernels can run on ``x``'s device: CUDA (or any device under the interpreter)."""
    if triton is None or not ENABLED:
        return False
    if x.device.type == "cuda":
        return _works_on(x.device)
    return interpreted()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _works_on(device: torch.device) -> bool:
    """Whether the kernels compiled and ran on this CUDA device, tried once per device on the
    first eager call (never inside a CUDA-graph capture or a trace: assumed there)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _VERIFIED.get(index)
    if ok is None:
        if _capturing() or is_compiling():
            return True
        ok = _VERIFIED[index] = _smoke(torch.device("cuda", index))
    return ok


def _smoke(device: torch.device) -> bool:
    """Compile and run every kernel once on tiny inputs, checking two results. A failure (a
    GPU or a Triton version they do not compile for) turns them off for the device, with one
    warning, and the eager path runs: training goes on rather than stopping mid-run."""
    try:  # float32 whatever the caller's autocast, no graph
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, 4, 4, generator=gen).to(device)
            sel = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], device=device)
            z = torch.where(sel[:, :, None, None] > 0.5, x, x + 1)
            mean, var = plane_stats(x, x + 1, sel)
            ones = torch.ones(2, 3, device=device)
            y = select_affine(x, x + 1, sel, ones, ones)
            a, p = plane_sums(x, x, x)
            branch_grads(x, x, x, sel, torch.zeros(3, 2, 2, 3, device=device))
            bns = (nn.BatchNorm2d(3).to(device), nn.BatchNorm2d(3).to(device))
            st, use = branch_stats(mean, var, sel, 16, bns, min_examples=2, min_values=16)
            branch_coeffs(sel, st, use, a, p)
            w = [torch.zeros(s, device=device) for s in ((3, 8), (8,), (2, 8), (2, 3), (3,))]
            gate_step(x, None, None, *w, None)
            gate_step(x, torch.zeros(3, 3, device=device), w[4], *w, (ones[:, :2], ones[:, :2]))
            mods = (nn.Linear(3, 2), nn.LSTMCell(2, 2), nn.Linear(2, 3))
            emb, cell, head = (m.to(device) for m in mods)
            pk = pack_cell(cell)
            out = gate_train_forward(mean, (ones[:, :2], ones[:, :2]), emb, pk, head)
            gate_train_backward(
                out[:3], out[4], out[2], ones[:, :2], emb, pk, head, need_pooled=True
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if not (torch.allclose(mean, z.mean((2, 3)), atol=1e-5) and torch.allclose(y, z + 1)):
            raise RuntimeError("wrong results")
    except Exception as exc:  # noqa: BLE001 - any failure means "use the eager path"
        warnings.warn(
            f"adafilter: the Triton kernels failed on {device} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the eager path runs instead (ADAFILTER_TRITON=0 skips them)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
