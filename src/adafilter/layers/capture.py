"""Whether code is being traced by ``torch.compile`` (or ``torch.export``), on every torch.

Gated layers take their capturable path (no host reads, no caches, no data-dependent shapes)
while a compiler traces them; older torch builds without ``torch.compiler.is_compiling``
never trace them.
"""

from __future__ import annotations

import torch


def is_compiling() -> bool:
    """``True`` while ``torch.compile`` or ``torch.export`` traces the calling code."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


def is_dynamo_compiling() -> bool:
    """``True`` only while TorchDynamo traces the code (not in a non-strict export)."""
    fn = getattr(torch.compiler, "is_dynamo_compiling", None)
    return bool(fn()) if fn is not None else is_compiling()
