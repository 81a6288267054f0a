"""A training run: one directory holding its config, checkpoints, metrics and TensorBoard events.

    RUN_DIR/config.yaml                 the full resolved config
    RUN_DIR/checkpoints/last.ckpt       written every trainer.checkpoint_every and at the end;
                                        --resume continues from it
    RUN_DIR/checkpoints/best.ckpt       best validation accuracy so far (final weights included)
    RUN_DIR/metrics.csv                 one row per epoch
    RUN_DIR/tensorboard/                TensorBoard events
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from vitlab import config as configs
from vitlab.config import RunConfig
from vitlab.data.datamodule import ImageDataModule
from vitlab.errors import VitlabError
from vitlab.io import free_space
from vitlab.pretrained import init_config, load_init, read_init
from vitlab.training.checkpoints import (
    AtomicCheckpointIO,
    BestCheckpoint,
    DivergenceGuard,
    LastCheckpoint,
    StopRequests,
)
from vitlab.training.module import Classifier

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "elapsed_s"]


def read_metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of RUN_DIR/metrics.csv as written (empty strings where a value is missing); [] if none."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsCSV(L.Callback):
    """Appends one row per epoch to RUN_DIR/metrics.csv, flushed at once, so a run that is still
    going (or was resumed) can be read and plotted; earlier rows are never rewritten, and a resumed
    run writes each epoch's row once. `elapsed_s` is the run's training time, across resumes.

    An epoch that was not validated gets empty val_* columns, except the run's final epoch: when a
    time limit cuts it short, its row waits for the final validation that `train` runs, so the last
    row always scores the final weights (those in last.ckpt).
    """

    def __init__(self, path: Path):
        self.path = path
        self.start = time.monotonic()
        self.elapsed_before = 0.0  # training time of the run before this process resumed it
        self.validated_step = -1
        self.writes = True
        self.pending: dict | None = None  # the final epoch's row, until its validation
        self.written_step = max((int(r["step"]) for r in read_metric_rows(path.parent)), default=-1)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.start

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict):
        self.elapsed_before, self.start = state["elapsed_s"], time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule):
        self.validated_step = trainer.global_step
        if self.pending is not None and self.pending["step"] == trainer.global_step:
            self.write({**self.pending, **self.val_metrics(trainer)})
            self.pending = None

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule):
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            **module.train_metrics(),
            "val_loss": None,
            "val_acc": None,
            "elapsed_s": round(self.elapsed(), 1),
        }
        if self.validated_step == trainer.global_step:
            self.write({**row, **self.val_metrics(trainer)})
        elif trainer.should_stop or trainer.current_epoch + 1 == trainer.max_epochs:
            self.pending = row
        else:
            self.write(row)

    @staticmethod
    def val_metrics(trainer: L.Trainer) -> dict:
        return {"val_loss": trainer.callback_metrics.get("val_loss"), "val_acc": trainer.callback_metrics.get("val_acc")}

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str):
        self.writes = trainer.is_global_zero  # one writer, whatever the number of processes

    def write(self, row: dict):
        if row["step"] <= self.written_step or not self.writes:
            return
        new = not self.path.exists()
        try:
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
        except OSError as e:
            raise VitlabError(f"cannot write metrics {self.path}: {e.strerror or e} ({free_space(self.path)})") from None
        self.written_step = row["step"]


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its launch (or the only one), known before the Trainer
    exists from the variables the launchers set: torchrun (RANK), Lightning's own launcher
    (LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def default_precision() -> str:
    # bf16 matmuls are ~100x slower than fp32 on CPUs without AVX512-BF16: only use them on a GPU.
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


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


def train(config: RunConfig, run_dir: Path, resume: bool = False) -> Path:
    """Train a new run, or resume one (`config` then differs from the saved one at most in its
    length); returns the path of its last checkpoint."""
    if config.trainer.max_epochs is None and config.trainer.max_time is None:
        raise VitlabError("training needs a limit: set --max-epochs or --max-time")
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
                                 compile=config.trainer.compile)
    datamodule.setup("fit")
    if writer:
        if resume:
            note_length_change(configs.load(run_dir / "config.yaml"), config)
        # Only once the data has loaded, so a bad data set leaves no half-made run behind.
        configs.save(config, run_dir / "config.yaml")
    model_config = dataclasses.replace(config.model, num_classes=len(datamodule.classes))
    module = Classifier(**Classifier.hparams_for(
        model_config, config.optim, datamodule.classes, datamodule.mean, datamodule.std,
        config.trainer.val_tta))
    if init_weights is not None:
        load_init(module.model, init_weights, config.model.init)
    if config.trainer.compile:
        module.model.compile()  # in place: parameter names, and so checkpoints, stay the same

    t = config.trainer
    precision = default_precision() if t.precision == "auto" else t.precision
    if "bf16" in precision and not torch.cuda.is_available():
        print(f"warning: precision {precision} without a GPU is very slow on most CPUs; "
              f"trainer.precision=32-true trains in fp32", file=sys.stderr)
    metrics = MetricsCSV(run_dir / "metrics.csv")
    stops = StopRequests()
    callbacks = [
        DivergenceGuard(last),  # first: a diverged step stops before anything is saved
        metrics,
        LearningRateMonitor(logging_interval="step"),
    ]
    if t.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    if t.early_stopping_patience is not None:
        # Deciding when validation ends, before the epoch's end, where LastCheckpoint saves the final state.
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=t.early_stopping_patience,
                                       check_on_train_epoch_end=False))
    callbacks += [  # last: a checkpoint holds what every other callback did at that step (the EMA update)
        LastCheckpoint(last, configs.parse_duration(t.checkpoint_every).total_seconds(), stops),
        BestCheckpoint(run_dir / "checkpoints" / "best.ckpt", last, best_val_acc(run_dir) if resume else None),
    ]
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        use_distributed_sampler=False,  # the loaders shard by rank themselves (EpochBatches)
        default_root_dir=run_dir,
        max_epochs=-1 if t.max_epochs is None else t.max_epochs,
        max_time=None if t.max_time is None else configs.parse_duration(t.max_time),
        precision=precision,
        gradient_clip_val=t.gradient_clip,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,  # vitlab's own LastCheckpoint and BestCheckpoint write the checkpoints
        logger=TensorBoardLogger(save_dir=run_dir, name="", version="tensorboard"),
        log_every_n_steps=50,  # each log reads values back from the GPU: not every step
        num_sanity_val_steps=0,
        check_val_every_n_epoch=t.val_every_n_epochs,
    )
    with stops:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if metrics.pending is not None:  # the final weights are not validated yet
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return last
