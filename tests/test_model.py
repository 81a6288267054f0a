import dataclasses
import math

import pytest
import timm
import torch
from torch import nn

from vitlab import ViT, ViTConfig
from vitlab.errors import VitlabError
from vitlab.model import DropPath, Dropout
from vitlab.pretrained import from_timm

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
    with pytest.raises(VitlabError, match="patch_size"):
        ViTConfig(image_size=32, patch_size=5)
    with pytest.raises(VitlabError, match="heads"):
        ViTConfig(dim=64, heads=5)
    with pytest.raises(VitlabError, match="tokenizer must be patch or conv"):
        ViTConfig(tokenizer="cnn")
    with pytest.raises(VitlabError, match="pool must be cls or attention"):
        ViTConfig(pool="mean")


def test_matches_timm_vision_transformer():
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0
    ).eval()
    # timm zero-initialises some weights; randomise everything so the comparison means something.
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    model = from_timm(reference).eval()
    assert model.config.depth == 3 and model.config.heads == 4 and model.config.dim == 64
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)


def test_from_timm_refuses_what_it_cannot_map():
    def timm_vit(**options):
        return timm.models.vision_transformer.VisionTransformer(
            **{"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 64, "depth": 1, "num_heads": 4,
               **options})

    with pytest.raises(VitlabError, match="global_pool"):
        from_timm(timm_vit(global_pool="avg"))
    # Raised, not asserted: these hold under python -O too.
    with pytest.raises(VitlabError, match="unmapped parameters blocks.0.attn.qkv.bias"):
        from_timm(timm_vit(qkv_bias=False))
    with pytest.raises(VitlabError, match=r"pos_embed has shape \(1, 97, 64\) in timm, \(1, 65, 64\) in vitlab"):
        from_timm(timm_vit(img_size=(32, 48)))  # not square: 8 x 12 patches


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


def reference_attention(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention written out head by head from attn's fused qkv weights, for x (B, N, D):
    the attention weights (B, heads, N, N) and the output (B, N, D)."""
    D = x.shape[-1]
    head_dim = D // attn.heads
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D] for i in range(3))  # 3 x (B, N, D)
    weights, outputs = [], []
    for h in range(attn.heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(head_dim)  # (B, N, N)
        weights.append(scores.softmax(-1))
        outputs.append(weights[-1] @ v[..., part])  # (B, N, head_dim)
    return torch.stack(weights, 1), attn.proj(torch.cat(outputs, -1))


def randomise_attention(model: ViT):
    """Larger q/k/v weights than the initialisation's, so that attention is far from uniform and a
    wrong scale or head split shows."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.2)
            block.attn.qkv.bias.normal_(0, 0.2)


def test_attention_scales_by_head_dim_and_uses_head_width_projections():
    torch.manual_seed(0)
    model = ViT(TINY).eval()
    randomise_attention(model)
    attn = model.blocks[0].attn
    # Standard multi-head attention: q, k, v together are 3 x dim wide, not 3 x heads x dim.
    assert attn.qkv.weight.shape == (3 * 64, 64)
    x = torch.randn(2, 65, 64)
    weights, expected = reference_attention(attn, x)
    assert weights.max() > 0.5  # far from uniform (1/65)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.attention_weights(x), weights, atol=1e-6, rtol=1e-5)
    # timm's attention with the same weights agrees.
    reference = timm.models.vision_transformer.Attention(64, num_heads=4, qkv_bias=True).eval()
    reference.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x), reference(x), atol=1e-5, rtol=1e-5)


def test_attention_maps_are_distributions():
    torch.manual_seed(0)
    model = ViT(TINY).eval()
    randomise_attention(model)
    x = torch.randn(2, 3, 32, 32)
    # What each block's attention sees in an ordinary forward pass.
    inputs = []

    def record(module, args):
        inputs.append(args[0])

    hooks = [block.attn.register_forward_pre_hook(record) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    maps = model.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 65, 65)
    for block, block_input, attention in zip(model.blocks, inputs, maps):
        expected, _ = reference_attention(block.attn, block_input)
        torch.testing.assert_close(attention, expected, atol=1e-6, rtol=1e-5)
        assert attention.min() >= 0
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 65))
    assert not torch.allclose(maps[0], maps[1], atol=1e-2)


def test_flops_per_image_counts_the_matmuls():
    model = ViT(TINY)
    n, d, h = 65, 64, 256
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * h
    expected = 2 * 64 * 48 * d + 2 * per_block + 2 * d * 10
    assert model.flops_per_image() == expected


def test_compact_options_conv_tokenizer_and_attention_pooling():
    config = ViTConfig(tokenizer="conv", patch_size=8, conv_channels=16, dim=64, depth=2, heads=4, pool="attention",
                       num_classes=10)
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
    with pytest.raises(VitlabError, match="power of 2"):
        ViTConfig(tokenizer="conv", patch_size=6, image_size=36)
    with pytest.raises(VitlabError, match="power of 2, at least 2"):  # one stage always halves the image
        ViTConfig(tokenizer="conv", patch_size=1, image_size=8)


