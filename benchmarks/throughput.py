"""Training throughput, side by side in one run: vitlab's ViT, timm's VisionTransformer at the same
config, and a re-implementation of the tutorial's model; achieved GFLOP/s against a measured fp32
matmul peak; and the augmentations' tensor ops per batch and images/s, eager and compiled. With
--loop: the images/s of a real training run (`vitlab.train`: data, augmentation, step, logging,
progress bar) against the bare train step's.

    python benchmarks/throughput.py [--seconds 10] [--configs tutorial-cpu tiny cpu-hour] [--no-compile]
    python benchmarks/throughput.py --configs cpu-hour cpu-hour+model.depth=5 ...   # preset variants
    python benchmarks/throughput.py --loop --configs cpu-hour [--device cuda] [--epochs 4] [--seconds 12]

With several configs, each config's vitlab rate is also given relative to the first config's: how
many more (or fewer) steps a variant gets in the same time budget.

A train step is forward + backward + AdamW (the same optimiser for every model) on a batch of random
images, fp32, on the CPU (or the GPU with --device cuda). Each model is measured eager and, unless
--no-compile, also under torch.compile (vitlab's `trainer.compile=true`); timm gets the same.

--loop measures each preset as it trains. The bare step is the one vitlab's Classifier takes, on one
batch of random images resident on the device: the preset's model (compiled if the preset compiles),
batch size, precision, label smoothing, and AdamW over vitlab's parameter groups (fused on CUDA).
The loop is a run of the same preset on synthetic in-memory data (`fake:N`), sized so that an epoch
lasts about --seconds / 2 at the bare step's rate, without validation between epochs; each epoch's
time is the difference of metrics.csv's `elapsed_s` between consecutive epochs, and the first epoch
(which compiles) is not counted. A loop that keeps the GPU busy reaches >= 0.90 of the bare step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vitlab
from vitlab import ViT, ViTConfig
from vitlab.model import forward_flops
from vitlab import config as configs
from vitlab.config import OptimConfig, RunConfig
from vitlab.data.augment import auto_augment_cifar10, normalize, rand_augment, random_crop_flip, tutorial_geometry
from vitlab.training.module import param_groups


class TutorialAttention(nn.Module):
    """The tutorial's attention, kept only for comparison: every head has its own full-width q, k and
    v projections (heads x the weights and compute), and scores are divided by sqrt(sequence length)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.q = nn.ModuleList([nn.Linear(dim, dim) for _ in range(heads)])
        self.k = nn.ModuleList([nn.Linear(dim, dim) for _ in range(heads)])
        self.v = nn.ModuleList([nn.Linear(dim, dim) for _ in range(heads)])
        self.out = nn.Linear(heads * dim, dim)

    def forward(self, x):
        n = x.shape[1]
        heads = []
        for q, k, v in zip(self.q, self.k, self.v):
            scores = q(x) @ k(x).transpose(-2, -1) / math.sqrt(n)
            heads.append(scores.softmax(-1) @ v(x))
        return self.out(torch.cat(heads, dim=-1))


class TutorialBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TutorialAttention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TutorialViT(nn.Module):
    """The tutorial's ViT: unfold-based patchify + linear, class token, position embedding, blocks, head."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.patch = c.patch_size
        self.embed = nn.Linear(c.in_channels * c.patch_size ** 2, c.dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_patches + 1, c.dim))
        self.drop = nn.Dropout(c.emb_dropout)
        self.blocks = nn.Sequential(*[TutorialBlock(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth)])
        self.head = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.num_classes))

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.patch
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(2, 4)
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.drop(x))
        return self.head(x[:, 0])


def cct_stem_vit(c: ViTConfig) -> nn.Module:
    """vitlab's conv-tokenizer ViT with the stem in the CCT order, conv -> BN -> ReLU -> max-pool 3x3
    stride 2, kept only for comparison: vitlab pools first (2x2), so BN and ReLU see a quarter of the pixels."""
    model = ViT(c)
    layers = []
    for conv in [m for m in model.patch_embed.layers if isinstance(m, nn.Conv2d)]:
        layers += [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    model.patch_embed.layers = nn.Sequential(*layers)
    return model


def timm_vit(c: ViTConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_channels,
                             num_classes=c.num_classes, embed_dim=c.dim, depth=c.depth, num_heads=c.heads,
                             mlp_ratio=c.mlp_ratio, drop_rate=c.emb_dropout, proj_drop_rate=c.dropout)


def timed(fn, seconds: float, device: str, warmup: int = 1) -> float:
    """Seconds per call of fn, after `warmup` calls, averaged over about `seconds` (at least one call)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 1:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls


