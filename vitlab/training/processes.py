"""The processes of a run: which one is first, and how they end together.

Lightning's own handling of processes is replaced where it breaks a stop under DDP: its SIGTERM
handler broadcasts from inside the signal handler (a collective the other processes are not in: a
crash or a hang), ends `fit` with a SystemExit that exits 0, and broadcasts a flag and reads it back
from the device at every step; its watch on the processes it launched SIGKILLs the launching process,
with no word, whenever another exits non-zero (also after a clean stop, when that one is quicker).
vitlab's StopRequests and RunClock (callbacks.py) handle the signals, and `ProcessWatch` names a lost
process in one line.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies.launchers import subprocess_script

from vitlab.errors import VitlabError

# How gloo and NCCL say that the other end of a collective has gone.
PEER_GONE = re.compile(r"Connection (reset|closed|refused)|Broken pipe|remote process|peer", re.IGNORECASE)
# The exit codes of a process that stopped on a stop request (see callbacks.Interrupted): the others
# reach the same decision at the same step.
STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGUSR1}


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its launch (or the only one), known before the Trainer
    exists from the variables the launchers set: torchrun (RANK), Lightning's own launcher
    (LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def without_lightning_signals(trainer: L.Trainer) -> L.Trainer:
    """The trainer with Lightning's own SIGTERM handling switched off (see the module's docstring)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not (hasattr(trainer._signal_connector, "register_signal_handlers")
            and hasattr(epoch_loop, "_broadcast_sigterm_tensor")
            and hasattr(subprocess_script, "_launch_process_observer")):
        raise RuntimeError("this Lightning version handles processes differently: vitlab cannot replace it")
    trainer._signal_connector.register_signal_handlers = lambda: None
    epoch_loop._broadcast_sigterm_tensor = lambda: None
    return trainer


def how_it_ended(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class ProcessWatch(threading.Thread):
    """Watches the processes that Lightning's launcher started from this one (ranks 1, 2, ... of
    this machine). When one ends other than by a stop, `lost` names it; the main thread says so when
    its next collective fails, and if it is stuck instead (a collective that never fails), the watch
    says it after `grace_s` seconds and ends this process, with exit code 1."""

    def __init__(self, trainer: L.Trainer, grace_s: float = 30.0):
        super().__init__(daemon=True, name="vitlab-process-watch")
        self.launcher = trainer.strategy.launcher
        self.first_rank = trainer.node_rank * trainer.num_devices
        self.world_size = trainer.world_size
        self.grace_s = grace_s
        self.lost: str | None = None

    def run(self):
        while self.lost is None:
            time.sleep(0.2)
            for local_rank, process in enumerate(list(self.launcher.procs), start=1):
                code = process.poll()
                if code is not None and code != 0 and code not in STOP_CODES:
                    self.lost = (f"training process {self.first_rank + local_rank} of {self.world_size} "
                                 f"was lost ({how_it_ended(code)})")
        time.sleep(self.grace_s)
        print(f"vitlab train: error: {self.lost}, and the others are stuck waiting for it", file=sys.stderr, flush=True)
        os._exit(1)


@contextmanager
def watched(trainer: L.Trainer):
    """While fitting: the processes this one launches are watched by a ProcessWatch (yielded; None
    when the processes were started by another launcher, torchrun or SLURM, which watch them)."""
    original = subprocess_script._launch_process_observer
    watch = None
    if isinstance(trainer.strategy.launcher, subprocess_script._SubprocessScriptLauncher):
        watch = ProcessWatch(trainer)
        subprocess_script._launch_process_observer = lambda processes: watch.start()
    try:
        yield watch
    finally:
        subprocess_script._launch_process_observer = original


def lost_process(error: RuntimeError, trainer: L.Trainer, watch: ProcessWatch | None, parent: int,
                 last: Path) -> VitlabError | None:
    """If `error` ended fit because another process is gone, the one-line error that says which one
    (if known) and how to go on, printed by the first process (or by another when the first is gone)."""
    if trainer.world_size == 1:
        return None
    first_gone = trainer.global_rank != 0 and os.getppid() != parent  # Lightning's launcher: rank 0 is the parent
    deadline = time.monotonic() + 1.0  # the watch looks every 0.2 s
    while watch is not None and watch.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not (first_gone or (watch is not None and watch.lost) or PEER_GONE.search(str(error))):
        return None
    if watch is not None and watch.lost:
        what = watch.lost
    elif first_gone:
        what = f"training process 0 of {trainer.world_size} was lost"
    else:
        what = f"a training process was lost (this is process {trainer.global_rank} of {trainer.world_size})"
    then = (f"the same command with --resume continues from {last}" if last.is_file()
            else "no checkpoint was written yet: the same command with --resume starts it over")
    error = VitlabError(f"{what}; {then}")
    error.rank_zero_tells = not first_gone  # the first process tells, if it is there
    return error
