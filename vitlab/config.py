"""The full configuration of a training run: model + data + optimiser + trainer, as data.

A leaf of the package: it imports nothing but the standard library, YAML and the model's config, so
reading a preset or checking a command loads no training code. It names every choice a key can take
(the data source kinds, the augmentations, the test-time views); the modules that implement a choice
are keyed by these names.

A run's config is resolved in this order, each step overriding the one before:
dataclass defaults -> preset (vitlab/presets/NAME.yaml) -> --config FILE.yaml -> CLI flags -> key=value.
A resumed run resolves its command on top of its saved config instead of the defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import yaml

from vitlab.errors import VitlabError
from vitlab.io import atomic_write
from vitlab.model import ViTConfig

PRESETS_DIR = Path(__file__).parent / "presets"
CIFAR_NAMES = ("cifar10", "cifar100")
SOURCES_HELP = "cifar10, cifar100, fake[:N], folder:PATH or shards:DIR_OR_URL"
AUGMENTATIONS = ("crop-flip", "resized-crop-flip", "tutorial", "none")  # data.augment (vitlab.data.augment)
TTA_NAMES = ("none", "flip", "flip-shift")  # trainer.val_tta, eval --tta (vitlab.evaluation.TTA_VIEWS)
LOGGER_NAMES = ("tensorboard", "csv", "mlflow", "wandb")  # trainer.loggers (vitlab.training.tracking)


@dataclass
class DataConfig:
    source: str = "cifar10"  # cifar10 | cifar100 | fake[:N] (N synthetic images) | folder:PATH | shards:DIR_OR_URL (packed by `vitlab pack`)
    root: str = "data"  # where CIFAR is downloaded to
    cache_dir: str = "~/.cache/vitlab"  # decoded image folders are cached here
    val_fraction: float = 0.1  # held out of train unless a folder has a sibling val/ folder
    split_seed: int = 0  # fixes the held-out part, independently of the training seed
    batch_size: int = 128
    num_workers: int = 0  # loader processes decoding streamed (shards:) data; in-memory data needs none
    augment: str = "crop-flip"  # batched on the training device, first: crop-flip (translate + flip) |
    # resized-crop-flip (RandomResizedCrop + flip) | tutorial (flip, resized crop, rotation ±30°) | none
    crop_padding: int | None = None  # crop-flip translates images by up to this many pixels; None = an eighth
    # of the image side (4 px at 32, 16 px at 128: the same share of the picture at every resolution)
    crop_scale: float = 0.25  # resized-crop-flip's smallest box, as a share of the image's area
    autoaugment: bool = False  # then AutoAugment's CIFAR-10 policy (as torchvision's)
    randaugment_ops: int = 0  # then RandAugment with this many ops per image (0 = off; as torchvision's)
    randaugment_magnitude: int = 9  # RandAugment's magnitude, 0-30
    mixup_alpha: float = 0.0  # then, after normalising, mixup with lam ~ Beta(alpha, alpha) (0 = off)
    cutmix_alpha: float = 0.0  # or CutMix (0 = off); with both on, each batch takes one of the two at random
    skip_bad_images: bool = False  # skip unreadable images in folders instead of stopping
    shard_cache_size: str = "25GB"  # the most of a remote shards: source kept in cache_dir at once

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise VitlabError(f"data.augment must be one of {', '.join(AUGMENTATIONS)}, not '{self.augment}'")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise VitlabError(f"data.crop_padding must be 0 or more, not {self.crop_padding}")
        if not 0 < self.crop_scale <= 1:
            raise VitlabError(f"data.crop_scale must be above 0 and at most 1 (a share of the image's area), "
                              f"not {self.crop_scale}")
        if self.randaugment_ops < 0:
            raise VitlabError(f"data.randaugment_ops must be 0 or more, not {self.randaugment_ops}")
        if not 0 <= self.randaugment_magnitude <= 30:
            raise VitlabError(f"data.randaugment_magnitude must be between 0 and 30, not {self.randaugment_magnitude}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise VitlabError(f"data.{name} must be 0 or more, not {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise VitlabError(f"data.val_fraction must be between 0 and 1, not {self.val_fraction}")
        parse_source(self.source)


def crop_padding(data: DataConfig, image_size: int) -> int:
    """The pixels crop-flip translates images of image_size by, at most: data.crop_padding, or an
    eighth of the side."""
    return image_size // 8 if data.crop_padding is None else data.crop_padding


FAKE_IMAGES = 2000  # the synthetic images of source `fake` (`fake:N` makes N)


def parse_source(source: str) -> tuple[str, Path | str | int | None]:
    """'cifar10' -> ('cifar10', None); 'fake:N' -> ('fake', N); 'folder:PATH' -> ('folder', PATH);
    'shards:LOCATION' -> ('shards', LOCATION), a folder or a bucket URL (kept as text: a Path would
    mangle s3://)."""
    if source in CIFAR_NAMES:
        return source, None
    if source == "fake" or source.startswith("fake:"):
        count = source[len("fake:"):] if ":" in source else str(FAKE_IMAGES)
        if not count.isdigit() or int(count) < 2:
            raise VitlabError(f"data source '{source}': fake:N needs a number of images N of 2 or more")
        return "fake", int(count)
    if source.startswith("folder:") and len(source) > len("folder:"):
        return "folder", Path(source[len("folder:"):]).expanduser()
    if source.startswith("shards:") and len(source) > len("shards:"):
        location = source[len("shards:"):]
        return "shards", location if "://" in location or location.startswith("local:") else str(Path(location).expanduser())
    raise VitlabError(f"unknown data source '{source}' (expected {SOURCES_HELP})")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    min_lr: float = 1e-5  # the cosine schedule ends here
    weight_decay: float = 0.05  # AdamW decay, applied only to weight matrices (see param_groups)
    beta1: float = 0.9
    beta2: float = 0.999
    warmup: float = 0.0  # linear warm-up from 0 to lr over this fraction of training
    label_smoothing: float = 0.0
    init_lr_scale: float = 1.0  # with model.init: the pre-trained part's LR is lr x this (0 freezes it)


@dataclass
class TrainerConfig:
    max_epochs: int | None = 100  # None: train until max_time
    max_time: str | None = None  # wall-clock budget HH:MM:SS; the LR schedule ends with whichever limit comes first
    precision: str = "auto"  # auto = bf16-mixed on CUDA, 32-true on CPU; or any Lightning precision
    early_stopping_patience: int | None = None  # epochs without val_loss improvement; None = off
    seed: int = 0
    compile: bool = False  # torch.compile the model (and, on a GPU, the batched augmentation)
    gradient_clip: float | None = None  # clip the gradient norm to this value
    val_every_n_epochs: int = 1  # validate every n epochs; the final weights are always validated
    val_tta: str = "none"  # validate with test-time augmentation: none, flip or flip-shift (as `vitlab eval --tta`)
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.999); it is
    # what validation scores and what checkpoints hold as the model; None = off
    checkpoint_every: str = "00:10:00"  # write last.ckpt this often (HH:MM:SS) while training (and always at
    # its end), so a crash loses at most this much training; 00:00:00 = after every batch
    accelerator: str = "auto"  # cpu, gpu or auto (a GPU when there is one)
    devices: int | str = 1  # training processes per machine (one per GPU), or auto (every GPU); data.batch_size
    # is per process, so the global batch is batch_size x devices x num_nodes
    num_nodes: int = 1  # machines, each running `devices` processes
    strategy: str = "auto"  # Lightning's strategy; auto = DDP when there is more than one process (gloo on
    # CPU, NCCL on CUDA)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # Lightning's loggers that track the
    # run (metrics.csv is written anyway): any of tensorboard (RUN_DIR/tensorboard), csv (RUN_DIR/csv), mlflow
    # (RUN_DIR/mlflow), wandb (RUN_DIR/wandb, offline unless WANDB_MODE or WANDB_API_KEY is set); e.g.
    # trainer.loggers=[tensorboard,mlflow]; mlflow and wandb need the extras vitlab[mlflow], vitlab[wandb]
    experiment: str = "vitlab"  # the MLflow experiment and the W&B project of the run (named as its directory)
    mlflow_uri: str | None = None  # the MLflow tracking URI (a server or a database); None = the SQLite store
    # RUN_DIR/mlflow/mlflow.db, artifacts beside it (MLFLOW_TRACKING_URI is not read: config.yaml records
    # where the run went)

    def __post_init__(self):
        if self.max_time is not None:
            parse_duration(self.max_time, "trainer.max_time")
        parse_duration(self.checkpoint_every, "trainer.checkpoint_every")
        if self.val_every_n_epochs < 1:
            raise VitlabError(f"trainer.val_every_n_epochs must be 1 or more, not {self.val_every_n_epochs}")
        if self.val_tta not in TTA_NAMES:
            raise VitlabError(f"trainer.val_tta must be one of {', '.join(TTA_NAMES)}, not '{self.val_tta}'")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise VitlabError(f"trainer.ema_decay must be between 0 and 1, not {self.ema_decay}")
        if self.accelerator not in ("cpu", "gpu", "auto"):
            raise VitlabError(f"trainer.accelerator must be cpu, gpu or auto, not '{self.accelerator}'")
        if self.devices != "auto" and not (isinstance(self.devices, int) and self.devices >= 1):
            raise VitlabError(f"trainer.devices must be a number of processes (1 or more) or auto, not {self.devices!r}")
        if self.num_nodes < 1:
            raise VitlabError(f"trainer.num_nodes must be 1 or more, not {self.num_nodes}")
        for name in self.loggers:
            if name not in LOGGER_NAMES:
                raise VitlabError(f"trainer.loggers: unknown logger '{name}' (choices: {', '.join(LOGGER_NAMES)})")
        if not self.loggers or len(set(self.loggers)) < len(self.loggers):
            raise VitlabError(f"trainer.loggers must name one or more of {', '.join(LOGGER_NAMES)}, each once, "
                              f"not {self.loggers}")


