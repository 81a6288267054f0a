"""Augmentation and normalisation of uint8 image tensors.

Two pipelines:
- `crop-flip`: batched on the training device (random translation with reflect padding + horizontal
  flip), a few tensor ops per batch and no per-sample Python: the fast path.
- `tutorial`: the tutorial's per-sample pipeline (flip, RandomResizedCrop, rotation ±30°, optional
  AutoAugment with the CIFAR-10 policy), run in the data loader's workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

AUGMENTATIONS = ("crop-flip", "tutorial", "none")


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with per-channel mean and std (in [0, 1] units)."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def random_crop_flip(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Batched random crop (translate by up to `pad` pixels, reflect-padded) and horizontal flip."""
    B, C, H, W = images.shape
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (B, 1), device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (B, 1), device=images.device)
    rows = (dy + torch.arange(H, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(W, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=images.device)[:, None, None, None]
    channel = torch.arange(C, device=images.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]  # (B, C, H, W)
    flip = torch.rand(B, device=images.device) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.to(images.dtype)


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
