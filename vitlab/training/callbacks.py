"""The Lightning callbacks of a training run, each one concern:

- `RunClock` is the run's clock and time limit (trainer.max_time), and carries stop requests
  (`StopRequests`: SIGTERM, SIGINT, SLURM's SIGUSR1); with several processes it is where they agree.
- `MetricsCSV` appends one row per epoch to RUN_DIR/metrics.csv, and sends it to the run's loggers.
- `LastCheckpoint` keeps RUN_DIR/checkpoints/last.ckpt current: every `trainer.checkpoint_every`
  of training time, when training ends, and on a stop request. `BestCheckpoint` keeps best.ckpt,
  the best validation accuracy so far.
- `DivergenceGuard` stops training at the first non-finite loss.
- `ProgressBar` is Lightning's Rich bar, saying only what is true of a vitlab run.
Checkpoints themselves are written and read by vitlab.io (write_checkpoint, read_checkpoint).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer

from vitlab.errors import VitlabError
from vitlab.io import atomic_open, free_space, metric_columns, read_metric_rows


# val_acc is with the run's test-time views (trainer.val_tta), val_acc_plain without them.
METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_acc_plain",
                  "elapsed_s"]


class MetricsCSV(L.Callback):
    """Appends one row per epoch to RUN_DIR/metrics.csv, flushed at once, so a run that is still
    going (or was resumed) can be read and plotted; earlier rows are never rewritten, and a resumed
    run writes each epoch's row once. `elapsed_s` is the run's training time, across resumes.

    An epoch that was not validated gets empty val_* columns, except the run's final epoch: when a
    time limit cuts it short, its row waits for the final validation that `train` runs, so the last
    row always scores the final weights (those in last.ckpt). Each row written also goes to the
    Trainer's loggers (trainer.loggers) at the row's step: `epoch` and `epoch/<column>`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.start = time.monotonic()
        self.elapsed_before = 0.0  # training time of the run before this process resumed it
        self.validated_step = -1
        self.writes = True
        self.pending: dict | None = None  # the final epoch's row, until its validation
        self.loggers: list = []  # the Trainer's loggers, which get each row too
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
            "val_acc_plain": None,
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
        return {key: trainer.callback_metrics.get(key) for key in ("val_loss", "val_acc", "val_acc_plain")}

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str):
        self.writes = trainer.is_global_zero  # one writer, whatever the number of processes
        self.loggers = trainer.loggers

    def write(self, row: dict):
        if row["step"] <= self.written_step or not self.writes:
            return
        new = not self.path.exists()
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        # A run resumed from an older vitlab keeps its file's columns (rows go on under that header).
        columns = METRIC_COLUMNS if new else metric_columns(self.path)
        try:
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as e:
            raise VitlabError(f"cannot write metrics {self.path}: {e.strerror or e} ({free_space(self.path)})") from None
        self.written_step = row["step"]
        values = {k if k == "epoch" else f"epoch/{k}": float(v)
                  for k, v in row.items() if k != "step" and v is not None}
        for logger in self.loggers:
            logger.log_metrics(values, step=row["step"])


class Interrupted(VitlabError):
    """Training stopped on a signal after saving a checkpoint; the exit code says which signal."""

    rank_zero_tells = True

    def __init__(self, signum: int, checkpoint: Path, note: str = ""):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; saved {checkpoint}{note}: "
                         f"the same command with --resume continues from it")


