"""End to end through the CLI: train on tiny generated images -> checkpoint -> eval -> predict -> resume,
and every bad input gives a one-line error and a non-zero exit."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vitlab import ViT, load_model
from vitlab.cli import main
from vitlab.config import DataConfig
from vitlab.data.sources import load_eval_set
from tests.conftest import TINY, write_image_folder



def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_tiny_run(tmp, per_class: int):
    """Train the tiny model for 2 epochs on generated colour images; returns (image folder, run dir)."""
    images = write_image_folder(tmp / "images", per_class=per_class)
    run_dir = tmp / "run"
    assert main(["train", "--data", f"folder:{images}", "--max-epochs", "2", "--run-dir", str(run_dir),
                 "--val-fraction", "0.25", f"data.cache_dir={tmp / 'cache'}", *TINY]) == 0
    return images, run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny training run shared by the tests that only read it."""
    return train_tiny_run(tmp_path_factory.mktemp("run"), per_class=12)


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_directory(trained_run):
    _, run_dir = trained_run
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(r["train_loss"] and r["val_acc"] and r["lr"] for r in rows)


def test_checkpoint_holds_config_and_class_names(trained_run):
    images, run_dir = trained_run
    model = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(model, ViT) and not model.training
    assert model.class_names == ["blue", "green", "red"]
    assert model.config.dim == 32 and model.config.num_classes == 3
    # The normalisation is the training images' own per-channel mean and std, computed here from the
    # files (all images but the ones held out for validation).
    held_out = set(load_eval_set(DataConfig(source=f"folder:{images}", val_fraction=0.25,
                                            cache_dir=str(run_dir.parent / "cache")), 32, model.class_names,
                                 held_out=True).paths)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255
                       for p in sorted(images.rglob("*.png")) if str(p) not in held_out])
    assert len(pixels) == 27
    assert model.image_mean == pytest.approx(tuple(pixels.mean((0, 1, 2))), abs=1e-5)
    assert model.image_std == pytest.approx(tuple(pixels.reshape(-1, 3).std(0, ddof=1)), abs=1e-5)


def test_eval_json_agrees_with_training_validation(trained_run, capsys, tmp_path):
    images, run_dir = trained_run
    last = run_dir / "checkpoints" / "last.ckpt"
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{images}", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"accuracy", "loss", "per_class", "n"}
    assert result["n"] == 36 and set(result["per_class"]) == {"blue", "green", "red"}
    # --held-out scores exactly the images training validated on, so it reproduces the last val_acc.
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{images}", "--json",
                           "--held-out", "--val-fraction", "0.25")
    held_out = json.loads(out)
    assert code == 0 and held_out["n"] == 9
    assert held_out["accuracy"] == pytest.approx(float(read_metrics(run_dir)[-1]["val_acc"]), abs=1e-6)
    # Human-readable form too.
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{images}", "--tta", "flip")
    assert code == 0 and "accuracy" in out and "green" in out


def test_held_out_follows_the_split_the_checkpoint_records(trained_run, capsys, tmp_path):
    """The run held out 0.25 of its folder: --held-out needs no flag to score exactly those images, and
    another source or another fraction is an error, never a score on training images."""
    images, run_dir = trained_run
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_model(last).data_split == {"source": f"folder:{images}", "val_fraction": 0.25, "split_seed": 0,
                                           "skip_bad_images": False}
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{images}/../images", "--json",
                           "--held-out")
    assert code == 0 and json.loads(out)["n"] == 9
    assert json.loads(out)["accuracy"] == pytest.approx(float(read_metrics(run_dir)[-1]["val_acc"]), abs=1e-6)
    other = write_image_folder(tmp_path / "other", per_class=12)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{other}", "--held-out")
    assert code == 1 and f"was trained on folder:{images}, not folder:{other}" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{images}", "--held-out",
                           "--val-fraction", "0.1")
    assert code == 1 and "held out a fraction 0.25 of its data, not --val-fraction 0.1" in err


def test_the_tiny_run_learned_the_colours(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=24)
    run_dir = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--data", f"folder:{images}", "--max-epochs", "6", "--run-dir", run_dir,
                         *TINY, "optim.lr=3e-3", "optim.min_lr=3e-4")
    assert code == 0
    assert float(read_metrics(run_dir)[-1]["val_acc"]) > 0.9


