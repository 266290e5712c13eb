"""Validity of the eval-mode caches (folded filters, fused gate weights)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


class TensorsKey:
    """The tensors a cached result was computed from, and their state at that time.

    Valid while every tensor keeps its storage and its version counter: in-place updates (an
    optimizer step, ``load_state_dict``'s copy, ``p.mul_()`` under ``no_grad``) bump the
    counter, ``module.to()`` moves the storage. Keeping the tensors themselves makes the check
    two attribute reads per tensor instead of a module lookup for each (the old per-layer key
    cost ~20 us a layer, ~2 ms a ResNet-50 forward). A parameter *object* replaced on a
    submodule is not seen here: the owning modules drop their caches in ``train()``/``eval()``,
    ``_apply`` (``.to()``) and ``load_state_dict``.

    Args:
        tensors: The sources; ``None`` entries (absent biases) are skipped.
    """

    __slots__ = ("_state", "_tensors")

    def __init__(self, tensors: Iterable[Tensor | None]) -> None:
        self._tensors = tuple(t for t in tensors if t is not None)
        self._state = self._now()

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The source tensors."""
        return self._tensors

    def _now(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t._version) for t in self._tensors]

    def valid(self) -> bool:
        """Whether no source tensor has moved or changed in place since construction."""
        return self._now() == self._state


_epoch = 0


def epoch() -> int:
    """Counts :func:`drop_all` calls: a cache that combines several modules' tensors (the
    batch-1 compiled layers hold the gate's) is stale once this moves."""
    return _epoch


def drop_all() -> None:
    """A module dropped its caches (its parameter objects may have been replaced, which no
    version counter shows): every cache built from several modules is stale too."""
    global _epoch
    _epoch += 1
