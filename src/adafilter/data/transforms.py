"""Train/eval image transforms at a configurable resolution."""

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


#: Training augmentations: ``resized-crop`` = RandomResizedCrop + flip (the ImageNet recipe;
#: the paper does not state its own); ``random-crop`` = resize to R*256/224, random R crop +
#: flip (the fine-grained transfer recipe of L2-SP and DELTA: most of the object always in
#: view); ``pad-crop`` = the CIFAR recipe (whole image, padded random crop + flip) for small
#: images; ``none`` = the evaluation pipeline.
AUGMENTATIONS: tuple[str, ...] = ("resized-crop", "random-crop", "pad-crop", "none")


def eval_resize(resolution: int, augment: str = "resized-crop") -> int:
    """Side the evaluation pipeline resizes to before its centre crop of ``resolution``.

    ``resized-crop`` and ``random-crop`` keep the ImageNet habit (resize to R*256/224, crop R);
    ``pad-crop`` and ``none`` train on the whole image, so evaluation sees the whole image too
    (resize to R).
    """
    r = int(resolution)
    return max(r, int(r * 256 / 224)) if augment in ("resized-crop", "random-crop") else r


def build_transforms(
    train: bool,
    *,
    resolution: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: str = "resized-crop",
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the train or eval preprocessing.

    Training with ``augment="resized-crop"``: RandomResizedCrop(R) + RandomHorizontalFlip;
    ``"random-crop"``: Resize(R*256/224) + RandomCrop(R) + flip; ``"pad-crop"``: Resize(R) +
    CenterCrop(R) + RandomCrop(R, padding R/8) + flip; ``"none"``: the evaluation pipeline.
    Evaluation: Resize(:func:`eval_resize`) + CenterCrop(R). All convert to RGB first
    (grayscale data becomes 3 channels) and end with ToTensor + Normalize(mean,
    std) for the backbone.

    Args:
        train: Training (random) or evaluation (deterministic) pipeline.
        resolution: Output side length R in pixels (any size >= 1, e.g. 32 for quick runs).
        mean: Per-channel normalisation mean of the backbone.
        std: Per-channel normalisation std of the backbone.
        augment: One of :data:`AUGMENTATIONS`.

    Returns:
        A callable mapping a PIL image to a float tensor of shape (3, R, R).

    Raises:
        ValueError: ``resolution`` < 1 or an unknown ``augment``.
    """
    r = int(resolution)
    if r < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution!r}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    whole: list[Callable] = [T.Resize(eval_resize(r, augment), antialias=True), T.CenterCrop(r)]
    if not train or augment == "none":
        geometry = whole
    elif augment == "pad-crop":
        geometry = [*whole, T.RandomCrop(r, padding=max(1, r // 8)), T.RandomHorizontalFlip()]
    elif augment == "random-crop":
        geometry = [whole[0], T.RandomCrop(r), T.RandomHorizontalFlip()]
    else:
        geometry = [T.RandomResizedCrop(r, antialias=True), T.RandomHorizontalFlip()]
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
