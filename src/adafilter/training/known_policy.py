"""A transfer problem whose right per-example policy is known by construction.

A small conv-BN network is pretrained on *source* images (label: is the left half brighter
than the right half?). The target mixes source images, for which the pretrained filters S
are exactly right, with *shifted* images: the same pictures plus a constant offset (visible
in every layer's pooled input, which the gate reads) whose label is flipped. No single set of
filters serves both without learning to read the offset; routing shifted images to fine-tuned
filters F and source images to S does. The right policy is therefore "S for source, F for
shifted" in at least one layer, and a gate that learns shows it as a per-example split.

Used by the test suite (a gate that is frozen or whose gradient is cut cannot split) and by
``benchmarks/known_policy.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KnownPolicyTask", "make_task", "pretrain", "routing_agreement", "tiny_net"]


def tiny_net(width: int = 8) -> nn.Module:
    """conv-BN-ReLU x 3 -> global pool -> linear(2), for 3 x 8 x 8 inputs."""
    layers: list[nn.Module] = []
    c_in = 3
    for _ in range(3):
        layers += [
            nn.Conv2d(c_in, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


@dataclass
class KnownPolicyTask:
    """Images ``x`` (N, 3, 8, 8), labels ``y`` (N,) and ``shifted`` (N,) bool."""

    x: Tensor
    y: Tensor
    shifted: Tensor


# The hard setting: a weak signal (per pixel, against unit noise) and few target images, where
# one set of filters for both kinds of image costs accuracy and the gate's routing matters.
SIGNAL = 0.15
TARGET_IMAGES = 256


def _source(n: int, gen: torch.Generator, signal: float) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    sign = (2 * y - 1).float()[:, None, None, None]  # left half brighter when y = 1
    x[:, :, :, :4] += signal * sign
    x[:, :, :, 4:] -= signal * sign
    return x, y


def make_task(
    n: int, *, seed: int, offset: float = 2.0, rule: str = "flip", signal: float = SIGNAL
) -> KnownPolicyTask:
    """Half source images, half shifted ones (``+offset``), shuffled.

    Args:
        n: Number of images.
        seed: Draw seed.
        offset: Constant added to every pixel of a shifted image.
        rule: The shifted images' label: ``"flip"`` (the source label, flipped) or
            ``"vertical"`` (is the top half brighter?, a feature the source never needed).
        signal: Brightness difference between the halves, against unit pixel noise.
    """
    gen = torch.Generator().manual_seed(seed)
    x, y = _source(n, gen, signal)
    shifted = torch.rand(n, generator=gen) < 0.5
    if rule == "vertical":
        xv, yv = _source(n, gen, signal)
        xv = xv.transpose(2, 3)  # the brighter half is now top or bottom
        x = torch.where(shifted[:, None, None, None], xv, x)
        y = torch.where(shifted, yv, y)
    elif rule == "flip":
        y = torch.where(shifted, 1 - y, y)
    else:
        raise ValueError(f"rule must be 'flip' or 'vertical', got {rule!r}")
    x = torch.where(shifted[:, None, None, None], x + offset, x)
    return KnownPolicyTask(x, y, shifted)


def pretrain(
    net: nn.Module, *, steps: int = 600, seed: int = 0, signal: float = SIGNAL
) -> nn.Module:
    """Train ``net`` on (unlimited) source images only: the "pretrained" network."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for _ in range(steps):
        x, y = _source(64, gen, signal)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def routing_agreement(model: Any, task: KnownPolicyTask) -> dict[str, float]:
    """How well the learned policy matches "S for source, F for shifted".

    Per gated layer, the agreement is the share of (example, filter) decisions that match
    the known choice; the best layer's is reported (the split may happen in any layer), with
    the mean fine-tuned share of source and shifted images there, and the accuracy.
    """
    model.eval()
    logits = model(task.x)
    best = {"agreement": 0.0}
    for name, pol in model.policies.items():  # bool (N, C)
        agree = float((pol == task.shifted[:, None]).float().mean())
        if agree > best["agreement"]:
            best = {
                "agreement": agree,
                "layer": name,
                "f_source": float(pol[~task.shifted].float().mean()),
                "f_shifted": float(pol[task.shifted].float().mean()),
            }
    best["accuracy"] = float((logits.argmax(1) == task.y).float().mean())
    return best
