"""More than one process: the sharding maths, and real CPU DDP runs (gloo) of the CLI, launched by
Lightning (--devices 2) and by torchrun as two nodes on this machine. Every process gets a short
timeout, so a hang fails the test instead of stalling CI."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from vitlab.data.datamodule import EpochBatches
from vitlab.errors import VitlabError
from tests.conftest import write_image_folder
from tests.test_cli import TINY

TIMEOUT_S = 240
MODEL = [*TINY, "data.batch_size=4"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("size", [37, 48])
def test_training_batches_are_disjoint_complete_and_equal_in_number(world, size):
    shards = [EpochBatches(size, 4, shuffle=True, seed=3, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for shard in shards:
            shard.set_epoch(epoch)
        taken = [[i for batch in shard for i in batch.tolist()] for shard in shards]
        assert len({len(list(shard)) for shard in shards}) == 1  # the same number of steps everywhere
        assert all(len(t) == len(shards[0]) * 4 for t in taken)
        seen = [i for t in taken for i in t]
        assert len(seen) == len(set(seen))  # no image twice
        assert len(seen) == size // (4 * world) * 4 * world  # all but the remainder of a global batch
    shards[0].set_epoch(0)
    first = [batch.tolist() for batch in shards[0]]
    shards[0].set_epoch(1)
    assert [batch.tolist() for batch in shards[0]] != first  # a new order every epoch


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_batches_cover_every_image_once(world):
    shards = [EpochBatches(10, 4, shuffle=False, rank=r, world=world) for r in range(world)]
    seen = sorted(i for shard in shards for batch in shard for i in batch.tolist())
    assert seen == list(range(10))


def test_fewer_images_than_one_global_batch_is_refused():
    with pytest.raises(VitlabError, match="9 training images do not fill one batch of 4 on each of 3 processes"):
        EpochBatches(9, 4, shuffle=True, world=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "MASTER_PORT": str(free_port())}


def vitlab(*argv, timeout=TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "vitlab.cli", *map(str, argv)], env=env(), capture_output=True,
                          text=True, timeout=timeout)


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("ddp") / "images", per_class=16)


def test_two_process_ddp_run_resumes_and_scores_as_single_process_eval(images, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--data", f"folder:{images}", "--run-dir", run_dir, "--val-fraction", "0.25",
            "--accelerator", "cpu", "--devices", "2", f"data.cache_dir={tmp_path / 'cache'}", *MODEL]
    first = vitlab(*args, "--max-epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("run written to") == 1  # one process speaks
    resumed = vitlab(*args, "--max-epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = rows(run_dir)
    assert [r["epoch"] for r in metrics] == ["0", "1"]  # one writer: each row once
    # 36 training images, 4 per process per step, 2 processes: 4 steps an epoch.
    assert [r["step"] for r in metrics] == ["4", "8"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(checkpoint["rng"]) == 2  # each process's random state
    # Validation was sharded over the two processes and reduced: a single process scores the same.
    scored = vitlab("eval", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--data", f"folder:{images}",
                    "--held-out", "--val-fraction", "0.25", "--json", f"--data-root={tmp_path}")
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)
    assert result["n"] == 12
    assert result["accuracy"] == pytest.approx(float(metrics[-1]["val_acc"]), abs=1e-6)
    assert result["loss"] == pytest.approx(float(metrics[-1]["val_loss"]), abs=1e-5)


def test_a_data_set_smaller_than_one_global_batch_is_an_error_not_a_hang(images, tmp_path):
    result = vitlab("train", "--data", f"folder:{images}", "--run-dir", tmp_path / "run", "--max-epochs", "1",
                    "--accelerator", "cpu", "--devices", "2", f"data.cache_dir={tmp_path / 'cache'}", *TINY,
                    "data.batch_size=64")
    assert result.returncode == 1
    assert "do not fill one batch of 64 on each of 2 processes" in result.stderr


def test_two_nodes_launched_by_torchrun(images, tmp_path):
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              "-m", "vitlab.cli", "train", "--data", f"folder:{images}", "--run-dir", str(tmp_path / "run"),
              "--max-epochs", "1", "--val-fraction", "0.25", "--accelerator", "cpu", "--num-nodes", "2",
              f"data.cache_dir={tmp_path / 'cache'}", *MODEL]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--node-rank", str(rank), *common],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert [r["step"] for r in rows(tmp_path / "run")] == ["4"]  # 36 images, 4 per node per step


def test_slurm_time_limit_signal_saves_requeues_and_the_same_command_resumes(images, tmp_path):
    bin_dir = tmp_path / "bin"  # a stand-in scontrol that records how it was called
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {**env(), "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "vitlab.cli", "train", "--data", f"folder:{images}", "--run-dir", str(run_dir),
            "--max-epochs", "3", "--val-fraction", "0.25", "--resume", f"data.cache_dir={tmp_path / 'cache'}",
            *MODEL, "trainer.checkpoint_every=00:00:00"]
    job = subprocess.Popen(argv, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM: the time limit is near
    _, err = job.communicate(timeout=TIMEOUT_S)
    assert job.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert "requeued SLURM job 4242" in err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    again = subprocess.run(argv, env=slurm, capture_output=True, text=True, timeout=TIMEOUT_S)  # the requeued job
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["epoch"] for r in rows(run_dir)] == ["0", "1", "2"]


def test_two_nodes_launched_by_lightning_from_the_environment(images, tmp_path):
    port = str(free_port())
    argv = [sys.executable, "-m", "vitlab.cli", "train", "--data", f"folder:{images}", "--run-dir",
            str(tmp_path / "run"), "--max-epochs", "1", "--val-fraction", "0.25", "--accelerator", "cpu",
            "--num-nodes", "2", f"data.cache_dir={tmp_path / 'cache'}", *MODEL]
    nodes = [subprocess.Popen(argv, env={**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                         "NODE_RANK": str(rank), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert [r["step"] for r in rows(tmp_path / "run")] == ["4"]


def test_two_process_ddp_run_streams_shards(images, tmp_path):
    packed = tmp_path / "packed"
    assert vitlab("pack", f"folder:{images}", "--out", packed).returncode == 0
    run_dir = tmp_path / "run"
    result = vitlab("train", "--data", f"shards:{packed}", "--run-dir", run_dir, "--max-epochs", "2",
                    "--val-fraction", "0.25", "--accelerator", "cpu", "--devices", "2", *MODEL)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == ["4", "8"]  # 36 training items, 4 per process per step
    scored = vitlab("eval", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--data", f"shards:{packed}",
                    "--held-out", "--val-fraction", "0.25", "--json")
    result = json.loads(scored.stdout)
    assert result["n"] == 12 and result["accuracy"] == pytest.approx(float(metrics[-1]["val_acc"]), abs=1e-6)
    assert result["loss"] == pytest.approx(float(metrics[-1]["val_loss"]), abs=1e-4)
