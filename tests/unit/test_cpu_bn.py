"""The gated BN's compiled CPU passes (``bn_*`` of ``layers/cpu_gate.py``) against the eager
path they replace in training.

Each check runs twice: with :func:`_reference`, the passes' contract written in ATen, standing
in for the built module, and with the real module (the session's ``built`` fixture; skipped
where no C++ toolchain is found). Tolerance: ``atol=1e-5, rtol=1e-4`` (float32, another
summation order).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_kernels import _run, tiny_net
from torch import Tensor, nn

from adafilter import AdaFilterConfig, wrap
from adafilter.layers import cpu_gate

_PASSES = ("bn_stats", "bn_branch_stats", "bn_apply", "bn_sums", "bn_coeffs", "bn_grads")


def _reference() -> SimpleNamespace:
    """The compiled passes in ATen, with their signatures (``sel`` (B, C) float32 0/1; BN
    tensors and settings as lists; ``k`` (3, 2, B, C); a branch not wanted: ``None``);
    ``.calls`` lists the passes run."""
    calls: list[str] = []

    def pick(sel: Tensor) -> Tensor:
        return (sel > 0.5)[:, :, None, None]  # (B, C, 1, 1)

    def bn_stats(xf: Tensor, xs: Tensor, sel: Tensor) -> list[Tensor]:
        calls.append("bn_stats")
        var, mean = torch.var_mean(torch.where(pick(sel), xf, xs), dim=(2, 3), correction=0)
        return [mean, var]

    def bn_apply(xf: Tensor, xs: Tensor, sel: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        calls.append("bn_apply")
        a = torch.where(pick(sel), scale[0, :, None, None], scale[1, :, None, None])
        b = torch.where(pick(sel), shift[0, :, None, None], shift[1, :, None, None])
        return torch.where(pick(sel), xf, xs) * a + b

    def bn_branch_stats(mean, var, sel, hw, bn, hp, min_examples, min_values):  # noqa: ANN001, ANN202
        calls.append("bn_branch_stats")
        t = torch.stack([(sel > 0.5).float(), (sel <= 0.5).float()])  # (2, B, C): F, S
        k = t.sum(1)  # (2, C) examples in each branch
        mu = (t * mean).sum(1) / k.clamp(min=1)
        n = k * hw
        v = (t * (var + (mean - mu[:, None]) ** 2)).sum(1) * hw / n.clamp(min=1)
        whole = torch.tensor([[bool((sel > 0.5).all())], [bool((sel <= 0.5).all())]]) & (n > 1)
        use = ((k >= min_examples) & (n >= min_values)) | whole
        w, b, rm, rv = (torch.stack([bn[i], bn[5 + i]]) for i in range(4))  # (2, C) copies
        m_used = torch.where(use, mu, rm)
        stored = torch.where(rv > 0, rv, torch.ones_like(rv))  # 0 is no estimate
        rstd = (torch.where(use, v, stored) + torch.tensor(hp[:2])[:, None]).rsqrt()
        scale = w * rstd
        unbiased = v * n / (n - 1).clamp(min=1)
        for r in range(2):
            mom = hp[2 + r]
            bn[5 * r + 2].copy_(torch.where(use[r], rm[r] + mom * (mu[r] - rm[r]), rm[r]))
            bn[5 * r + 3].copy_(torch.where(use[r], rv[r] + mom * (unbiased[r] - rv[r]), rv[r]))
            bn[5 * r + 4].add_(1)
        return [torch.stack([m_used, rstd, scale, b - m_used * scale, n]), use]

    def bn_coeffs(sel: Tensor, stats: Tensor, use: Tensor, a: Tensor, p: Tensor) -> list[Tensor]:
        calls.append("bn_coeffs")
        t = torch.stack([(sel > 0.5).float(), (sel <= 0.5).float()])  # (2, B, C): F, S
        mean, rstd, scale, shift, n = stats  # (2, C) each
        db = (t * a).sum(1)
        dw = (t * (p - mean[:, None] * a)).sum(1) * rstd
        k2 = torch.where(use, -scale * rstd * dw / n.clamp(min=1), 0.0)
        k3 = torch.where(use, -scale * db / n.clamp(min=1), 0.0) - k2 * mean
        k = torch.stack([t * scale[:, None], t * k2[:, None], t * k3[:, None]])
        y = scale[:, None] * p + shift[:, None] * a  # (2, B, C): sum_hw dy * BN(x) per branch
        return [k, torch.stack([dw, db]), y[0] - y[1]]

    def bn_sums(dy: Tensor, xf: Tensor, xs: Tensor) -> list[Tensor]:
        calls.append("bn_sums")
        return [dy.sum((2, 3)), torch.stack([(dy * x).sum((2, 3)) for x in (xf, xs)])]

    def bn_grads(dy, xf, xs, sel, k, want_f, want_s):  # noqa: ANN001, ANN202
        calls.append("bn_grads")
        out = []
        for r, (x, want, routed) in enumerate(((xf, want_f, pick(sel)), (xs, want_s, ~pick(sel)))):
            k1, k2, k3 = (k[j, r][:, :, None, None] for j in range(3))
            out.append(torch.where(routed, k1 * dy + k2 * x + k3, 0.0) if want else None)
        return out

    scope = locals()
    return SimpleNamespace(**{name: scope[name] for name in _PASSES}, calls=calls)


@pytest.fixture(params=["reference", "built"])
def passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The passes in use: the ATen contract, or the built module (skipped without a
    toolchain), each counting the passes it ran in ``.calls``."""
    if request.param == "reference":
        module = _reference()
    else:
        built = request.getfixturevalue("built")
        module = SimpleNamespace(calls=[])
        for name in _PASSES:
            fn = getattr(built, name)
            setattr(module, name, lambda *a, _fn=fn, _n=name: module.calls.append(_n) or _fn(*a))
    monkeypatch.setattr(cpu_gate, "_module", module)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    return module


