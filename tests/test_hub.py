"""The Hugging Face Hub folder export (`vitlab export --format hf`): timm loads a plain ViT's folder
and gives vitlab's logits; the model card reports only what the run measured; every --checkpoint and
model.init take such a folder; hf-hub: without the network, and bad folders, are one-line errors."""

import json
import re
import shutil
from dataclasses import asdict, replace

import huggingface_hub
import pytest
import timm
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError

from vitlab import ViT, ViTConfig, load_model
from vitlab import config as configs
from vitlab.errors import VitlabError
from vitlab.export import TrainingRun, card_metadata, export
from vitlab.io import read_metric_rows
from vitlab.pretrained import read_init
from tests.test_cli import run_cli, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    images, run_dir = train_tiny_run(tmp_path_factory.mktemp("hub"), per_class=8)
    return images, run_dir, run_dir / "checkpoints" / "best.ckpt"


def export_folder(capsys, ckpt, out):
    assert run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "hf", "--out", out)[0] == 0
    return out


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("vitlab ")]
    assert len(errors) == 1, err
    return errors[0]


def test_timm_loads_the_folder_of_a_plain_vit_and_gives_vitlabs_logits(run, tmp_path, capsys):
    _, run_dir, ckpt = run
    out = export_folder(capsys, ckpt, tmp_path / "tiny-vit")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = load_model(ckpt)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] in timm.list_models()
    assert (config["num_classes"], config["num_features"], config["label_names"]) == (3, 32, model.class_names)
    assert config["model_args"]["global_pool"] == "token" and config["model_args"]["img_size"] == 32
    assert config["vitlab"]["config"] == {**asdict(model.config), "init": None}
    assert str(run_dir.parent) not in (out / "config.json").read_text() + (out / "README.md").read_text()

    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), timm_model(x)
    assert ours.std() > 0.01  # trained: the logits differ between images and classes
    assert (ours - theirs).abs().max() < 1e-4
    data = timm.data.resolve_model_data_config(timm_model)
    assert data["input_size"] == (3, 32, 32) and (data["interpolation"], data["crop_pct"]) == ("bicubic", 1.0)
    assert tuple(data["mean"]) == model.image_mean and tuple(data["std"]) == model.image_std


def test_the_model_card_reports_what_the_run_measured_and_how_it_trained(run, tmp_path, capsys):
    _, run_dir, ckpt = run
    card = (export_folder(capsys, ckpt, tmp_path / "tiny-vit") / "README.md").read_text()
    step = torch.load(ckpt, weights_only=True)["global_step"]
    row = next(r for r in read_metric_rows(run_dir) if int(r["step"]) == step)
    accuracy = float(row["val_acc"])
    meta = front_matter(card)
    assert (meta["library_name"], meta["license"], meta["pipeline_tag"]) == ("timm", "other", "image-classification")
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics == [{"type": "accuracy", "value": round(accuracy, 4), "name": "held-out accuracy"}]
    assert f"| plain | {accuracy:.2%} |" in card
    assert "| with test-time augmentation (flip or flip-shift) | not measured |" in card  # trainer.val_tta=none
    # The training command resolves to the run's config, less its local paths.
    command = re.search(r"```bash\n(vitlab train .*)\n```", card).group(1).split()
    assert command[:4] == ["vitlab", "train", "--data", "folder:images"]
    resolved = configs.resolve(overrides=dict(configs.parse_override(word) for word in command[4:]))
    saved = configs.flatten(configs.load(run_dir / "config.yaml").to_dict())
    local = ("data.source", "data.root", "data.cache_dir")
    assert {k: v for k, v in configs.flatten(resolved.to_dict()).items() if k not in local} == \
           {k: v for k, v in saved.items() if k not in local}

    # A run that validated with test-time views measured both, from the same forward pass ...
    with_flip = configs.load(run_dir / "config.yaml")
    with_flip = replace(with_flip, trainer=replace(with_flip.trainer, val_tta="flip"))
    meta = card_metadata(load_model(ckpt), "x", TrainingRun(with_flip, {**row, "val_acc_plain": "0.5"}))
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics == [{"type": "accuracy", "value": 0.5, "name": "held-out accuracy"},
                       {"type": "accuracy", "value": round(accuracy, 4), "name": "held-out accuracy, test-time flip"}]
    # ... one from before vitlab recorded the plain one (no such column), only the one with views.
    older = {k: v for k, v in row.items() if k != "val_acc_plain"}
    meta = card_metadata(load_model(ckpt), "x", TrainingRun(with_flip, older))
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics == [{"type": "accuracy", "value": round(accuracy, 4), "name": "held-out accuracy, test-time flip"}]

    # A checkpoint away from its run directory: nothing measured, nothing invented.
    shutil.copy(ckpt, tmp_path / "moved.ckpt")
    card = (export_folder(capsys, tmp_path / "moved.ckpt", tmp_path / "moved") / "README.md").read_text()
    assert "model-index" not in front_matter(card) and "| plain | not measured |" in card
    assert "vitlab train --data folder:images" not in card and "Not recorded" in card


