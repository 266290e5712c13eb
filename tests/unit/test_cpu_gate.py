"""The compiled CPU gate (``layers/cpu_gate.py``) against the ATen eval step it replaces.

Building needs a C++ compiler and ninja and takes about a minute on a fresh machine; the
``built`` fixture builds it once per session (kept in pytest's cache between runs) and skips
where the toolchain is missing. The fallback (nothing built, an unloadable or untrusted build:
the ATen step), the build's plumbing (a stand-in child) and the batch-1 fused layer's plumbing
with :func:`_reference_module` (the kernel's contract written in ATen) need no toolchain; the
same checks then run with the built kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from adafilter import AdaFilterConfig, AdaFilterModel, wrap
from adafilter.layers import cpu_gate
from adafilter.layers.gate import RecurrentGate
from adafilter.layers.gated_conv import GatedConv2dBN, policy_source
from adafilter.tuner.policies import ForwardPolicies
from helpers import mix_policies, perturb_bn, run_in_threads


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty kernel cache and no loaded kernel; restored afterwards."""
    monkeypatch.setenv("ADAFILTER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(cpu_gate, "_module", None)
    monkeypatch.setattr(cpu_gate, "_looked", False)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    monkeypatch.setattr(cpu_gate, "AUTO_BUILD", False)
    return tmp_path / "home"


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_gate.get() is None  # said once


def _gate_outputs(gate: RecurrentGate, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    state, out = None, []
    with torch.no_grad():
        for i, x in enumerate(xs):
            logits, state = gate.step(i, x, state)
            out += [logits, *state]
    return out


class _FakeBuild:
    """Stands in for the foreground build's child Python: records its command and
    environment, and writes the library (or fails)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.fail = fail
        self.lock_seen: list[bool] = []

    def run(self, args: list[str], *, env: dict[str, str], **kwargs: object) -> object:
        self.calls.append((args, env))
        self.lock_seen.append((cpu_gate.build_directory() / "lock").exists())
        if self.fail:
            return subprocess.CompletedProcess(args, 1, "x.cpp:1: fatal error: Python.h\n")
        cpu_gate._library().write_bytes(b"built")
        return subprocess.CompletedProcess(args, 0, "")


def _toolchain(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> _FakeBuild:
    """A compiler and the venv's ninja are "present"; builds run :class:`_FakeBuild`."""
    fake = _FakeBuild(fail)
    ninja = Path("/venv/bin/ninja")
    monkeypatch.setattr(cpu_gate, "find_ninja", lambda: ninja)
    monkeypatch.setattr(cpu_gate, "find_compiler", lambda: "/usr/bin/c++")
    stand_in = SimpleNamespace(
        run=fake.run, DEVNULL=subprocess.DEVNULL, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT
    )
    monkeypatch.setattr(cpu_gate, "subprocess", stand_in)  # this module's subprocess only
    monkeypatch.setattr(cpu_gate, "_import", lambda path: SimpleNamespace(path=path))
    return fake


def test_a_forward_builds_nothing_and_starts_no_process(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds allowed and a toolchain present, nothing built: a batch-1 eval forward (the
    first CPU eval outside training, where a background build used to start) runs the ATen
    step, starts nothing, says nothing and leaves the environment as it was."""
    monkeypatch.setattr(cpu_gate, "AUTO_BUILD", True)
    fake = _toolchain(monkeypatch)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("started a process"))
    environ = dict(os.environ)
    model = wrap(torchvision.models.resnet18(num_classes=5)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    assert not fake.calls and cpu_gate.get() is None
    assert not cpu_gate.build_directory().exists() and dict(os.environ) == environ


def test_build_runs_in_the_foreground_with_the_venvs_ninja(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build() drives torch's builder in a waited-for child whose PATH starts with ninja's
    directory; this process's PATH is not changed; the library is loaded at once and the
    cache is private (no group/other write bits even under umask 002)."""
    fake = _toolchain(monkeypatch)
    path = os.environ.get("PATH", "")
    old = os.umask(0o002)
    try:
        lib = cpu_gate.build()
    finally:
        os.umask(old)
    [(args, env)] = fake.calls
    assert env["PATH"].split(os.pathsep)[0] == "/venv/bin" and os.environ.get("PATH", "") == path
    assert args[0] == sys.executable and str(cpu_gate.SOURCE_FILE) in args
    assert cpu_gate.get().path == lib  # type: ignore[union-attr]
    for p in (fresh, lib.parent.parent, lib.parent, lib):
        assert p.stat().st_mode & 0o022 == 0, p
    assert cpu_gate.cache_problem() is None


def test_the_venvs_ninja_is_found_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pip puts ninja beside the venv's python, which need not be on PATH."""
    (tmp_path / "ninja").write_text("#!/bin/sh\n")
    (tmp_path / "ninja").chmod(0o755)
    monkeypatch.setattr(cpu_gate.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cpu_gate.find_ninja() == tmp_path / "ninja"
    (tmp_path / "ninja").unlink()
    assert cpu_gate.find_ninja() is None


def test_the_sources_ship_as_cpp() -> None:
    assert cpu_gate.SOURCE_FILE.suffix == ".cpp" and cpu_gate.SOURCE_FILE.is_file()
    assert "PYBIND11_MODULE" in cpu_gate.SOURCE_FILE.read_text()


@pytest.mark.parametrize("where", ["kernels", "library"])
def test_a_writable_kernel_cache_is_refused(
    where: str, fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group- or world-writable cache would run anyone's code: get() warns once and keeps
    the ATen step; build() refuses."""
    _toolchain(monkeypatch)
    lib = cpu_gate.build()
    monkeypatch.setattr(cpu_gate, "_module", None)
    monkeypatch.setattr(cpu_gate, "_looked", False)
    target = lib if where == "library" else lib.parent.parent
    target.chmod(target.stat().st_mode | 0o002)
    with pytest.warns(UserWarning, match="world-writable") as record:
        assert cpu_gate.get() is None
        assert cpu_gate.get() is None
    assert len(record) == 1 and str(target) in str(record[0].message)
    with pytest.raises(RuntimeError, match="refusing"):
        cpu_gate.build()


def test_a_stale_build_lock_is_removed(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's build waits for ever on a lock a killed build left; one older than
    STALE_LOCK_S is removed first, a fresh one (a build running now) is kept."""
    fake = _toolchain(monkeypatch)
    lock = cpu_gate.build_directory() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    cpu_gate.build()
    old = time.time() - cpu_gate.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    cpu_gate.build()
    assert fake.lock_seen == [True, False]


def test_built_kernel_equals_the_aten_step(built: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real C++ step (built once per session) against the ATen step."""
    monkeypatch.setattr(cpu_gate, "_module", built)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    assert cpu_gate.get() is built
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


# ---- the batch-1 compiled layer (gate step + recopy of changed filters + conv) -------------


def _reference_module(**_: object) -> SimpleNamespace:
    """The kernel module's contract in ATen: ``step`` and ``Layer`` with the same arguments,
    in-place updates and staleness rule; ``.runs`` counts the layers it ran."""

    def step(x, emb, emb_bias, inp, bias, hid, head, head_bias, h0, c0):  # noqa: ANN001, ANN202
        v = x.mean((2, 3))  # (B, C_in)
        if emb.numel():
            v = v @ emb.t() + emb_bias  # (B, E)
        gates = bias + v @ inp  # (B, 4H), g rows pre-doubled
        if h0.numel():
            gates = gates + h0 @ hid
        i, f, g2, o = torch.sigmoid(gates).chunk(4, 1)
        c = i * (2 * g2 - 1) + (f * c0 if c0.numel() else 0)
        h = o * torch.tanh(c)
        return head_bias + h @ head, h, c

    class Layer:
        def __init__(self, gate_w, bank, stride, padding, dilation, groups, sources):  # noqa: ANN001
            self.gate_w, self.bank = gate_w, bank
            self.conv = (stride, padding, dilation, groups)
            self.sources = sources
            self.seen = self._now()

        def _now(self) -> list[tuple[int, int]]:
            return [(t.data_ptr(), t._version) for t in self.sources]

        def run(self, x: Tensor, h0: Tensor, c0: Tensor) -> list[Tensor]:
            if self._now() != self.seen or x.shape[0] != 1 or x.dtype != torch.float32:
                return []
            logits, h, c = step(x, *self.gate_w, h0, c0)
            prev, w, b, w_f, b_f, w_s, b_s = self.bank
            decisions = logits >= 0  # (1, C_out)
            changed = (decisions[0] != prev).nonzero().squeeze(1)
            take = decisions[0, changed]
            w[changed] = torch.where(take[:, None, None, None], w_f[changed], w_s[changed])
            b[changed] = torch.where(take, b_f[changed], b_s[changed])
            prev[changed] = take
            module.runs += 1
            return [F.conv2d(x, w, b, *self.conv), decisions, h, c]

    module = SimpleNamespace(step=step, Layer=Layer, runs=0)
    return module


class _Varied(nn.Module):
    """Conv-BN pairs with what the compiled layer passes to the conv: a bias, stride,
    dilation, groups; and a string padding, which keeps the Python path."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, padding="same", bias=False), nn.BatchNorm2d(16)
        self.c4, self.b4 = nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        for conv, bn in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3)):
            x = F.relu(bn(conv(x)))  # (B, C, H, W)
        return self.fc(self.b4(self.c4(x)).mean((2, 3)))  # (B, 5)


class _Fixed:
    """A policy source that replays given decisions (the reference forward)."""

    def __init__(self, decisions: dict[int, Tensor]) -> None:
        self.decisions = decisions

    def policy(self, index: int, x: Tensor) -> Tensor:
        return self.decisions[index].to(x.dtype)

    def compiled_state(self) -> None:
        return None

    def compiled_step(self, index: int, x: Tensor) -> None:
        return None

    def record(self, *args: object) -> None:
        raise AssertionError("no compiled step was offered")


_MODELS = {  # name: (builder, gated layers that run compiled, input resolution)
    "varied": (
        lambda: wrap(perturb_bn(_Varied()), example_input=torch.zeros(1, 3, 12, 12)),
        3,
        12,
    ),
    "resnet18": (lambda: wrap(perturb_bn(torchvision.models.resnet18(num_classes=5))), 20, 32),
    "resnet18-standard-bn": (
        lambda: wrap(
            perturb_bn(torchvision.models.resnet18(num_classes=5)),
            config=AdaFilterConfig(gated_bn=False),
        ),
        20,
        32,
    ),
}


def _mixed_model(name: str) -> AdaFilterModel:
    torch.manual_seed(0)
    return mix_policies(_MODELS[name][0]()).eval()


@pytest.fixture()
def compiled_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the index of every gated layer that ran compiled (any kernel module)."""
    runs: list[int] = []
    real = ForwardPolicies.record
    monkeypatch.setattr(
        ForwardPolicies, "record", lambda self, i, *a: runs.append(i) or real(self, i, *a)
    )
    return runs


def _assert_equals_dual_path(model: AdaFilterModel, x: Tensor) -> Tensor:
    """One batch-1 no-grad forward equals the dual path (both convs and BNs, no caches) under
    the decisions it made; those decisions are the ATen gate's wherever its logit is not
    within rounding of 0. Returns the output."""
    with torch.no_grad():
        out = model(x)
    decisions = dict(model._decisions)
    with torch.enable_grad(), policy_source(_Fixed(decisions)):
        want = model.model(x).detach()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_gate, "ENABLED", False)  # the ATen step
        logits = model.policy_logits(x)
    for i, name in enumerate(model.gated_layer_names):
        sure = logits[name].abs() > 1e-4
        assert torch.equal(decisions[i].bool()[sure], (logits[name] >= 0)[sure]), name
    return out


def _check_compiled_layers(name: str, runs: list[int]) -> None:
    """A sequence of examples: every layer but string-padded ones runs compiled, bound once;
    outputs equal the dual path; the decisions (hence the filter banks) change in between."""
    model = _mixed_model(name)
    _, compiled, res = _MODELS[name]
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 3, res, res, generator=gen) for _ in range(4)]
    binds = []
    real_bind = cpu_gate.bind
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_gate, "bind", lambda *a: binds.append(1) or real_bind(*a))
        changed, previous = 0, None
        for x in xs + xs[::-1]:
            runs.clear()
            _assert_equals_dual_path(model, x)
            assert len(runs) == compiled
            decisions = model._decisions
            if previous is not None:
                changed += sum(int((decisions[i] != previous[i]).sum()) for i in decisions)
            previous = dict(decisions)
    assert changed > 0  # the filter banks were updated in place, not only built
    assert len(binds) == compiled  # bound once, then reused


def _check_bound_layers_follow_changes(name: str, runs: list[int]) -> None:
    """In-place parameter changes (layer and gate), gate parameters replaced by
    ``load_state_dict(assign=True)`` on the gate alone, and another dtype: each seen."""
    model = _mixed_model(name)
    other = _mixed_model(name)  # made first: building a model drops every bound layer
    with torch.no_grad():
        for head in other.gate.heads:
            head.bias.neg_()
    res = _MODELS[name][2]
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(4))
    before = _assert_equals_dual_path(model, x)
    layer = next(iter(model.gated_layers().values()))
    with torch.no_grad():
        layer.conv_f.weight.mul_(1.5)
        (layer.bn_f if layer.gated_bn else layer.bn).running_var.add_(0.3)
        model.gate.heads[0].bias.neg_()
        model.gate.cell.weight_hh.mul_(0.5)
    changed = _assert_equals_dual_path(model, x)
    assert not torch.allclose(changed, before)
    model.gate.load_state_dict(other.gate.state_dict(), assign=True)
    runs.clear()
    swapped = _assert_equals_dual_path(model, x)
    assert runs and not torch.allclose(swapped, changed)
    model.double()
    runs.clear()
    _assert_equals_dual_path(model, x.double())
    assert not runs  # float64: the Python path


@pytest.mark.parametrize("name", list(_MODELS))
def test_compiled_layer_plumbing(
    name: str, compiled_runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a kernel module present, batch-1 eval runs each gated layer as one bound call
    (except string padding) and equals the dual path; the reference module stands in."""
    monkeypatch.setattr(cpu_gate, "get", _reference_module)
    _check_compiled_layers(name, compiled_runs)


@pytest.mark.parametrize("name", ["varied", "resnet18-standard-bn"])
def test_bound_layers_follow_parameter_changes(
    name: str, compiled_runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _reference_module()
    monkeypatch.setattr(cpu_gate, "get", lambda **_: module)
    _check_bound_layers_follow_changes(name, compiled_runs)


def test_compiled_layer_only_where_it_applies(
    compiled_runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch > 1, gradients on, training, kept logits, non-learned modes, the CNN gate and
    a disabled kernel all keep the Python path."""
    module = _reference_module()
    monkeypatch.setattr(
        cpu_gate, "get", lambda **_: module if cpu_gate.ENABLED else None
    )  # as get()
    model = _mixed_model("resnet18")
    x1, x2 = torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x1)
    assert len(compiled_runs) == module.runs == 20  # the positive control
    compiled_runs.clear()
    with torch.no_grad():
        model(x2)
        model.policy_logits(x1)
        for mode in ("random", "finetuned", "pretrained"):
            model.set_policy_mode(mode, seed=0)
            model(x1)
        model.set_policy_mode("learned")
        model.train()
        model(x1)
    model.eval()
    model(x1)  # gradients on
    monkeypatch.setattr(cpu_gate, "ENABLED", False)
    with torch.no_grad():
        model(x1)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    with monkeypatch.context() as mp, torch.no_grad():
        # not built: not even a binding is attempted (decided once per forward)
        mp.setattr(cpu_gate, "get", lambda **_: None)
        mp.setattr(GatedConv2dBN, "_bind", lambda *a: pytest.fail("tried to bind"))
        model(x1)
    cnn = wrap(torchvision.models.resnet18(num_classes=5), config=AdaFilterConfig(gate="cnn"))
    with torch.no_grad():
        cnn.eval()(x1)
    assert not compiled_runs and module.runs == 20


def _check_threads_share_banks_safely() -> None:
    """Four threads run batch-1 forwards of one model at once: each output equals the same
    example's forward run alone (the merged banks are updated in place and shared; without
    the per-bank lock 10 of 40 differed here on the Python path)."""
    model = _mixed_model("resnet18")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(8)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    wrong: list[int] = []

    def work(k: int) -> None:
        with torch.no_grad():
            for r in range(10):
                i = (k + r) % len(xs)
                if not torch.allclose(model(xs[i]), want[i], rtol=1e-4, atol=1e-4):
                    wrong.append(i)

    run_in_threads(work)
    assert not wrong


@pytest.mark.parametrize("path", ["python", "compiled"])
def test_concurrent_batch1_forwards(
    path: str, compiled_runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "compiled":
        module = _reference_module()
        monkeypatch.setattr(cpu_gate, "get", lambda **_: module)
    else:
        monkeypatch.setattr(cpu_gate, "ENABLED", False)
    _check_threads_share_banks_safely()
    assert bool(compiled_runs) == (path == "compiled")


@pytest.mark.parametrize("name", list(_MODELS))
def test_built_compiled_layers(
    name: str, built: object, compiled_runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real C++ batch-1 layer (built once per session): the checks above."""
    monkeypatch.setattr(cpu_gate, "_module", built)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    assert cpu_gate.get() is built
    _check_compiled_layers(name, compiled_runs)
    _check_bound_layers_follow_changes(name, compiled_runs)
    if name == "resnet18":
        _check_threads_share_banks_safely()


def test_a_failed_foreground_build_is_not_retried_before_training(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure() builds in the foreground once; a failure warns, is recorded and is not tried
    again by the next ensure() (every training run would wait for it); a build that succeeds
    (``adafilter build-kernels``) clears the record."""
    fake = _toolchain(monkeypatch, fail=True)
    monkeypatch.setattr(cpu_gate, "AUTO_BUILD", True)
    with pytest.warns(RuntimeWarning, match="Python.h"):
        assert cpu_gate.ensure() is None
    assert cpu_gate.failed_marker().is_file() and len(fake.calls) == 1
    assert cpu_gate.ensure() is None and len(fake.calls) == 1  # not again
    fake.fail = False
    cpu_gate.build()
    assert not cpu_gate.failed_marker().exists()
