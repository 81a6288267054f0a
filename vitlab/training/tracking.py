"""Tracking a run with Lightning's loggers (`trainer.loggers`): TensorBoard, CSV, MLflow, Weights & Biases.

    RUN_DIR/tensorboard/     TensorBoard events (tensorboard, the default)
    RUN_DIR/csv/             Lightning's CSVLogger: metrics.csv and hparams.yaml (csv)
    RUN_DIR/mlflow/          MLflow's store (mlflow, unless trainer.mlflow_uri names another): the
                             SQLite database mlflow.db, and artifacts/
    RUN_DIR/wandb/           W&B's run files (wandb; offline unless WANDB_MODE or WANDB_API_KEY is set)
    RUN_DIR/tracking.json    the MLflow and W&B run ids, each written once: --resume continues those runs
    RUN_DIR/curves.png       the learning curves, as `vitlab plot` draws them (with mlflow or wandb)

Every logger gets what Lightning logs (train_loss and lr-AdamW every 50 steps, val_loss and val_acc at
each validation) and each row of metrics.csv at the row's step, as `epoch` and `epoch/<column>`
(MetricsCSV sends them). MLflow and W&B also get the run's resolved config instead of the LightningModule's
hyperparameters (flattened as `section.key` parameters in MLflow, nested in W&B's config), and, when
training ends (`log_run_end`), the held-out accuracy of the final weights and the best one
(`final_val_acc`, `best_val_acc`), config.yaml and curves.png. Only the first process writes any of it:
the other processes of a DDP run get a DummyLogger in place of the MLflow and W&B loggers (they
would open the store and import the library for nothing), and `log_run_end` acts on rank 0 alone.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_only

from vitlab import config as configs
from vitlab.config import RunConfig
from vitlab.errors import VitlabError
from vitlab.io import atomic_write, read_metric_rows
from vitlab.training.processes import launched_as_rank_zero

IDS_FILE = "tracking.json"


def build_loggers(config: RunConfig, run_dir: Path, resume: bool) -> list[Logger]:
    """The Lightning loggers of `trainer.loggers`, in its order; a resumed run's MLflow and W&B
    loggers continue the runs recorded in RUN_DIR/tracking.json."""
    ids = read_ids(run_dir) if resume else {}
    first = launched_as_rank_zero()
    loggers: list[Logger] = []
    for name in config.trainer.loggers:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=run_dir, name="", version="tensorboard"))
        elif name == "csv":
            loggers.append(AppendingCSVLogger(save_dir=run_dir, name="", version="csv"))
        elif name == "mlflow":
            require("mlflow")
            loggers.append(MLflowTracker(config, run_dir, ids.get("mlflow", {}).get("run_id")) if first
                           else DummyLogger())
        elif name == "wandb":
            require("wandb")
            loggers.append(WandbTracker(config, run_dir, ids.get("wandb", {}).get("id")) if first else DummyLogger())
        else:  # the config refuses other names
            raise VitlabError(f"trainer.loggers: unknown logger '{name}' (choices: {', '.join(configs.LOGGER_NAMES)})")
    return loggers


def require(package: str):
    """A one-line error unless `package` (an extra's) is installed; looked up, not imported (MLflow takes seconds)."""
    if importlib.util.find_spec(package) is None:
        raise VitlabError(f"trainer.loggers: {package} needs the {package} extra "
                          f"(pip install 'vitlab[{package}]')")


def check_installed(config: RunConfig):
    """Before a run writes anything: every logger of trainer.loggers can be built."""
    for name in config.trainer.loggers:
        if name in ("mlflow", "wandb"):
            require(name)


def read_ids(run_dir: Path) -> dict:
    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VitlabError(f"cannot read {path} (the ids of the run's MLflow and W&B runs): {e}") from None


def record_id(run_dir: Path, logger: str, values: dict):
    """Add a logger's run id to RUN_DIR/tracking.json, once: a recorded id is never replaced."""
    ids = read_ids(run_dir)
    if logger not in ids:
        ids[logger] = values
        atomic_write(run_dir / IDS_FILE, json.dumps(ids, indent=2) + "\n", "tracking ids")


def log_run_end(trainer, run_dir: Path):
    """When training has ended (after the final validation), on rank 0: the held-out accuracy of
    the final weights and the best one, config.yaml and the learning curves, to MLflow and W&B;
    then the W&B run is finished."""
    trackers = [logger for logger in trainer.loggers if isinstance(logger, (MLflowTracker, WandbTracker))]
    if not trackers or not trainer.is_global_zero:
        return
    rows = read_metric_rows(run_dir)
    scores = [float(r["val_acc"]) for r in rows if r["val_acc"]]
    summary = {}
    if rows and rows[-1]["val_acc"]:
        summary["final_val_acc"] = float(rows[-1]["val_acc"])
    if rows and rows[-1].get("val_acc_plain"):
        summary["final_val_acc_plain"] = float(rows[-1]["val_acc_plain"])
    if scores:
        summary["best_val_acc"] = max(scores)
    files = [run_dir / "config.yaml"]
    if rows:
        from vitlab import plots

        plots.plot_learning_curves(run_dir, run_dir / "curves.png")
        files.append(run_dir / "curves.png")
    for tracker in trackers:
        tracker.log_run_end(summary, files, trainer.global_step)


class AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run appends to its metrics file (Lightning's deletes it)."""

    def _check_log_dir_exists(self):
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


class MLflowTracker(MLFlowLogger):
    """Lightning's MLFlowLogger for a vitlab run: experiment `trainer.experiment`, the run named as
    its directory, at `trainer.mlflow_uri` or in RUN_DIR/mlflow (a SQLite store, MLflow's own
    default since its file store went into maintenance, with the artifacts beside it); `run_id`
    continues a run."""

    def __init__(self, config: RunConfig, run_dir: Path, run_id: str | None):
        import mlflow  # noqa: F401  (it sets up its loggers when first imported)

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables"
        uri, artifacts = config.trainer.mlflow_uri, None
        if uri is None:
            store = (run_dir / "mlflow").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts")
        super().__init__(experiment_name=config.trainer.experiment, run_name=run_dir.name, tracking_uri=uri,
                         run_id=run_id, artifact_location=artifacts)
        self.run_dir = run_dir
        self.params = configs.flatten(config.to_dict())

    @property
    @rank_zero_experiment
    def experiment(self):
        from mlflow.exceptions import MlflowException

        new = not self._initialized
        try:
            client = super().experiment
        except MlflowException as e:
            where = f" (recorded in {self.run_dir / IDS_FILE})" if self._run_id else ""
            raise VitlabError(f"MLflow at {self._tracking_uri}: {str(e).splitlines()[0]}{where}") from None
        if new:
            record_id(self.run_dir, "mlflow", {"run_id": self._run_id, "experiment_id": self._experiment_id,
                                               "tracking_uri": self._tracking_uri})
        return client

    @rank_zero_only
    def log_hyperparams(self, params=None):
        """The run's config, whatever Lightning passes (the module's hyperparameters). MLflow's
        parameters never change: a resumed run logs the ones it lacks, and a new run length (the one
        change --resume allows) as the tag `resumed_with.<key>`."""
        from mlflow.entities import Param, RunTag

        logged = self.experiment.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in self.params.items() if k not in logged]
        changed = [RunTag(f"resumed_with.{k}", str(v)) for k, v in self.params.items()
                   if k in logged and logged[k] != str(v)]
        if changed:
            self.experiment.log_batch(self.run_id, tags=changed)
        for start in range(0, len(new), 100):  # MLflow takes 100 parameters at a time
            self.experiment.log_batch(self.run_id, params=new[start:start + 100])

    def log_run_end(self, summary: dict, files: list[Path], step: int):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.experiment.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in summary.items()])
        for path in files:
            self.experiment.log_artifact(self.run_id, str(path))