def test_conv_depth_adds_size_keeping_convolutions_per_stage():
    torch.manual_seed(0)
    one = ViT(ViTConfig(tokenizer="conv", patch_size=8, conv_channels=8, dim=32, depth=1, heads=2, num_classes=10))
    two = ViT(ViTConfig(tokenizer="conv", patch_size=8, conv_channels=8, dim=32, depth=1, heads=2, num_classes=10,
                        conv_depth=2))
    convs = [m for m in two.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in two.patch_embed.modules()) == 3  # still 32 -> 4
    assert two.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 17, 32)
    # The added convolutions work at the pooled size: 8*8*3*3 weights per output pixel at 16 x 16, ...
    added = 2 * 9 * (8 * 8 * 16 * 16 + 16 * 16 * 8 * 8 + 32 * 32 * 4 * 4)
    assert two.flops_per_image() - one.flops_per_image() == added
    assert "conv tokenizer (2 convolutions per stage)" in two.describe()[0]
    assert "conv tokenizer, patch 8" in one.describe()[0]
    with pytest.raises(VitlabError, match="model.conv_depth must be 1 or more, not 0"):
        ViTConfig(tokenizer="conv", patch_size=8, conv_depth=0)


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


def timm_vit(**options) -> nn.Module:
    """A small timm VisionTransformer, options over the defaults of these tests."""
    return timm.models.vision_transformer.VisionTransformer(
        **{"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 64, "depth": 1, "num_heads": 4,
           **options})


def test_from_timm_names_what_it_cannot_map():
    refused = {
        "global_pool must be 'token'": {"global_pool": "avg"},
        "needs a class token": {"reg_tokens": 1},
        "position embedding must include the class token": {"no_embed_class": True},
        "pre-norm, fc-norm, qk-norm and layer scale are not supported": {"init_values": 1e-5},
        "unmapped parameters blocks.0.attn.qkv.bias, blocks.1.attn.qkv.bias": {"qkv_bias": False, "depth": 2},
    }
    for reason, options in refused.items():
        with pytest.raises(VitlabError, match=f"^cannot convert this timm model: {reason}$"):
            from_timm(timm_vit(**options))
    # A model from a timm that predates register tokens and no_embed_class converts as before.
    older = timm_vit()
    del older.num_reg_tokens, older.no_embed_class
    assert from_timm(older).config == ViTConfig(dim=64, depth=1, heads=4, num_classes=10)


def test_from_timm_reads_every_size_from_the_model():
    torch.manual_seed(0)
    reference = timm_vit(img_size=16, patch_size=8, in_chans=1, num_classes=5, embed_dim=32, num_heads=2,
                         mlp_ratio=2.0).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    model = from_timm(reference).eval()
    assert model.config == ViTConfig(image_size=16, patch_size=8, in_channels=1, num_classes=5, dim=32, depth=1,
                                     heads=2, mlp_ratio=2.0)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


def test_layer_norms_have_timms_epsilon():
    eps = {m.eps for m in ViT(TINY).modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {m.eps for m in timm_vit().modules() if isinstance(m, nn.LayerNorm)} == {1e-6}


def test_fresh_model_is_initialised_small_and_knows_no_classes_yet():
    torch.manual_seed(0)
    model = ViT(TINY)
    assert model.class_names is None and model.image_mean is None and model.image_std is None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name != "head":
            assert 0.017 < module.weight.std().item() < 0.023, name
            assert module.bias.eq(0).all(), name
    assert 0.017 < model.pos_embed.std().item() < 0.023
    assert 0.01 < model.cls_token.std().item() < 0.03  # 64 values
    assert model.head.weight.eq(0).all()


def test_parameter_count():
    d, h, n = 64, 256, 64  # width, MLP width, patches
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    expected = (48 * d + d) + d + (n + 1) * d + 2 * per_block + 2 * d + (d * 10 + 10)
    assert ViT(TINY).num_parameters() == expected


CONV = ViTConfig(tokenizer="conv", patch_size=8, conv_channels=16, dim=64, depth=1, heads=4, pool="attention",
                 num_classes=10)


def test_conv_tokenizer_doubles_its_width_per_stage_and_halves_the_image():
    model = ViT(CONV)
    assert model.patch_embed(torch.randn(3, 3, 32, 32)).shape == (3, 16, 64)  # a 4 x 4 grid of tokens
    convs = [m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 32), (32, 64)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)  # BatchNorm follows
    pools = [m for m in model.patch_embed.modules() if isinstance(m, nn.MaxPool2d)]
    assert [p.kernel_size for p in pools] == [2, 2, 2]


