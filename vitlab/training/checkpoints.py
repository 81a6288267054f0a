"""Checkpoints that survive crashes: how they are written, read, and when.

- `AtomicCheckpointIO` writes every checkpoint through vitlab.io (temp file + fsync + rename), so a
  crash during a write leaves the previous checkpoint whole, and refuses weights that are not finite.
- `LastCheckpoint` keeps RUN_DIR/checkpoints/last.ckpt current: every `trainer.checkpoint_every`
  of wall time, when training ends, and when SIGTERM, SIGINT or SLURM's SIGUSR1 asks it to stop.
  `BestCheckpoint` keeps best.ckpt, the best validation accuracy so far.
- `DivergenceGuard` stops training at the first non-finite loss.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from vitlab import __version__
from vitlab.errors import VitlabError
from vitlab.io import CHECKPOINT_FORMAT, atomic_open, read_checkpoint


class Interrupted(VitlabError):
    """Training stopped on a signal after saving a checkpoint; the exit code says which signal."""

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


def non_finite_tensors(state: dict) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing atomically and durably, and never a non-finite model."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None):
        bad = non_finite_tensors(checkpoint["state_dict"])
        if bad:
            raise VitlabError(f"refused to write checkpoint {path}: weights are not finite ({bad[0]}, ...); "
                              f"training diverged (try a lower optim.lr or trainer.gradient_clip)")
        checkpoint["vitlab"] = {"version": __version__, "format": CHECKPOINT_FORMAT}
        with atomic_open(path, "checkpoint") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(Path(path))


class StopRequests:
    """SIGTERM, SIGINT and SIGUSR1, while installed, only note that training should stop (a second
    SIGINT interrupts at once), so that the stop can happen between two batches with a checkpoint.
    SIGUSR1 is SLURM's warning before a time limit (`#SBATCH --signal=SIGUSR1@90`): the job is then
    also requeued. Installed before the Trainer, these replace Lightning's own SIGUSR1 handling,
    which saves from inside the signal handler, part-way through a step, to a file --resume does not read."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class LastCheckpoint(L.Callback):
    """last.ckpt: the training state to resume from, written every `interval_s` seconds of training
    (after the batch or at the end of the epoch where it falls due), when training ends, and on a
    stop request (then training ends with `Interrupted`). Not at every epoch's end: on a GPU an
    epoch can take a second, and writing the checkpoint a fifth of one."""

    def __init__(self, path: Path, interval_s: float, stops: StopRequests):
        self.path = path
        self.interval_s = interval_s
        self.stops = stops
        self.saved_at = time.monotonic()

    def save(self, trainer: L.Trainer):
        trainer.save_checkpoint(self.path)
        self.saved_at = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last batch: its checkpoint comes at the epoch's end, after validation and the
            # metrics row (Lightning resumed from here would skip the epoch's end).
            return
        stop, due = self.stops.signum, time.monotonic() - self.saved_at >= self.interval_s
        if trainer.world_size > 1:  # every process saves together (saving waits for all): rank 0 decides
            stop, due = trainer.strategy.broadcast((stop, due), src=0)
        if due or stop is not None:
            self.save(trainer)
        self.stop_if_asked(trainer, stop)

    def on_train_epoch_end(self, trainer, module):
        stop, due = self.stops.signum, time.monotonic() - self.saved_at >= self.interval_s
        if trainer.world_size > 1:
            stop, due = trainer.strategy.broadcast((stop, due), src=0)
        # Every ending is known here: max_epochs; a time limit (Lightning's Timer stops after a batch);
        # early stopping (it decides when validation ends, see run.py). Not later: at the end of
        # training the EMA callback puts the averaged weights in the model.
        last_epoch = trainer.should_stop or trainer.current_epoch + 1 == trainer.max_epochs
        if due or stop is not None or last_epoch:
            self.save(trainer)
        self.stop_if_asked(trainer, stop)

    def stop_if_asked(self, trainer, stop: int | None):
        if stop is not None:
            requeued = requeue_slurm_job() if stop == signal.SIGUSR1 and trainer.is_global_zero else ""
            raise Interrupted(stop, self.path, requeued)

    def on_exception(self, trainer, module, exception):
        # Lightning's own SIGTERM handling can stop the loop between our hook and the next batch.
        if type(exception).__name__ == "SIGTERMException" and self.stops.signum is not None:
            self.save(trainer)


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
            trainer.save_checkpoint(self.path)
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
