"""Short one-line texts for messages."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(exc: BaseException, limit: int = 160) -> str:
    """``exc``'s message on one line, cut to ``limit`` characters (its type name if empty)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
