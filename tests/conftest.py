"""Shared fixtures. Helpers (argv builders, tiny backbone plugin, BN makers) are in ``helpers.py``.

Layout: ``unit/`` tests one module, layer or function; ``integration/`` runs the engine, the CLI,
the demo, reports and benchmarks end to end. Both use these fixtures and ``helpers.py``.

Tiers: ``make test`` (CI) runs the default tier; tests marked ``slow`` (subprocess benchmarks,
the ResNet-50 demo, kill -9 + resume, torchrun, the largest backbone builds) and ``zoo_slow``
are deselected there and run by ``make test-all``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

# No CPU training run in the tests compiles the CPU kernels before its first step
# (test_cpu_gate.py checks the build with a stand-in child; the ``built`` fixture builds once).
if os.environ.get("ADAFILTER_CPU_GATE") != "0":
    os.environ["ADAFILTER_CPU_GATE"] = "prebuilt"

from adafilter.layers import cpu_gate  # noqa: E402 - after the setting above
from helpers import (  # noqa: E402
    SHARED_CIFAR_WEIGHTS,
    SHARED_OMNIGLOT,
    Handler,
    ServerState,
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


@pytest.fixture(scope="session", autouse=True)
def empty_adafilter_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test sees an empty cache directory, never the user's ``~/.cache/adafilter``."""
    home = tmp_path_factory.mktemp("adafilter-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAFILTER_HOME", str(home))
        mp.delenv("ADAFILTER_DOWNLOAD_BASE", raising=False)
        yield home


@pytest.fixture()
def shared_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``$ADAFILTER_HOME`` whose cache links to ``../shared`` (skips when it is absent)."""
    if not (SHARED_CIFAR_WEIGHTS.is_dir() and SHARED_OMNIGLOT.is_dir()):
        pytest.skip("the project's ../shared data and weights are not available")
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    (home / "data").mkdir()
    os.symlink(SHARED_CIFAR_WEIGHTS, home / "weights" / "cifar10-resnet")
    os.symlink(SHARED_OMNIGLOT, home / "data" / "omniglot-small")
    monkeypatch.setenv("ADAFILTER_HOME", str(home))
    return home


@pytest.fixture()
def server() -> Iterator[tuple[str, ServerState]]:
    state = ServerState()
    handler = type("H", (Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def has_toolchain() -> bool:
    """A C++ compiler and ninja (the venv's, found by absolute path): what building the
    compiled CPU code needs."""
    return cpu_gate.find_compiler() is not None and cpu_gate.find_ninja() is not None


@pytest.fixture(scope="session")
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """The compiled CPU code (:mod:`adafilter.layers.cpu_gate`), built once per session with
    ``build()`` (as ``adafilter build-kernels``) into pytest's cache directory, so a later run
    of an unchanged source loads it in milliseconds (a fresh checkout builds it: ~35 s here).
    Skips where no C++ compiler or ninja is found. Tests put it in use themselves
    (``monkeypatch.setattr(cpu_gate, "_module", built)``); others keep the ATen step."""
    if not has_toolchain():
        pytest.skip("needs a C++ compiler and ninja (pip install ninja)")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    home = cache.mkdir("adafilter-kernels") if cache else tmp_path_factory.mktemp("kernels")
    home.chmod(0o700)  # the kernel cache must be private (cpu_gate.cache_problem)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAFILTER_HOME", str(home))
        mp.setattr(cpu_gate, "_module", None)
        mp.setattr(cpu_gate, "_looked", False)
        mp.setattr(cpu_gate, "ENABLED", True)
        if cpu_gate.get() is None:
            cpu_gate.build()
        module = cpu_gate.get()
        assert module is not None and hasattr(module, "Layer")
    yield module