def test_predict_top_k_json_and_text(trained_run, capsys):
    images, run_dir = trained_run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", ckpt, "--top-k", "2", "--json",
                           images / "red" / "0.png", images / "blue")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 1 + 12
    assert lines[0]["path"].endswith("red/0.png")
    top = lines[0]["top"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    assert {t["class"] for t in top} <= {"red", "green", "blue"}
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", ckpt, images / "red" / "0.png")
    assert code == 0 and out.startswith(str(images / "red" / "0.png"))


def test_resume_continues_from_last_checkpoint(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=8)
    run_dir = tmp_path / "run"
    args = ["train", "--data", f"folder:{images}", "--run-dir", run_dir, *TINY]
    assert run_cli(capsys, *args, "--max-epochs", "1")[0] == 0
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    code, _, _ = run_cli(capsys, "train", "--resume", "--run-dir", run_dir, "--max-epochs", "2")
    assert code == 0
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2 * first["global_step"]
    assert [r["epoch"] for r in read_metrics(run_dir)] == ["0", "1"]
    # A finished run is not overwritten by a new one in the same directory.
    code, _, err = run_cli(capsys, *args, "--max-epochs", "1")
    assert code == 1 and "already holds a run" in err


def test_info_reports_parameters_and_flops(trained_run, capsys):
    code, out, _ = run_cli(capsys, "info", "--preset", "tutorial-cpu")
    assert code == 0 and "parameters: 12,674,570" in out and "GFLOP" in out
    code, out, _ = run_cli(capsys, "info", "--checkpoint", trained_run[1] / "checkpoints" / "last.ckpt")
    assert code == 0 and "3 classes" in out


def bad_inputs(tmp_path, images, ckpt):
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    other_pickle = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, other_pickle)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = write_image_folder(tmp_path / "noimg", per_class=2)
    (no_images / "purple").mkdir()
    corrupt = write_image_folder(tmp_path / "corrupt", per_class=4, fmt="jpg")
    (corrupt / "red" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    unknown_class = write_image_folder(tmp_path / "unknown", per_class=2)
    (unknown_class / "red").rename(unknown_class / "purple")
    text = tmp_path / "readme.txt"
    text.write_text("not an image")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {dim: [\n")
    misfit = tmp_path / "misfit.ckpt"  # weights of a dim-32 model under a dim-64 config
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["model"]["dim"] = 64
    torch.save(checkpoint, misfit)
    bad_archive_root = tmp_path / "cifar-root"
    bad_archive_root.mkdir()
    (bad_archive_root / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    foreign_safetensors = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign_safetensors))
    foreign_onnx = tmp_path / "foreign.onnx"
    tensor = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [tensor],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign_onnx))
    return [
        (["train", "--data", "fake", "optim.lr=fast"], "config key optim.lr must be float, not 'fast'"),
        (["train", "--data", "fake", "model.depth=2.5"], "config key model.depth must be int, not 2.5"),
        (["train", "--data", "fake", "trainer.max_epochs=null"], "training needs a limit: set --max-epochs or --max-time"),
        (["train", "--data", "cifar10", "--data-root", bad_archive_root, "--max-epochs", "1"], "cifar-10-python.tar.gz is corrupt .*checksum"),
        (["eval", "--checkpoint", misfit, "--data", "fake"], "misfit.ckpt: weights do not fit its model config"),
        (["eval", "--checkpoint", foreign_safetensors, "--data", "fake"], "foreign.safetensors is not a vitlab export"),
        (["predict", "--onnx", foreign_onnx, text], "foreign.onnx is not a vitlab export"),
        (["train", "--data", f"folder:{tmp_path / 'missing'}", "--max-epochs", "1"], "data folder .*missing does not exist"),
        (["train", "--data", f"folder:{empty}", "--max-epochs", "1"], "has no class folders"),
        (["train", "--data", f"folder:{no_images}", "--max-epochs", "1"], "class folder .*purple has no images"),
        (["train", "--data", f"folder:{corrupt}", "--max-epochs", "1"], "cannot read image .*bad.jpg"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "model.width=3"], "unknown config key 'model.width'"),
        (["train", "--config", bad_yaml], "not valid YAML"),
        (["train", "--config", tmp_path / "none.yaml"], "none.yaml does not exist"),
        (["train", "--data", "imagenet"], "unknown data source 'imagenet'"),
        (["train", "--data", "fake", "--max-epochs", "1", "model.in_channels=1"],
         "fake gives colour images: a model of model.in_channels 1 trains on folders"),
        (["train", "--data", "fake", "data.crop_padding=-1"], "data.crop_padding must be 0 or more, not -1"),
        (["train", "--data", "fake", "data.crop_scale=0"], "data.crop_scale must be above 0 and at most 1"),
        (["train", "--data", "fake", "trainer.val_tta=crop"],
         "trainer.val_tta must be one of none, flip, flip-shift, not 'crop'"),
        (["eval", "--checkpoint", tmp_path / "missing.ckpt", "--data", "fake"], "checkpoint .*missing.ckpt does not exist"),
        (["eval", "--checkpoint", not_ckpt, "--data", "fake"], "notes.ckpt is not a vitlab checkpoint"),
        (["eval", "--checkpoint", other_pickle, "--data", "fake"], "weights.ckpt is not a vitlab checkpoint"),
        (["eval", "--checkpoint", ckpt, "--data", f"folder:{unknown_class}"], "classes the model does not know: purple"),
        (["eval", "--checkpoint", ckpt, "--data", "fake", "--held-out", "--val-fraction", "1.5"],
         "data.val_fraction must be between 0 and 1, not 1.5"),
        (["eval", "--checkpoint", ckpt, "--data", "fake", "--tta", "crop"],
         "--tta must be one of none, flip, flip-shift, not 'crop'"),
        (["predict", "--checkpoint", ckpt, text], "cannot read image .*readme.txt"),
        (["predict", "--checkpoint", ckpt, tmp_path / "nothing.png"], "image .*nothing.png does not exist"),
        (["predict", "--checkpoint", ckpt, "--top-k", "0", text], "--top-k must be at least 1"),
    ]


