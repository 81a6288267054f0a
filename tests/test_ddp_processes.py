"""Two real CPU processes (gloo) launched by Lightning (--devices 2), as a user runs them: what each
process counts, when they talk to each other, and how a run ends when it is stopped or loses a
process. Every process gets a short timeout, so a hang fails the test instead of stalling CI."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import TINY, write_image_folder
from tests.test_distributed import env, rows
from vitlab.io import read_checkpoint

TIMEOUT_S = 120
STOP_LINE = "vitlab train: error: stopped by {signal}; saved {last}: the same command with --resume continues from it"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("ddp") / "images", per_class=16)  # 36 train, 12 held out


def train_argv(images, run_dir, *extra):
    return ["train", "--data", f"folder:{images}", "--run-dir", str(run_dir), "--val-fraction", "0.25",
            "--accelerator", "cpu", "--devices", "2", f"data.cache_dir={run_dir.parent / 'cache'}", *TINY, *extra]


INSTRUMENTED = textwrap.dedent("""
    # vitlab's CLI, with each process writing down (1) the collectives it takes inside each training
    # step and (2) its own tally of each epoch's training loss and accuracy, from its own batches.
    import atexit, json, os, sys
    import torch.distributed as dist
    import torch.nn.functional as F
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from vitlab.cli import main
    from vitlab.training.module import Classifier

    counts, tallies, step = {}, {}, [None]
    for name in ("broadcast", "broadcast_object_list", "all_reduce", "all_gather", "all_gather_object",
                 "barrier", "reduce", "gather", "scatter"):
        def counted(*args, _call=getattr(dist, name), **kwargs):
            if step[0] is not None:
                counts[step[0]] = counts.get(step[0], 0) + 1
            return _call(*args, **kwargs)
        setattr(dist, name, counted)
    advance = _TrainingEpochLoop.advance
    def counting_advance(self, *args, **kwargs):
        step[0] = self.trainer.global_step + 1  # the step this call trains
        try:
            return advance(self, *args, **kwargs)
        finally:
            step[0] = None
    _TrainingEpochLoop.advance = counting_advance
    training_step = Classifier.training_step
    def tallied_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)  # no dropout: the logits training_step computes
        loss = F.cross_entropy(logits, labels, label_smoothing=self.optim.label_smoothing)
        tally = tallies.setdefault(self.trainer.current_epoch, [0.0, 0, 0])
        tally[0] += loss.item() * len(labels)
        tally[1] += (logits.argmax(-1) == labels).sum().item()
        tally[2] += len(labels)
        return training_step(self, batch, batch_idx)
    Classifier.training_step = tallied_step
    out = os.environ["INSTRUMENTS_OUT"] + "." + os.environ.get("LOCAL_RANK", "0")
    atexit.register(lambda: open(out, "w").write(json.dumps({"counts": counts, "tallies": tallies})))
    sys.exit(main())
""")


@pytest.fixture(scope="module")
def instrumented_run(images, tmp_path_factory):
    """13 epochs of 4 steps (36 images, 4 per process per step) on two processes, with a time limit
    and a checkpoint after every agreement; what each process wrote down (INSTRUMENTED) and the run's rows."""
    tmp_path = tmp_path_factory.mktemp("instrumented")
    script = tmp_path / "instrumented.py"
    script.write_text(INSTRUMENTED)
    run_dir = tmp_path / "run"
    argv = train_argv(images, run_dir, "--max-epochs", "13", "--max-time", "00:10:00", "data.batch_size=4",
                      "trainer.checkpoint_every=00:00:00")
    result = subprocess.run([sys.executable, str(script), *argv],
                            env={**env(), "INSTRUMENTS_OUT": str(tmp_path / "instruments")},
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"instruments.{rank}").read_text()) for rank in (0, 1)], rows(run_dir)


def test_processes_talk_only_after_the_first_step_and_at_log_steps(instrumented_run):
    """Inside a training step (forward, backward, optimiser, the step's callbacks) the processes take
    no collective of their own but after the first step and at log steps (every 50): the time limit,
    the time-fitted LR and the checkpoint timer all read the clock they agree on there. (DDP's gradient
    all-reduce runs in DDP's own C++ and is not counted.)"""
    instruments, metrics = instrumented_run
    assert metrics[-1]["step"] == "52"
    for rank, written in enumerate(instruments):
        # There: the clock's broadcast, the checkpoint it made due (a barrier, the random states
        # gathered), and at step 50 the divergence check's reduction.
        assert sorted(int(step) for step in written["counts"]) == [1, 50], (rank, written["counts"])


def test_the_epoch_training_metrics_are_over_every_process_images(instrumented_run):
    """Each epoch's train loss and accuracy are the mean over both processes' images (DDP would
    overwrite a buffer of sums with process 0's before every forward, reporting process 0's alone)."""
    instruments, metrics = instrumented_run
    differ = 0
    for row in metrics:
        per_process = [written["tallies"][row["epoch"]] for written in instruments]
        loss_sum, correct, count = (sum(t[i] for t in per_process) for i in range(3))
        assert count == 32  # 4 steps of 4 images on each process
        assert float(row["train_loss"]) == pytest.approx(loss_sum / count, abs=1e-5), row
        assert float(row["train_acc"]) == pytest.approx(correct / count, abs=1e-9), row
        differ += abs(per_process[0][0] - per_process[1][0]) > 1e-3
    assert differ >= 10  # the processes' own means differ: process 0's alone would not pass


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]:
            return True
        time.sleep(0.1)
    return False


