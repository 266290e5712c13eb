"""What the Triton kernels share: the optional Triton import, the routing read, the plane
tiling and argument checks of the per-plane wrappers."""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is optional (CPU-only installs, older platforms)
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _taken(sel_ptr, plane):  # pragma: no cover - compiled by Triton
        """1 where plane ``plane`` is routed to F (the routing: a 0/1 float or a bool), else 0
        (an int: a comparison's own mask type does not combine with block masks under the
        interpreter)."""
        return (tl.load(sel_ptr + plane).to(tl.float32) > 0.5).to(tl.int32)


def _check(xf: Tensor, xs: Tensor, sel: Tensor) -> None:
    if xf.shape != xs.shape or xf.dim() != 4 or sel.shape != xf.shape[:2]:
        raise ValueError(
            f"need xf, xs (B, C, H, W) and sel (B, C), got {xf.shape}, {xs.shape}, {sel.shape}"
        )


def _routing(sel: Tensor) -> Tensor:
    """The (B, C) routing as the kernels read it: a bool as bytes (a view, no copy), or the
    policy's own 0/1 floats (no comparison launched)."""
    sel = sel.contiguous()
    return sel.view(torch.uint8) if sel.dtype == torch.bool else sel


def _tiles(n: int, hw: int) -> tuple[int, int, tuple[int, int]]:
    """How the per-plane kernels cover ``n`` planes of ``hw`` values: ``(BLOCK, PLANES, grid)``.

    Planes are read in blocks of up to ``_BLOCK`` values; the grid's second axis splits a plane
    for the kernels that do not loop over it (the others take ``grid[:1]``). Smaller planes go
    ``PLANES`` to a program, so that every program handles about ``_BLOCK`` values: a 7 x 7
    plane alone would leave most of a program idle, and a late ResNet-50 layer at batch 64 has
    ~130k of them.
    """
    block = min(_BLOCK, triton.next_power_of_2(hw))
    planes = min(_BLOCK // block, triton.next_power_of_2(n))
    return block, planes, (triton.cdiv(n, planes), triton.cdiv(hw, block))