def requeue_slurm_job() -> str:
    """Put this SLURM job back in the queue (as Lightning's auto-requeue does); what happened, for the message."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return ""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"; could not requeue SLURM job {job} ({e})"
    if result.returncode != 0:
        return f"; could not requeue SLURM job {job} ({result.stderr.strip() or result.returncode})"
    return f"; requeued SLURM job {job}"


class Aborted(VitlabError):
    """A second Ctrl-C: training stops at once, without a checkpoint."""

    exit_code = 130
    rank_zero_tells = True


class StopRequests:
    """SIGTERM, SIGINT and SIGUSR1, while installed, only note that training should stop (a second
    SIGINT interrupts at once), so that the stop can happen between two steps with a checkpoint
    (the RunClock carries the request to every process). SIGUSR1 is SLURM's warning before a time
    limit (`#SBATCH --signal=SIGUSR1@90`): the job is then also requeued. They replace Lightning's
    own signal handling, which vitlab.training.processes switches off."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise Aborted("interrupted again: stopped at once, without a checkpoint; --resume continues "
                          "from the last one")
        self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunClock(Timer):
    """The run's clock: Lightning's Timer (its time limit stops training after a step; its time
    survives resumes) and what the LR schedule and LastCheckpoint read from it, with stop requests.

    Processes must decide together: one that saves or stops alone leaves the others waiting in a
    collective for ever, and a signal may reach only some of them (the launching process alone, or
    the processes of one pre-empted machine). They agree by one all-reduce of (rank 0's training
    time, the stop request any process heard), but not at every step (it makes the host wait for the
    device): after the first step (when compiling ends), every trainer.log_every_n_steps steps (when
    Lightning reads its logs from the device anyway) and at each epoch's end. So under DDP the time
    limit, the time-fitted LR and the checkpoint timer lag by at most that interval, and a stop
    request waits for the next agreement. One process agrees with itself after every step."""

    def __init__(self, duration_s: float | None, stops: StopRequests):
        super().__init__(duration=None if duration_s is None else timedelta(seconds=duration_s), interval="step")
        self.duration_s = duration_s
        self.stops = stops
        self.agreed_step = -1  # the global step of the last agreement, and what was agreed then:
        self.agreed_elapsed = 0.0  # rank 0's seconds of training (across resumes)
        self.stop: int | None = None  # the signal that asked training to stop, if any

    @property
    def state_key(self) -> str:
        return "Timer"  # where Lightning's Timer saved the time: runs checkpointed before the clock resume with it

    def agree(self, trainer: L.Trainer):
        elapsed, stop = self.time_elapsed(), self.stops.signum or 0
        if trainer.world_size > 1:  # the maximum of each: rank 0's time (the others give -1), any stop request
            mine = torch.tensor([elapsed if trainer.global_rank == 0 else -1.0, stop], dtype=torch.float64,
                                device=trainer.strategy.root_device)
            elapsed, stop = trainer.strategy.reduce(mine, reduce_op="max").tolist()
        self.agreed_elapsed, self.stop = elapsed, int(stop) or None
        self.agreed_step = trainer.global_step
        if self.duration_s is not None and self.agreed_elapsed >= self.duration_s:
            trainer.should_stop = True

    def on_fit_start(self, trainer, *args, **kwargs):
        pass  # not the Timer's check: a resumed run's step is restored later, by on_train_start

    def on_train_start(self, trainer, *args, **kwargs):
        super().on_train_start(trainer, *args, **kwargs)
        self.agree(trainer)  # a resumed run: its step and time; if its time is spent, it stops at once

    def on_train_batch_end(self, trainer, *args, **kwargs):
        step = trainer.global_step
        if trainer.world_size == 1 or step == 1 or step % trainer.log_every_n_steps == 0:
            self.agree(trainer)

    def on_train_epoch_end(self, trainer, *args, **kwargs):
        self.agree(trainer)