def test_bad_inputs_give_one_line_errors(trained_run, tmp_path, capsys):
    images, run_dir = trained_run
    for argv, message in bad_inputs(tmp_path, images, run_dir / "checkpoints" / "last.ckpt"):
        code, _, err = run_cli(capsys, *argv)
        assert code == 1, argv
        errors = [line for line in err.splitlines() if line.startswith("vitlab ")]
        assert len(errors) == 1 and "Traceback" not in err, (argv, err)
        assert re.search(message, errors[0]), (argv, err)


def test_skip_bad_images_trains_on_the_rest(tmp_path, capsys):
    corrupt = write_image_folder(tmp_path / "corrupt", per_class=4, fmt="jpg")
    (corrupt / "red" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{corrupt}", "--skip-bad-images", "--max-epochs", "1",
                           "--run-dir", tmp_path / "run", *TINY)
    assert code == 0 and "skipped 1 unreadable images" in err


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vitlab.cli", "eval", "--checkpoint", str(tmp_path / "x.ckpt"),
                             "--data", "fake"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "x.ckpt does not exist" in result.stderr


def test_fake_source_trains_end_to_end(tmp_path, capsys):
    code, _, _ = run_cli(capsys, "train", "--preset", "smoke", "--data", "fake", "--max-epochs", "1",
                         "--run-dir", tmp_path / "run", "model.dim=32")
    assert code == 0
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run" / "checkpoints" / "last.ckpt",
                           "--data", "fake", "--json")
    # eval on fake scores exactly the held-out part that training validated on.
    assert json.loads(out)["accuracy"] == pytest.approx(float(read_metrics(tmp_path / "run")[-1]["val_acc"]), abs=1e-6)


@pytest.mark.parametrize("views", ["flip", "flip-shift"])
def test_tta_validation_is_what_eval_tta_scores(tmp_path, capsys, views):
    run_dir = tmp_path / "run"
    code, trained, _ = run_cli(capsys, "train", "--preset", "smoke", "--data", "fake", "--max-epochs", "1",
                               "--run-dir", run_dir, "model.dim=32", f"trainer.val_tta={views}")
    assert code == 0 and f"with {views} TTA" in trained
    last_val = read_metrics(run_dir)[-1]
    scores = {}
    for tta in ["none", views]:
        code, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir / "checkpoints" / "last.ckpt",
                               "--data", "fake", "--json", "--tta", tta)
        assert code == 0
        scores[tta] = json.loads(out)
    assert scores[views]["accuracy"] == pytest.approx(float(last_val["val_acc"]), abs=1e-6)
    assert scores[views]["loss"] == pytest.approx(float(last_val["val_loss"]), abs=1e-4)
    assert scores["none"]["loss"] != pytest.approx(scores[views]["loss"], abs=1e-7)  # the other views did count
    # The same validation scored the image alone too, as eval without views does.
    assert scores["none"]["accuracy"] == pytest.approx(float(last_val["val_acc_plain"]), abs=1e-6)
    assert f"without {100 * float(last_val['val_acc_plain']):.2f}%" in trained


