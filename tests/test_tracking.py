"""Tracking runs with Lightning's loggers (trainer.loggers, vitlab/training/tracking.py): a tiny run
tracked by MLflow (its local SQLite store) and by W&B (offline), read back with their own formats,
and continued by --resume; bad logger names and missing extras are one-line errors. No network."""

import csv
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger

from vitlab import config as configs
from vitlab.cli import main
from vitlab.training.tracking import build_loggers
from tests.conftest import TINY


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def train(capfd, image_folder, run_dir, *argv):
    """`vitlab train` on the tiny model in this process; returns (exit code, stdout, stderr), the
    output of other processes (W&B's service) included."""
    code = main(["train", "--data", f"folder:{image_folder}", "--run-dir", str(run_dir), "--val-fraction", "0.25",
                 f"data.cache_dir={run_dir.parent / 'cache'}", *TINY, *argv])
    out, err = capfd.readouterr()
    return code, out, err


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_quiet(out: str, err: str):
    """vitlab's own lines and the progress bar, nothing from MLflow or W&B."""
    assert out.strip().splitlines()[-1].startswith("run written to")
    vitlab_lines = ("decoding ", "model:", "  ", "note: trainer.max_epochs changed", "no preset or config file")
    assert all(line.startswith(vitlab_lines) for line in err.splitlines()), err


def test_the_default_is_tensorboard_and_a_list_can_be_given():
    assert configs.resolve().trainer.loggers == ["tensorboard"]
    for text, loggers in [("[tensorboard,mlflow]", ["tensorboard", "mlflow"]), ("csv", ["csv"]),
                          ("csv, wandb", ["csv", "wandb"])]:
        assert configs.resolve(overrides=dict([configs.parse_override(f"trainer.loggers={text}")])).trainer.loggers \
            == loggers


def test_only_the_first_process_opens_mlflow_and_wandb(tmp_path, monkeypatch):
    config = configs.resolve(overrides={"trainer.loggers": ["tensorboard", "mlflow", "wandb"]})
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started
    loggers = build_loggers(config, tmp_path / "run", resume=False)
    assert [type(logger) for logger in loggers] == [TensorBoardLogger, DummyLogger, DummyLogger]
    assert not (tmp_path / "run").exists()


