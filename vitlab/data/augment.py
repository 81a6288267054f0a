"""Augmentation and normalisation of uint8 image tensors.

Two pipelines:
- `crop-flip`: batched on the training device (random translation with reflect padding + horizontal
  flip), one gather per batch on the uint8 images and no per-sample Python: the fast path.
- `tutorial`: the tutorial's per-sample pipeline (flip, RandomResizedCrop, rotation ±30°, optional
  AutoAugment with the CIFAR-10 policy), run in the data loader's workers.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("crop-flip", "tutorial", "none")


@lru_cache(maxsize=16)
def pixel_statistics(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """mean and std (in [0, 1] units) as two (1, C, 1, 1) tensors in pixel units on device: built once
    per (mean, std, device), not every batch."""
    return (torch.tensor([mean, std], device=device) * 255).view(2, 1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with per-channel mean and std (in [0, 1] units)."""
    mean_t, std_t = pixel_statistics(tuple(mean), tuple(std), images.device)
    # One new tensor, updated in place: no temporaries of the batch's size.
    return images.to(torch.float32, copy=True).sub_(mean_t).div_(std_t)


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in (-size, 2 * size - 1) mirrored into [0, size) as reflect padding does (the edge
    pixel is not repeated): -1 -> 1, size -> size - 2."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def flip_translate(images: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W), each mirrored left-right where flip (B,) is True, then moved by dy (B,) rows
    down and dx (B,) columns right, the uncovered border filled by reflection (as reflect padding would).
    One gather of the images' own dtype: uint8 stays uint8."""
    B, C, H, W = images.shape
    rows = reflect(torch.arange(H, device=images.device) - dy[:, None], H)  # (B, H)
    cols = reflect(torch.arange(W, device=images.device) - dx[:, None], W)  # (B, W)
    cols = torch.where(flip[:, None], W - 1 - cols, cols)
    pixels = (rows[:, :, None] * W + cols[:, None, :]).view(B, 1, H * W)  # (B, 1, H*W) source of each pixel
    return images.reshape(B, C, H * W).gather(2, pixels.expand(B, C, H * W)).view(B, C, H, W)


def random_crop_flip(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Batched random crop (translate by up to `pad` pixels, reflect-padded) and horizontal flip."""
    B = len(images)
    flip = torch.rand(B, device=images.device) < 0.5
    dy, dx = torch.randint(-pad, pad + 1, (2, B), device=images.device)
    return flip_translate(images, flip, dy, dx)


def tutorial_transform(image_size: int, autoaugment: bool) -> v2.Compose:
    """The tutorial's per-sample train augmentation on a uint8 tensor (C, H, W)."""
    steps = [
        v2.RandomHorizontalFlip(),
        v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomRotation(30),
    ]
    if autoaugment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    return v2.Compose(steps)
