"""Inference on the CPU, side by side in one run: a trained model as torch eager, torch compiled
(torch.compile), ONNX Runtime fp32 and ONNX Runtime int8 (`vitlab export --quantize int8`): latency
at batch 1, throughput at batch 64, held-out accuracy, and the size of each file.

    python benchmarks/inference.py --checkpoint RUN/checkpoints/last.ckpt --data folder:/tmp/cifar10-jpeg/train \\
        [--held-out N] [--repeats 200] [--batches 30] [--rounds 3] [--calibrate-images 512] [--threads N] [--out-dir DIR]
        [--variants]

The held-out images are those the checkpoint's run held out (its recorded split, as `vitlab eval
--held-out`), the same images for all four; --held-out N scores the first N of them (default all).
The int8 model is calibrated on --calibrate-images training images of --data, never held-out ones.
The exports (safetensors, ONNX fp32, ONNX int8) are written to --out-dir (default: a temporary folder).

Latency: the median wall time of --repeats calls on one image, after warm-up calls. Throughput: 64
images over the median wall time of --batches calls on 64 images. The runtimes are timed in turn,
--rounds times over, and each keeps its best round (a machine shared with other jobs slows some
rounds; the best is the closest to an idle machine's). Inputs are normalised float
images already in memory (no decoding); torch runs under inference_mode; torch.compile compiles
once per batch size (dynamic=False) in the warm-up. Every runtime uses --threads threads (default
torch.get_num_threads(), the machine's cores), one process, fp32 apart from the int8 model.

--variants adds a table of other int8 recipes (export.Int8Recipe: what is quantized, per-tensor
weights, no pre-processing, percentile calibration), each calibrated on the same images and timed
as the runtimes are, to show why vitlab quantizes what it does.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab import config as configs
from vitlab.data.augment import normalize
from vitlab.data.sources import load_eval_set, same_source
from vitlab.export import Int8Recipe, calibration_images, export_onnx, export_onnx_int8, export_safetensors
from vitlab.inference import OnnxModel, load_model

ROWS = ("torch eager", "torch compiled", "onnxruntime fp32", "onnxruntime int8")
# --variants: what else int8 could quantize, and how (vitlab's choice is Int8Recipe()).
VARIANTS = {
    "every op onnxruntime quantizes (LayerNorm, Softmax, GELU, BatchNorm, ... too)": Int8Recipe(op_types=None, activation_matmuls=True),
    "Conv, MatMul, Gemm, with the attention's q.k and attention.v": Int8Recipe(activation_matmuls=True),
    "Conv, MatMul, Gemm with weights only (vitlab's choice)": Int8Recipe(),
    "the same, per-tensor weights (not per channel)": Int8Recipe(per_channel=False),
    "the same, without onnxruntime's pre-processing": Int8Recipe(pre_process=False),
    "the same, percentile calibration (not min/max)": Int8Recipe(calibration="percentile"),
    "MatMul and Gemm only (a conv tokenizer stays fp32)": Int8Recipe(op_types=("MatMul", "Gemm")),
}


def median_seconds(fn, calls: int, warmup: int) -> float:
    """The median wall time of one call of fn, over `calls` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def held_out_data(model, source: str) -> configs.DataConfig:
    """The data config whose held-out part is the images the checkpoint's run held out."""
    data = configs.resolve(flags={"data": {"source": source}}).data
    recorded = model.data_split
    if recorded is None:
        print(f"note: the checkpoint does not record its split: assuming val_fraction {data.val_fraction}, "
              f"split seed {data.split_seed}", file=sys.stderr)
        return data
    if not same_source(recorded["source"], source):
        sys.exit(f"--data: the checkpoint was trained on {recorded['source']}, not {source}")
    return dataclasses.replace(data, **{k: recorded[k] for k in ("val_fraction", "split_seed", "skip_bad_images")})


