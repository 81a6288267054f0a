"""vitlab from Python: `train` does what `vitlab train` does (the CLI calls it) and returns a `Run`.

    from vitlab import train
    run = train(preset="cpu-hour", data="folder:DIR", max_time="00:10:00", overrides={"optim.lr": 1e-3})
    run.accuracy, run.best_checkpoint, run.metrics
    run = train(data="folder:DIR", max_time="00:20:00")  # planned from the data and this machine: run.plan

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

    @property
    def plain_accuracy(self) -> float | None:
        """The held-out accuracy of the final weights without test-time views; None if not validated
        (or validated by a vitlab that did not record it)."""
        rows = self.metrics
        return float(rows[-1]["val_acc_plain"]) if rows and rows[-1].get("val_acc_plain") else None

    @property
    def plan(self) -> dict | None:
        """A planned run's plan (plan.yaml: the data's summary, the measured speeds, the choices and
        why); None for a run from a preset or config."""
        path = self.run_dir / "plan.yaml"
        return configs.read_yaml(path, "plan") if path.is_file() else None


def train(preset: str | None = None, data: str | None = None, *, config: str | Path | None = None,
          max_epochs: int | None = None, max_time: str | None = None, run_dir: str | Path | None = None,
          seed: int | None = None, resume: bool = False, overrides: dict | None = None) -> Run:
    """Train a ViT, or resume the run in `run_dir` (give the same arguments as when it started, or
    none: only max_epochs and max_time may change; a run that has not begun yet is started).
    The config is resolved as: defaults -> preset -> config file -> data / max_epochs / max_time /
    seed -> overrides ({"section.key": value}). With preset "auto", or with no preset, config file
    or override of a recipe setting (configs.NOT_RECIPE are none), the run is planned
    (vitlab.planning): the plan's settings take the preset's place."""
    from vitlab.training.processes import launched_as_rank_zero
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
    chosen = preset is not None or config is not None or any(k not in configs.NOT_RECIPE for k in overrides or {})
    planned = preset == "auto" or not chosen
    plan = None
    if saved is not None:  # a planned run's config.yaml holds its plan's settings: never planned again
        run_config = configs.resolve_resume(configs.load(saved), None if planned else preset, config, flags,
                                            overrides)
    elif planned:
        plan = plan_run(config, flags, overrides)
        base = configs.apply(RunConfig(), plan.settings, "the plan")
        run_config = configs.resolve(None, config, flags, overrides, base=base)
    else:
        run_config = configs.resolve(preset, config, flags, overrides)
        if preset is None and config is None and launched_as_rank_zero():  # said once the settings are valid
            print("no preset or config file: vitlab's defaults with the key=value settings on top (--preset auto "
                  "plans the run instead)", file=sys.stderr)
    name = "auto" if planned else preset or "run"
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_run(run_config, run_dir, resume=resume, plan=plan.record() if plan else None)
    return Run(run_dir, run_config)


def plan_run(config, flags: dict, overrides: dict | None):
    """The plan of a new run (printed by the launching process): on the data, budget and accelerator
    the command gives."""
    from vitlab.planning.plan import announce, make_plan
    from vitlab.training.processes import launched_as_rank_zero

    # No epoch limit unless one is given: a time budget alone is the plan's only limit.
    given = configs.resolve(None, config, flags, overrides, base=RunConfig(trainer=configs.TrainerConfig(max_epochs=None)))
    t = given.trainer
    if t.devices != 1 or t.num_nodes != 1:
        # Each process would measure its own speeds and could plan another model.
        raise VitlabError("a planned run trains in one process: see the plan with `vitlab info --preset auto "
                          "--data ... --max-time ...` and train it with its settings on several")
    plan = make_plan(given.data, t.max_time, t.max_epochs, t.accelerator)
    if launched_as_rank_zero():
        announce(plan)
    return plan