class WandbTracker(WandbLogger):
    """Lightning's WandbLogger for a vitlab run: project `trainer.experiment`, the run named as its
    directory, files in RUN_DIR/wandb; offline unless WANDB_MODE or WANDB_API_KEY says otherwise;
    `run_id` continues a run. Quiet: no banner, and the console is not captured."""

    def __init__(self, config: RunConfig, run_dir: Path, run_id: str | None):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else "online" if os.environ.get("WANDB_API_KEY") else "offline"
        super().__init__(name=run_dir.name, save_dir=str(run_dir), id=run_id, project=config.trainer.experiment,
                         mode=mode, settings=wandb.Settings(silent=True, console="off"))
        self._wandb_init.pop("anonymous", None)  # W&B warns that it has no effect, even when None
        self.run_dir = run_dir
        self.values = config.to_dict()

    @property
    @rank_zero_experiment
    def experiment(self):
        from wandb.errors import Error

        new = self._experiment is None
        try:
            run = super().experiment
        except Error as e:  # e.g. online without a login
            raise VitlabError(f"W&B: {str(e).strip().splitlines()[0]}") from None
        if new and getattr(run, "id", None):
            record_id(self.run_dir, "wandb", {"id": run.id, "project": self._project})
        return run

    @rank_zero_only
    def log_hyperparams(self, params=None):
        """The run's config, whatever Lightning passes (the module's hyperparameters)."""
        self.experiment.config.update(self.values, allow_val_change=True)

    @rank_zero_only
    def finalize(self, status: str):
        super().finalize(status)
        if status == "failed" and self._experiment is not None:  # an error ends training: end the run too
            self._experiment.finish(exit_code=1)
            self._experiment = None

    def log_run_end(self, summary: dict, files: list[Path], step: int):
        """The summary, and the files under the run's files/vitlab/ (files/config.yaml is W&B's own)."""
        run = self.experiment
        run.summary.update(summary)
        saved = Path(run.dir) / "vitlab"
        saved.mkdir(exist_ok=True)
        for path in files:
            (saved / path.name).write_bytes(path.read_bytes())
            run.save(str(saved / path.name), base_path=run.dir, policy="now")
        run.finish()
        self._experiment = None
