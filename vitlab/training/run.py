"""A training run: one directory holding its config, checkpoints, metrics and TensorBoard events.

    RUN_DIR/config.yaml                 the full resolved config
    RUN_DIR/checkpoints/last.ckpt       written every epoch; --resume continues from it
    RUN_DIR/checkpoints/best.ckpt       best validation accuracy so far
    RUN_DIR/metrics.csv                 one row per epoch
    RUN_DIR/tensorboard/                TensorBoard events
"""

from __future__ import annotations

import csv
import dataclasses
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from vitlab import config as configs
from vitlab.config import RunConfig
from vitlab.data.datamodule import ImageDataModule
from vitlab.errors import VitlabError
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
    going (or was resumed) can be read and plotted; earlier rows are never rewritten.

    An epoch that was not validated gets empty val_* columns, except the run's final epoch: when a
    time limit cuts it short, its row waits for the final validation that `train` runs, so the last
    row always scores the final weights (those in last.ckpt).
    """

    def __init__(self, path: Path):
        self.path = path
        self.start = time.monotonic()
        self.validated_step = -1
        self.pending: dict | None = None  # the final epoch's row, until its validation
        # A resumed run closes its checkpoint's epoch again: each step's row is written once only.
        self.written_step = max((int(r["step"]) for r in read_metric_rows(path.parent)), default=-1)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule):
        self.validated_step = trainer.global_step
        if self.pending is not None and self.pending["step"] == trainer.global_step:
            self.write({**self.pending, **self.val_metrics(trainer)})
            self.pending = None

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule):
        m = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train_loss": m.get("train_loss_epoch"),
            "train_acc": m.get("train_acc"),
            "val_loss": None,
            "val_acc": None,
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

    def write(self, row: dict):
        if row["step"] <= self.written_step:
            return
        row["elapsed_s"] = round(time.monotonic() - self.start, 1)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
        self.written_step = row["step"]


def default_precision() -> str:
    # bf16 matmuls are ~100x slower than fp32 on CPUs without AVX512-BF16: only use them on a GPU.
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Check the run directory (writing nothing); return the checkpoint to resume from, or None.

    A new run refuses a directory that already holds a run, so nothing the user had is overwritten.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise VitlabError(f"cannot resume: {last} does not exist (train without --resume first)")
        return last
    if last.exists() or (run_dir / "config.yaml").exists():
        raise VitlabError(f"run directory {run_dir} already holds a run: use --resume, or another --run-dir")
    return None


def train(config: RunConfig, run_dir: Path, resume: bool = False) -> Path:
    """Train a new run, or resume one (then `config` is the run's saved config); returns the path
    of its last checkpoint."""
    if config.trainer.max_epochs is None and config.trainer.max_time is None:
        raise VitlabError("training needs a limit: set --max-epochs or --max-time")
    ckpt_path = prepare_run_dir(run_dir, resume)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)

    datamodule = ImageDataModule(config.data, config.model.image_size)
    datamodule.setup("fit")
    if not resume:  # only once the data has loaded, so a bad data set leaves no half-made run behind
        run_dir.mkdir(parents=True, exist_ok=True)
        configs.save(config, run_dir / "config.yaml")
    model_config = dataclasses.replace(config.model, num_classes=len(datamodule.classes))
    module = Classifier(**Classifier.hparams_for(
        model_config, config.optim, datamodule.classes, datamodule.mean, datamodule.std,
        config.trainer.val_tta))
    if config.trainer.compile:
        module.model.compile()  # in place: parameter names, and so checkpoints, stay the same

    t = config.trainer
    precision = default_precision() if t.precision == "auto" else t.precision
    if "bf16" in precision and not torch.cuda.is_available():
        print(f"warning: precision {precision} without a GPU is very slow on most CPUs; "
              f"trainer.precision=32-true trains in fp32", file=sys.stderr)
    metrics = MetricsCSV(run_dir / "metrics.csv")
    callbacks = [
        # ModelCheckpoint's own save_last only copies a checkpoint when one is saved (val_acc improved),
        # so last.ckpt has its own checkpointer: written at the end of every epoch, the final one too.
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_on_train_epoch_end=True,
                        enable_version_counter=False),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_acc", mode="max",
                        enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        metrics,
    ]
    if t.ema_decay is not None:
        callbacks.append(EMAWeightAveraging(decay=t.ema_decay))
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=t.early_stopping_patience))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=-1 if t.max_epochs is None else t.max_epochs,
        max_time=None if t.max_time is None else configs.parse_duration(t.max_time),
        precision=precision,
        gradient_clip_val=t.gradient_clip,
        callbacks=callbacks,
        logger=TensorBoardLogger(save_dir=run_dir, name="", version="tensorboard"),
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=t.val_every_n_epochs,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if metrics.pending is not None and not trainer.interrupted:  # the final weights are not validated yet
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return run_dir / "checkpoints" / "last.ckpt"
