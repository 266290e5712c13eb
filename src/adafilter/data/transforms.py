"""The paper's train/eval image transforms at a configurable resolution."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ToRGB:
    """Convert any PIL mode (1-bit, L, P, RGBA, CMYK) to 3-channel RGB.

    A class rather than a lambda so the transform pickles into spawned DataLoader workers.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transforms(
    train: bool,
    *,
    resolution: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the paper's preprocessing.

    Training: RandomResizedCrop(R) + RandomHorizontalFlip. Evaluation: Resize(R*256/224) +
    CenterCrop(R). Both convert to RGB first (grayscale data becomes 3 channels) and end with
    ToTensor + Normalize(mean, std) for the backbone.

    Args:
        train: Training (random) or evaluation (deterministic) pipeline.
        resolution: Output side length R in pixels (any size >= 1, e.g. 32 for quick runs).
        mean: Per-channel normalisation mean of the backbone.
        std: Per-channel normalisation std of the backbone.

    Returns:
        A callable mapping a PIL image to a float tensor of shape (3, R, R).
    """
    r = int(resolution)
    if r < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution!r}")
    if train:
        geometry: list[Callable] = [
            T.RandomResizedCrop(r, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [T.Resize(max(r, int(r * 256 / 224)), antialias=True), T.CenterCrop(r)]
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
