"""Training throughput, side by side in one run: vitlab's ViT, timm's VisionTransformer at the same
config, and a re-implementation of the tutorial's model; achieved GFLOP/s against a measured fp32
matmul peak; and the data pipeline's images/s.

    python benchmarks/throughput.py [--seconds 10] [--configs tutorial-cpu tiny cpu-hour] [--no-compile]
    python benchmarks/throughput.py --configs cpu-hour cpu-hour+model.depth=5 ...   # preset variants

With several configs, each config's vitlab rate is also given relative to the first config's: how
many more (or fewer) steps a variant gets in the same time budget.

A train step is forward + backward + AdamW (the same optimiser for every model) on a batch of random
images, fp32, on the CPU (or the GPU with --device cuda). Each model is measured eager and, unless
--no-compile, also under torch.compile (vitlab's `trainer.compile=true`); timm gets the same.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from vitlab import ViT, ViTConfig
from vitlab.model import forward_flops
from vitlab import config as configs
from vitlab.data.augment import normalize, random_crop_flip, tutorial_transform


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


def train_step(model: nn.Module, c: ViTConfig, batch: int, device: str):
    """A closure running one train step: forward + backward + AdamW."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, device=device)
    y = torch.randint(c.num_classes, (batch,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def data_rates(image_size: int, batch: int, seconds: float) -> dict[str, float]:
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    per_sample = tutorial_transform(image_size, autoaugment=True)
    return {
        "crop-flip (batched)": batch / timed(lambda: normalize(random_crop_flip(images), mean, std), seconds, "cpu"),
        "tutorial + AutoAugment (per sample, 1 process)":
            64 / timed(lambda: [per_sample(im) for im in images[:64]], seconds, "cpu"),
    }


def named_config(name: str) -> tuple[ViTConfig, int]:
    """'tiny', a preset, or a preset with overrides: 'cpu-hour+model.depth=5+model.mlp_ratio=3'."""
    if name == "tiny":
        return ViTConfig(dim=192, depth=6, heads=3, patch_size=4), 128
    preset, *overrides = name.split("+")
    run = configs.resolve(preset, overrides=overrides)
    return run.model, run.data.batch_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tutorial-cpu", "tiny"],
                        help="presets to measure (or 'tiny': dim 192, depth 6, 3 heads, patch 4)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per model, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="turns each model takes, interleaved")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)

    peak = matmul_peak(args.seconds / 3, args.device)
    print(f"device {args.device}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s")
    first = None  # (name, rates) of the first config, to which the others are compared
    for name in args.configs:
        c, batch = named_config(name)
        print(f"\n{name}: dim {c.dim}, depth {c.depth}, heads {c.heads}, patch {c.patch_size}, "
              f"tokenizer {c.tokenizer}, pool {c.pool}, batch {batch}")
        builders = {"vitlab": ViT}
        if c.tokenizer == "patch" and c.pool == "cls":  # the plain ViT that timm and the tutorial build
            builders.update(timm=timm_vit, tutorial=TutorialViT)
        if c.tokenizer == "conv":
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
        for k, rate in data_rates(c.image_size, batch, args.seconds / 3).items():
            print(f"  data: {k:48s} {rate:9.0f} images/s")


if __name__ == "__main__":
    main()
