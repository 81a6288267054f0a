import math

import pytest
import timm
import torch
from torch import nn

from vitlab import ViT, ViTConfig
from vitlab.model import Dropout

TINY = ViTConfig(image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=4)


def test_shapes_and_split_between_features_and_head():
    model = ViT(TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 64 + 1, 64)
    logits = model.forward_head(tokens)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(model(x), logits)


def test_fresh_model_predicts_uniformly():
    model = ViT(TINY).eval()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    assert loss.item() == pytest.approx(math.log(10), abs=1e-5)


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="heads"):
        ViTConfig(dim=64, heads=5)


def test_matches_timm_vision_transformer():
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0
    ).eval()
    # timm zero-initialises some weights; randomise everything so the comparison means something.
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    model = ViT.from_timm(reference).eval()
    assert model.config.depth == 3 and model.config.heads == 4 and model.config.dim == 64
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)


def test_from_timm_refuses_what_it_cannot_map():
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=1, num_heads=4, global_pool="avg"
    )
    with pytest.raises(ValueError, match="global_pool"):
        ViT.from_timm(reference)


def tutorial_img_to_patch(x, patch_size):
    """The tutorial's patchify: (B, C, H, W) -> (B, H'*W', C*p*p)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch_size, patch_size, W // patch_size, patch_size)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.flatten(1, 2).flatten(2, 4)


def test_patch_embedding_equals_tutorial_patchify_plus_linear():
    model = ViT(TINY)
    conv = model.patch_embed.proj
    linear = nn.Linear(3 * 4 * 4, 64)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(64, -1))
        linear.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 32, 32)
    patches = tutorial_img_to_patch(x, 4)
    assert patches.shape == (2, 64, 48)
    torch.testing.assert_close(model.patch_embed(x), linear(patches), atol=1e-5, rtol=1e-5)


def test_attention_scales_by_head_dim_and_uses_head_width_projections():
    model = ViT(TINY).eval()
    attn = model.blocks[0].attn
    # Standard multi-head attention: q, k, v together are 3 x dim wide, not 3 x heads x dim.
    assert attn.qkv.weight.shape == (3 * 64, 64)
    x = torch.randn(2, 65, 64)
    q, k, v = attn.split_heads(x)
    head_dim = 64 // 4
    weights = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 65, 64))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.attention_weights(x), weights)


def test_attention_maps_are_distributions():
    maps = ViT(TINY).attention_maps(torch.randn(2, 3, 32, 32))
    assert len(maps) == 2 and maps[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 65))


def test_flops_per_image_counts_the_matmuls():
    model = ViT(TINY)
    n, d, h = 65, 64, 256
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * h
    expected = 2 * 64 * 48 * d + 2 * per_block + 2 * d * 10
    assert model.flops_per_image() == expected


def test_compact_options_conv_tokenizer_and_attention_pooling():
    config = ViTConfig(tokenizer="conv", patch_size=8, conv_channels=16, dim=64, depth=2, heads=4, pool="attention")
    model = ViT(config).eval()
    assert model.cls_token is None and model.pos_embed.shape == (1, 16, 64)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 16, 64)  # 32 / 8 = 4 x 4 tokens, no class token
    weights = model.pool.weights(tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    expected = model.head((weights.unsqueeze(-1) * tokens).sum(1))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # Counting FLOPs must not disturb BatchNorm statistics.
    model.train()
    before = model.patch_embed.layers[2].running_mean.clone()
    assert model.flops_per_image() > 0 and model.training
    torch.testing.assert_close(model.patch_embed.layers[2].running_mean, before)


def test_conv_tokenizer_needs_a_power_of_two_patch():
    with pytest.raises(ValueError, match="power of 2"):
        ViTConfig(tokenizer="conv", patch_size=6, image_size=36)


def test_dropout_has_nn_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(1001, 999, requires_grad=True)  # an element count that is not a multiple of 4
    y = drop(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - 0.3) < 0.003
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - round(0.3 * 65536) / 65536)))
    assert abs(y.mean().item() - 1) < 0.01  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through exactly the kept elements, scaled
    assert not torch.equal(drop(x), y)  # a new mask every call
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
