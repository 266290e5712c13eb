"""``recompute_pretrained``: S's conv output recomputed in the backward instead of kept.

The gated BN's backward reads both branches' outputs (Eq. 5's policy gradient needs the one
not taken), so AdaFilter keeps one conv-output activation per gated layer more than plain
fine-tuning. With the option the backward recomputes ``S(x)`` from the input the convs keep
anyway: same losses, gradients and BN statistics, and that activation is no longer saved.
"""

from __future__ import annotations

import copy
import gc
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adafilter import AdaFilterConfig, AdaFilterModel, wrap
from adafilter.backbones.arch import cifar_resnet
from adafilter.layers.gated_conv import GatedConv2dBN
from helpers import REPO, mix_policies, perturb_bn


def _models(policy: str) -> tuple[AdaFilterModel, AdaFilterModel]:
    torch.manual_seed(0)
    net = perturb_bn(cifar_resnet(8, num_classes=5))
    base = mix_policies(wrap(net, AdaFilterConfig(), example_input=torch.zeros(1, 3, 16, 16)))
    if policy == "random":
        base.set_policy_mode("random", seed=0)
    other = copy.deepcopy(base)
    for layer in other.gated_layers().values():
        layer.recompute_s = True
    return base, other


def _saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward, each storage once, parameters excluded."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), x]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in resident:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU"))


@pytest.mark.parametrize("capturable", [False, True])  # the CPU path / the GPU's (no subsets)
@pytest.mark.parametrize("policy", ["learned", "random"])
@pytest.mark.parametrize("amp", [False, True])  # bf16 autocast: recomputed in the same dtype
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_recompute_equals_keeping(capturable: bool, policy: str, amp: bool, device: str) -> None:
    """Bit-identical on CPU; on CUDA within float rounding (cuDNN's backward algorithms
    need not be deterministic)."""
    tol = {"rtol": 0.0, "atol": 0.0} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
    base, other = (m.to(device) for m in _models(policy))
    opts = [
        torch.optim.SGD(m.param_groups(lr=0.05, gate_lr=0.5), momentum=0.9) for m in (base, other)
    ]
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(6, 3, 16, 16, generator=gen).to(device)
        y = torch.randint(0, 5, (6,), generator=gen).to(device)
        losses = []
        for m, opt in zip((base, other), opts, strict=True):
            m.train()
            m.capturable = capturable
            if policy == "random":
                m.set_policy_mode("random", seed=step)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            opt.step()
        torch.testing.assert_close(losses[0], losses[1], **tol)
        for (name, a), b in zip(base.named_parameters(), other.parameters(), strict=True):
            if a.grad is not None or b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, **tol, msg=name)
    for a, b in zip(base.buffers(), other.buffers(), strict=True):  # BN statistics
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("capturable", [False, True])
def test_recompute_keeps_one_activation_less_per_gated_layer(capturable: bool) -> None:
    base, other = _models("learned")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    outputs = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outputs.append(o.numel() * 4))
        for layer in base.gated_layers().values()
    ]
    kept = {}
    for name, m in (("keep", base), ("recompute", other)):
        m.train()
        m.capturable = capturable
        kept[name] = _saved_bytes(m, x, y)
        for h in hooks:
            h.remove()
        hooks = []
    # every gated layer's S output (float32, the layer output's size), no more: the input it
    # is recomputed from is kept by the convs anyway
    assert outputs and kept["keep"] - kept["recompute"] == sum(outputs)


@pytest.mark.parametrize("capturable", [False, True])
def test_recomputed_outputs_are_freed_after_the_forward(
    capturable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between forward and backward nothing holds S's outputs with the option (however they
    would be kept), and every one of them without it."""
    refs: list[weakref.ref] = []
    select = GatedConv2dBN._select

    def spy(self: GatedConv2dBN, xf: torch.Tensor, xs: torch.Tensor, *args: object) -> object:
        refs.append(weakref.ref(xs))
        return select(self, xf, xs, *args)

    monkeypatch.setattr(GatedConv2dBN, "_select", spy)
    for model, alive in zip(_models("learned"), (True, False), strict=True):
        refs.clear()
        model.train()
        model.capturable = capturable
        loss = F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
        gc.collect()
        assert len(refs) == len(model.gated_layers())
        assert all((r() is not None) is alive for r in refs)
        loss.backward()


def test_recompute_is_a_config_and_cli_option() -> None:
    from adafilter.cli import build_parser
    from adafilter.cli.train import train_config_from_args

    net = cifar_resnet(8, num_classes=5)
    model = wrap(
        net, AdaFilterConfig(recompute_pretrained=True), example_input=torch.zeros(1, 3, 16, 16)
    )
    assert all(layer.recompute_s for layer in model.gated_layers().values())
    args = build_parser().parse_args(
        ["train", "--dataset", "d", "--out", "o", "--recompute-pretrained"]
    )
    assert train_config_from_args(args).adafilter["recompute_pretrained"] is True


def test_activation_memory_benchmark_counts_the_saving() -> None:
    """``benchmarks/activation_memory.py`` on a torchvision ResNet-18: AdaFilter keeps about
    one and a half times fine-tuning's activations, with the option about as many."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import activation_memory  # noqa: PLC0415 (benchmarks/ is not a package)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    row = activation_memory.measure("resnet18", 64, 4, torch.device("cpu"))
    assert row["ratio"] > 1.4 and row["ratio_recompute"] < 1.15, row


def test_recompute_is_ignored_with_compile_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from adafilter.training.build import compiled_model
    from adafilter.training.config import TrainConfig

    cfg = TrainConfig(dataset="d", out="o", compile=True, adafilter={"recompute_pretrained": True})
    with caplog.at_level("WARNING"):
        compiled_model(cfg, nn.Linear(2, 2), None)  # torch.compile is lazy: nothing traced
    assert "recompute_pretrained=True ignored with compile=True" in caplog.text
