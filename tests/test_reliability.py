"""Nothing lost: resuming with the same command, mid-epoch checkpoints, stop signals, divergence,
failed writes, untrusted files, and the run files a resumed run leaves behind."""

import csv
import errno
import json
import os
import signal

import pytest
import torch

from vitlab import load_model
from vitlab.errors import VitlabError
from vitlab.io import atomic_write, read_metric_rows
from vitlab.training import module as training_module
from vitlab.training.callbacks import MetricsCSV, RunClock
from tests.conftest import write_image_folder
from tests.test_cli import TINY, run_cli

# 36 training images in batches of 4: 9 steps per epoch, a checkpoint after every one; dropout and the
# crop-flip augmentation draw random numbers, so an exact resume needs the random state too.
SMALL = [*TINY, "data.batch_size=4", "model.dropout=0.1", "trainer.checkpoint_every=00:00:00"]


def read_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_args(images, run_dir, *extra):
    return ["train", "--data", f"folder:{images}", "--run-dir", run_dir, "--val-fraction", "0.25", *SMALL, *extra]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=16)


@pytest.fixture(scope="module")
def straight_run(images, tmp_path_factory):
    """Three epochs without a stop: what every interrupted and resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    from vitlab.cli import main

    assert main([str(a) for a in train_args(images, run_dir, "--max-epochs", "3")]) == 0
    return run_dir


def signal_at_step(monkeypatch, signum: int, step: int):
    """Make training receive `signum` (as from `kill`) while it takes the given step."""
    original = training_module.Classifier.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == step and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(training_module.Classifier, "training_step", training_step)


def test_sigterm_mid_epoch_then_the_same_command_resumes_exactly(images, straight_run, tmp_path, capsys,
                                                                 monkeypatch):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-epochs", "3")
    signal_at_step(monkeypatch, signal.SIGTERM, 13)  # part-way through the second epoch
    code, _, err = run_cli(capsys, *args)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err and "--resume" in err
    stopped = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 14 and stopped["epoch"] == 1
    assert [r["epoch"] for r in read_rows(run_dir)] == ["0"]
    monkeypatch.undo()

    assert run_cli(capsys, *args, "--resume")[0] == 0
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    straight = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 27
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    # The same optimiser moments and learning rate as the run that never stopped.
    for a, b in zip(resumed["optimizer_states"][0]["state"].values(), straight["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed["lr_schedulers"][0]["_last_lr"] == straight["lr_schedulers"][0]["_last_lr"]
    # One row per epoch, none missing, none twice, with the same numbers; the time goes on from the stop.
    rows, straight_rows = read_rows(run_dir), read_rows(straight_run)
    columns = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert [[r[c] for c in columns] for r in rows] == [[r[c] for c in columns] for r in straight_rows]
    assert float(rows[1]["elapsed_s"]) >= stopped["callbacks"]["MetricsCSV"]["elapsed_s"] > 0


def test_a_second_sigint_stops_at_once_with_130_and_one_line(images, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    original = training_module.Classifier.training_step

    def training_step(self, batch, batch_idx):  # Ctrl-C twice during step 4
        if self.global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(training_module.Classifier, "training_step", training_step)
    code, _, err = run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "1"))
    assert code == 130
    assert [line for line in err.splitlines() if line.startswith("vitlab")] == [
        "vitlab train: error: interrupted again: stopped at once, without a checkpoint; --resume continues "
        "from the last one"]
    assert "Traceback" not in err


def test_sigint_saves_and_exits_non_zero(images, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    signal_at_step(monkeypatch, signal.SIGINT, 4)
    code, _, err = run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "1"))
    assert code == 130 and "stopped by SIGINT" in err
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    monkeypatch.undo()
    assert run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "1"), "--resume")[0] == 0
    assert [r["epoch"] for r in read_rows(run_dir)] == ["0"]


def test_resume_accepts_the_same_command_and_names_a_changed_value(images, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "trainer.checkpoint_every=00:10:00")
    assert run_cli(capsys, *args, "--max-epochs", "1")[0] == 0
    code, _, err = run_cli(capsys, *args, "--max-epochs", "2", "--resume")
    assert code == 0 and "trainer.max_epochs changed from 1 to 2" in err
    assert [r["epoch"] for r in read_rows(run_dir)] == ["0", "1"]
    code, _, err = run_cli(capsys, *args, "--max-epochs", "3", "--resume", "optim.lr=0.5")
    assert code == 1 and "optim.lr is 0.5 here but 0.001 in the run's config.yaml" in err
    # Only the length needs saying: the run's config fills in the rest.
    assert run_cli(capsys, "train", "--run-dir", run_dir, "--resume", "--max-epochs", "3")[0] == 0
    assert [r["epoch"] for r in read_rows(run_dir)] == ["0", "1", "2"]


def test_a_run_stopped_before_its_first_checkpoint_starts_over(images, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-epochs", "1")
    assert run_cli(capsys, *args)[0] == 0
    for path in (run_dir / "checkpoints").iterdir():  # as if killed before the first checkpoint
        path.unlink()
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0 and "starting it over" in err
    assert [r["epoch"] for r in read_rows(run_dir)] == ["0"]


def test_divergence_stops_with_the_step_and_writes_no_non_finite_checkpoint(images, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "2", "optim.lr=1e30"))
    assert code == 1 and "training diverged: the loss is not finite at step" in err
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(v.isfinite().all() for v in state.values() if v.is_floating_point()), path


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays(images, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "trainer.checkpoint_every=00:10:00")
    assert run_cli(capsys, *args, "--max-epochs", "1")[0] == 0
    saved = load_model(run_dir / "checkpoints" / "last.ckpt").state_dict()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr("vitlab.io.os.replace", replace)
    code, _, err = run_cli(capsys, *args, "--max-epochs", "2", "--resume")
    assert code == 1 and "cannot write checkpoint" in err and "No space left on device" in err and "free" in err
    # last.ckpt still holds the first epoch's weights, whole, though the second epoch trained on.
    kept = load_model(run_dir / "checkpoints" / "last.ckpt").state_dict()
    assert kept.keys() == saved.keys()
    assert [k for k in saved if not torch.equal(kept[k], saved[k])] == []
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out" / "file.bin"
    atomic_write(target, b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(VitlabError, match="cannot write file .*file.bin: I/O error"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_unwritable_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "not_a_dir").write_text("")
    metrics = MetricsCSV(tmp_path / "not_a_dir" / "metrics.csv")
    with pytest.raises(VitlabError, match="cannot write metrics .*metrics.csv.*free"):
        metrics.write({"epoch": 0, "step": 1, "elapsed_s": 0.0})


def test_a_run_resumed_from_an_older_vitlab_keeps_its_metrics_columns(tmp_path):
    # metrics.csv from before val_acc_plain: the resumed run's rows go on under the file's own header,
    # each value in its column (not shifted one along).
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,lr,train_loss,train_acc,val_loss,val_acc,elapsed_s\n0,10,0.001,2.0,0.2,1.9,0.3,5.0\n")
    MetricsCSV(path).write({"epoch": 1, "step": 20, "lr": 0.0005, "train_loss": 1.5, "train_acc": 0.4,
                            "val_loss": 1.4, "val_acc": 0.5, "val_acc_plain": 0.45, "elapsed_s": 9.0})
    rows = read_metric_rows(tmp_path)
    assert [(r["epoch"], r["val_acc"], r["elapsed_s"]) for r in rows] == [("0", "0.3", "5.0"), ("1", "0.5", "9.0")]
    assert path.read_text().splitlines()[0] == "epoch,step,lr,train_loss,train_acc,val_loss,val_acc,elapsed_s"


def test_best_checkpoint_counts_the_final_validation(images, tmp_path, capsys):
    # Validation every 5 epochs in a 2-epoch run: the final weights' validation (after fit) is the
    # only one, so best.ckpt must be written from it and hold the final weights.
    run_dir = tmp_path / "run"
    assert run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "2", "trainer.val_every_n_epochs=5"))[0] == 0
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())
    assert read_rows(run_dir)[-1]["val_acc"]


def test_time_budget_ends_at_min_lr_and_validates_the_cut_short_epoch(images, tmp_path, capsys, monkeypatch):
    # The clock advances 0.1 s each time it is read (after each step, and at the start and at each
    # epoch's end; no timed checkpoints), so the 6 s budget runs out inside the second epoch on any
    # machine, never at its end.
    ticks = iter(range(10**6))
    monkeypatch.setattr(RunClock, "time_elapsed", lambda self, stage="train": next(ticks) * 0.1)
    run_dir = tmp_path / "run"
    code, _, _ = run_cli(capsys, *train_args(images, run_dir, "--max-time", "00:00:06", "trainer.max_epochs=null",
                                             "optim.lr=1e-3", "optim.min_lr=1e-5", "data.batch_size=1",
                                             "trainer.checkpoint_every=01:00:00"))
    assert code == 0
    rows = read_rows(run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(rows[-1]["step"]) == last["global_step"] and 36 < int(rows[-1]["step"]) < 72  # cut short
    assert rows[-1]["val_acc"]  # the final weights are validated
    assert float(rows[-1]["lr"]) == pytest.approx(1e-5, abs=2e-5)  # the schedule ended with the time


def test_compiled_training_runs_on_the_cpu(images, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "1", "trainer.compile=true"))
    assert code == 0 and "held-out accuracy" in out
    # The compiled model's checkpoint loads into a plain ViT that scores the held-out images as the
    # run's final validation did: the trained weights, under the names they have uncompiled.
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir / "checkpoints" / "last.ckpt",
                           "--data", f"folder:{images}", "--held-out", "--val-fraction", "0.25", "--json")
    assert code == 0
    last = read_rows(run_dir)[-1]
    assert json.loads(out)["loss"] == pytest.approx(float(last["val_loss"]), abs=1e-4)
    assert json.loads(out)["accuracy"] == pytest.approx(float(last["val_acc"]), abs=1e-6)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch code-ran",))


def test_untrusted_files_run_no_code(tmp_path, capsys):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode()}, ckpt)
    code, _, err = run_cli(capsys, "info", "--checkpoint", ckpt)
    assert code == 1 and "refused to load" in err and "would run code" in err
    evil_yaml = tmp_path / "evil.yaml"
    evil_yaml.write_text('model: !!python/object/apply:os.system ["touch code-ran"]\n')
    code, _, err = run_cli(capsys, "train", "--config", evil_yaml, "--data", "fake")
    assert code == 1 and "refused config file" in err
    assert not os.path.exists("code-ran")


def test_a_checkpoint_from_a_newer_vitlab_says_so(images, straight_run, tmp_path, capsys):
    checkpoint = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["vitlab"]["format"] == 1 and checkpoint["vitlab"]["version"]
    checkpoint["vitlab"] = {"format": 99, "version": "9.0"}
    torch.save(checkpoint, tmp_path / "future.ckpt")
    code, _, err = run_cli(capsys, "info", "--checkpoint", tmp_path / "future.ckpt")
    assert code == 1 and "written by a newer vitlab (9.0, checkpoint format 99" in err


def test_ema_average_is_carried_over_on_resume(images, tmp_path, capsys, monkeypatch):
    args = lambda run_dir: train_args(images, run_dir, "--max-epochs", "2", "trainer.ema_decay=0.9")  # noqa: E731
    assert run_cli(capsys, *args(tmp_path / "straight"))[0] == 0
    signal_at_step(monkeypatch, signal.SIGTERM, 12)
    assert run_cli(capsys, *args(tmp_path / "run"))[0] == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_cli(capsys, *args(tmp_path / "run"), "--resume")[0] == 0
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):  # the average, and the weights being trained
        assert all(torch.equal(resumed[key][k], v) for k, v in straight[key].items()), key


def test_a_time_budget_run_resumes_with_the_time_it_had_left(images, tmp_path, capsys, monkeypatch):
    args = train_args(images, tmp_path / "run", "--max-time", "00:00:06", "trainer.max_epochs=null",
                      "data.batch_size=1")
    signal_at_step(monkeypatch, signal.SIGTERM, 20)
    assert run_cli(capsys, *args)[0] == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_cli(capsys, *args, "--resume")[0] == 0
    # The run's training time, across both processes, is the budget (plus the final validation).
    assert 6 <= float(read_rows(tmp_path / "run")[-1]["elapsed_s"]) < 8


def test_last_checkpoint_is_written_when_due_and_when_training_ends(images, tmp_path, capsys, monkeypatch):
    # Not at every epoch's end: with a 10-minute interval, a 3-epoch run of seconds writes it once,
    # at its end; with a time limit, at the end too, whenever in the epoch the limit falls.
    from vitlab.training.run import AtomicCheckpointIO

    written = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        written.append((os.path.basename(path), checkpoint["global_step"]))
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    run_dir = tmp_path / "run"
    assert run_cli(capsys, *train_args(images, run_dir, "--max-epochs", "3", "trainer.checkpoint_every=00:10:00"))[0] == 0
    assert [step for name, step in written if name == "last.ckpt"] == [27]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 27
    written.clear()
    run_dir = tmp_path / "timed"
    assert run_cli(capsys, *train_args(images, run_dir, "--max-time", "00:00:02", "trainer.max_epochs=null",
                                       "trainer.checkpoint_every=00:10:00"))[0] == 0
    steps = [step for name, step in written if name == "last.ckpt"]
    rows = read_rows(run_dir)
    assert len(steps) == 1 and steps[0] == int(rows[-1]["step"]) > 0 and rows[-1]["val_acc"]


def test_early_stopping_saves_the_trained_weights_not_their_average(images, tmp_path, capsys):
    # Early stopping ends training at an epoch's end: last.ckpt is written there, with the weights as
    # trained (resuming goes on from them) beside their EMA, not after the EMA callback has put the
    # average in the model.
    run_dir = tmp_path / "run"
    args = train_args(images, run_dir, "--max-epochs", "30", "trainer.checkpoint_every=00:10:00",
                      "trainer.early_stopping_patience=1", "trainer.ema_decay=0.9", "optim.lr=0.05")
    assert run_cli(capsys, *args)[0] == 0
    rows = read_rows(run_dir)
    assert len(rows) < 30  # stopped early
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == int(rows[-1]["step"])
    trained, average = checkpoint["current_model_state"], checkpoint["state_dict"]
    assert any(not torch.equal(trained[k], average[k]) for k in trained if trained[k].is_floating_point())


def test_a_checkpoint_without_a_schedule_start_counts_time_from_the_start():
    from types import SimpleNamespace

    from tests.test_training import micro_classifier, timer

    classifier = micro_classifier()
    classifier.trainer = SimpleNamespace(world_size=1, global_rank=0, estimated_stepping_batches=float("inf"),
                                         callbacks=[timer(175.0, 135.0)])
    classifier.on_load_checkpoint({})  # written before the schedule started after the first step
    assert classifier.training_progress(501) == pytest.approx(175 / 310)
