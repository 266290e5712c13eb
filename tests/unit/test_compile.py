"""The capturable path: torch.compile captures a wrapped model whole; it equals the default path.

CPU only, tiny models (16 px). ``backend="aot_eager"`` traces forward and backward exactly as
inductor would receive them (an autograd function's backward included) without generating
code, so these tests check capture and equality, not speed (``benchmarks/speed.py`` times it).

Tolerances: compiled vs eager and capturable vs default differ only in summation order (the
default CPU path reduces through ATen's BN kernels, the capturable one through ``var_mean``
and plain sums), so outputs, gradients and running statistics are compared at
``atol=1e-5, rtol=1e-4`` (float32).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from adafilter import AdaFilterConfig, AdaFilterModel, wrap
from adafilter.backbones.arch import cifar_resnet
from adafilter.cli import main
from adafilter.layers.gated_bn import gated_batch_norm
from helpers import (
    conv_bn_relu6,
    install_plugin,
    make_imagefolder,
    read_jsonl,
    train_args,
    uninstall_plugin,
)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "is_compiling"), reason="needs torch.compiler (torch >= 2.3)"
)

ATOL, RTOL = 1e-5, 1e-4
SIZE = 16


class TinyLite(nn.Module):
    """EfficientNet-Lite-style: stem, an inverted residual block (expand, depthwise, project)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()

        cbr = conv_bn_relu6

        self.stem = cbr(3, 8, 3, 2)
        self.expand = cbr(8, 16)
        self.depthwise = cbr(16, 16, 3, 1, groups=16)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 8, H/2, W/2)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.fc(x.mean((2, 3)))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "cifar-resnet8": lambda: cifar_resnet(8, num_classes=5),
    "lite": TinyLite,
}


def _wrapped(
    name: str, mode: str = "learned", config: AdaFilterConfig | None = None
) -> AdaFilterModel:
    """A wrapped tiny net with pretrained-like BN statistics and a mixed learned policy."""
    torch.manual_seed(0)
    net = BUILDERS[name]()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    model = wrap(net, config, example_input=torch.zeros(1, 3, SIZE, SIZE))
    with torch.no_grad():
        for i, (layer, head) in enumerate(
            zip(model.gated_layers().values(), model.gate.heads, strict=True)
        ):
            # F != S, BN_F != BN_S, and heads whose decisions differ per example and filter
            layer.conv_f.weight.add_(0.05 * torch.randn(layer.conv_f.weight.shape, generator=gen))
            if layer.gated_bn:
                layer.bn_f.running_mean.add_(0.1)
            head.bias.copy_(torch.randn(head.bias.shape, generator=gen))
            head.weight.mul_(20.0 + i)
    model.set_policy_mode(mode, p=0.5, seed=0)
    return model


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _train_step(model: nn.Module, params: AdaFilterModel, x: torch.Tensor, y: torch.Tensor):
    """One SGD step; returns the loss, every gradient (by name) and the buffers after the step."""
    opt = torch.optim.SGD([p for p in params.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) + params.policy_loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}
    opt.step()
    buffers = {n: b.clone() for n, b in params.named_buffers()}
    return loss.detach(), grads, buffers


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=ATOL, rtol=RTOL, msg=lambda m: what + m)


def _assert_same_step(ref: tuple, got: tuple) -> None:
    (loss_a, grads_a, bufs_a), (loss_b, grads_b, bufs_b) = ref, got
    _assert_close(loss_a, loss_b, "loss: ")
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        _assert_close(grads_a[n], grads_b[n], f"grad {n}: ")
    for n in bufs_a:
        _assert_close(bufs_a[n], bufs_b[n], f"buffer {n}: ")


def _mixed(model: AdaFilterModel) -> bool:
    """The last forward routed some (example, filter) of some layer to F and some to S."""
    pols = torch.cat([p.flatten() for p in model.policies.values()])
    return bool(pols.any()) and not bool(pols.all())


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("mode", ["learned", "random", "finetuned", "pretrained"])
def test_capturable_path_equals_default_path(name, mode):
    """Same loss, gradients and running statistics after a step; same eval outputs."""
    x, y = _batch()
    default = _wrapped(name, mode)
    capt = copy.deepcopy(default)
    capt.capturable = True
    assert capt.capturable and not default.capturable
    for model in (default, capt):
        model.set_policy_mode(mode, p=0.5, seed=0)
    _assert_same_step(_train_step(default, default, x, y), _train_step(capt, capt, x, y))
    if mode in ("learned", "random"):
        assert _mixed(default)
    for model in (default, capt):
        model.set_policy_mode(mode, p=0.5, seed=3)
        model.eval()
    with torch.no_grad():
        for xx in (x, x[:1], x[1:2]):  # batch 1 twice: the default path's merge cache
            _assert_close(default(xx), capt(xx), "eval: ")