def launch_and_wait_for_a_checkpoint(images, run_dir, *extra):
    # A session of its own, as a command typed at a terminal: Ctrl-C reaches its whole process group.
    job = subprocess.Popen([sys.executable, "-m", "vitlab.cli", *train_argv(images, run_dir, *extra)], env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return job


def stop_at(images, run_dir, delay_s: float, ctrl_c: bool = False) -> dict:
    """A 2-process run sent SIGTERM (a scheduler: to the launching process) or Ctrl-C (a terminal:
    SIGINT to every process) delay_s after its first checkpoint; what came of it."""
    # A checkpoint after every epoch (4 steps) and a validation every epoch: many instants fall in one.
    job = launch_and_wait_for_a_checkpoint(images, run_dir, "--max-epochs", "400", "data.batch_size=4",
                                           "trainer.checkpoint_every=00:00:00")
    others = children(job.pid)
    time.sleep(delay_s)
    if ctrl_c:
        os.killpg(job.pid, signal.SIGINT)
    else:
        job.send_signal(signal.SIGTERM)
    try:
        _, err = job.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
        return {"hung": True}
    last = run_dir / "checkpoints" / "last.ckpt"
    return {"code": job.returncode, "err": err, "others": others, "others_gone": gone(others, 10),
            "vitlab_lines": [line for line in err.splitlines() if line.startswith("vitlab")],
            "last": last, "checkpoint": read_checkpoint(last) if last.is_file() else None}


def stopped_one_way(outcome: dict, signum: signal.Signals, when: str):
    """A stop's one way: 128 + the signal, one message from one process, a whole checkpoint of both
    processes' state, no traceback, no process left behind."""
    assert not outcome.get("hung"), f"{when}: hung"
    where = f"{when}:\n{outcome['err'][-3000:]}"
    assert outcome["code"] == 128 + signum, where
    assert outcome["vitlab_lines"] == [STOP_LINE.format(signal=signum.name, last=outcome["last"])], where
    assert "Traceback" not in outcome["err"], where
    assert outcome["checkpoint"] is not None and outcome["checkpoint"]["global_step"] > 0, where
    assert len(outcome["checkpoint"]["rng"]) == 2, where
    assert outcome["others_gone"], where


def test_sigterm_at_any_instant_stops_a_two_process_run_one_way(images, tmp_path):
    """SIGTERM to the launching process at 20 seeded instants (in steps, validations and checkpoint
    writes alike): every time exit 143, one message from one process, a whole checkpoint that the
    same command resumes from, and no process left behind."""
    rng = random.Random(20261203)
    delays = [rng.uniform(0.0, 1.5) for _ in range(20)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda i: stop_at(images, tmp_path / f"run{i}", delays[i]), range(len(delays))))
    for delay, outcome in zip(delays, outcomes):
        stopped_one_way(outcome, signal.SIGTERM, f"SIGTERM {delay:.2f} s after the first checkpoint")
    # The last stopped run resumes where it stopped, and finishes.
    run_dir = tmp_path / f"run{len(delays) - 1}"
    stopped_at = outcomes[-1]["checkpoint"]["global_step"]
    resumed = subprocess.run([sys.executable, "-m", "vitlab.cli", *train_argv(images, run_dir, "--resume",
                              "--max-epochs", str(stopped_at // 4 + 2), "data.batch_size=4")],
                             env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int(rows(run_dir)[-1]["step"]) > stopped_at


def test_ctrl_c_stops_a_two_process_run_one_way(images, tmp_path):
    """Ctrl-C at a terminal (SIGINT to both processes) at 4 seeded instants: exit 130, one message
    from one process, a checkpoint, no process left behind."""
    rng = random.Random(130)
    delays = [rng.uniform(0.0, 1.5) for _ in range(4)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda i: stop_at(images, tmp_path / f"run{i}", delays[i], ctrl_c=True),
                                 range(len(delays))))
    for delay, outcome in zip(delays, outcomes):
        stopped_one_way(outcome, signal.SIGINT, f"Ctrl-C {delay:.2f} s after the first checkpoint")


@pytest.mark.parametrize("lost", [1, 0])
def test_a_lost_process_is_named_in_one_line_with_the_way_on(images, tmp_path, lost):
    run_dir = tmp_path / "run"
    job = launch_and_wait_for_a_checkpoint(images, run_dir, "--max-epochs", "400", "data.batch_size=4",
                                           "trainer.checkpoint_every=00:00:00")
    [other] = children(job.pid)
    os.kill(other if lost == 1 else job.pid, signal.SIGKILL)
    if lost == 1:
        _, err = job.communicate(timeout=TIMEOUT_S)
        assert job.returncode == 1
    else:  # the launching process is gone; the other process tells, through the same stderr
        job.wait(timeout=TIMEOUT_S)
        assert gone([other], TIMEOUT_S)
        err = job.stderr.read()
    lines = [line for line in err.splitlines() if line.startswith("vitlab")]
    assert lines == [f"vitlab train: error: training process {lost} of 2 was lost"
                     f"{' (killed by SIGKILL)' if lost == 1 else ''}; the same command with --resume continues "
                     f"from {run_dir / 'checkpoints' / 'last.ckpt'}"], err[-3000:]
    assert "Traceback" not in err and len(err.splitlines()) < 15, err[-3000:]
