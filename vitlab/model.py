"""The Vision Transformer, as a plain `nn.Module` that knows nothing of training.

Reads top to bottom: the config, PatchEmbed | ConvTokenizer -> Dropout, DropPath, Attention, Mlp ->
Block -> AttentionPool -> ViT.
Input is a normalised float image batch (B, C, H, W); output is logits (B, num_classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError

LAYER_NORM_EPS = 1e-6  # timm's value, so weights move between the two unchanged


@dataclass
class ViTConfig:
    image_size: int = 32  # input height and width in pixels
    patch_size: int = 4  # each token is a patch_size x patch_size x in_channels patch
    in_channels: int = 3
    num_classes: int | None = None  # None: a run takes the number of classes of its data
    dim: int = 192  # token width
    depth: int = 6  # number of encoder blocks
    heads: int = 3  # attention heads; head_dim = dim // heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.0  # after attention projection and in the MLP
    emb_dropout: float = 0.0  # on the token embeddings, before the first block
    drop_path: float = 0.0  # stochastic depth rate of the last block; block i drops its residual branches with
    # probability drop_path * i / (depth - 1), timm's linear rule torch.linspace(0, drop_path, depth)
    tokenizer: str = "patch"  # patch: linear projection of patches | conv: small conv stem (CCT)
    conv_channels: int = 64  # width of the conv tokenizer's first stage (doubling per stage)
    conv_depth: int = 1  # convolutions per stage of the conv tokenizer (the second one after the pooling, as airbench)
    pool: str = "cls"  # cls: classify the class token | attention: learned weighted mean of tokens
    init: str | None = None  # start from trained weights: a vitlab .ckpt/.safetensors, a timm state dict
    # (.safetensors/.pth) or timm:NAME; the head is made anew (see vitlab/pretrained.py)

    def __post_init__(self):
        if self.num_classes is not None and self.num_classes < 1:
            raise VitlabError(f"model.num_classes must be 1 or more, not {self.num_classes}")
        if self.image_size % self.patch_size:
            raise VitlabError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise VitlabError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        if self.tokenizer not in ("patch", "conv"):
            raise VitlabError(f"tokenizer must be patch or conv, not '{self.tokenizer}'")
        if self.tokenizer == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise VitlabError(f"the conv tokenizer halves the image per stage: patch_size {self.patch_size} "
                              f"must be a power of 2, at least 2")
        if self.conv_depth < 1:
            raise VitlabError(f"model.conv_depth must be 1 or more, not {self.conv_depth}")
        if self.pool not in ("cls", "attention"):
            raise VitlabError(f"pool must be cls or attention, not '{self.pool}'")
        if not 0 <= self.drop_path < 1:
            raise VitlabError(f"model.drop_path must be at least 0 and below 1, not {self.drop_path}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each one linearly to `dim`.

    A convolution whose kernel equals its stride is exactly "flatten each patch, then Linear".
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class ConvTokenizer(nn.Module):
    """A small convolutional stem (as in Compact Convolutional Transformers): log2(patch_size) stages
    of conv3x3 -> max-pool 2x2 -> BatchNorm -> ReLU (then conv_depth - 1 more conv3x3 -> BatchNorm ->
    ReLU at the pooled size), so that each token sees overlapping context
    and the model gets a convolution's locality prior, which matters on small data sets.
    Pooling comes first (as in airbench), so normalisation and activation touch a quarter of the
    pixels (on a 2-core CPU 1.09x the compiled train steps of conv -> BN -> ReLU -> max-pool 3x3;
    benchmarks/throughput.py --configs cpu-hour)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        stages = int(math.log2(config.patch_size))
        widths = [config.in_channels] + [config.conv_channels * 2**i for i in range(stages - 1)] + [config.dim]
        layers = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            for _ in range(config.conv_depth - 1):  # more convolution at the pooled size, as airbench's blocks
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper random mask on the CPU; the same maths: each element is zeroed with
    probability p, the others are scaled by 1/(1-p).

    Eager on the CPU, nn.Dropout draws a float per element (bernoulli_), which costs more than the
    matmul before it. Here each element gets 16 bits cut from bulk 64-bit draws, so p is exact to
    1/65536. On a GPU, and under torch.compile (which fuses the draw into its kernels), nn.Dropout runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        dropped = round(self.p * 65536)  # how many of the 65536 16-bit values drop an element
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
        keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= dropped - 32768
        return (x * keep).mul_(65536 / (65536 - dropped))


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm's: in training, each sample's residual branch output is
    zeroed with probability p and the kept ones are scaled by 1/(1-p), so the expectation is unchanged;
    in eval mode it passes x through.

    The mask is one draw of B numbers on x's device: no host sync, and torch.compile traces it whole.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.p  # (B, 1, 1)
        return x * (keep.to(x.dtype) / (1 - self.p))  # the scale in x's dtype, so bf16 stays bf16

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Standard multi-head self-attention: one fused q/k/v projection, heads by reshape.

    Scores are scaled by 1/sqrt(head_dim) (inside scaled_dot_product_attention).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.proj_drop = Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax attention matrix (B, heads, N, N), for inspection only."""
        q, k, _ = self.split_heads(x)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.split_heads(x)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.dim, hidden)
        self.fc2 = nn.Linear(hidden, config.dim)
        self.drop = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.gelu(self.fc1(x)))
        return self.drop(self.fc2(x))


class AttentionPool(nn.Module):
    """Sequence pooling (CCT): a learned score per token, softmax over tokens, weighted mean."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.score = nn.Linear(config.dim, 1)

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.score(tokens).squeeze(-1).softmax(dim=-1)  # (B, N)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.weights(tokens).unsqueeze(1) @ tokens).squeeze(1)  # (B, D)