def test_capturable_gated_bn_rules_equal_default():
    """Degenerate, whole-batch and ordinary branches; momentum None: tensor rules == host rules."""
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = 5, 6, 2, 2
    xf = torch.randn(b, c, h, w, generator=gen, requires_grad=True)
    xs = torch.randn(b, c, h, w, generator=gen, requires_grad=True)
    g = torch.zeros(b, c)
    g[:, 0] = 1.0  # channel 0 all F in every example (the F branch is "whole" only if all are)
    g[0, 1] = 1.0  # channel 1: one example in F (too few values: running statistics)
    g[:4, 2] = 1.0  # channel 2: 4 examples x 4 values = 16 in F, 1 example in S
    g[:, 3] = (torch.arange(b) % 2).float()  # channel 3: mixed 2 / 3
    g.requires_grad_(True)
    results = []
    for capturable in (False, True):
        bn_f, bn_s = nn.BatchNorm2d(c, momentum=None), nn.BatchNorm2d(c)
        stats = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for bn in (bn_f, bn_s):
                bn.running_mean.normal_(0.0, 0.3, generator=stats)
                bn.running_var.uniform_(0.5, 1.5, generator=stats)
            bn_f.num_batches_tracked.fill_(3)
        xs_ = [t.detach().clone().requires_grad_(True) for t in (xf, xs, g)]
        out = gated_batch_norm(
            *xs_, bn_f, bn_s, training=True, min_examples=2, min_values=16, capturable=capturable
        )
        out.mul(torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        grads = [t.grad for t in xs_] + [p.grad for bn in (bn_f, bn_s) for p in bn.parameters()]
        state = [bn.running_mean.clone() for bn in (bn_f, bn_s)]
        state += [bn.running_var.clone() for bn in (bn_f, bn_s)]
        results.append((out.detach(), grads, state))
    (o1, g1, s1), (o2, g2, s2) = results
    _assert_close(o1, o2, "output: ")
    for a, b_ in zip(g1 + s1, g2 + s2, strict=True):
        _assert_close(a, b_, "grad/state: ")


def _compiled(model: nn.Module, backend: str = "aot_eager") -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend=backend)


@pytest.mark.parametrize(
    "name,mode",
    [
        pytest.param("cifar-resnet8", "learned", marks=pytest.mark.slow),  # ~30 s of tracing
        ("lite", "learned"),
        ("lite", "finetuned"),
    ],
)
def test_fullgraph_compile_train_and_eval_match_eager(name, mode):
    """fullgraph=True: zero graph breaks (capture fails otherwise); compiled == eager."""
    x, y = _batch()
    eager = _wrapped(name, mode)
    model = copy.deepcopy(eager)
    assert not model.capturable  # compiling takes the capturable path by itself
    compiled = _compiled(model)
    for step in range(2):  # the second step reuses the graphs
        xs, ys = _batch(seed=step)
        _assert_same_step(_train_step(eager, eager, xs, ys), _train_step(compiled, model, xs, ys))
    assert not mode == "learned" or _mixed(model)
    eager.eval()
    model.eval()
    with torch.no_grad():
        for xx in (x, x[:1]):
            _assert_close(eager(xx), compiled(xx), "eval: ")
            assert eager.policies.keys() == model.policies.keys()
            for k, pol in eager.policies.items():
                assert torch.equal(pol, model.policies[k]), k
    torch._dynamo.reset()


def test_explain_counts_no_graph_break_in_gated_bn_off_and_gate_noise():
    """The Table 3 ablation (one BN) and gate noise trace whole too (training and eval)."""
    model = _wrapped("lite", config=AdaFilterConfig(gated_bn=False, gate_noise=0.5))
    x, _ = _batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda t: model(t).sum())(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


def test_default_path_breaks_graphs_when_forced():
    """The check above can fail: the default CPU path's host reads break a traced graph."""
    model = _wrapped("lite")
    layer = next(iter(model.gated_layers().values()))
    x, _ = _batch()
    calls = []
    original = type(layer)._forward_fast

    def host_read(self, xx, sel):
        calls.append(int(sel.sum()))  # what the default CPU path does (a host read)
        return original(self, xx, sel)

    layer._forward_fast_capturable = host_read.__get__(layer)  # type: ignore[method-assign]
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count > 0
    torch._dynamo.reset()


# ---- adafilter train --compile -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("compile")
    env = install_plugin(base / "plugin")
    data = make_imagefolder(base / "data")
    yield {"env": env, "data": data}
    uninstall_plugin()


@pytest.mark.parametrize("method", ["adafilter", "finetune"])
def test_train_compile_matches_eager(tiny: dict, tmp_path: Path, method: str) -> None:
    """``--compile`` (backend aot_eager here) trains the same epoch as eager training.

    Batch 3 of 4 images: a full batch and a short one, so a recompile for the new shape runs
    too. Losses and accuracies within ``rel=1e-4, abs=1e-5``.
    """
    rows = {}
    for compiled in (False, True):
        out = tmp_path / f"{method}-{compiled}"
        argv = train_args(tiny["data"], out, method, "--epochs", "1", "--batch-size", "3")
        argv += ["--compile", "--compile-backend", "aot_eager"] if compiled else []
        assert main([*argv, "--quiet"]) == 0
        rows[compiled] = read_jsonl(out / "metrics.jsonl")
        config = json.loads((out / "summary.json").read_text())["config"]
        assert config["compile"] is compiled
    torch._dynamo.reset()
    for eager, comp in zip(rows[False], rows[True], strict=True):
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert comp[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key


def test_train_compile_rejects_unknown_backend(tiny: dict, tmp_path: Path) -> None:
    argv = train_args(tiny["data"], tmp_path / "x", "adafilter", "--epochs", "1", "--compile")
    assert main([*argv, "--compile-backend", "no-such-backend", "--quiet"]) != 0
