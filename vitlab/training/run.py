"""A training run: one directory holding its config, checkpoints, metrics and TensorBoard events.

    RUN_DIR/config.yaml                 the full resolved config
    RUN_DIR/plan.yaml                   a planned run's plan: what it measured and chose, and why
    RUN_DIR/checkpoints/last.ckpt       written every trainer.checkpoint_every and at the end;
                                        --resume continues from it
    RUN_DIR/checkpoints/best.ckpt       best validation accuracy so far (final weights included)
    RUN_DIR/metrics.csv                 one row per epoch
    RUN_DIR/tensorboard/                TensorBoard events; the other loggers of trainer.loggers write
                                        theirs beside it (vitlab.training.tracking)

`train` prepares the run directory, the data and the model, then `build_callbacks` and
`build_trainer` make the Lightning Trainer that fits them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor

from vitlab import config as configs
from vitlab.config import RunConfig
from vitlab.data.datamodule import ImageDataModule
from vitlab.errors import VitlabError
from vitlab.io import atomic_write, read_checkpoint, read_metric_rows, write_checkpoint
from vitlab.pretrained import init_config, load_init, read_init
from vitlab.training.callbacks import (BestCheckpoint, DivergenceGuard, LastCheckpoint, MetricsCSV, ProgressBar,
                                       RunClock, StopRequests)
from vitlab.training.module import Classifier
from vitlab.training.processes import launched_as_rank_zero, lost_process, watched, without_lightning_signals
from vitlab.training.tracking import build_loggers, check_installed, log_run_end


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning writes and reads checkpoints through vitlab.io: atomically, never non-finite weights."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None):
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(Path(path))


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision when training runs on a GPU, fp32 on a CPU: bf16 matmuls are ~100x
    slower than fp32 on CPUs without AVX512-BF16. Follows trainer.accelerator, not whether a GPU exists."""
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Check the run directory; return the checkpoint to resume from, or None to start (over).

    A new run refuses a directory that already holds a run, so nothing the user had is overwritten.
    A run killed before its first checkpoint has only its config: resuming starts it over.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        for partial in run_dir.glob("**/.*.tmp"):  # writes a kill cut short; the files they replace are whole
            partial.unlink()
        if last.is_file():
            return last
        print(f"{run_dir} has no checkpoint yet (the run stopped before its first one): "
              f"starting it over from its saved config", file=sys.stderr)
        (run_dir / "metrics.csv").unlink(missing_ok=True)  # rows of work that is about to be redone
        return None
    if last.exists() or (run_dir / "config.yaml").exists():
        raise VitlabError(f"run directory {run_dir} already holds a run: use --resume, or another --run-dir")
    return None


def best_val_acc(run_dir: Path) -> float | None:
    scores = [float(r["val_acc"]) for r in read_metric_rows(run_dir) if r["val_acc"]]
    return max(scores, default=None)


def note_length_change(saved: RunConfig, config: RunConfig):
    """Say how a resumed run's LR schedule changes when its length does (it is fitted to the length)."""
    for key in ("max_epochs", "max_time"):
        before, after = getattr(saved.trainer, key), getattr(config.trainer, key)
        if before != after:
            print(f"note: trainer.{key} changed from {before} to {after}: the LR schedule is re-fitted to "
                  f"the new length from the resumed step on (the LR jumps to where the new schedule is)",
                  file=sys.stderr)


def build_callbacks(config: RunConfig, run_dir: Path, resume: bool, stops: StopRequests) -> list[L.Callback]:
    """The run's callbacks, in the order they must act at each step."""
    t = config.trainer
    last = run_dir / "checkpoints" / "last.ckpt"
    clock = RunClock(None if t.max_time is None else configs.parse_duration(t.max_time).total_seconds(), stops)
    callbacks = [
        DivergenceGuard(last),  # first: a diverged step stops before anything is saved
        clock,  # before those that act on what the processes agreed
        MetricsCSV(run_dir / "metrics.csv"),
        LearningRateMonitor(logging_interval="step"),
        ProgressBar(),
    ]
    if t.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    if t.early_stopping_patience is not None:
        # Lightning's patience counts validations: as many as span the patience in epochs. Deciding when
        # validation ends, before the epoch's end, where LastCheckpoint saves the final state.
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", check_on_train_epoch_end=False,
                                       patience=math.ceil(t.early_stopping_patience / t.val_every_n_epochs)))
    callbacks += [  # last: a checkpoint holds what every other callback did at that step (the EMA update)
        LastCheckpoint(last, configs.parse_duration(t.checkpoint_every).total_seconds(), clock),
        BestCheckpoint(run_dir / "checkpoints" / "best.ckpt", last, best_val_acc(run_dir) if resume else None),
    ]
    return callbacks