class Block(nn.Module):
    """Pre-norm encoder block: x + Attention(LN(x)), then x + Mlp(LN(x)); in training each branch is
    dropped per sample with probability drop_path (stochastic depth)."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(config)
        # Identity when not dropping, as in timm: no module, no mask, nothing in the graph.
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Vision Transformer: tokenizer, learned position embedding, pre-norm blocks, pooling, linear head.

    The default is the plain ViT (linear patches, class token); `tokenizer=conv` and
    `pool=attention` turn it into a compact convolutional transformer.

    `load_model` also sets `class_names` and the normalisation (`image_mean`, `image_std`) that the
    weights were trained with; a freshly built model has them as None.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.num_classes is None:
            raise VitlabError("model.num_classes is not set (a run sets it from its data)")
        self.config = config
        self.class_names: list[str] | None = None
        self.image_mean: tuple[float, ...] | None = None
        self.image_std: tuple[float, ...] | None = None
        self.data_split: dict | None = None  # the images its training held out (source, fraction, seed)
        self.loaded_from: Path | None = None  # the file or folder load_model read (an export finds its run by it)

        self.patch_embed = PatchEmbed(config) if config.tokenizer == "patch" else ConvTokenizer(config)
        use_cls = config.pool == "cls"
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim)) if use_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + use_cls, config.dim))
        self.emb_drop = Dropout(config.emb_dropout)
        # Deeper blocks are dropped more often (timm's rule, rates computed in float32 as timm does).
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList([Block(config, rate) for rate in rates])
        self.norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.pool = AttentionPool(config) if config.pool == "attention" else None
        self.head = nn.Linear(config.dim, config.num_classes)
        self.init_weights()

    def init_weights(self):
        # Small truncated-normal weights and zero biases, as in timm: a deep pre-norm stack then
        # starts close to the identity and trains stably without warm-up tricks. The conv stem's
        # ReLU convolutions get He initialisation instead, which keeps their activations in scale.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.patch_embed, ConvTokenizer):
            for module in self.patch_embed.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        # A zero head makes every class equally likely at the start (loss = log(num_classes)).
        nn.init.zeros_(self.head.weight)

    # Parameters that are embeddings rather than weights: the optimiser does not decay them.
    no_weight_decay = ("cls_token", "pos_embed")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D)
        return self.emb_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (B, C, H, W) -> normalised tokens (B, T, D); T = N+1 with the class token first,
        or N with attention pooling."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, D) -> logits (B, num_classes), from the class token or by attention pooling."""
        pooled = tokens[:, 0] if self.pool is None else self.pool(tokens)  # (B, D)
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's attention matrix, a list of depth tensors (B, heads, T, T)."""
        maps = []
        x = self.embed(x)
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.norm1(x)))
            x = block(x)
        return maps

    def describe(self) -> list[str]:
        """What the model is, for people: its shape, parameters and forward FLOPs per image."""
        c = self.config
        stages = f" ({c.conv_depth} convolutions per stage)" if c.tokenizer == "conv" and c.conv_depth > 1 else ""
        tokenizer = f"{c.tokenizer} tokenizer{stages}"
        return [f"ViT dim {c.dim}, depth {c.depth}, heads {c.heads}, {tokenizer}, patch {c.patch_size}, "
                f"{c.pool} pooling, image {c.image_size}, {c.num_patches} tokens, {c.num_classes} classes",
                f"parameters: {self.num_parameters():,}",
                f"forward FLOPs per image: {self.flops_per_image() / 1e9:.3f} GFLOP"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> int:
        """Floating-point operations of one forward pass on one image (a multiply-add is 2)."""
        c = self.config
        return forward_flops(self, (1, c.in_channels, c.image_size, c.image_size))


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Counted FLOPs of model's forward pass on a zero input of input_shape, in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # The flop counter knows the GPU attention kernels but not the CPU one: teach it.
    cpu_attention = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    }
    was_training = model.training
    model.eval()  # so BatchNorm statistics are not touched
    x = torch.zeros(input_shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops()
