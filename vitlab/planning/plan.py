"""A planned run (`vitlab train --preset auto`, or no preset or config file): the data's
summary and this machine's measured speed, through the rules (planning/rules.py), to the settings
of a run. The settings take the place of a preset: a config file, flags and key=value go on top.
The plan is printed before training and written beside the run's config.yaml as plan.yaml."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch

from vitlab import config as configs
from vitlab.config import DataConfig
from vitlab.data.augment import augment_batch
from vitlab.data.images import available_memory
from vitlab.data.sources import DataSummary, open_source
from vitlab.errors import VitlabError
from vitlab.model import ViT, ViTConfig
from vitlab.planning import rules
from vitlab.planning.probe import train_speed
from vitlab.training.run import default_precision

# Compiled training steps per eager one on the 2-core CPU, measured on the earlier ladder's large model
# (benchmarks/throughput.py: 380 / 322 images/s); with it, the plans of cpu-hour's family trained within
# about 7% of the epochs they expected (docs/experiments.md, "Planned runs"). The probe runs eager; a
# planned run compiles when it is long enough (rules.compiles).
# On a GPU the gain is larger and not measured here: the plan counts the eager speed there, which
# errs towards fewer epochs than the run will get.
COMPILE_GAIN = 1.18
PROBE_SECONDS = 1.0  # timed steps per candidate model (repeated probes agree within about 5%)


@dataclass
class Plan:
    summary: DataSummary
    budget: str  # as the user gave it: "00:10:00" or "20 epochs"
    device: str  # what the probe ran on: "cpu" or "cuda", and the precision
    choice: rules.ModelChoice
    settings: dict  # {section: {key: value}}: the run's config before a config file, flags and key=value
    speeds: dict = field(default_factory=dict)  # "shape at side px" -> measured training images/s
    why: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    planning_s: float = 0.0  # what making the plan cost: the data's summary and the probes

    def lines(self) -> list[str]:
        """The plan in a few lines, as printed before training."""
        s, c, m = self.summary, self.choice, self.settings["model"]
        model = ViT(ViTConfig(**{**m, "num_classes": s.classes}))
        d = self.settings["data"]
        augment = d["augment"] + (f" + RandAugment {d['randaugment_ops']} ops" if d.get("randaugment_ops") else "")
        epochs = f"~{c.epochs:.0f} epochs in {self.budget}" if c.epochs is not None else self.budget
        grey = ", grayscale" if s.grayscale else ""
        compiled_on_cpu = self.settings["trainer"]["compile"] and self.device.startswith("cpu")
        counted = f" (x{COMPILE_GAIN} compiled)" if compiled_on_cpu else ""
        return [
            f"data: {s.images:,} images, {s.classes} classes ({s.per_class:,.0f} per class, smallest "
            f"{s.smallest_class if s.smallest_class is not None else '?'}), typically {s.side} px{grey}",
            f"resolution: {c.side} px (sides up to the images' own tried, largest first)",
            f"model: {c.shape}, dim {m['dim']}, depth {m['depth']}, {m['heads']} heads, conv tokenizer "
            f"({m['patch_size'].bit_length() - 1} stages of {m['conv_depth']} convolutions) -> 16 tokens; "
            f"{model.num_parameters():,} parameters, {model.flops_per_image() / 1e9:.3f} GFLOP per image",
            f"speed: {c.images_per_s:,.0f} training images/s measured on {self.device}{counted} -> {epochs} "
            f"(planning took {self.planning_s:.0f} s)",
            f"recipe: batch {d['batch_size']}, lr {self.settings['optim']['lr']:g}, warm-up "
            f"{self.settings['optim']['warmup']:.0%}, {augment}, label smoothing "
            f"{self.settings['optim']['label_smoothing']}, flip-shift TTA",
            *(f"why: {line}" for line in self.why),
            *(f"note: {line}" for line in self.notes),
        ]

    def record(self) -> dict:
        """What plan.yaml holds."""
        return {"plan": self.lines(), "budget": self.budget, "device": self.device, "planning_s": self.planning_s,
                "data": dataclasses.asdict(self.summary), "choice": dataclasses.asdict(self.choice),
                "speeds": self.speeds, "why": self.why, "notes": self.notes, "settings": self.settings}


def make_plan(data: DataConfig, max_time: str | None, max_epochs: int | None, accelerator: str = "auto",
              speed=None) -> Plan:
    """Plan a run on `data` for max_time (HH:MM:SS) or max_epochs. `speed(config, batch_size)`
    measures training images/s (default: the probe, on the accelerator the run will use, with the
    plan's augmentation)."""
    start = time.perf_counter()
    if max_time is None and max_epochs is None:  # said before the source is read (or CIFAR downloaded)
        raise VitlabError("a planned run needs a budget: --max-time HH:MM:SS or --max-epochs N")
    source = open_source(data, rules.RESOLUTIONS[0])
    summary = source.summary()  # a bad source says what is wrong with it
    n_train = rules.train_images(summary, data.val_fraction)
    batch = rules.batch_size(n_train)
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise VitlabError("--accelerator gpu: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if on_gpu else "cpu")
    bf16 = "bf16" in default_precision(accelerator)
    augmentation = {**rules.augmentation(n_train / summary.classes), "batch_size": batch}
    augment_config = dataclasses.replace(data, **augmentation)

    def probe(config: ViTConfig, batch_size: int) -> float:
        return train_speed(config, batch_size, device, bf16, PROBE_SECONDS,
                           augment=lambda images: augment_batch(images, augment_config, config.image_size))

    measure = speed or probe
    eager = {}  # (shape, side) -> measured training images/s, eager
    channels = 1 if summary.grayscale else 3  # a grey folder trains a one-channel model

    def eager_speed(shape: str, side: int) -> float:
        if (shape, side) not in eager:
            settings = rules.model_settings(shape, side, channels)
            eager[shape, side] = measure(ViTConfig(**settings, num_classes=summary.classes), batch)
        return eager[shape, side]

    sides = rules.resolutions(summary, None if source.streams else available_memory())  # streams: never all held
    too_large = [f"{side} px left out: its decoded images would take more than {rules.MEMORY_SHARE:.0%} of the "
                 f"free memory" for side in rules.resolutions(summary) if side not in sides]
    seconds = configs.parse_duration(max_time).total_seconds() if max_time is not None else None
    # Compiled when the run is long enough to repay it: a time budget says; epochs last as long as
    # they take the large model at the largest side (what an epoch budget trains).
    expected_s = seconds if seconds is not None else max_epochs * n_train / eager_speed(rules.SHAPES[0][0], sides[0])
    compiled = rules.compiles(expected_s, on_gpu)
    gain = COMPILE_GAIN if compiled and not on_gpu else 1.0
    choice, why = rules.choose_model(sides, lambda shape, side: eager_speed(shape, side) * gain, n_train, batch,
                                     seconds, max_epochs)
    why = too_large + why
    speeds = {f"{shape} at {side} px": round(ips * gain, 1) for (shape, side), ips in eager.items()}
    settings = {
        "model": rules.model_settings(choice.shape, choice.side, channels),
        "data": augmentation,
        "optim": dict(rules.OPTIMISER),
        "trainer": {"max_epochs": max_epochs, "max_time": max_time, "compile": compiled, "val_tta": "flip-shift",
                    "val_every_n_epochs": rules.validation_interval(choice.epochs or max_epochs)},
    }
    budget = max_time if max_time is not None else f"{max_epochs} epochs"
    return Plan(summary, budget, f"{device.type} ({'bf16' if bf16 else 'fp32'})", choice, settings, speeds, why,
                rules.notes(summary), round(time.perf_counter() - start, 1))


def announce(plan: Plan):
    print("plan:", *plan.lines(), sep="\n  ", file=sys.stderr)
