"""Shared fixtures. Helpers (argv builders, tiny backbone plugin, BN makers) are in ``helpers.py``.

Tiers: ``make test`` (CI) runs the default tier; tests marked ``slow`` (subprocess benchmarks,
the ResNet-50 demo, kill -9 + resume, torchrun, the largest backbone builds) and ``zoo_slow``
are deselected there and run by ``make test-all``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    SHARED_CIFAR_WEIGHTS,
    SHARED_OMNIGLOT,
    install_plugin,
    make_imagefolder,
    uninstall_plugin,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The ``tiny-cnn`` plugin registered for this module, and a generated ImageFolder.

    ``{"env": subprocess environment that loads the plugin, "data": the ImageFolder root}``.
    """
    base = tmp_path_factory.mktemp("tiny")
    env = install_plugin(base / "plugin")
    data = make_imagefolder(base / "data")
    yield {"env": env, "data": data, "base": base}
    uninstall_plugin()


@pytest.fixture(scope="session")
def shared_omniglot() -> Path:
    """``../shared/data/omniglot`` (skips when the project's shared folder is absent)."""
    if not SHARED_OMNIGLOT.is_dir():
        pytest.skip(f"shared omniglot data not available ({SHARED_OMNIGLOT})")
    return SHARED_OMNIGLOT


@pytest.fixture(scope="session")
def shared_cifar_weights() -> Path:
    """``../shared/weights/cifar10-resnet`` (skips when the project's shared folder is absent)."""
    if not SHARED_CIFAR_WEIGHTS.is_dir():
        pytest.skip(f"shared CIFAR ResNet weights not available ({SHARED_CIFAR_WEIGHTS})")
    return SHARED_CIFAR_WEIGHTS