def matmul_peak(seconds: float, device: str) -> float:
    """fp32 GFLOP/s of a large square matmul: the most this machine's matmul can do."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / timed(lambda: a @ b, seconds, device) / 1e9


def train_step(model: nn.Module, c: ViTConfig, batch: int, device: str, optim: OptimConfig | None = None,
               precision: str = "32-true"):
    """A closure running one train step on one resident batch of random images: forward + backward +
    AdamW. Without `optim`, AdamW treats all parameters alike, the same for every model compared; with
    it, the step is the one vitlab's Classifier takes: AdamW over `param_groups` (fused on CUDA), with
    optim's LR, betas and label smoothing. precision 'bf16-mixed' runs forward and loss under bf16
    autocast, as Lightning does; '32-true' in fp32."""
    if precision not in ("32-true", "bf16-mixed"):
        raise SystemExit(f"precision {precision}: the benchmark knows 32-true and bf16-mixed")
    model = model.to(device).train()
    if optim is None:
        optimizer, label_smoothing = torch.optim.AdamW(model.parameters(), lr=1e-4), 0.0
    else:
        optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                      betas=(optim.beta1, optim.beta2), fused=device == "cuda")
        label_smoothing = optim.label_smoothing
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=device)
    y = torch.randint(c.num_classes, (batch,), device=device)

    def step():
        with torch.autocast(device, torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations run inside it: on a GPU, eager, each is a kernel launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def data_rates(image_size: int, batch: int, seconds: float, device: str, compile: bool) -> dict[str, tuple]:
    """For each batched augmentation (uint8 batch in, normalised batch out, on the training device,
    where the DataModule runs them): its tensor operations per batch, its images/s eager and, with
    compile, under torch.compile (what trainer.compile does to it on a GPU)."""
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    augmentations = {
        "crop-flip": random_crop_flip,
        "crop-flip + RandAugment(2, 9)": lambda x: rand_augment(random_crop_flip(x), 2, 9),
        "tutorial + AutoAugment": lambda x: auto_augment_cifar10(tutorial_geometry(x)),
    }
    results = {}
    for name, augment in augmentations.items():
        def pipeline(x, augment=augment):
            return normalize(augment(x), mean, std)

        pipeline(images)  # the cached tables are made outside the count
        with OpCounter() as counter:
            pipeline(images)
        eager = batch / timed(lambda: pipeline(images), seconds, device)
        compiled = torch.compile(pipeline, dynamic=False) if compile else None
        results[name] = (counter.count, eager, compiled and batch / timed(lambda: compiled(images), seconds, device))
    return results


TINY = {"model.dim": 192, "model.depth": 6, "model.heads": 3, "model.patch_size": 4, "data.batch_size": 128}


def named_config(name: str) -> tuple[str | None, dict]:
    """'tiny', a preset, or a preset with overrides ('cpu-hour+model.depth=5+model.mlp_ratio=3') as
    (preset, overrides), for configs.resolve and vitlab.train; 'tiny' is the defaults with TINY."""
    if name == "tiny":
        return None, dict(TINY)
    preset, *overrides = name.split("+")
    return preset, dict(configs.parse_override(text) for text in overrides)


def run_precision(run: RunConfig, device: str) -> str:
    """The precision the run trains in on `device`: 'auto' is bf16-mixed on CUDA and 32-true on the
    CPU (vitlab.training.run.default_precision, decided here by the device measured rather than by
    whether the machine has a GPU)."""
    if run.trainer.precision != "auto":
        return run.trainer.precision
    return "bf16-mixed" if device == "cuda" else "32-true"


def bare_step(run: RunConfig, device: str):
    """A closure running the train step alone, as the run's Classifier takes it."""
    model = ViT(dataclasses.replace(run.model, num_classes=10))  # fake data has 10 classes
    if run.trainer.compile:
        model.compile()
    return train_step(model, model.config, run.data.batch_size, device, run.optim, run_precision(run, device))


