"""Evaluation (flip TTA, reports), attention maps, learning curves and exports, end to end through the CLI."""

import json
import re

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from vitlab import ViT, ViTConfig, load_model
from vitlab.evaluation import predict_logits
from vitlab.inspection import attention_summary
from vitlab.model import translate
from tests.test_cli import run_cli, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    images, run_dir = train_tiny_run(tmp_path_factory.mktemp("inspect"), per_class=8)
    return images, run_dir, run_dir / "checkpoints" / "last.ckpt"


def assert_png(path, min_size=(300, 200)):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        # A picture, not a blank canvas.
        assert np.asarray(img.convert("L")).std() > 5


def test_attention_rollout_is_a_distribution_over_patches():
    model = ViT(ViTConfig(dim=32, depth=3, heads=2, patch_size=8)).eval()
    summary = attention_summary(model, torch.randn(2, 3, 32, 32))
    assert summary.rollout.shape == (2, 4, 4) and len(summary.per_layer) == 3
    assert summary.rollout.min() == 0 and summary.rollout.max() == pytest.approx(1)
    pooled = ViT(ViTConfig(dim=32, depth=2, heads=2, patch_size=8, pool="attention", tokenizer="conv")).eval()
    summary = attention_summary(pooled, torch.randn(1, 3, 32, 32))
    assert len(summary.per_layer) == 1 and summary.layer_label == "pooling weights"


def test_attention_command_draws_every_image(run, tmp_path, capsys):
    images, _, ckpt = run
    big = tmp_path / "big.jpg"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(big)  # any size: resized as in training
    out = tmp_path / "attention.png"
    code, _, _ = run_cli(capsys, "attention", "--checkpoint", ckpt, "--out", out, images / "red" / "0.png", big)
    assert code == 0
    assert_png(out, (500, 300))


def test_eval_report_writes_figures_and_numbers(run, tmp_path, capsys):
    images, _, ckpt = run
    report = tmp_path / "report"
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", f"folder:{images}", "--report", report, "--json")
    assert code == 0
    numbers = json.loads((report / "report.json").read_text())
    assert numbers["accuracy"] == pytest.approx(json.loads(out)["accuracy"])
    assert np.array(numbers["confusion"]).sum() == 24 and numbers["classes"] == ["blue", "green", "red"]
    for error in numbers["confident_errors"]:
        assert error["true"] != error["predicted"]
    for name in ["confusion_matrix.png", "per_class_accuracy.png", "confident_errors.png"]:
        assert_png(report / name)


def test_plot_learning_curves_of_a_run(run, tmp_path, capsys):
    _, run_dir, _ = run
    code, _, _ = run_cli(capsys, "plot", run_dir, "--out", tmp_path / "curves.png")
    assert code == 0
    assert_png(tmp_path / "curves.png", (800, 250))
    code, _, err = run_cli(capsys, "plot", tmp_path)
    assert code == 1 and "has no metrics.csv" in err


def test_onnx_export_matches_pytorch_and_predicts(run, tmp_path, capsys):
    images, _, ckpt = run
    out = tmp_path / "model.onnx"
    assert run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "onnx", "--out", out)[0] == 0
    model = load_model(ckpt)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        np.testing.assert_allclose(logits, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    code, out_onnx, _ = run_cli(capsys, "predict", "--onnx", out, "--json", images / "green")
    code2, out_torch, _ = run_cli(capsys, "predict", "--checkpoint", ckpt, "--json", images / "green")
    assert code == code2 == 0
    onnx_top = [json.loads(line)["top"] for line in out_onnx.splitlines()]
    torch_top = [json.loads(line)["top"] for line in out_torch.splitlines()]
    assert [[t["class"] for t in top] for top in onnx_top] == [[t["class"] for t in top] for top in torch_top]


def test_safetensors_export_round_trips(run, tmp_path, capsys):
    images, _, ckpt = run
    out = tmp_path / "model.safetensors"
    assert run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "safetensors", "--out", out)[0] == 0
    original, loaded = load_model(ckpt), load_model(out)
    assert loaded.class_names == original.class_names and loaded.config == original.config
    assert loaded.image_mean == original.image_mean
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), original(x))
    code, out_json, _ = run_cli(capsys, "eval", "--checkpoint", out, "--data", f"folder:{images}", "--json")
    assert code == 0 and json.loads(out_json)["n"] == 24


def test_bad_inputs_of_inspection_and_export(run, tmp_path, capsys):
    images, _, ckpt = run
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake_safetensors = tmp_path / "x.safetensors"
    fake_safetensors.write_text("hello")
    cases = [
        (["export", "--checkpoint", ckpt, "--format", "tflite", "--out", tmp_path / "m.tflite"], "unknown export format 'tflite'"),
        (["attention", "--checkpoint", ckpt, text], "cannot read image .*notes.txt"),
        (["predict", "--onnx", text, images / "red" / "0.png"], "notes.txt is not an ONNX model"),
        (["predict", "--onnx", tmp_path / "none.onnx", images / "red" / "0.png"], "none.onnx does not exist"),
        (["eval", "--checkpoint", fake_safetensors, "--data", "fake"], "not a safetensors file"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        errors = [line for line in err.splitlines() if line.startswith("vitlab ")]
        assert code == 1 and len(errors) == 1, (argv, err)
        assert re.search(message, errors[0]), (argv, err)
    assert not (tmp_path / "m.tflite").exists()


def test_tta_averages_logits_of_mirrored_and_translated_views():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=1, heads=2, num_classes=3)).eval()
    torch.nn.init.normal_(model.head.weight)  # the head starts at zero: give the logits something to show
    model.image_mean, model.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    plain, mirrored = predict_logits(model, images), predict_logits(model, images.flip(3))
    assert torch.allclose(predict_logits(model, images, batch_size=2, tta="flip"), (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(plain, mirrored)
    # flip-shift adds both, moved 2 pixels down-right and up-left, the border mirrored in (reflect padding).
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    down_right, up_left = padded[..., :8, :8], padded[..., 4:, 4:]
    assert torch.equal(down_right[..., 2:, 2:], images[..., :6, :6].float())
    assert torch.equal(down_right[..., 0, 2:], images[..., 2, :6].float())  # row -2 mirrors row 2
    views = [images.float(), images.float().flip(3)]
    views += [v for u in views for v in (translate(u, 2, 2), translate(u, -2, -2))]
    assert torch.equal(views[2], down_right) and torch.equal(views[3], up_left)
    expected = sum(predict_logits(model, v.to(torch.uint8)) for v in views) / 6
    assert torch.allclose(predict_logits(model, images, batch_size=2, tta="flip-shift"), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'crop'"):
        predict_logits(model, images, tta="crop")