class LastCheckpoint(L.Callback):
    """last.ckpt: the training state to resume from, written every `interval_s` seconds of training
    (after the step or at the end of the epoch where it falls due, as the RunClock agreed), when
    training ends, and on a stop request (then training ends with `Interrupted`). Not at every
    epoch's end: on a GPU an epoch can take a second, and writing the checkpoint a fifth of one."""

    def __init__(self, path: Path, interval_s: float, clock: RunClock):
        self.path = path
        self.interval_s = interval_s
        self.clock = clock
        self.saved_at = 0.0  # the clock's training time at the last save (or the start)

    def save(self, trainer: L.Trainer):
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state, to resume from
        self.saved_at = self.clock.agreed_elapsed

    def on_train_start(self, trainer, module):
        self.saved_at = self.clock.agreed_elapsed  # the clock (before this callback) has agreed

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.clock.agreed_step != trainer.global_step or batch_idx + 1 >= trainer.num_training_batches:
            # Only where the processes agreed; and the epoch's last batch has its checkpoint at the
            # epoch's end, after validation and the metrics row (Lightning resumed from here would skip it).
            return
        self.act(trainer, end=False)

    def on_train_epoch_end(self, trainer, module):
        # Every ending is known here: max_epochs; the time limit (the clock stops after a step); early
        # stopping (it decides when validation ends, see run.py). Not later: at the end of training the
        # EMA callback puts the averaged weights in the model.
        self.act(trainer, end=trainer.should_stop or trainer.current_epoch + 1 == trainer.max_epochs)

    def act(self, trainer: L.Trainer, end: bool):
        stop = self.clock.stop
        if end or stop is not None or self.clock.agreed_elapsed - self.saved_at >= self.interval_s:
            self.save(trainer)
        if stop is not None:
            requeued = requeue_slurm_job() if stop == signal.SIGUSR1 and trainer.is_global_zero else ""
            raise Interrupted(stop, self.path, requeued)


class BestCheckpoint(L.Callback):
    """best.ckpt: the checkpoint with the best validation accuracy so far. The validation of the
    final weights that `train` runs after fitting is a candidate too: then last.ckpt (which holds
    exactly those weights) is copied."""

    def __init__(self, path: Path, last: Path, best_so_far: float | None):
        self.path = path
        self.last = last
        self.best = best_so_far

    def on_validation_end(self, trainer, module):
        score = trainer.callback_metrics.get("val_acc")
        if trainer.sanity_checking or score is None or (self.best is not None and float(score) <= self.best):
            return
        self.best = float(score)
        if trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path, weights_only=False)
        elif trainer.is_global_zero:
            with open(self.last, "rb") as source, atomic_open(self.path, "checkpoint") as f:
                shutil.copyfileobj(source, f)


class DivergenceGuard(L.Callback):
    """Stops training at the first non-finite loss, naming its step and the last good checkpoint,
    before any checkpoint of the diverged weights can be written.

    Reading the loss on the host waits for the GPU to finish every queued step, so the first
    non-finite step is recorded on the device and read only when Lightning writes its logs (every
    trainer.log_every_n_steps, a read it makes anyway), at the end of each epoch and before every
    checkpoint: a diverged run trains at most that many steps further, and they are never saved."""

    def __init__(self, last: Path):
        self.last = last
        self.first_bad = None  # () int64 on the loss's device: the first step with a non-finite loss, or -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self.first_bad is None:
            self.first_bad = torch.tensor(-1, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, trainer.global_step, self.first_bad)
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self.check(trainer)

    def on_train_epoch_end(self, trainer, module):
        self.check(trainer)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.check(trainer)

    def check(self, trainer):
        if self.first_bad is None:
            return
        step = int(self.first_bad)
        if trainer.world_size > 1:  # all processes stop together, or the others would wait forever
            step = int(trainer.strategy.reduce(torch.tensor(step, device=self.first_bad.device), reduce_op="max"))
        if step >= 0:
            good = f"the last good checkpoint is {self.last}" if self.last.is_file() else "no checkpoint was written"
            raise VitlabError(f"training diverged: the loss is not finite at step {step}; "
                              f"{good} (try a lower optim.lr or trainer.gradient_clip)")


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar (one look whatever else is installed) without two misreadings:
    a run with a time limit has no epoch count (Lightning's max_epochs -1, which its bar shows as
    "Epoch 3/-2"), and a run directory holds one run, so the loggers' version ("v_num") means nothing."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the bar's label
        epochs = self.trainer.max_epochs
        description = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        # As Lightning pads it: the same width as the validation bar's label, so the bar does not jump.
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
