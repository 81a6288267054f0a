"""What a trained model attends to: attention rollout and per-layer attention as image-sized maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlab.model import ViT


@dataclass
class AttentionSummary:
    logits: torch.Tensor  # (B, num_classes)
    rollout: torch.Tensor  # (B, h, w): attention rollout over all layers, scaled to [0, 1]
    per_layer: list[torch.Tensor]  # maps (B, h, w), scaled to [0, 1]
    layer_label: str  # what per_layer shows


def scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    low = maps.flatten(1).min(1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(1e-12)


@torch.no_grad()
def attention_summary(model: ViT, images: torch.Tensor) -> AttentionSummary:
    """Attention rollout (Abnar & Zuidema, 2020) for a normalised batch (B, C, H, W).

    Each layer's head-averaged attention is mixed half-and-half with the identity (the residual
    path), rows renormalised, and the layers multiplied; the row of the token that is classified
    (the class token, or the pooling weights over all tokens) says how much each input patch
    contributed. With a class token, per_layer is its attention in each layer; with attention
    pooling, it is the pooling weights."""
    maps = model.attention_maps(images)  # depth x (B, heads, T, T)
    tokens = model.forward_features(images)
    logits = model.forward_head(tokens)
    B, T = tokens.shape[:2]
    eye = torch.eye(T, device=images.device)
    rollout = eye.expand(B, T, T)
    for attention in maps:
        mixed = 0.5 * attention.mean(1) + 0.5 * eye
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout  # (B, T, T)

    grid = model.config.image_size // model.config.patch_size
    if model.pool is None:  # class token first: keep its row, drop its own column
        relevance = rollout[:, 0, 1:]
        per_layer = [attention.mean(1)[:, 0, 1:] for attention in maps]
        label = "class token's attention"
    else:
        weights = model.pool.weights(tokens)  # (B, N)
        relevance = (weights.unsqueeze(1) @ rollout).squeeze(1)
        per_layer = [weights]
        label = "pooling weights"
    as_grid = lambda m: scale_to_unit(m.reshape(B, grid, grid)).cpu()  # noqa: E731
    return AttentionSummary(logits, as_grid(relevance), [as_grid(m) for m in per_layer], label)