def fake_source_for(run: RunConfig, train_images: int) -> tuple[str, int]:
    """The `fake:N` source whose training split holds at least train_images images (N less the
    round(N x val_fraction) held out), and the images an epoch takes from it (full batches only)."""
    fraction, batch = run.data.val_fraction, run.data.batch_size
    n = math.ceil(train_images / (1 - fraction))
    while n - round(n * fraction) < train_images:  # held out as data.datamodule.split_train_val does
        n += 1
    return f"fake:{n}", (n - round(n * fraction)) // batch * batch


def loop_rates(preset: str | None, overrides: dict, run: RunConfig, device: str, epochs: int,
               train_images: int) -> list[float]:
    """Images/s of each epoch but the first of a real run (`vitlab.train`) of the preset with the
    overrides (resolved: `run`) on `fake` data with about train_images training images. The run's own
    clock times the epochs: the differences of metrics.csv's elapsed_s, which is rounded to 0.1 s."""
    source, images_per_epoch = fake_source_for(run, train_images)
    overrides = {
        **overrides,
        "trainer.max_time": None,
        "trainer.val_every_n_epochs": epochs + 1,  # no validation between epochs (the final one is not timed)
        "trainer.accelerator": "gpu" if device == "cuda" else "cpu",
        "trainer.precision": run_precision(run, device),  # the bare step's, whatever else the machine has
        "trainer.checkpoint_every": "10:00:00",  # no checkpoint part-way through an epoch
    }
    with tempfile.TemporaryDirectory() as tmp:
        rows = vitlab.train(preset, source, max_epochs=epochs, run_dir=Path(tmp) / "run", overrides=overrides).metrics
    elapsed = [float(row["elapsed_s"]) for row in rows]  # at the end of each epoch; epoch 0 compiles
    return [images_per_epoch / (end - start) for start, end in zip(elapsed, elapsed[1:])]


