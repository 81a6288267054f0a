"""Starting from trained weights: vitlab checkpoints and exports, timm state dicts, timm names."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vitlab import ViT, ViTConfig
from vitlab import config as configs
from vitlab.errors import VitlabError
from vitlab.pretrained import load_init, read_init, resample_pos_embed
from vitlab.training.module import param_groups
from tests.conftest import write_image_folder
from tests.test_cli import TINY, run_cli


@pytest.mark.parametrize("old, new, prefix", [(8, 4, 1), (4, 8, 1), (4, 6, 0), (5, 5, 1)])
def test_position_embedding_resampling_equals_timm(old, new, prefix):
    torch.manual_seed(0)
    pos_embed = torch.randn(1, prefix + old * old, 16)
    ours = resample_pos_embed(pos_embed, new, prefix)
    theirs = resample_abs_pos_embed(pos_embed, [new, new], num_prefix_tokens=prefix)
    assert ours.shape == theirs.shape == (1, prefix + new * new, 16)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_class_token_row_is_dropped_for_attention_pooling():
    pos_embed = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resample_pos_embed(pos_embed, 4, 0), pos_embed[:, 1:])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_on_disk_gives_timm_features(tmp_path, suffix):
    torch.manual_seed(0)
    timm_model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               num_classes=7).eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    weights, source_config = read_init(str(path))
    assert source_config is None  # a bare state dict: the run's config must describe the model
    model = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, num_classes=3)).eval()
    load_init(model, weights, str(path))
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.forward_features(images), timm_model.forward_features(images), atol=1e-5)
    assert not model.head.weight.any() and model.head.weight.shape == (3, 32)  # a new head for 3 classes


def test_state_dict_of_another_architecture_is_named(tmp_path):
    timm_model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
    torch.save(timm_model.state_dict(), tmp_path / "w.pth")
    model = ViT(ViTConfig(patch_size=8, dim=32, depth=1, heads=2, num_classes=10))
    with pytest.raises(VitlabError, match=r"model.init: cls_token is \(1, 1, 48\) in .*w.pth but \(1, 1, 32\) in this model"):
        load_init(model, read_init(str(tmp_path / "w.pth"))[0], str(tmp_path / "w.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(VitlabError, match="junk.pth is not a state dict"):
        read_init(str(tmp_path / "junk.pth"))


def test_timm_names_without_the_network_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitlabError, match="timm has no model 'no_such_vit'"):
        read_init("timm:no_such_vit")
    with pytest.raises(VitlabError, match=r"cannot (download|load) .*timm:vit_tiny_patch16_224"):
        read_init("timm:vit_tiny_patch16_224")


def test_pretrained_groups_get_the_scaled_lr():
    model = ViT(ViTConfig(dim=32, depth=1, heads=2, patch_size=8, num_classes=10))
    groups = param_groups(model, 0.05, pretrained_lr_scale=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    new = {names[id(p)] for g in groups if g["lr_scale"] == 1.0 for p in g["params"]}
    assert new == {"head.weight", "head.bias"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_from_a_checkpoint_adopts_its_architecture_and_resamples(tmp_path, capsys):
    source_images = write_image_folder(tmp_path / "source", per_class=8)
    source = tmp_path / "source-run"
    assert run_cli(capsys, "train", "--data", f"folder:{source_images}", "--run-dir", source, "--max-epochs", "1",
                   *TINY)[0] == 0
    source_ckpt = source / "checkpoints" / "last.ckpt"
    target_images = tmp_path / "target"  # two classes, and a larger image: an 8x8 token grid, not 4x4
    write_image_folder(tmp_path / "target-all", per_class=8)
    (tmp_path / "target-all" / "red").rename(tmp_path / "target-red")
    (tmp_path / "target-all").rename(target_images)
    run_dir = tmp_path / "finetune"
    code, _, _ = run_cli(capsys, "train", "--preset", "finetune", "--data", f"folder:{target_images}",
                         "--run-dir", run_dir, "--max-epochs", "1", f"model.init={source_ckpt}",
                         "model.image_size=64", "model.dim=96", "optim.init_lr_scale=0", "data.batch_size=4",
                         "trainer.compile=false")
    assert code == 0
    config = configs.load(run_dir / "config.yaml")
    assert (config.model.dim, config.model.image_size, config.model.init) == (32, 64, str(source_ckpt))
    before = torch.load(source_ckpt, weights_only=True)["state_dict"]
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert after["model.pos_embed"].shape == (1, 1 + 64, 32)
    frozen = [k for k in before if k.startswith("model.") and "head" not in k and "pos_embed" not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # init_lr_scale=0 froze them
    assert after["model.head.weight"].shape == (2, 32) and after["model.head.weight"].any()
    # Resuming needs only the run's checkpoint, not the init weights.
    source_ckpt.unlink()
    assert run_cli(capsys, "train", "--run-dir", run_dir, "--resume", "--max-epochs", "2")[0] == 0
