"""The full configuration of a training run: model + data + optimiser + trainer, as data.

A run's config is resolved in this order, each step overriding the one before:
dataclass defaults -> preset (vitlab/presets/NAME.yaml) -> --config FILE.yaml -> CLI flags -> key=value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import yaml

from vitlab.data.datamodule import DataConfig
from vitlab.errors import VitlabError
from vitlab.model import TTA_VIEWS, ViTConfig
from vitlab.training.module import OptimConfig

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class TrainerConfig:
    max_epochs: int | None = 100  # None: train until max_time
    max_time: str | None = None  # wall-clock budget HH:MM:SS; the LR schedule ends with whichever limit comes first
    precision: str = "auto"  # auto = bf16-mixed on CUDA, 32-true on CPU; or any Lightning precision
    early_stopping_patience: int | None = None  # epochs without val_loss improvement; None = off
    seed: int = 0
    compile: bool = False  # torch.compile the model
    gradient_clip: float | None = None  # clip the gradient norm to this value
    val_every_n_epochs: int = 1  # validate every n epochs; the final weights are always validated
    val_tta: str = "none"  # validate with test-time augmentation: none, flip or flip-shift (as `vitlab eval --tta`)
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.999); it is
    # what validation scores and what checkpoints hold as the model; None = off

    def __post_init__(self):
        if self.max_time is not None:
            parse_duration(self.max_time)
        if self.val_every_n_epochs < 1:
            raise ValueError(f"trainer.val_every_n_epochs must be 1 or more, not {self.val_every_n_epochs}")
        if self.val_tta not in TTA_VIEWS:
            raise ValueError(f"trainer.val_tta must be one of {', '.join(TTA_VIEWS)}, not '{self.val_tta}'")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be between 0 and 1, not {self.ema_decay}")


def parse_duration(text: str) -> timedelta:
    """'HH:MM:SS' (or 'DD:HH:MM:SS') -> timedelta."""
    parts = str(text).split(":")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise ValueError(f"max_time must look like HH:MM:SS, not '{text}'")
    days, hours, minutes, seconds = map(int, ([0] + parts)[-4:])
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


@dataclass
class RunConfig:
    model: ViTConfig = field(default_factory=ViTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise VitlabError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise VitlabError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise VitlabError(f"{what} {path} must be a mapping of sections (model, data, optim, trainer)")
    return values


def preset_values(name: str) -> dict:
    if name not in preset_names():
        raise VitlabError(f"unknown preset '{name}' (known: {', '.join(preset_names())})")
    return read_yaml(PRESETS_DIR / f"{name}.yaml", "preset")


def field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def coerce(value, hint, key: str):
    """Check (and where harmless, convert) a value against a dataclass field's type hint."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
    raise VitlabError(f"config key {key} must be {names}, not {value!r}")


def apply(config: RunConfig, values: dict, origin: str) -> RunConfig:
    """Override config with a nested mapping {section: {key: value}}; unknown keys are errors."""
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for section, entries in values.items():
        if section not in sections:
            raise VitlabError(f"unknown config section '{section}' in {origin} (known: {', '.join(sections)})")
        if not isinstance(entries, dict):
            raise VitlabError(f"config section '{section}' in {origin} must be a mapping")
        current = sections[section]
        hints = field_types(type(current))
        changes = {}
        for key, value in entries.items():
            if key not in hints:
                raise VitlabError(
                    f"unknown config key '{section}.{key}' in {origin} (known: {', '.join(sorted(hints))})"
                )
            changes[key] = coerce(value, hints[key], f"{section}.{key}")
        try:
            sections[section] = dataclasses.replace(current, **changes)
        except ValueError as e:
            raise VitlabError(f"invalid config in {origin}: {e}") from None
    return RunConfig(**sections)


def parse_override(text: str) -> dict:
    """'optim.lr=3e-4' -> {'optim': {'lr': 0.0003}} (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise VitlabError(f"override '{text}' must look like section.key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return {section: {name: value}}


def resolve(preset: str | None = None, config_file: Path | None = None, flags: dict | None = None,
            overrides=()) -> RunConfig:
    """defaults -> preset -> config file -> CLI flags ({section: {key: value}}) -> key=value overrides."""
    config = RunConfig()
    if preset:
        config = apply(config, preset_values(preset), f"preset {preset}")
    if config_file:
        config = apply(config, read_yaml(Path(config_file), "config file"), str(config_file))
    if flags:
        config = apply(config, flags, "command-line flags")
    if overrides:
        # Applied together, so that e.g. model.dim=32 model.heads=2 is never checked half-way.
        merged: dict = {}
        for text in overrides:
            for section, entries in parse_override(text).items():
                merged.setdefault(section, {}).update(entries)
        config = apply(config, merged, "key=value overrides")
    return config


def save(config: RunConfig, path: Path):
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load(path: Path) -> RunConfig:
    return apply(RunConfig(), read_yaml(path, "run config"), str(path))