def compare_loop(names: list[str], device: str, epochs: int, seconds: float):
    """For each config: the bare train step's images/s, then a training run's, and their ratio."""
    results = []
    for name in names:
        preset, overrides = named_config(name)
        run = configs.resolve(preset, overrides=overrides)
        c, batch = dataclasses.replace(run.model, num_classes=10), run.data.batch_size  # fake data: 10 classes
        bare = "bare compiled step" if run.trainer.compile else "bare step"
        print(f"\n{name}: dim {c.dim}, depth {c.depth}, tokenizer {c.tokenizer}, batch {batch}, "
              f"precision {run_precision(run, device)}, {'compiled' if run.trainer.compile else 'eager'}")
        # A config compiles afresh: shapes that differ from the previous config's would otherwise make
        # torch.compile recompile for dynamic shapes, slower than the static ones a `vitlab train` gets.
        torch.compiler.reset()
        step = bare_step(run, device)
        # Three warm-up steps: the first compiles, the next let CUDA's allocator and kernels settle.
        before = batch / timed(step, seconds, device, warmup=3)
        print(f"  {bare}: {before:,.0f} images/s")
        # Each epoch lasts about seconds / 2 if the loop keeps up with the bare step; at least 4 batches.
        train_images = max(4 * batch, round(before * seconds / 2))
        rates = loop_rates(preset, overrides, run, device, epochs, train_images)
        # The step is timed again after the run and keeps its better time, as the run keeps its best
        # epoch: a slow spell of a shared machine then cannot favour the loop.
        after = batch / timed(step, seconds, device)
        print(f"  {bare} after the run: {after:,.0f} images/s")
        results.append((name, bare, max(before, after), rates))
    counted = "epoch 1" if epochs == 2 else f"epochs 1-{epochs - 1}"
    print(f"\nloop = a `vitlab.train` epoch, the best (and the median) of {counted}; device {device}")
    for name, bare, step_rate, rates in results:
        best, median = max(rates), statistics.median(rates)
        print(f"{name}: loop {best:,.0f} images/s (median {median:,.0f}) | {bare} {step_rate:,.0f} images/s | "
              f"loop / step {best / step_rate:.2f} (median {median / step_rate:.2f}; target >= 0.90 on a GPU)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tutorial-cpu", "tiny"],
                        help="presets to measure (or 'tiny': dim 192, depth 6, 3 heads, patch 4)")
    parser.add_argument("--seconds", type=float, default=12.0,
                        help="measuring time per model, over all rounds; with --loop, the bare step's, "
                             "and each epoch lasts about half of it")
    parser.add_argument("--rounds", type=int, default=3, help="turns each model takes, interleaved")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--loop", action="store_true",
                        help="compare a real training run (vitlab.train) with the bare train step instead")
    parser.add_argument("--epochs", type=int, default=4, help="with --loop: the run's epochs (the first is not counted)")
    args = parser.parse_args()
    if args.loop and args.epochs < 2:
        parser.error("--loop needs --epochs 2 or more: the first epoch compiles and is not counted")
    torch.manual_seed(0)
    if args.loop:
        compare_loop(args.configs, args.device, args.epochs, args.seconds)
        return

    peak = matmul_peak(args.seconds / 3, args.device)
    print(f"device {args.device}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s")
    first = None  # (name, rates) of the first config, to which the others are compared
    for name in args.configs:
        preset, overrides = named_config(name)
        run = configs.resolve(preset, overrides=overrides)
        c, batch = dataclasses.replace(run.model, num_classes=10), run.data.batch_size  # fake data: 10 classes
        print(f"\n{name}: dim {c.dim}, depth {c.depth}, heads {c.heads}, patch {c.patch_size}, "
              f"tokenizer {c.tokenizer}, pool {c.pool}, batch {batch}")
        builders = {"vitlab": ViT}
        if c.tokenizer == "patch" and c.pool == "cls":  # the plain ViT that timm and the tutorial build
            builders.update(timm=timm_vit, tutorial=TutorialViT)
        if c.tokenizer == "conv" and c.conv_depth == 1:  # the stems differ in the order of one conv's stage
            builders["CCT-order stem"] = cct_stem_vit
        runs = [(k, False) for k in builders]
        if not args.no_compile:
            runs += [(k, True) for k in builders if k != "tutorial"]  # the tutorial ran eager
        steps, flops = {}, {}
        for k, compiled in runs:
            model = builders[k](c)
            label = f"{k}{' compiled' if compiled else ''}"
            # A train step costs about 3x the forward pass; each model is charged its own FLOPs.
            flops[label] = 3 * forward_flops(model, (1, c.in_channels, c.image_size, c.image_size))
            if compiled:
                model.compile()
            steps[label] = train_step(model, c, batch, args.device)
        # Models take turns, round after round, and each keeps its best round: a slow spell of the
        # machine then cannot favour whichever model happened to run outside it.
        rates = dict.fromkeys(steps, 0.0)
        for _ in range(args.rounds):
            for label, step in steps.items():
                seconds = timed(step, args.seconds / args.rounds, args.device, warmup=0 if rates[label] else 1)
                rates[label] = max(rates[label], batch / seconds)
        for label, rate in rates.items():
            f = flops[label]
            print(f"  {label:18s} {f / 3e9:6.3f} GFLOP/image forward  {rate:8.1f} train images/s  "
                  f"{rate * f / 1e9:6.1f} GFLOP/s ({100 * rate * f / 1e9 / peak:3.0f}% of peak)")
        for ours, theirs in [("vitlab", "timm"), ("vitlab compiled", "timm compiled"),
                             ("vitlab", "tutorial"), ("vitlab compiled", "tutorial"),
                             ("vitlab", "CCT-order stem"), ("vitlab compiled", "CCT-order stem compiled")]:
            if ours in rates and theirs in rates:
                print(f"  {ours} / {theirs}: {rates[ours] / rates[theirs]:.2f}x")
        if first is None:
            first = (name, rates)
        else:
            for label in ("vitlab", "vitlab compiled"):
                if label in rates and label in first[1]:
                    print(f"  {label} / {first[0]} {label}: {rates[label] / first[1][label]:.2f}x")
        for k, (ops, eager, compiled) in data_rates(c.image_size, batch, args.seconds / 3, args.device,
                                                    not args.no_compile).items():
            print(f"  data: {k:30s} {ops:4d} tensor ops/batch  {eager:9.0f} images/s eager"
                  + (f"  {compiled:9.0f} compiled ({compiled / eager:.2f}x)" if compiled else ""))


if __name__ == "__main__":
    main()