def test_ema_run_validates_and_saves_the_averaged_weights(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=8)
    run_dir = tmp_path / "run"
    args = ["train", "--data", f"folder:{images}", "--run-dir", run_dir, "--val-fraction", "0.25",
            *TINY, "trainer.ema_decay=0.9"]
    assert run_cli(capsys, *args, "--max-epochs", "2")[0] == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == current.keys()
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged)
    # The checkpoint's model is the average, and it is what validation scored: its held-out loss is the
    # run's last val_loss, which the raw (current) weights do not reach. (The loss, not the accuracy:
    # on 6 held-out images the two weights may well score the same accuracy.)
    raw = tmp_path / "raw.ckpt"
    torch.save({**ckpt, "state_dict": current}, raw)
    scores = {}
    for name, path in (("averaged", last), ("raw", raw)):
        code, out, _ = run_cli(capsys, "eval", "--checkpoint", path, "--data", f"folder:{images}",
                               "--held-out", "--val-fraction", "0.25", "--json")
        assert code == 0
        scores[name] = json.loads(out)
    val = read_metrics(run_dir)[-1]
    val_loss = float(val["val_loss"])
    assert scores["averaged"]["loss"] == pytest.approx(val_loss, abs=1e-4)
    assert scores["averaged"]["accuracy"] == pytest.approx(float(val["val_acc"]), abs=1e-6)
    assert scores["raw"]["loss"] != pytest.approx(val_loss, abs=1e-3)


def test_bad_ema_decay_is_a_one_line_error(image_folder, capsys):
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{image_folder}", *TINY, "trainer.ema_decay=1.5")
    assert code == 1 and "trainer.ema_decay" in err and len(err.strip().splitlines()) == 1


def test_last_checkpoint_and_last_row_are_the_final_weights(tmp_path, capsys):
    """Validating every 2nd of 3 epochs: epoch 0 has no val columns, and the final epoch (which
    Lightning would not validate) is validated after training, on the weights last.ckpt holds."""
    images = write_image_folder(tmp_path / "images", per_class=8)
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", f"folder:{images}", "--run-dir", run_dir, "--max-epochs", "3",
                           "--val-fraction", "0.25", *TINY, "trainer.val_every_n_epochs=2")
    assert code == 0
    rows = read_metrics(run_dir)
    assert f"held-out accuracy {100 * float(rows[2]['val_acc']):.2f}%" in out
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["val_acc"] == "" and rows[1]["val_acc"] and rows[2]["val_acc"]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == int(rows[2]["step"])
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", last, "--data", f"folder:{images}",
                           "--held-out", "--val-fraction", "0.25", "--json")
    assert code == 0
    assert json.loads(out)["accuracy"] == pytest.approx(float(rows[2]["val_acc"]), abs=1e-6)


def test_bad_val_every_n_epochs_is_a_one_line_error(image_folder, capsys):
    code, _, err = run_cli(capsys, "train", "--data", f"folder:{image_folder}", *TINY, "trainer.val_every_n_epochs=0")
    assert code == 1 and "trainer.val_every_n_epochs" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size, tokenizer", [(64, "patch"), (96, "conv"), (128, "patch")])
def test_larger_images_train_with_the_token_grid_following(tmp_path, capsys, size, tokenizer):
    images = write_image_folder(tmp_path / "images", per_class=6, size=160)  # resized to model.image_size
    run_dir = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--data", f"folder:{images}", "--run-dir", run_dir, "--max-epochs", "1",
                         *TINY, "data.batch_size=4", f"model.image_size={size}", "model.patch_size=16",
                         f"model.tokenizer={tokenizer}", "model.conv_channels=8")
    assert code == 0
    model = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert model.pos_embed.shape[1] == 1 + (size // 16) ** 2
