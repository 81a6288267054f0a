"""Evaluation (flip TTA, reports), attention maps, learning curves and exports, end to end through the CLI."""

import json
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from vitlab import ViT, ViTConfig, inference, load_model
from vitlab.errors import VitlabError
from vitlab.evaluation import predict_logits
from vitlab.inspection import attention_summary
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


def expected_rollout(maps: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema) written out: per layer the mean over heads, plus the
    identity (the residual path), rows renormalised; the layers multiplied, the last on the left;
    then the row `weights` (B, T) of the classified token. maps: layers of (B, heads, T, T)."""
    B, _, T, _ = maps[0].shape
    rollout = np.broadcast_to(np.eye(T), (B, T, T))
    for attention in maps:
        mixed = attention.mean(1) + np.eye(T)
        rollout = (mixed / mixed.sum(-1, keepdims=True)) @ rollout
    return np.einsum("bt,bts->bs", weights, rollout)


def unit_grid(maps: np.ndarray, grid: int) -> np.ndarray:
    """(B, grid*grid) -> (B, grid, grid), each map scaled to span [0, 1]."""
    low, high = maps.min(1, keepdims=True), maps.max(1, keepdims=True)
    return ((maps - low) / (high - low)).reshape(-1, grid, grid)


def test_attention_rollout_matches_the_rollout_written_out(monkeypatch):
    torch.manual_seed(0)
    # 2 layers of 2 heads over a class token and 3 x 3 patches, attention set by hand (not the model's).
    model = ViT(ViTConfig(image_size=24, patch_size=8, dim=32, depth=2, heads=2, num_classes=10)).eval()
    maps = [torch.randn(2, 2, 10, 10).mul(2).softmax(-1) for _ in range(2)]
    monkeypatch.setattr(model, "attention_maps", lambda images: maps)
    summary = attention_summary(model, torch.randn(2, 3, 24, 24))
    assert summary.rollout.shape == (2, 3, 3) and len(summary.per_layer) == 2
    class_token = np.eye(10)[[0, 0]]  # (B, T): the class token's row
    expected = expected_rollout([m.numpy() for m in maps], class_token)[:, 1:]  # its own column dropped
    np.testing.assert_allclose(summary.rollout.numpy(), unit_grid(expected, 3), atol=1e-5)
    for layer, attention in zip(summary.per_layer, maps):
        np.testing.assert_allclose(layer.numpy(), unit_grid(attention.numpy().mean(1)[:, 0, 1:], 3), atol=1e-5)

    # Attention pooling: the rollout's rows weighted by the pooling weights, over all 4 tokens.
    pooled = ViT(ViTConfig(image_size=16, dim=32, depth=2, heads=2, patch_size=8, pool="attention", num_classes=10,
                           tokenizer="conv")).eval()
    maps = [torch.randn(3, 2, 4, 4).mul(2).softmax(-1) for _ in range(2)]
    monkeypatch.setattr(pooled, "attention_maps", lambda images: maps)
    images = torch.randn(3, 3, 16, 16)
    summary = attention_summary(pooled, images)
    with torch.no_grad():
        tokens = pooled.forward_features(images).numpy()  # (B, 4, D)
    scores = tokens @ pooled.pool.score.weight.detach().numpy()[0] + pooled.pool.score.bias.item()
    weights = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert summary.layer_label == "pooling weights" and len(summary.per_layer) == 1
    np.testing.assert_allclose(summary.per_layer[0].numpy(), unit_grid(weights, 2), atol=1e-5)
    expected = expected_rollout([m.numpy() for m in maps], weights)
    np.testing.assert_allclose(summary.rollout.numpy(), unit_grid(expected, 2), atol=1e-5)


def test_attention_command_draws_every_image(run, tmp_path, capsys):
    images, _, ckpt = run
    big = tmp_path / "big.jpg"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(big)  # any size: resized as in training
    out = tmp_path / "attention.png"
    code, _, _ = run_cli(capsys, "attention", "--checkpoint", ckpt, "--out", out, images / "red" / "0.png", big)
    assert code == 0
    assert_png(out, (500, 300))


def test_eval_report_writes_figures_and_numbers(run, tmp_path, capsys, monkeypatch):
    images, _, ckpt = run
    # A model whose logits are known: 4 for the image's dominant colour, 0 for the others, except
    # that red images are called green. With 8 images a class, the confusion is known by construction.
    load = inference.load_model

    def load_known_model(path):
        model = load(path)
        mean, std = torch.tensor(model.image_mean).view(1, 3, 1, 1), torch.tensor(model.image_std).view(1, 3, 1, 1)
        colour_class = torch.tensor([model.class_names.index(name) for name in ("green", "green", "blue")])  # R, G, B

        def known_logits(x):
            dominant = (x * std + mean).mean((2, 3)).argmax(1)  # 0 red, 1 green, 2 blue
            return 4.0 * torch.nn.functional.one_hot(colour_class[dominant], 3).float()

        monkeypatch.setattr(model, "forward", known_logits)
        return model

    monkeypatch.setattr(inference, "load_model", load_known_model)
    report = tmp_path / "report"
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", f"folder:{images}", "--report", report, "--json")
    assert code == 0
    numbers = json.loads((report / "report.json").read_text())
    assert numbers["classes"] == ["blue", "green", "red"] and numbers["n"] == 24
    assert numbers["confusion"] == [[8, 0, 0], [0, 8, 0], [0, 8, 0]]  # rows: true, columns: predicted
    assert numbers["per_class"] == {"blue": 1.0, "green": 1.0, "red": 0.0}
    assert numbers["accuracy"] == pytest.approx(16 / 24)
    log_total = np.log(np.exp(4) + 2)  # log-sum-exp of the logits (4, 0, 0)
    assert numbers["loss"] == pytest.approx((16 * (log_total - 4) + 8 * log_total) / 24, rel=1e-5)
    printed = json.loads(out)
    assert printed["accuracy"] == pytest.approx(16 / 24) and printed["per_class"] == numbers["per_class"]
    # The confident errors: all 8 red images, called green with probability e^4 / (e^4 + 2).
    errors = numbers["confident_errors"]
    assert len(errors) == 8 and {e["path"] for e in errors} == {str(p) for p in (images / "red").glob("*.png")}
    assert all(e["true"] == "red" and e["predicted"] == "green" for e in errors)
    assert all(e["probability"] == pytest.approx(np.exp(4) / (np.exp(4) + 2), abs=1e-4) for e in errors)
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


@pytest.mark.parametrize("size, shift", [(8, 1), (32, 2), (64, 4)])
def test_tta_averages_logits_of_mirrored_and_translated_views(size, shift):
    torch.manual_seed(0)
    # The conv tokenizer has BatchNorm: in eval mode it is per image, so all views can share a batch.
    model = ViT(ViTConfig(image_size=size, patch_size=4, dim=16, depth=1, heads=2, num_classes=3, tokenizer="conv",
                          conv_channels=8)).eval()
    torch.nn.init.normal_(model.head.weight)  # the head starts at zero: give the logits something to show
    model.image_mean, model.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    batch_sizes = []
    model.register_forward_hook(lambda module, args, output: batch_sizes.append(len(args[0])))
    images = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
    plain, mirrored = predict_logits(model, images), predict_logits(model, images.flip(3))
    assert torch.allclose(predict_logits(model, images, batch_size=2, tta="flip"), (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(plain, mirrored)
    # flip-shift adds both, moved down-right and up-left by a sixteenth of the side (at least a pixel),
    # the border mirrored in (reflect padding).
    s = shift
    views = []
    for view in (images, images.flip(3)):
        padded = torch.nn.functional.pad(view.float(), (s, s, s, s), mode="reflect")
        views += [view.float(), padded[..., :size, :size], padded[..., 2 * s:, 2 * s:]]  # as is, down-right, up-left
    assert torch.equal(views[1][..., s:, s:], images[..., :-s, :-s].float())
    assert torch.equal(views[1][..., 0, s:], images[..., s, :-s].float())  # row -s mirrors row s
    expected = sum(predict_logits(model, v.to(torch.uint8)) for v in views) / 6  # one pass per view
    batch_sizes.clear()
    torch.testing.assert_close(predict_logits(model, images, tta="flip-shift"), expected, atol=1e-5, rtol=1e-5)
    assert batch_sizes == [30]  # all 6 views of the 5 images in one forward pass
    batch_sizes.clear()
    torch.testing.assert_close(predict_logits(model, images, batch_size=12, tta="flip-shift"), expected,
                               atol=1e-5, rtol=1e-5)
    assert batch_sizes == [12, 12, 6]  # batch_size counts views: 2 images a pass
    with pytest.raises(VitlabError, match="unknown test-time augmentation 'crop'"):
        predict_logits(model, images, tta="crop")


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_an_export_does_not_carry_the_local_path_its_weights_started_from(run, tmp_path, fmt):
    from vitlab.export import export
    from vitlab.io import read_safetensors

    _, _, ckpt = run
    model = load_model(ckpt)
    model.config.init = "/home/someone/private-projects/start.ckpt"  # as a run fine-tuned with model.init has
    out = tmp_path / f"model.{fmt}"
    export(model, fmt, out)
    meta = read_safetensors(out)[1] if fmt == "safetensors" else {p.key: p.value for p in onnx.load(out).metadata_props}
    assert "private-projects" not in json.dumps(meta) and json.loads(meta["vitlab.config"])["init"] is None
    assert json.loads(meta["vitlab.config"])["dim"] == model.config.dim
