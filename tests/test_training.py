import pytest
import torch

from vitlab import ViT, ViTConfig
from vitlab import config as configs
from vitlab.errors import VitlabError
from vitlab.training.module import param_groups, warmup_cosine


def test_decay_rule_spares_biases_norms_and_embeddings():
    model = ViT(ViTConfig(dim=32, depth=2, heads=2))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {
        "patch_embed.proj.weight", "head.weight",
        *[f"blocks.{i}.{m}.weight" for i in range(2) for m in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]],
    }
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight"} <= spared
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_warmup_then_cosine_to_minimum():
    assert warmup_cosine(0.0, 0.1, 0.01) == 0.0
    assert warmup_cosine(0.05, 0.1, 0.01) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(0.55, 0.1, 0.01) == pytest.approx(0.505)
    assert warmup_cosine(1.0, 0.1, 0.01) == pytest.approx(0.01)
    assert warmup_cosine(0.0, 0.0, 0.25) == pytest.approx(1.0)


def test_presets_resolve_to_the_tutorial_settings():
    gpu = configs.resolve("tutorial-gpu")
    assert (gpu.model.dim, gpu.model.depth, gpu.model.heads, gpu.model.patch_size) == (512, 6, 8, 4)
    assert (gpu.optim.lr, gpu.optim.min_lr, gpu.optim.weight_decay) == (1e-4, 2.5e-5, 1e-6)
    assert (gpu.data.batch_size, gpu.data.autoaugment, gpu.trainer.precision) == (512, True, "bf16-mixed")
    assert (gpu.trainer.max_epochs, gpu.trainer.early_stopping_patience) == (200, 10)
    cpu = configs.resolve("tutorial-cpu")
    assert (cpu.model.depth, cpu.data.batch_size, cpu.model.emb_dropout, cpu.data.autoaugment) == (4, 256, 0.16, False)
    for name in configs.preset_names():
        configs.resolve(name)


def test_resolution_order_and_type_checks(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("model: {dim: 96, heads: 3}\noptim: {lr: 0.01}\n")
    config = configs.resolve("smoke", file, {"trainer": {"max_epochs": 7}},
                             {"optim.lr": 3e-4, "trainer.max_time": "00:01:00"})
    assert config.model.dim == 96 and config.model.depth == 2  # file over preset
    assert config.optim.lr == 3e-4  # override over file
    assert config.trainer.max_epochs == 7 and config.trainer.max_time == "00:01:00"
    with pytest.raises(VitlabError, match="unknown config key 'model.width'"):
        configs.resolve(overrides={"model.width": 3})
    with pytest.raises(VitlabError, match="unknown config section 'modle'"):
        configs.resolve(overrides={"modle.dim": 3})
    with pytest.raises(VitlabError, match="model.depth must be int"):
        configs.resolve(overrides={"model.depth": "deep"})
    with pytest.raises(VitlabError, match="section.key=value"):
        configs.parse_override("lr=3")
    assert configs.parse_override("model.depth=8") == ("model.depth", 8)
    with pytest.raises(VitlabError, match="invalid config in key=value overrides.*heads"):
        configs.resolve(overrides={"model.heads": 5})


def test_saved_config_round_trips(tmp_path):
    config = configs.resolve("tutorial-cpu", overrides={"data.source": "fake"})
    configs.save(config, tmp_path / "config.yaml")
    assert configs.load(tmp_path / "config.yaml") == config


def test_max_time_must_be_a_duration():
    assert configs.parse_duration("01:30:05").total_seconds() == 5405
    assert configs.parse_duration("1:00:00:00").days == 1
    with pytest.raises(VitlabError, match="HH:MM:SS"):
        configs.resolve(flags={"trainer": {"max_time": "90min"}})


def test_decay_rule_spares_batchnorm_of_the_conv_tokenizer():
    model = ViT(ViTConfig(tokenizer="conv", patch_size=4, dim=32, depth=1, heads=2, pool="attention"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "patch_embed.layers.0.weight" in decayed and "pool.score.weight" in decayed
    assert "patch_embed.layers.2.weight" not in decayed  # BatchNorm scale