def logits_of(run, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([run(images[i:i + batch]) for i in range(0, len(images), batch)])


def variants_table(model, calibration, images, labels, reference, one, batch, threads, out: Path, args):
    """--variants: each Int8Recipe's held-out accuracy, agreement with fp32, speed (timed in --rounds
    rounds over all of them, each keeping its best) and file size."""
    runs, rows = {}, {}
    for index, (name, recipe) in enumerate(VARIANTS.items()):
        path = out / f"variant-{index}.onnx"
        export_onnx_int8(model, path, calibration, recipe)
        runs[name] = OnnxModel(path, threads=threads)
        predicted = logits_of(runs[name], images, len(batch)).argmax(-1)
        rows[name] = [(predicted == labels).float().mean().item(), (predicted == reference).float().mean().item(),
                      [], [], path.stat().st_size]
    for _ in range(args.rounds):
        for name, run in runs.items():
            rows[name][2].append(median_seconds(lambda: run(one), args.repeats, args.warmup))
            rows[name][3].append(len(batch) / median_seconds(lambda: run(batch), args.batches, args.warmup))
    print()
    print(f"| int8 variant | held-out accuracy | same class as fp32 | latency, batch 1 (median ms) "
          f"| throughput, batch {len(batch)} (images/s) | size (MB) |")
    print("|---|---|---|---|---|---|")
    for name, (accuracy, agreement, latencies, rates, size) in rows.items():
        print(f"| {name} | {accuracy:.2%} | {agreement:.2%} | {min(latencies) * 1e3:.2f} | {max(rates):,.0f} | "
              f"{size / 1e6:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a vitlab checkpoint (.ckpt)")
    parser.add_argument("--data", required=True, help="the data source the checkpoint was trained on")
    parser.add_argument("--held-out", type=int, default=0, metavar="N", help="score the first N held-out images (0: all)")
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 calls timed per runtime")
    parser.add_argument("--batches", type=int, default=30, help="batch-64 calls timed per runtime")
    parser.add_argument("--batch-size", type=int, default=64, help="the throughput batch (default 64)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each timing")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds over all runtimes; each keeps its best")
    parser.add_argument("--calibrate-images", type=int, default=512, help="training images that calibrate int8")
    parser.add_argument("--threads", type=int, help="threads of every runtime (default: torch.get_num_threads())")
    parser.add_argument("--out-dir", type=Path, help="where the exports are written (default: a temporary folder)")
    parser.add_argument("--variants", action="store_true",
                        help="also a table of other ways to quantize (what to quantize, per-channel, calibration)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = load_model(args.checkpoint)
    data = held_out_data(model, args.data)
    held_out = load_eval_set(data, model.config.image_size, model.class_names, held_out=True,
                             channels=model.config.in_channels)
    count = min(args.held_out or len(held_out), len(held_out))
    images = normalize(held_out.images[:count], model.image_mean, model.image_std)
    labels = held_out.labels[:count]

    with tempfile.TemporaryDirectory(prefix="vitlab-bench-") as tmp:
        out = args.out_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = {"checkpoint (.ckpt)": args.checkpoint, "safetensors": out / "model.safetensors",
                 "onnx fp32": out / "model.onnx", "onnx int8": out / "model-int8.onnx"}
        export_safetensors(model, files["safetensors"])
        export_onnx(model, files["onnx fp32"])
        start = time.perf_counter()
        calibration = calibration_images(model, data, args.calibrate_images)
        export_onnx_int8(model, files["onnx int8"], calibration)
        quantize_seconds = time.perf_counter() - start
        sizes = {name: path.stat().st_size for name, path in files.items()}

        compiled = torch.compile(model, dynamic=False)
        runners = {"torch eager": model, "torch compiled": compiled,
                   "onnxruntime fp32": OnnxModel(files["onnx fp32"], threads=threads),
                   "onnxruntime int8": OnnxModel(files["onnx int8"], threads=threads)}
        one, batch = images[:1], images[:args.batch_size].repeat(-(-args.batch_size // count), 1, 1, 1)[:args.batch_size]
        predictions, accuracies = {}, {}
        with torch.inference_mode():
            for name, run in runners.items():
                predictions[name] = logits_of(run, images, args.batch_size).argmax(-1)
                accuracies[name] = (predictions[name] == labels).float().mean().item()
            # Round after round over the runtimes, each keeping its best round: load from other jobs
            # that comes and goes slows one round, not one runtime's only measurement.
            latencies, rates = {name: [] for name in runners}, {name: [] for name in runners}
            for round_ in range(args.rounds):
                for name, run in runners.items():
                    latencies[name].append(median_seconds(lambda: run(one), args.repeats, args.warmup))
                    rates[name].append(args.batch_size / median_seconds(lambda: run(batch), args.batches, args.warmup))
                    print(f"round {round_ + 1}: {name}: batch 1 {latencies[name][-1] * 1e3:.2f} ms, "
                          f"batch {args.batch_size} {rates[name][-1]:,.0f} images/s", file=sys.stderr)
        results = {name: (accuracies[name], min(latencies[name]), max(rates[name])) for name in runners}
        report(args, model, data, count, threads, calibration, quantize_seconds, predictions, results, sizes)
        if args.variants:
            variants_table(model, calibration, images, labels, predictions["onnxruntime fp32"], one, batch,
                           threads, out, args)


def report(args, model, data, count, threads, calibration, quantize_seconds, predictions, results, sizes):
    import onnxruntime

    shape, size = model.describe()[:2]
    agreement = (predictions["onnxruntime int8"] == predictions["onnxruntime fp32"]).float().mean().item()
    print(f"model: {args.checkpoint}: {shape}; {size}")
    print(f"held-out images: {count} of {args.data} (val_fraction {data.val_fraction}, split seed {data.split_seed})")
    print(f"CPU: {platform.processor() or platform.machine()}, {threads} threads for every runtime "
          f"(torch.get_num_threads(); onnxruntime intra-op threads {threads}); torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")
    print(f"timing: median of {args.repeats} calls at batch 1 and of {args.batches} calls at batch {args.batch_size}, "
          f"best of {args.rounds} rounds")
    print(f"int8: calibrated on {len(calibration)} training images in {quantize_seconds:.1f} s; "
          f"predicts the same class as onnxruntime fp32 on {agreement:.2%} of the held-out images")
    print()
    print(f"| runtime | held-out accuracy | latency, batch 1 (median ms) | throughput, batch {args.batch_size} (images/s) |")
    print("|---|---|---|---|")
    for name in ROWS:
        accuracy, latency, rate = results[name]
        print(f"| {name} | {accuracy:.2%} | {latency * 1e3:.2f} | {rate:,.0f} |")
    print()
    print("| file | size (MB) |")
    print("|---|---|")
    for name, value in sizes.items():
        print(f"| {name} | {value / 1e6:.2f} |")


if __name__ == "__main__":
    main()
