"""How fast this machine trains a model: a few timed training steps (the batch's augmentation,
forward, backward, AdamW) on random images, on the device and in the precision the run will use.
Eager: compiling each candidate would cost longer than the probe; the plan allows for compiling
separately (plan.COMPILE_GAIN)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from vitlab.model import ViT, ViTConfig


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(config: ViTConfig, batch_size: int, device: torch.device, bf16: bool,
                seconds: float = 1.0, min_steps: int = 3,
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Training images per second of a model of `config` at `batch_size`, each step augmenting its
    uint8 batch with `augment` first: from the median of the timed steps after two untimed ones
    (allocations, kernel selection), for at least `seconds` and `min_steps`."""
    model = ViT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(256, (batch_size, config.in_channels, config.image_size, config.image_size),
                           dtype=torch.uint8, device=device)
    labels = torch.randint(config.num_classes, (batch_size,), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()

    def step():
        batch = (augment(images) if augment else images).float().div_(255)
        with autocast:
            loss = F.cross_entropy(model(batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return batch_size / sorted(times)[len(times) // 2]