def test_attention_pooling_feeds_the_head():
    torch.manual_seed(0)
    model = ViT(CONV).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1)  # the fresh head is zero: every input would give the same logits
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model(x), model.head(model.pool(tokens)))
    assert not torch.allclose(model(x), model.head(tokens[:, 0]), atol=1e-3)


def test_dropout_rate_is_exact_to_one_in_65536():
    torch.manual_seed(0)
    x = torch.ones(2**23)
    zeros = (Dropout(1 / 65536).train()(x) == 0).sum().item()
    assert 90 < zeros < 170  # 128 expected
    y = Dropout(0.75).train()(x[:1000])
    assert set(y.unique().tolist()) == {0.0, 4.0}


def test_dropout_is_nn_dropout_when_compiled_and_its_own_on_the_cpu(monkeypatch):
    x = torch.ones(64, 64)

    def masks(module):
        torch.manual_seed(0)
        return module.train()(x)

    ours, torchs = masks(Dropout(0.3)), masks(nn.Dropout(0.3))
    assert not torch.equal(ours, torchs)  # the cheap mask on the CPU
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(masks(Dropout(0.3)), torchs)  # under torch.compile, which fuses nn.Dropout's own


def test_flops_are_counted_on_the_models_device():
    model = ViT(TINY)
    assert ViT(TINY).to("meta").flops_per_image() == model.flops_per_image()  # counted without allocating it


def test_drop_path_rates_grow_linearly_with_depth():
    model = ViT(ViTConfig(dim=64, depth=5, heads=4, drop_path=0.2, num_classes=10))
    assert all(isinstance(m, nn.Identity) for m in (model.blocks[0].drop_path1, model.blocks[0].drop_path2))
    rates = [[m.p for m in (block.drop_path1, block.drop_path2)] for block in model.blocks[1:]]
    assert rates == [[r, r] for r in torch.linspace(0, 0.2, 5).tolist()[1:]]  # 0.05, 0.1, 0.15, 0.2
    assert not any(isinstance(m, DropPath) for m in ViT(TINY).modules())  # the default drops nothing


def test_drop_path_is_refused_outside_0_to_1():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(VitlabError, match=rf"^model.drop_path must be at least 0 and below 1, not {bad}$"):
            ViTConfig(drop_path=bad)


def test_drop_path_zeroes_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = DropPath(0.3).train()
    x = torch.randn(1, 5, 8).expand(20000, 5, 8)  # one sample, many draws
    y = drop(x)
    dropped = y.eq(0).all(dim=(1, 2))
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.7)  # kept samples whole, scaled by 1/(1-p)
    torch.testing.assert_close(y.mean(0), x[0], atol=0.03, rtol=0)  # unbiased
    assert not torch.equal(drop(x), y)  # a new mask every call
    assert torch.equal(drop.eval()(x), x)
    assert drop.train()(x.bfloat16()).dtype == torch.bfloat16
    # One draw on the input's device, no host sync: it traces into a single graph.
    compiled = torch.compile(DropPath(0.3).train(), backend="eager", fullgraph=True)
    assert compiled(x).shape == x.shape


def test_drop_path_drops_a_blocks_residual_branches_per_sample():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=64, depth=2, heads=4, drop_path=0.5, num_classes=10)).train()
    block = model.blocks[1]  # the last block drops each branch with probability 0.5
    x = torch.randn(4000, 5, 64)
    with torch.no_grad():
        y = block(x)
        attn = block.attn(block.norm1(x))  # the attention branch, before drop path
    # Both branches dropped: the sample passes through unchanged, exactly (probability 0.25).
    unchanged = (y == x).all(dim=(1, 2)).float().mean().item()
    assert abs(unchanged - 0.25) < 0.03
    # Only the MLP branch dropped: exactly x + 2 * attention (probability 0.25).
    attn_only = (y == x + attn / 0.5).all(dim=(1, 2)).float().mean().item()
    assert abs(attn_only - 0.25) < 0.03


def test_drop_path_changes_nothing_in_eval_mode():
    torch.manual_seed(0)
    plain = ViT(TINY).eval()
    randomise_attention(plain)
    dropping = ViT(dataclasses.replace(TINY, drop_path=0.5)).eval()
    dropping.load_state_dict(plain.state_dict())  # no parameters of its own: the same state dict
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(dropping.forward_features(x), plain.forward_features(x))
    assert not torch.equal(dropping.train().forward_features(x), plain.train().forward_features(x))


def test_matches_timm_with_drop_path_rate_in_eval_mode():
    torch.manual_seed(0)
    reference = timm_vit(depth=3, drop_path_rate=0.2).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    model = from_timm(reference).eval()
    assert model.config.drop_path == pytest.approx(0.2)
    for ours, theirs in zip(model.blocks, reference.blocks):
        assert getattr(ours.drop_path1, "p", 0.0) == getattr(theirs.drop_path1, "drop_prob", 0.0)
        assert getattr(ours.drop_path2, "p", 0.0) == getattr(theirs.drop_path2, "drop_prob", 0.0)
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