def test_every_checkpoint_option_and_model_init_take_the_folder(run, tmp_path, capsys):
    images, _, ckpt = run
    out = export_folder(capsys, ckpt, tmp_path / "tiny-vit")
    original, loaded = load_model(ckpt), load_model(out)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)
    assert (loaded.config, loaded.class_names, loaded.image_mean) == (original.config, original.class_names,
                                                                      original.image_mean)
    scores = [json.loads(run_cli(capsys, "eval", "--checkpoint", c, "--data", f"folder:{images}", "--json")[1])
              for c in (ckpt, out)]
    assert scores[0] == scores[1]
    code, predicted, _ = run_cli(capsys, "predict", "--checkpoint", out, "--json", images / "red" / "0.png")
    assert code == 0 and json.loads(predicted)["top"][0]["class"] in original.class_names
    code, info, _ = run_cli(capsys, "info", "--checkpoint", out)
    assert code == 0 and "parameters" in info
    state, config = read_init(str(out))
    assert config == original.config and all(torch.equal(state[k], v) for k, v in original.state_dict().items())


def test_conv_tokenizer_and_attention_pooling_need_vitlab(tmp_path):
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=16, patch_size=4, dim=16, depth=1, heads=2, num_classes=2, tokenizer="conv",
                          conv_channels=8, pool="attention")).eval()
    torch.nn.init.normal_(model.head.weight)
    model.class_names, model.image_mean, model.image_std = ["cat", "dog"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    export(model, "hf", tmp_path / "conv")
    config = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert config["architecture"] == "vitlab" and "model_args" not in config
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    card = (tmp_path / "conv" / "README.md").read_text()
    assert front_matter(card)["library_name"] == "vitlab"
    assert "It needs vitlab to run: timm has no equivalent of its conv tokenizer and attention pooling" in card
    assert "| plain | not measured |" in card and "timm.create_model" not in card
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(load_model(tmp_path / "conv")(x), model(x), rtol=0, atol=0)


def test_a_timm_folder_starts_a_run(tmp_path):
    from timm.models import save_for_hf

    timm_model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                                   num_heads=2, num_classes=3)
    save_for_hf(timm_model, tmp_path / "timm-vit", safe_serialization=True)
    state, config = read_init(str(tmp_path / "timm-vit"))
    assert (config.dim, config.patch_size, config.image_size) == (32, 8, 32)
    assert all(torch.equal(state[k], v) for k, v in timm_model.state_dict().items())
    with pytest.raises(VitlabError, match="no vitlab section: it is not a vitlab export"):
        load_model(tmp_path / "timm-vit")


def test_hf_hub_goes_through_huggingface_hub(run, tmp_path, capsys, monkeypatch):
    _, _, ckpt = run
    out = export_folder(capsys, ckpt, tmp_path / "tiny-vit")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    state, config = read_init("hf-hub:someone/tiny-vit")
    assert asked == [("someone/tiny-vit", ["config.json", "model.safetensors"])]
    assert config == load_model(ckpt).config and torch.equal(state["head.weight"], load_model(ckpt).head.weight)


def test_hf_hub_without_the_network_is_one_line_naming_the_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: set what it read, too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # an empty cache
    with pytest.raises(VitlabError) as offline:
        read_init("hf-hub:someone/tiny-vit")

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(VitlabError) as no_network:
        read_init("hf-hub:someone/tiny-vit")
    for error in (offline, no_network):
        message = str(error.value)
        assert "\n" not in message and "hf-hub:someone/tiny-vit" in message and "no network" in message
    code, _, err = run_cli(capsys, "train", "--data", "fake:8", "--max-epochs", "1",
                           "model.init=hf-hub:someone/tiny-vit")
    assert code == 1 and "no network" in one_error_line(err)


def test_bad_folders_are_one_line_errors_and_a_full_folder_is_kept(run, tmp_path, capsys):
    _, _, ckpt = run
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "hf", "--out", full)
    assert code == 1 and "exists and is not an empty folder" in one_error_line(err)
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "mine"

    out = export_folder(capsys, ckpt, tmp_path / "tiny-vit")
    for missing in (["model.safetensors"], ["config.json"], ["config.json", "model.safetensors"]):
        broken = tmp_path / f"without-{len(missing)}-{missing[0]}"
        shutil.copytree(out, broken)
        for name in missing:
            (broken / name).unlink()
        code, _, err = run_cli(capsys, "eval", "--checkpoint", broken, "--data", "fake:8")
        line = one_error_line(err)
        assert code == 1 and all(f"no {name}" in line for name in missing), line
