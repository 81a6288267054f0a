"""Planned runs: the rules (pure functions), the data summary, the probe, and `--preset auto` end to end."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vitlab import config as configs, load_model
from vitlab.config import DataConfig, preset_values
from vitlab.data.sources import DataSummary, open_source
from vitlab.errors import VitlabError
from vitlab.export import model_card
from vitlab.model import ViT, ViTConfig
from vitlab.planning import rules
from vitlab.planning.plan import COMPILE_GAIN, make_plan
from vitlab.planning.probe import train_speed
from tests.conftest import write_image_folder
from tests.test_cli import run_cli

CIFAR = DataSummary(50_000, 10, 5_000, side=32, aspect=1.0, grayscale=False)
FLOWERS = DataSummary(3_430, 5, 579, side=128, aspect=1.0, grayscale=False)


def fixed_speeds(table):
    looked_at = []

    def speed(shape, side):
        looked_at.append((shape, side))
        return table[shape, side]

    return speed, looked_at


def test_every_shape_at_every_side_ends_at_16_tokens_and_a_larger_side_costs_little_more():
    flops = {}
    for shape, *_ in rules.SHAPES:
        for side in rules.RESOLUTIONS:
            config = ViTConfig(**rules.model_settings(shape, side), num_classes=10)
            assert config.num_patches == 16
            flops[shape, side] = ViT(config).flops_per_image()
        # One more conv stage per doubling, the first narrower: 16 times the pixels, under 2x the FLOPs.
        assert flops[shape, 32] < flops[shape, 64] < flops[shape, 128] < 2 * flops[shape, 32]
    assert flops["large", 32] > flops["medium", 32] > flops["small", 32]
    # "large" at 32 px is cpu-hour's model.
    large = rules.model_settings("large", 32)
    assert large == {**large, **preset_values("cpu-hour")["model"]}


def test_resolutions_never_exceed_the_images_own_side():
    assert rules.resolutions(FLOWERS) == [128, 64, 32]
    assert rules.resolutions(DataSummary(100, 2, 50, side=100, aspect=1.5, grayscale=False)) == [64, 32]
    assert rules.resolutions(DataSummary(100, 2, 50, side=28, aspect=1.0, grayscale=False)) == [32]


def test_resolutions_leave_out_sides_whose_decoded_images_overfill_the_memory():
    at_128 = 3_430 * 3 * 128 * 128  # bytes: the flowers decoded at 128 px (169 MB)
    assert rules.resolutions(FLOWERS, free_memory=2 * at_128) == [128, 64, 32]
    assert rules.resolutions(FLOWERS, free_memory=2 * at_128 - 1) == [64, 32]
    assert rules.resolutions(FLOWERS, free_memory=1000) == [32]  # nothing fits: the smallest, which says so
    grey = DataSummary(3_430, 5, 579, side=128, aspect=1.0, grayscale=True)  # a third of the bytes
    assert rules.resolutions(grey, free_memory=2 * at_128 // 3) == [128, 64, 32]


def test_the_largest_side_then_the_largest_shape_that_gets_its_epochs():
    n_train = 45_000
    assert rules.TARGET_EPOCHS == 15
    # 60 minutes: the large model does 380 images/s -> 27 epochs >= 15: chosen, nothing smaller looked at.
    speed, looked_at = fixed_speeds({("large", 32): 380.0, ("medium", 32): 700.0, ("small", 32): 1100.0})
    choice, why = rules.choose_model([32], speed, n_train, 128, 3600, None)
    assert (choice.shape, choice.side, round(choice.epochs)) == ("large", 32, 27) and looked_at == [("large", 32)]
    # 30 minutes: large 13.7 epochs, medium 25: the medium model.
    choice, why = rules.choose_model([32], speed, n_train, 128, 1800, None)
    assert (choice.shape, round(choice.epochs)) == ("medium", 25) and "the first to reach 15 epochs" in why[-1]
    # 10 minutes: large 4.6 epochs, medium 8.4, small 13.2: none reaches 15, so the one that trains most.
    choice, why = rules.choose_model([32], speed, n_train, 128, 600, None)
    assert choice.shape == "small" and "none reaches 15 epochs" in why[-1] and len(why) == 4
    # A small set wants its 1,000 steps: flowers' 2,744 training images, 47 epochs. The large model at
    # 128 px gets 16 in 10 minutes, at 64 px 53: the larger side gives way.
    assert rules.target_epochs(45_000, 128) == 15 and round(rules.target_epochs(2_744, 128)) == 47
    speed, looked_at = fixed_speeds({("large", 128): 83.0, ("medium", 128): 130.0, ("small", 128): 230.0,
                                     ("large", 64): 270.0})
    choice, why = rules.choose_model([128, 64, 32], speed, 2_744, 128, 600, None)
    assert (choice.shape, choice.side) == ("large", 64) and "the first to reach 47 epochs" in why[-1]
    # An epoch budget: the large model at the largest side.
    choice, _ = rules.choose_model([64, 32], speed_64 := (lambda shape, side: 100.0), n_train, 128,
                                    None, 30)
    assert (choice.shape, choice.side, choice.epochs) == ("large", 64, None)
    del speed_64


def test_small_data_sets_get_randaugment_and_smaller_batches():
    assert rules.augmentation(4_500) == {"augment": "crop-flip", "crop_padding": None}
    assert rules.augmentation(549)["randaugment_ops"] == 2
    assert rules.batch_size(45_000) == 128 and rules.batch_size(1_000) == 64
    assert rules.validation_interval(27) == 14 and rules.validation_interval(2) == 1
    # Once halfway, never twice before the end: 10.5 expected epochs validate at 6 (and the end).
    assert rules.validation_interval(10.5) == 6 and rules.validation_interval(23) == 12


def test_notes_recommend_fine_tuning_for_few_images_and_say_how_non_square_images_are_cut():
    few = DataSummary(60, 3, 12, side=300, aspect=1.33, grayscale=False)
    notes = rules.notes(few)
    assert any("--preset finetune" in n and "model.init=" in n for n in notes)
    assert any("centre-cropped" in n for n in notes)
    assert rules.notes(CIFAR) == []


def test_a_folder_summary_reads_counts_sizes_and_channels_from_headers(tmp_path):
    root = tmp_path / "photos"
    for name, count, size in (("cats", 5, (120, 90)), ("dogs", 3, (90, 120))):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (i * 20, 10, 10)).save(root / name / f"{i}.jpg")
    summary = open_source(DataConfig(source=f"folder:{root}"), 32).summary()
    assert summary == DataSummary(8, 2, 3, side=90, aspect=pytest.approx(4 / 3, abs=0.01), grayscale=False)
    grey = tmp_path / "grey"
    (grey / "a").mkdir(parents=True)
    Image.new("L", (40, 40), 128).save(grey / "a" / "0.png")
    assert open_source(DataConfig(source=f"folder:{grey}"), 32).summary().grayscale


def test_a_folder_with_a_sibling_val_folder_trains_on_every_image(tmp_path):
    # The held-out fraction is not taken from it, so the plan counts every image as training.
    for part in ("train", "val"):
        (tmp_path / part / "a").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / part / "a" / f"{i}.png")
    summary = open_source(DataConfig(source=f"folder:{tmp_path / 'train'}"), 32).summary()
    assert summary.validation_apart and rules.train_images(summary, 0.1) == 4
    alone = open_source(DataConfig(source=f"folder:{tmp_path / 'val'}"), 32).summary()
    assert not alone.validation_apart and rules.train_images(alone, 0.25) == 3


def test_a_folder_summary_looks_at_every_class_and_checks_what_it_is_given(tmp_path):
    # 300 grey images then 10 colour ones: the headers looked at are spread over the whole listing.
    root = tmp_path / "mixed"
    for name, count, mode in (("a", 300, "L"), ("b", 10, "RGB")):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new(mode, (8, 8)).save(root / name / f"{i}.png")
    assert not open_source(DataConfig(source=f"folder:{root}"), 32).summary().grayscale
    with pytest.raises(VitlabError, match="model.in_channels 2: images are read as RGB"):
        open_source(DataConfig(source=f"folder:{root}"), 32, channels=2)
    if not torch.cuda.is_available():
        with pytest.raises(VitlabError, match="--accelerator gpu: this machine has no CUDA GPU"):
            make_plan(DataConfig(source=f"folder:{root}"), "00:01:00", None, "gpu")


def test_the_probe_measures_a_real_augmented_training_step():
    augmented = []

    def augment(images):
        augmented.append((images.dtype, tuple(images.shape)))
        return images.flip(-1)

    # 8 times the FLOPs per image (0.23 vs 0.03 GFLOP): measured slower by far more than timing noise.
    fast = train_speed(ViTConfig(**rules.model_settings("small", 32), num_classes=3), 16, torch.device("cpu"),
                       bf16=False, seconds=0.2, augment=augment)
    slow = train_speed(ViTConfig(**rules.model_settings("large", 128), num_classes=3), 16, torch.device("cpu"),
                       bf16=False, seconds=0.2)
    assert fast > 2 * slow > 0
    assert len(augmented) >= 5 and set(augmented) == {(torch.uint8, (16, 3, 32, 32))}  # every step, 2 untimed


def test_a_plan_sets_every_choice_and_fits_the_budget(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=20, size=64)
    speeds = {}

    def speed(config, batch_size):
        speeds[config.image_size, config.dim] = batch_size
        return 2000.0  # images/s, whatever the model

    data = DataConfig(source=f"folder:{root}", val_fraction=0.25)
    plan = make_plan(data, "00:01:00", None, "cpu", speed=speed)
    # 45 training images in batches of 64 want 1,000 steps: 1,422 epochs. 2,000 images/s (a minute: not
    # worth compiling) for 54 s buy 2,400: the large model at the largest side (64 px), the first
    # candidate, nothing else measured.
    assert plan.summary.images == 60 and plan.summary.side == 64
    assert speeds == {(64, 256): 64}
    assert plan.choice.side == 64 and plan.choice.epochs == pytest.approx(54 * 2000 / 45)
    # Ten seconds buy 400 epochs of anything: every candidate measured, the first of those that train most.
    speeds.clear()
    short = make_plan(data, "00:00:10", None, "cpu", speed=speed)
    assert set(speeds) == {(64, 256), (64, 192), (64, 128), (32, 256), (32, 192), (32, 128)}
    assert (short.choice.shape, short.choice.side) == ("large", 64) and "none reaches 1422 epochs" in short.why[-1]
    assert plan.settings["trainer"]["compile"] is False
    assert plan.settings["model"]["image_size"] == 64 and plan.settings["data"]["batch_size"] == 64
    assert plan.settings["data"]["randaugment_ops"] == 2  # 15 images per class
    assert plan.settings["trainer"] == {**plan.settings["trainer"], "max_time": "00:01:00", "max_epochs": None}
    lines = "\n".join(plan.lines())
    assert "60 images, 3 classes" in lines and "64 px" in lines and "2,000 training images/s" in lines
    assert any("model.init=" in n for n in plan.notes)


def test_a_long_budget_compiles_and_counts_the_compiled_speed(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=20, size=32)
    plan = make_plan(DataConfig(source=f"folder:{root}"), "00:10:00", None, "cpu", speed=lambda c, b: 100.0)
    assert plan.settings["trainer"]["compile"] is True
    assert plan.choice.images_per_s == pytest.approx(100 * COMPILE_GAIN) and "compiled" in plan.lines()[3]
    # An epoch budget compiles when its epochs (at the large model's probed speed) last long enough.
    assert make_plan(DataConfig(source=f"folder:{root}"), None, 2, "cpu",
                     speed=lambda c, b: 100.0).settings["trainer"]["compile"] is False
    assert make_plan(DataConfig(source=f"folder:{root}"), None, 2000, "cpu",
                     speed=lambda c, b: 100.0).settings["trainer"]["compile"] is True


def test_a_plan_needs_a_budget_said_before_the_data_is_read(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", per_class=4)
    with pytest.raises(Exception, match="a planned run needs a budget"):
        make_plan(DataConfig(source=f"folder:{root}"), None, None, speed=lambda c, b: 1.0)
    monkeypatch.setattr("vitlab.data.sources.download_cifar", lambda *a: pytest.fail("CIFAR downloaded"))
    with pytest.raises(Exception, match="a planned run needs a budget"):
        make_plan(DataConfig(source="cifar10", root=str(tmp_path / "data")), None, None, speed=lambda c, b: 1.0)


def test_a_plan_says_which_sides_the_free_memory_leaves_out(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", per_class=4, size=64)  # 12 images: 147,456 bytes at 64 px
    monkeypatch.setattr("vitlab.planning.plan.available_memory", lambda: 200_000)
    plan = make_plan(DataConfig(source=f"folder:{root}"), None, 2, "cpu", speed=lambda c, b: 100.0)
    assert plan.choice.side == 32 and plan.why[0] == ("64 px left out: its decoded images would take more than "
                                                      "50% of the free memory")


def test_train_without_a_recipe_is_planned_printed_recorded_and_resumed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the decode cache (~/.cache/vitlab): no key=value in a plain command
    monkeypatch.setattr("vitlab.planning.plan.PROBE_SECONDS", 0.01)
    root = write_image_folder(tmp_path / "images", per_class=12, size=64)
    run_dir = tmp_path / "run"
    args = ["train", "--data", f"folder:{root}", "--val-fraction", "0.25", "--accelerator", "cpu",
            "--run-dir", run_dir, "--max-epochs", "1"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "plan:" in err and "resolution: 64 px" in err and "training images/s measured on cpu" in err
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    plan = yaml.safe_load((run_dir / "plan.yaml").read_text())
    assert saved["model"] == {**saved["model"], **plan["settings"]["model"]} and saved["model"]["image_size"] == 64
    assert saved["trainer"]["max_epochs"] == 1 and saved["trainer"]["val_tta"] == "flip-shift"
    # Resumed with one more epoch: the saved plan is followed, not made again.
    code, _, err = run_cli(capsys, *args[:-1], "2", "--resume")
    assert code == 0 and "plan:" not in err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == saved["model"]
    # info shows the plan of the run's checkpoint; a damaged plan is said in a line, the model still described.
    code, out, _ = run_cli(capsys, "info", "--checkpoint", run_dir / "checkpoints" / "last.ckpt")
    assert code == 0 and "resolution: 64 px" in out
    (run_dir / "plan.yaml").write_text("plan: [unclosed")
    code, out, err = run_cli(capsys, "info", "--checkpoint", run_dir / "checkpoints" / "last.ckpt")
    assert code == 0 and "the run's plan is unreadable" in err and "is not valid YAML" in err and "parameters" in out


def test_key_value_goes_on_top_of_the_plan_and_devices_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vitlab.planning.plan.PROBE_SECONDS", 0.01)
    root = write_image_folder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--preset", "auto", "--data", f"folder:{root}", "--max-epochs", "1",
                           "--run-dir", run_dir, "--val-fraction", "0.25", "--accelerator", "cpu", "model.depth=1", f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 0, err
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["depth"] == 1 and saved["model"]["tokenizer"] == "conv"
    code, _, err = run_cli(capsys, "train", "--preset", "auto", "--data", f"folder:{root}", "--max-epochs", "1",
                           "--run-dir", tmp_path / "run2", "--devices", "2")
    assert code == 1 and "a planned run trains in one process" in err
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{root}", "--run-dir", tmp_path / "run3")
    assert code == 1 and "a planned run needs a budget" in err
    # The seed, where the data is or what trains are no choice of recipe: still planned. Any other
    # key=value without a preset starts from vitlab's defaults, and says so.
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{root}", "--run-dir", tmp_path / "run4", "trainer.seed=1")
    assert code == 1 and "a planned run needs a budget" in err
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{root}", "--run-dir", tmp_path / "run5", "model.depth=1",
                           "trainer.max_epochs=null")
    assert code == 1 and "vitlab's defaults with the key=value settings on top" in err
    assert "training needs a limit" in err
    # info prints a plan without training, and its every setting as key=value to train it elsewhere.
    code, out, _ = run_cli(capsys, "info", "--preset", "auto", "--data", f"folder:{root}", "--max-epochs", "1",
                           "--accelerator", "cpu")
    assert code == 0 and "plan:" in out and "measured on cpu (fp32)" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("as key=value:"))
    settings = configs.resolve(overrides=dict(configs.parse_override(t) for t in line.split(":", 1)[1].split()))
    assert settings.model.tokenizer == "conv" and settings.trainer.val_tta == "flip-shift"
    assert settings.trainer.max_epochs == 1 and settings.trainer.max_time is None


def test_a_grey_folder_plans_and_trains_a_one_channel_model_that_reads_any_image(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vitlab.planning.plan.PROBE_SECONDS", 0.01)
    root = tmp_path / "grey"
    rng = np.random.default_rng(0)
    for name, level in (("dark", 60), ("light", 190)):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(level + rng.normal(0, 20, (40, 40)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--preset", "auto", "--data", f"folder:{root}", "--max-epochs", "2",
                           "--run-dir", run_dir, "--val-fraction", "0.2", "--accelerator", "cpu", f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 0, err
    assert "grayscale" in err
    model = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert model.config.in_channels == 1 and model.config.image_size == 32 and len(model.image_mean) == 1
    # A colour image is read in grey for it; eval scores the held-out grey images.
    colour = tmp_path / "colour.png"
    Image.new("RGB", (50, 40), (200, 180, 190)).save(colour)
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--json", colour)
    assert code == 0 and json.loads(out)["top"][0]["class"] in ("dark", "light")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--data",
                             f"folder:{root}", "--held-out", "--json", "--tta", "flip-shift")
    assert code == 0 and json.loads(out)["n"] == 4
    code, _, err = run_cli(capsys, "export", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--format",
                           "onnx", "--out", tmp_path / "grey.onnx")
    assert code == 0, err
    code, out, err = run_cli(capsys, "predict", "--onnx", tmp_path / "grey.onnx", "--json", colour)
    assert code == 0 and json.loads(out)["top"][0]["class"] in ("dark", "light")
    # A Hub folder of it, which vitlab loads back; a plain one-channel ViT's card reads images in grey for timm.
    code, _, err = run_cli(capsys, "export", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--format",
                           "hf", "--out", tmp_path / "grey-hf")
    assert code == 0, err
    assert load_model(tmp_path / "grey-hf").config.in_channels == 1
    plain = ViT(ViTConfig(image_size=32, patch_size=8, in_channels=1, num_classes=2, dim=32, depth=1, heads=2))
    plain.class_names, plain.image_mean, plain.image_std = ["dark", "light"], (0.5,), (0.25,)
    assert '.convert("L")' in model_card(plain, "grey") and '.convert("RGB")' not in model_card(plain, "grey")


def test_a_folder_of_mixed_sizes_and_aspect_ratios_plans_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vitlab.planning.plan.PROBE_SECONDS", 0.01)
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    sizes = [(96, 64), (64, 96), (80, 80), (150, 70), (70, 100)]  # (width, height): landscape, portrait, square
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(10):
            w, h = sizes[i % len(sizes)]
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{root}", "--val-fraction", "0.2", "--accelerator",
                           "cpu", "--max-epochs", "1", "--run-dir", run_dir)
    assert code == 0, err
    # Shorter sides 64-80 (typically 70): 64 px is the largest side tried; not square, so said how they are cut.
    assert "resolution: 64 px" in err and "centre-cropped" in err and "typically 70 px" in err
    model = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert model.config.image_size == 64
    code, out, err = run_cli(capsys, "predict", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--json",
                             root / "red" / "3.png")
    assert code == 0 and json.loads(out)["top"][0]["class"] in ("red", "blue")


def test_a_time_budget_plans_the_epochs_it_buys_and_trains_for_that_time(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vitlab.planning.plan.PROBE_SECONDS", 0.01)
    root = write_image_folder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{root}", "--val-fraction", "0.25", "--accelerator",
                           "cpu", "--max-time", "00:00:05", "--run-dir", run_dir, f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 0, err
    # 27 training images want 1,000 steps: no candidate gets them in 5 s, so the one that trains most.
    assert "epochs in 00:00:05" in err and "none reaches" in err
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_time"] == "00:00:05" and saved["trainer"]["max_epochs"] is None
    assert saved["trainer"]["compile"] is False  # 5 s would not repay compiling
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
