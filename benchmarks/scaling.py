"""How vitlab scales on this machine: one process against two DDP processes, streamed shards against
images in memory, and the memory a streamed run needs as the data set grows.

    .venv/bin/python benchmarks/scaling.py [--epochs 3] [--rounds 2] [--only ddp|streaming|memory] [--work DIR]

Each configuration is a real `vitlab train` subprocess on synthetic images (the `fake` source,
packed with `vitlab.data.shards` for the streamed runs). Training speed is images per second of
the epochs after the first (from metrics.csv's elapsed_s, so start-up, decoding and compiling do
not count); memory is the peak resident set of the training process(es) (getrusage of children).
Run it on an otherwise idle machine: the configurations run one after another.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = ["model.dim=128", "model.depth=4", "model.heads=4", "data.batch_size=64", "optim.warmup=0"]


def train(run_dir: Path, data: str, image_size: int, epochs: int, threads: int, extra: list[str]) -> dict:
    """One `vitlab train` in a child process that reports its own children's peak RSS."""
    cmd = [sys.executable, "-m", "vitlab.cli", "train", "--data", data, "--run-dir", str(run_dir),
           "--max-epochs", str(epochs), f"model.image_size={image_size}", f"model.patch_size={image_size // 8}",
           f"data.cache_dir={run_dir.parent / 'cache'}", *MODEL, *extra]
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    images = (steps[-1] - steps[0]) * 64 * processes(extra)  # a step takes a batch on every process
    return {"images_per_s": images / (elapsed[-1] - elapsed[0]), "peak_rss_mib": int(result.stdout.split()[-1]) / 1024}


def processes(extra: list[str]) -> int:
    return int(extra[extra.index("--devices") + 1]) if "--devices" in extra else 1


def pack(out: Path, count: int, image_size: int) -> str:
    from vitlab.data import shards
    from vitlab.data.images import make_fake

    shards.pack_image_set(make_fake(num_images=count, image_size=image_size), out, "fake", None, 2)
    return f"shards:{out}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the DDP comparison")
    parser.add_argument("--only", choices=["ddp", "streaming", "memory"], help="run one part only")
    parser.add_argument("--work", type=Path, help="where runs and packs go (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vitlab-scaling-"))
    results = {}
    if args.only in (None, "ddp"):
        ddp_comparison(args, work, results)
    if args.only in (None, "streaming"):
        streaming_comparison(args, work, results)
    if args.only in (None, "memory"):
        streamed_memory(work, results)
    for name, figures in results.items():
        print(f"{name:<48} {figures['images_per_s']:8.1f} images/s   peak RSS {figures['peak_rss_mib']:7.0f} MiB")
    print(json.dumps(results))


def ddp_comparison(args, work: Path, results: dict):
    # Interleaved rounds, the best of each kept: a one-off slowdown of the machine then hits both sides.
    rounds = {"one": [], "ddp": []}
    for r in range(args.rounds):
        rounds["one"].append(train(work / f"one-{r}", "fake", 32, args.epochs, 2, ["--accelerator", "cpu"]))
        rounds["ddp"].append(train(work / f"ddp-{r}", "fake", 32, args.epochs, 1,
                                   ["--accelerator", "cpu", "--devices", "2"]))
    one, two = (max(rounds[k], key=lambda f: f["images_per_s"]) for k in ("one", "ddp"))
    results["1 process x 2 threads, in memory, 32 px"] = one
    results["2 DDP processes x 1 thread, in memory, 32 px"] = two
    print(f"DDP (2 x 1 thread) / one process (2 threads): {two['images_per_s'] / one['images_per_s']:.2f}x "
          f"(best of {args.rounds} interleaved rounds)")


def streaming_comparison(args, work: Path, results: dict):
    for size in (32, 128):
        memory = train(work / f"memory-{size}", "fake", size, args.epochs, 2, [])
        streamed = train(work / f"streamed-{size}", pack(work / f"pack-{size}", 2000, size), size, args.epochs, 2,
                         ["data.num_workers=1"])
        results[f"in memory, {size} px"], results[f"streamed, {size} px"] = memory, streamed
        print(f"{size} px: streamed / in memory: {streamed['images_per_s'] / memory['images_per_s']:.2f}x")


def streamed_memory(work: Path, results: dict):
    for count in (2000, 8000):
        location = pack(work / f"pack-rss-{count}", count, 128)
        results[f"streamed, 128 px, {count} images"] = train(work / f"rss-{count}", location, 128, 2, 2,
                                                              ["data.num_workers=1"])


if __name__ == "__main__":
    main()
