"""Kill -9 at random instants: a real `vitlab train` process is killed (SIGKILL: no handler runs) at
seeded random moments — while importing and decoding, mid-epoch, while writing a checkpoint —
and re-launched each time with the same command plus --resume, as a job scheduler would. The
finished run must be the run that was never killed."""

import csv
import os
import random
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import write_image_folder
from tests.test_cli import TINY

KILLS = 4
TIMEOUT_S = 180  # per process: a hang fails the test instead of stalling CI


def command(images, run_dir, cache):
    return [sys.executable, "-m", "vitlab.cli", "train", "--data", f"folder:{images}", "--run-dir", str(run_dir),
            "--max-epochs", "3", "--val-fraction", "0.25", f"data.cache_dir={cache}", *TINY,
            "data.batch_size=4", "model.dropout=0.1", "trainer.checkpoint_every=00:00:00"]


def wait_for(process: subprocess.Popen, kind: str, when, last, rng: random.Random) -> bool:
    """Wait until the planned instant of a kill; False if the process ended first."""
    deadline = time.monotonic() + TIMEOUT_S
    if kind == "start":
        try:
            process.wait(timeout=when)
            return False
        except subprocess.TimeoutExpired:
            return True
    seen, stamp = 0, last.stat().st_mtime_ns if last.exists() else None
    while seen < when and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
        now = last.stat().st_mtime_ns if last.exists() else None
        if now != stamp:
            seen, stamp = seen + 1, now
    time.sleep(rng.uniform(0, 0.05))
    return process.poll() is None


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_sigkill_at_random_instants_then_resume_gives_the_uninterrupted_run(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=16)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}

    start = time.monotonic()
    straight = subprocess.run(command(images, tmp_path / "straight", tmp_path / "cache-a"), env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    assert straight.returncode == 0, straight.stderr[-2000:]
    duration = time.monotonic() - start

    run_dir, cache = tmp_path / "killed", tmp_path / "cache-b"  # its own cache: decoding is killed too
    last = run_dir / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    # Where each launch is killed: the first while starting up or decoding (before any checkpoint);
    # the others after a seeded number of checkpoint writes, plus a few milliseconds, so that the
    # kill falls mid-batch or mid-write. Counting writes, not seconds, keeps every kill inside the
    # run however fast or loaded the machine is.
    plan = [("start", rng.uniform(0.2, 2.0))] + [("writes", rng.randint(1, 6)) for _ in range(KILLS - 1)]
    killed_at = []
    for attempt, (kind, when) in enumerate(plan + [("none", None)]):
        argv = command(images, run_dir, cache) + (["--resume"] if attempt else [])
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kind != "none" and wait_for(process, kind, when, last, rng):
            process.send_signal(signal.SIGKILL)
            killed_at.append(f"{kind} {when if kind == 'writes' else round(when, 2)}")
        out, err = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode in (0, -signal.SIGKILL), err[-2000:]
        if process.returncode == 0:
            break
    assert process.returncode == 0, err[-2000:]
    assert len(killed_at) == KILLS, f"only these kills landed: {killed_at}"
    print(f"killed at: {killed_at}; the uninterrupted run took {duration:.1f} s")

    assert [r["epoch"] for r in rows(run_dir)] == ["0", "1", "2"]  # every epoch once
    columns = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert [[r[c] for c in columns] for r in rows(run_dir)] == [[r[c] for c in columns] for r in rows(tmp_path / "straight")]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in reference["state_dict"].items():
        assert last["state_dict"][key].isfinite().all() and torch.equal(last["state_dict"][key], value), key
    assert not list(run_dir.rglob("*.tmp"))  # writes cut short by a kill are cleared on resume