@pytest.mark.parametrize(
    "training, routing, momentum",
    [
        (True, "mixed", 0.1),
        (True, "all_f", 0.1),
        (True, "all_s", 0.1),
        (True, "mixed", None),
        (False, "mixed", 0.1),
    ],
)
def test_compiled_passes_equal_the_eager_gated_bn(
    passes: SimpleNamespace, training: bool, routing: str, momentum: float | None
) -> None:
    """Output, every gradient (both branches' inputs, the policy, both BNs' affine
    parameters) and the BNs' buffers; degenerate, whole-branch and mixed channels."""
    out_c, rest_c = _run("cpu", training, routing, momentum)
    ran = set(passes.calls)
    cpu_gate.ENABLED = False
    out_e, rest_e = _run("cpu", training, routing, momentum)
    cpu_gate.ENABLED = True
    expected = {"bn_apply", "bn_sums", "bn_coeffs", "bn_grads"}
    if training:  # (a cumulative average, momentum None, keeps the ATen per-channel step)
        expected |= {"bn_stats", "bn_branch_stats"} if momentum else {"bn_stats"}
    assert ran == expected and len(passes.calls) == len(expected)  # nothing ran when off
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
    assert len(rest_c) == len(rest_e)
    for a, b in zip(rest_c, rest_e, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [0.0, 3.0])  # mixed policies; every filter from F
def test_compiled_passes_train_a_wrapped_network_like_eager(
    passes: SimpleNamespace, bias: float
) -> None:
    """Two SGD steps of a wrapped network, compiled passes on vs off: the same loss, every
    trainable parameter and buffer after; with an all-F policy S's input gradient is the
    broadcast zero (S's backward skipped), as on the eager path."""
    torch.manual_seed(3)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    model = wrap(tiny_net(), AdaFilterConfig(gate_bias_init=bias), example_input=x).train()
    results = []
    for on in (True, False):
        cpu_gate.ENABLED = on
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.param_groups(lr=0.1, gate_lr=0.1), lr=0.1, momentum=0.9)
        losses = []
        for _ in range(2):
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append([*losses, *m.state_dict().values()])
    cpu_gate.ENABLED = True
    assert "bn_grads" in passes.calls
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_training_forward_builds_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """Nothing built: the gated BN looks for the module once and runs the ATen passes; no
    build is attempted (neither here nor by a later lookup)."""
    monkeypatch.setenv("ADAFILTER_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_gate, "_module", None)
    monkeypatch.setattr(cpu_gate, "_looked", False)
    monkeypatch.setattr(cpu_gate, "ENABLED", True)
    monkeypatch.setattr(cpu_gate, "AUTO_BUILD", True)
    started: list[int] = []
    monkeypatch.setattr(cpu_gate, "build", lambda **kw: started.append(1))
    out, _ = _run("cpu", True, "mixed", 0.1)
    assert out.shape == (5, 6, 3, 3) and not started
    assert cpu_gate.get() is None and not started
