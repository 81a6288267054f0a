"""vitlab from Python: `train` does what `vitlab train` does (the CLI calls it) and returns a `Run`.

    from vitlab import train
    run = train(preset="cpu-hour", data="folder:DIR", max_time="00:10:00", overrides={"optim.lr": 1e-3})
    run.accuracy, run.best_checkpoint, run.metrics

Errors are `VitlabError`s with the CLI's one-line messages.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vitlab import config as configs
from vitlab.config import RunConfig
from vitlab.errors import VitlabError
from vitlab.io import read_metric_rows


@dataclass
class Run:
    """A run directory and what is in it."""

    run_dir: Path
    config: RunConfig

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "best.ckpt"

    @property
    def metrics(self) -> list[dict[str, str]]:
        """The rows of metrics.csv, one per epoch, as written."""
        return read_metric_rows(self.run_dir)

    @property
    def accuracy(self) -> float | None:
        """The held-out accuracy of the final weights (last.ckpt), as a fraction, with the run's
        validation TTA (config.trainer.val_tta); None if they were not validated."""
        rows = self.metrics
        return float(rows[-1]["val_acc"]) if rows and rows[-1]["val_acc"] else None


def train(preset: str | None = None, data: str | None = None, *, config: str | Path | None = None,
          max_epochs: int | None = None, max_time: str | None = None, run_dir: str | Path | None = None,
          seed: int | None = None, resume: bool = False, overrides: dict | None = None) -> Run:
    """Train a ViT, or resume the run in `run_dir` (give the same arguments as when it started, or
    none: only max_epochs and max_time may change; a run that has not begun yet is started).
    The config is resolved as: defaults -> preset -> config file -> data / max_epochs / max_time /
    seed -> overrides ({"section.key": value})."""
    from vitlab.training.run import train as train_run

    flags = {"data": {"source": data},
             "trainer": {"max_epochs": max_epochs, "max_time": max_time, "seed": seed}}
    flags = {section: {k: v for k, v in entries.items() if v is not None} for section, entries in flags.items()}
    if resume and run_dir is None:
        raise VitlabError("resuming needs the run's directory (--run-dir)")
    saved = Path(run_dir) / "config.yaml" if resume else None
    if saved is not None and not saved.is_file():
        # Killed before it began (e.g. while decoding): a job scheduler re-running the command with
        # --resume expects the run to start.
        print(f"{run_dir} holds no run yet: starting it", file=sys.stderr)
        resume, saved = False, None
    if saved is not None:
        run_config = configs.resolve_resume(configs.load(saved), preset, config, flags, overrides)
    else:
        run_config = configs.resolve(preset, config, flags, overrides)
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_run(run_config, run_dir, resume=resume)
    return Run(run_dir, run_config)
