"""The one ``set_submodule``: replace a submodule by its dotted name."""

from __future__ import annotations

from torch import nn

__all__ = ["set_submodule"]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root``'s submodule ``name`` (dotted path, e.g. ``layer1.0.conv1``) is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