def quiet_lightning():
    """A run prints vitlab's lines and the progress, nothing else: not Lightning's notices and tips
    (GPU/TPU availability, advertising), nor warnings about library internals a user cannot act on."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": on a CPU, none is
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)  # "Experiment ... Creating it."
    for message in (".*isinstance\\(treespec, LeafSpec\\).*",  # inside Lightning's own code
                    ".*does not have many workers.*",  # in-memory data needs no loader workers
                    ".*smaller than the logging interval.*",  # logs are every 50 steps on purpose (GPU reads)
                    ".*IterableDataset. has .__len__. defined.*"):  # LitData gives each worker its own share
        warnings.filterwarnings("ignore", message)
    # Validation streams every image on every process (drop_last=False) on purpose: it takes no
    # collective step by step, so the processes' unequal shares cannot stall it.
    logging.getLogger("litdata.streaming.dataset").addFilter(lambda record: "drop_last" not in record.getMessage())


def build_trainer(config: RunConfig, run_dir: Path, callbacks: list[L.Callback], resume: bool = False) -> L.Trainer:
    t = config.trainer
    precision = default_precision(t.accelerator) if t.precision == "auto" else t.precision
    if "bf16" in precision and (t.accelerator == "cpu" or not torch.cuda.is_available()):
        print(f"warning: precision {precision} on a CPU is very slow on most CPUs; "
              f"trainer.precision=32-true trains in fp32", file=sys.stderr)
    return without_lightning_signals(L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        use_distributed_sampler=False,  # the loaders shard by rank themselves (EpochBatches)
        default_root_dir=run_dir,
        max_epochs=-1 if t.max_epochs is None else t.max_epochs,
        max_time=None,  # the RunClock among the callbacks is the Timer
        precision=precision,
        gradient_clip_val=t.gradient_clip,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # vitlab's own LastCheckpoint and BestCheckpoint write the checkpoints
        logger=build_loggers(config, run_dir, resume),
        log_every_n_steps=50,  # each log reads values back from the GPU: not every step
        num_sanity_val_steps=0,
        check_val_every_n_epoch=t.val_every_n_epochs,
        enable_model_summary=False,  # train() prints the model's own summary, with its real FLOPs per image
    ))


def train(config: RunConfig, run_dir: Path, resume: bool = False, plan: dict | None = None) -> Path:
    """Train a new run, or resume one (`config` then differs from the saved one at most in its
    length); returns the path of its last checkpoint. A planned run's plan is written as plan.yaml."""
    if config.trainer.max_epochs is None and config.trainer.max_time is None:
        raise VitlabError("training needs a limit: set --max-epochs or --max-time")
    check_installed(config)  # a missing extra is an error before the run directory is touched
    # With several processes, the first one of the launch checks and writes the run directory; the
    # others (started by Lightning, torchrun or SLURM with the same command) only read it.
    writer = launched_as_rank_zero()
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt_path = prepare_run_dir(run_dir, resume) if writer else (last if resume and last.is_file() else None)
    init_weights = None
    if config.model.init and ckpt_path is None:  # a resumed run's weights are in its checkpoint
        init_weights, source = read_init(config.model.init)
        config = dataclasses.replace(config, model=init_config(config.model, source))
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)

    datamodule = ImageDataModule(config.data, config.model.image_size, seed=config.trainer.seed,
                                 compile=config.trainer.compile, channels=config.model.in_channels)
    datamodule.setup("fit")
    classes = datamodule.classes
    if config.model.num_classes is not None and config.model.num_classes != len(classes):
        raise VitlabError(f"model.num_classes is {config.model.num_classes} but {config.data.source} has "
                          f"{len(classes)} classes: leave model.num_classes unset, and it follows the data")
    if writer:
        if resume:
            note_length_change(configs.load(run_dir / "config.yaml"), config)
        # Only once the data has loaded, so a bad data set leaves no half-made run behind.
        configs.save(config, run_dir / "config.yaml")
        if plan is not None:
            atomic_write(run_dir / "plan.yaml", yaml.safe_dump(plan, sort_keys=False), "plan")
    model_config = dataclasses.replace(config.model, num_classes=len(classes))
    module = Classifier(**Classifier.hparams_for(
        model_config, config.optim, classes, datamodule.mean, datamodule.std, config.trainer.val_tta, config.data))
    if init_weights is not None:
        load_init(module.model, init_weights, config.model.init)
    if writer:
        print("model:", *module.model.describe(), sep="\n  ", file=sys.stderr)
    if config.trainer.compile:
        module.model.compile()  # in place: parameter names, and so checkpoints, stay the same

    quiet_lightning()
    stops = StopRequests()
    trainer = build_trainer(config, run_dir, build_callbacks(config, run_dir, resume, stops), resume)
    parent = os.getppid()
    with stops, watched(trainer) as watch:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except RuntimeError as e:  # a collective failed: is another process gone?
            raise lost_process(e, trainer, watch, parent, last) or e from None
    metrics = next(c for c in trainer.callbacks if isinstance(c, MetricsCSV))
    if metrics.pending is not None:  # the final weights are not validated yet
        trainer.validate(module, datamodule=datamodule, verbose=False)
    log_run_end(trainer, run_dir)  # MLflow and W&B: the final accuracy, config.yaml, the learning curves
    return last
