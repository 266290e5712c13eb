"""The compiled CPU gate step (``layers/cpu_gate.py``) against the ATen eval step it replaces.

Building needs a C++ compiler and ninja and takes about a minute on a fresh machine (slow
tier); the fallback (nothing built, or an unloadable build: the ATen step, with a warning for
the latter) is checked in the default tier.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from adafilter import wrap
from adafilter.layers import cpu_gate
from adafilter.layers.gate import RecurrentGate


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty kernel cache and no loaded kernel; restored afterwards."""
    monkeypatch.setenv("ADAFILTER_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_gate, "_module", None)
    monkeypatch.setattr(cpu_gate, "_looked", False)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    return tmp_path


def test_not_built_means_the_aten_step(fresh: Path) -> None:
    assert cpu_gate.get() is None
    gate = RecurrentGate([4], [6], embed_dim=3, hidden_dim=2).eval()
    with torch.no_grad():
        logits, _ = gate.step(0, torch.randn(1, 4, 3, 3), None)
    assert logits.shape == (1, 6)


def test_unloadable_build_warns_and_falls_back(fresh: Path) -> None:
    lib = cpu_gate._library()
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a shared library")
    with pytest.warns(UserWarning, match="adafilter build-kernels"):
        assert cpu_gate.get() is None


def _has_toolchain() -> bool:
    return shutil.which("c++") is not None and shutil.which("ninja") is not None


def _gate_outputs(gate: RecurrentGate, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    state, out = None, []
    with torch.no_grad():
        for i, x in enumerate(xs):
            logits, state = gate.step(i, x, state)
            out += [logits, *state]
    return out


@pytest.mark.slow  # compiles the kernel (~1 min on a fresh machine)
@pytest.mark.skipif(not _has_toolchain(), reason="needs a C++ compiler and ninja")
def test_built_kernel_equals_the_aten_step(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_gate.build().is_file()
    module = cpu_gate.get()
    assert module is not None
    # layer 0 folds the embedding into the input map, layer 1 keeps it (wide input)
    gate = RecurrentGate([8, 300, 12], [16, 12, 40], embed_dim=6, hidden_dim=5).eval()
    assert gate._eval_weights(0).emb is None and gate._eval_weights(1).emb is not None
    calls = []
    real_step = cpu_gate.step
    monkeypatch.setattr(cpu_gate, "step", lambda *a: calls.append(1) or real_step(*a))
    for batch in (1, 3):
        xs = [torch.randn(batch, c, 5, 4) for c in (8, 300, 12)]
        got = _gate_outputs(gate, xs)
        assert len(calls) == 3
        calls.clear()
        monkeypatch.setattr(cpu_gate, "ENABLED", False)
        want = _gate_outputs(gate, xs)
        assert not calls
        monkeypatch.setattr(cpu_gate, "ENABLED", True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # a wrapped model's batch-1 eval: the same outputs and decisions with and without it
    model = wrap(torchvision.models.resnet18(num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out_k = model(x)
        pol_k = {k: v.clone() for k, v in model.policies.items()}
        monkeypatch.setattr(cpu_gate, "ENABLED", False)
        out_a = model(x)
    torch.testing.assert_close(out_k, out_a, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(pol_k[k], v) for k, v in model.policies.items())
