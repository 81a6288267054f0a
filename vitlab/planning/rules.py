"""The rules of a planned run: pure functions from what is known of the data (a DataSummary), the
budget and the measured training speed of candidate models to a run's settings. No training, no
search: the numbers below come from the runs in docs/experiments.md ("Planned runs"), which say why.

The candidates are one family, `cpu-hour`'s model (a conv tokenizer of two 3x3 convolutions per
stage, one transformer block, attention pooling): three widths, at the resolutions the images have.
Whatever the resolution, the tokenizer ends at 4 x 4 tokens (one conv stage more per doubling of
the side, each stage halving it) and its first stage is narrower in proportion, so a larger image
costs little more than a small one (16 times the pixels at 128 px, 1.8-1.9 times the FLOPs of
32 px): what a larger image adds is detail, in the convolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from vitlab.data.images import decoded_bytes
from vitlab.data.sources import DataSummary

# The model ladder, largest first: (name, dim, depth, heads, first conv stage's channels at 32 px).
# "large" is cpu-hour's model; each step down narrows every layer (by a quarter, then a third) and
# about halves the FLOPs (153, 87, 39 MFLOP per image at 32 px). All: two convolutions per
# tokenizer stage, MLP ratio 2, attention pooling, 16 tokens.
SHAPES = [("large", 256, 1, 4, 64), ("medium", 192, 1, 3, 48), ("small", 128, 1, 2, 32)]
CONV_DEPTH = 2
GRID = 4  # tokens per side at every resolution
RESOLUTIONS = (32, 64, 128)  # the sides a plan may train at: powers of 2 (the conv tokenizer halves the side)
USABLE = 0.9  # of a time budget, the part that trains (the rest: start-up, compiling, validations)


def model_settings(shape: str, side: int, in_channels: int = 3) -> dict:
    """The model.* settings of a ladder shape at a training resolution (side x side pixels)."""
    name, dim, depth, heads, conv = next(s for s in SHAPES if s[0] == shape)
    return {"image_size": side, "patch_size": side // GRID, "in_channels": in_channels, "tokenizer": "conv",
            "conv_channels": max(8, conv * 32 // side), "conv_depth": CONV_DEPTH, "dim": dim, "depth": depth,
            "heads": heads, "mlp_ratio": 2.0, "pool": "attention"}


MEMORY_SHARE = 0.5  # of the free memory, the most the decoded images may take (the rest: model, batches, system)


def resolutions(summary: DataSummary, free_memory: int | None = None) -> list[int]:
    """The training sides worth trying, largest first: never above the images' own shorter side
    (upsampling adds pixels, not detail), nor a side whose decoded images (held in memory, uint8)
    would take more than MEMORY_SHARE of the free memory, where that is known; 32 if none is left."""
    channels = 1 if summary.grayscale else 3

    def fits(side: int) -> bool:
        return free_memory is None or decoded_bytes(summary.images, channels, side) <= MEMORY_SHARE * free_memory

    return [s for s in reversed(RESOLUTIONS) if s <= summary.side and fits(s)] or [RESOLUTIONS[0]]


def train_images(summary: DataSummary, val_fraction: float) -> int:
    """The images a run trains on: all of them where the validation images are a set apart (a
    folder's sibling val/), else all but the held-out fraction."""
    if summary.validation_apart:
        return summary.images
    return summary.images - round(summary.images * val_fraction)


# How much training a model should get before a larger model or image is worth its cost
# (docs/experiments.md, "Planned runs"): 15 epochs, and at least 1,000 optimiser steps.
# CIFAR-10 (45,000 training images, 350 steps an epoch): in 10 minutes the small model's 10.5 epochs
# gave 82.3% (flip-shift TTA) against the large one's 3.6 epochs' 79.6%; in 30 minutes the medium
# model's 18 epochs 87.4% against the large one's 11 epochs' 86.1%; the large one's 22 in 60
# minutes 88.7%. Flowers (2,744 training images, 21 steps an epoch): 15 epochs of the large model at
# 128 px, 315 steps, gave 68%, while 36-70 epochs (750-1,500 steps) at 32-64 px gave 73-74%: a small
# set needs more epochs, as many as give the optimiser its 1,000 steps.
TARGET_EPOCHS = 15
MIN_STEPS = 1000


def target_epochs(n_train: int, batch: int) -> float:
    """The epochs a plan wants: TARGET_EPOCHS, or more where those are under MIN_STEPS steps."""
    return max(TARGET_EPOCHS, MIN_STEPS * batch / n_train)


@dataclass(frozen=True)
class ModelChoice:
    shape: str
    side: int
    images_per_s: float  # measured (training steps, forward + backward + optimiser)
    epochs: float | None  # what the time budget buys; None with an epoch budget


def choose_model(sides: list[int], speed: Callable[[str, int], float], n_train: int, batch: int,
                 seconds: float | None, epochs: int | None) -> tuple[ModelChoice, list[str]]:
    """The largest image side, then the largest shape, that still gets target_epochs() in the time
    budget `seconds` (speed(shape, side): measured training images/s); without one, `epochs` of the
    large shape at the largest side. Returns the choice and why, in a line per candidate looked at."""
    target = target_epochs(n_train, batch)
    why = []
    if seconds is None:
        shape, side = SHAPES[0][0], sides[0]
        return ModelChoice(shape, side, speed(shape, side), None), [f"{epochs} epochs asked: the large model "
                                                                     f"at the largest side"]
    fastest = None
    for side in sides:
        for shape, *_ in SHAPES:
            ips = speed(shape, side)
            bought = seconds * USABLE * ips / n_train
            why.append(f"{shape} at {side} px: {ips:,.0f} images/s -> {bought:.0f} epochs")
            if bought >= target:
                return ModelChoice(shape, side, ips, bought), why + [f"the first to reach {target:.0f} epochs"]
            if fastest is None or bought > fastest.epochs:
                fastest = ModelChoice(shape, side, ips, bought)
    return fastest, why + [f"none reaches {target:.0f} epochs: the one that trains most"]


def augmentation(per_class: float) -> dict:
    """data.* settings by training images per class. Every plan: crop-flip (a translation of an
    eighth of the side, and mirroring), at every side: random-resized crops (resized-crop-flip) lost
    3-6 points to it on flowers at 64 px in 10 minutes, and gained nothing at 128 px in 30.
    Fewer than 1,000 images per class (CIFAR-10 has 4,500):
    RandAugment too, 2 ops of magnitude 9 (flowers at 64 px in 10 minutes: 74.3% with it, 73.5%
    without, inside the spread; but training accuracy 77% instead of 92%: it holds off overfitting)."""
    settings = {"augment": "crop-flip", "crop_padding": None}
    if per_class < 1000:
        settings.update(randaugment_ops=2, randaugment_magnitude=9)
    return settings


# cpu-hour's optimiser: AdamW, a short warm-up, then cosine to min_lr over the budget.
OPTIMISER = {"lr": 1e-3, "min_lr": 1e-5, "weight_decay": 0.05, "warmup": 0.03, "label_smoothing": 0.1}


def batch_size(n_train: int) -> int:
    """128 (cpu-hour's), or 64 where 128 would leave fewer than 20 steps per epoch."""
    return 128 if n_train >= 20 * 128 else 64


COMPILE_SECONDS = 300  # on a CPU, compiling (~40 s for the large model) pays in runs longer than this


def compiles(seconds: float | None, on_gpu: bool) -> bool:
    """Whether the run compiles its model: on a GPU always, on a CPU when it trains long enough."""
    return on_gpu or (seconds is not None and seconds >= COMPILE_SECONDS)


def validation_interval(epochs: float | None) -> int:
    """Validate once halfway (and the final weights always): each validation with six test-time
    views costs time the budget would otherwise train with (CIFAR-10, small model, 10 minutes:
    validating every 3 epochs took 60 s, a tenth of the run). Rounded up, so that 10.5 epochs
    validate at 6 and at the end, not at 5, 10 and the end."""
    return max(1, math.ceil((epochs or 2) / 2))


FINE_TUNE_BELOW = 100  # images in the smallest class below which the plan recommends model.init=


def notes(summary: DataSummary) -> list[str]:
    """What the plan tells the user beyond its settings."""
    out = []
    if summary.smallest_class is not None and summary.smallest_class < FINE_TUNE_BELOW:
        out.append(f"only {summary.smallest_class} images in the smallest class: a model trained from scratch "
                   f"will overfit; fine-tuning trained weights is the better road: vitlab train --preset "
                   f"finetune --data ... model.init=CHECKPOINT (or timm:NAME with its model.* settings)")
    if summary.aspect > 1.05:
        out.append(f"images are not square (typical aspect {summary.aspect:.2f}): resized on the shorter side "
                   f"and centre-cropped")
    return out
