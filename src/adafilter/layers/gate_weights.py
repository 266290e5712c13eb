"""The recurrent gate's eval-mode weights, as the eager step and the compiled CPU code read
them (a leaf module: :mod:`.gate` makes them, :mod:`.cpu_gate` passes them to C++)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class EvalWeights(NamedTuple):
    """A gated layer's eval-mode gate weights, pre-transposed (see
    ``RecurrentGate._eval_weights``)."""

    emb: Tensor | None  # W_e^T (C_in, E), a view; None when folded into ``inp``
    emb_bias: Tensor | None  # b_e (E,)
    inp: Tensor  # (W_ih W_e)^T (C_in, 4H) when fused, else W_ih^T (E, 4H); g rows doubled
    bias: Tensor  # (4H,)
    hid: Tensor  # W_hh^T (H, 4H), g rows doubled
    head: Tensor  # W_head^T (H, C_out)
    head_bias: Tensor  # (C_out,)