def parse_duration(text: str, what: str = "max_time") -> timedelta:
    """'HH:MM:SS' (or 'DD:HH:MM:SS') -> timedelta."""
    parts = str(text).split(":")
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts):
        raise VitlabError(f"{what} must look like HH:MM:SS, not '{text}'")
    days, hours, minutes, seconds = map(int, ([0] + parts)[-4:])
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


@dataclass
class RunConfig:
    model: ViTConfig = field(default_factory=ViTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        # Checks that span two sections (each section checks its own keys).
        if self.model.in_channels not in (1, 3):
            raise VitlabError(f"model.in_channels must be 3 (colour) or 1 (grey: a folder's images read as one "
                              f"channel), not {self.model.in_channels}")
        if self.data.augment == "crop-flip" and crop_padding(self.data, self.model.image_size) >= self.model.image_size:
            raise VitlabError(f"data.crop_padding {self.data.crop_padding} must be smaller than the image "
                              f"(model.image_size {self.model.image_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise VitlabError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.constructor.ConstructorError as e:  # e.g. !!python/object tags: never constructed
        raise VitlabError(f"refused {what} {path}: it has a YAML tag vitlab does not read ({e.problem.split(' tag ')[-1]}); "
                          f"configs are plain data") from None
    except yaml.YAMLError as e:
        raise VitlabError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VitlabError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(values, dict):
        raise VitlabError(f"{what} {path} must be a mapping of sections (model, data, optim, trainer)")
    return values


def preset_values(name: str) -> dict:
    if name == "auto":  # not a file: vitlab.api plans the run and passes the plan's settings as the base
        raise VitlabError("preset auto is a plan made for the data and the budget: it has no fixed values")
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
        if typing.get_origin(t) is list:  # a YAML list, or one value, or values separated by commas
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                (item_type,) = typing.get_args(t)
                return [coerce(item.strip() if isinstance(item, str) else item, item_type, key) for item in items]
    names = " or ".join("null" if t is type(None) else str(t) if typing.get_origin(t) else t.__name__ for t in options)
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
        except VitlabError as e:
            raise VitlabError(f"invalid config in {origin}: {e}") from None
    return RunConfig(**sections)


def parse_override(text: str) -> tuple[str, object]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003) (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise VitlabError(f"override '{text}' must look like section.key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve(preset: str | None = None, config_file: Path | None = None, flags: dict | None = None,
            overrides: dict | None = None, base: RunConfig | None = None) -> RunConfig:
    """base (default: the defaults) -> preset -> config file -> flags ({section: {key: value}}) ->
    overrides ({"section.key": value})."""
    config = base or RunConfig()
    if preset:
        config = apply(config, preset_values(preset), f"preset {preset}")
    if config_file:
        config = apply(config, read_yaml(Path(config_file), "config file"), str(config_file))
    if flags:
        config = apply(config, flags, "command-line flags")
    if overrides:
        # Applied together, so that e.g. model.dim=32 model.heads=2 is never checked half-way.
        nested: dict = {}
        for key, value in overrides.items():
            section, dot, name = key.partition(".")
            if not dot or not name:
                raise VitlabError(f"override key '{key}' must look like section.key, e.g. optim.lr")
            nested.setdefault(section, {})[name] = value
        config = apply(config, nested, "key=value overrides")
    return config


# Settings that say where the data is, what trains and where the run is tracked, not how it trains:
# given alone (no preset or config file) they leave a run planned (vitlab.planning), as the flags
# that set them (--val-fraction, --seed, --accelerator, ...) do.
NOT_RECIPE = ("data.source", "data.root", "data.cache_dir", "data.val_fraction", "data.split_seed",
              "data.skip_bad_images", "data.num_workers", "data.shard_cache_size", "trainer.seed",
              "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.loggers",
              "trainer.experiment", "trainer.mlflow_uri", "trainer.checkpoint_every")


# What a resumed run may change: its length. Everything else must be what the run was started with.
RESUMABLE_CHANGES = ("trainer.max_epochs", "trainer.max_time")


def resolve_resume(saved: RunConfig, preset=None, config_file=None, flags=None, overrides=None) -> RunConfig:
    """The config of a resumed run: the original command's settings resolved on top of the run's
    saved config give the saved config back (same command, same run), except for the run's length;
    a setting that really differs is an error naming it and both values."""
    config = resolve(preset, config_file, flags, overrides, base=saved)
    before, after = flatten(saved.to_dict()), flatten(config.to_dict())
    for key in before:
        if before[key] != after[key] and key not in RESUMABLE_CHANGES:
            raise VitlabError(f"--resume: {key} is {after[key]!r} here but {before[key]!r} in the run's "
                              f"config.yaml; only --max-epochs and --max-time may change when resuming")
    return config


def flatten(values: dict) -> dict:
    """{section: {key: value}} -> {"section.key": value}."""
    return {f"{section}.{key}": v for section, entries in values.items() for key, v in entries.items()}


def save(config: RunConfig, path: Path):
    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False), "run config")


def load(path: Path) -> RunConfig:
    return apply(RunConfig(), read_yaml(path, "run config"), str(path))