def test_mlflow_tracks_the_run_and_its_resume(capfd, image_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    code, out, err = train(capfd, image_folder, run_dir, "--max-epochs", "2",
                           "trainer.loggers=[tensorboard,csv,mlflow]")
    assert code == 0, err
    assert_quiet(out, err)
    ids = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    assert ids["mlflow"]["tracking_uri"] == f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"

    def check(epochs: int):
        experiment = client.get_experiment_by_name("vitlab")
        (run,) = client.search_runs([experiment.experiment_id])  # one run, continued by --resume
        assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.run_name == "run"
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["model.dim"] == "32" and params["data.batch_size"] == "8" and params["trainer.max_epochs"] == "2"
        assert params["trainer.loggers"] == str(["tensorboard", "csv", "mlflow"])
        rows = metric_rows(run_dir)
        assert len(rows) == epochs
        for column in ("val_acc", "val_loss", "train_acc", "train_loss", "lr"):
            history = client.get_metric_history(run.info.run_id, f"epoch/{column}")
            assert [(m.step, m.value) for m in history] == [(int(r["step"]), pytest.approx(float(r[column])))
                                                             for r in rows]
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == epochs  # Lightning's own, per validation
        assert run.data.metrics["final_val_acc"] == pytest.approx(float(rows[-1]["val_acc"]))
        assert run.data.metrics["best_val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in rows))
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "curves.png"]
        artifacts = run_dir / "mlflow" / "artifacts" / run.info.run_id / "artifacts"
        assert run.info.artifact_uri == str(artifacts.resolve())
        saved = Path(run.info.artifact_uri) / "config.yaml"
        assert yaml.safe_load(saved.read_text()) == yaml.safe_load((run_dir / "config.yaml").read_text())
        return run

    check(epochs=2)
    code, out, err = train(capfd, image_folder, run_dir, "--max-epochs", "4", "--resume",
                           "trainer.loggers=[tensorboard,csv,mlflow]")
    assert code == 0, err
    assert json.loads((run_dir / "tracking.json").read_text()) == ids  # written once
    run = check(epochs=4)
    assert run.data.tags["resumed_with.trainer.max_epochs"] == "4"  # MLflow's parameters never change
    # Lightning's CSVLogger would have deleted the first two epochs' rows on resuming
    with open(run_dir / "csv" / "metrics.csv") as f:
        assert [r["epoch/val_acc"] for r in csv.DictReader(f) if r["epoch/val_acc"]] == \
            [r["val_acc"] for r in metric_rows(run_dir)]


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (W&B's transaction log, what `wandb sync` uploads): LevelDB's log
    format (32 KiB blocks of chunks, each with a 7-byte header) of protobuf `Record`s, after a 7-byte
    file header."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little left in the block for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_session(directory: Path) -> dict:
    """What one offline W&B session of a run recorded: its id, config, history rows, summary, saved files."""
    (path,) = directory.glob("run-*.wandb")

    def items(entries) -> dict:  # W&B stores "a/b" keys as nested keys
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entries}

    found = {"config": {}, "history": [], "summary": {}, "files": set(), "id": None, "exit": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["id"] = record.run.run_id
        elif kind == "config":
            found["config"].update(items(record.config.update))
        elif kind == "history":
            found["history"].append(items(record.history.item))
        elif kind == "summary":
            found["summary"].update(items(record.summary.update))
        elif kind == "files":
            found["files"] |= {f.path for f in record.files.files}
        elif kind == "exit":
            found["exit"] = record.exit.exit_code
    return found


def test_wandb_tracks_the_run_offline_and_its_resume(capfd, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = train(capfd, image_folder, run_dir, "--max-epochs", "2", "trainer.loggers=[wandb]")
    assert code == 0, err
    assert_quiet(out, err)
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]["id"]
    code, out, err = train(capfd, image_folder, run_dir, "--max-epochs", "3", "--resume", "trainer.loggers=[wandb]")
    assert code == 0, err
    assert json.loads((run_dir / "tracking.json").read_text())["wandb"]["id"] == run_id

    # Offline, each session is a directory of its own, with the run's id: `wandb sync` uploads them.
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [s.name.rsplit("-", 1)[1] for s in sessions] == [run_id, run_id]
    rows = metric_rows(run_dir)
    for session, epochs in zip(sessions, ([0, 1], [2])):
        found = wandb_session(session)
        assert found["id"] == run_id and found["exit"] == 0
        assert found["config"]["model"]["dim"] == 32 and found["config"]["trainer"]["loggers"] == ["wandb"]
        logged = [h for h in found["history"] if "epoch/val_acc" in h]
        assert [h["epoch"] for h in logged] == epochs
        for h in logged:
            (row,) = [r for r in rows if int(r["step"]) == h["trainer/global_step"]]
            assert h["epoch/val_acc"] == pytest.approx(float(row["val_acc"]))
            assert h["epoch/train_loss"] == pytest.approx(float(row["train_loss"]))
        assert found["summary"]["final_val_acc"] == pytest.approx(float(rows[epochs[-1]]["val_acc"]))
        assert {"vitlab/config.yaml", "vitlab/curves.png"} <= found["files"]
        saved = yaml.safe_load((session / "files" / "vitlab" / "config.yaml").read_text())  # as it was then
        assert saved["trainer"]["max_epochs"] == len(epochs) + epochs[0]
        assert {**saved, "trainer": None} == {**yaml.safe_load((run_dir / "config.yaml").read_text()), "trainer": None}


def test_an_unknown_logger_is_a_one_line_error(capfd, image_folder, tmp_path):
    code, out, err = train(capfd, image_folder, tmp_path / "run", "--max-epochs", "1",
                           "trainer.loggers=[tensorboard,comet]")
    assert code == 1 and out == ""
    assert err.startswith("vitlab train: error: ") and err.count("\n") == 1
    assert "trainer.loggers: unknown logger 'comet' (choices: tensorboard, csv, mlflow, wandb)" in err


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_logger_whose_package_is_missing_is_a_one_line_error(capfd, image_folder, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import PACKAGE` fails as when it is not installed
    code, out, err = train(capfd, image_folder, tmp_path / "run", "--max-epochs", "1",
                           f"trainer.loggers=[tensorboard,{package}]")
    assert code == 1
    assert err.splitlines()[-1] == (f"vitlab train: error: trainer.loggers: {package} needs the {package} extra "
                                    f"(pip install 'vitlab[{package}]')")
    assert not any(line.startswith(("Traceback", "vitlab")) for line in err.splitlines()[:-1])
    assert not (tmp_path / "run").exists()  # found before anything was written
