"""int8 ONNX export (`vitlab export --format onnx --quantize int8 --calibrate SOURCE`): int8 weights in
a graph that keeps its dynamic batch axis and vitlab's metadata, logits close to the fp32 export's,
calibrated on training images only; `predict --onnx` and `eval --onnx` run it; bad flags are one-line
errors; and benchmarks/inference.py's table adds up with an independent evaluation."""

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from vitlab import load_model
from vitlab.config import DataConfig
from vitlab.data.augment import normalize
from vitlab.data.sources import load_eval_set
from vitlab.export import calibration_images
from vitlab.inference import OnnxModel
from tests.conftest import write_image_folder
from tests.test_cli import run_cli, train_tiny_run

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained run (36 images, 9 held out) and its fp32 and int8 ONNX exports."""
    tmp = tmp_path_factory.mktemp("quantize")
    images, run_dir = train_tiny_run(tmp, per_class=12)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    fp32, int8 = tmp / "model.onnx", tmp / "model-int8.onnx"
    from vitlab.cli import main

    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(fp32)]) == 0
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--quantize", "int8",
                 "--calibrate", f"folder:{images}", "--out", str(int8)]) == 0
    return images, checkpoint, fp32, int8


def all_images(images_dir, model) -> torch.Tensor:
    data = DataConfig(source=f"folder:{images_dir}", val_fraction=0.25)
    held_out = load_eval_set(data, 32, model.class_names, held_out=True)
    every = load_eval_set(data, 32, model.class_names)
    return every.images, held_out


def test_int8_export_holds_int8_weights_and_keeps_the_batch_axis_and_metadata(exported):
    _, _, fp32, int8 = exported
    graph = onnx.load(str(int8))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert int8_weights, "no int8 weight matrices"
    # The patch projection (Conv), every linear layer's weight: in int8, per output channel.
    scales = {t.name: t for t in graph.graph.initializer}
    dequantized = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                   {t.name for t in int8_weights}]
    assert any(len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1 for n in dequantized)
    # The batch axis is still dynamic.
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    model = OnnxModel(int8)
    assert model.quantization["format"] == "int8"
    assert model.quantization["calibration_images"] == 27  # every training image (36 less the 9 held out)
    assert OnnxModel(fp32).quantization is None
    assert model.class_names == ["blue", "green", "red"] and model.config.dim == 32
    for batch in (1, 5):
        assert model(torch.zeros(batch, 3, 32, 32)).shape == (batch, 3)


def test_int8_logits_are_close_to_fp32(exported):
    images_dir, checkpoint, fp32, int8 = exported
    torch_model = load_model(checkpoint)
    images, _ = all_images(images_dir, torch_model)
    x = normalize(images, torch_model.image_mean, torch_model.image_std)
    full, quantized = OnnxModel(fp32)(x), OnnxModel(int8)(x)
    assert torch.allclose(full, torch_model(x).detach(), atol=1e-4)
    agreement = (full.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, agreement
    # int8 rounding, not a different model: the error is a small part of the logits' spread.
    assert (full - quantized).abs().max() < 0.1 * full.std() + 0.05, ((full - quantized).abs().max(), full.std())


def test_calibration_uses_training_images_only(exported):
    images_dir, checkpoint, _, _ = exported
    model = load_model(checkpoint)
    images, held_out = all_images(images_dir, model)
    # The run's recorded split (val_fraction 0.25) holds out 9 images, whatever DataConfig says.
    chosen = calibration_images(model, DataConfig(source=f"folder:{images_dir}"), count=1000)
    assert len(chosen) == 27
    held = {bytes(image.numpy()) for image in held_out.images}
    assert not held & {bytes(image.numpy()) for image in chosen}
    assert len(calibration_images(model, DataConfig(source=f"folder:{images_dir}"), count=5)) == 5


def test_predict_and_eval_run_the_int8_export(exported, capsys):
    images_dir, checkpoint, fp32, int8 = exported
    code, out, err = run_cli(capsys, "predict", "--onnx", int8, "--top-k", "2", "--json", images_dir / "red")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 12 and all(len(line["top"]) == 2 for line in lines)
    assert sum(line["top"][0]["class"] == "red" for line in lines) >= 9
    scores = {}
    for flag, path in [("--checkpoint", checkpoint), ("--onnx", fp32), ("--onnx", int8)]:
        code, out, err = run_cli(capsys, "eval", flag, path, "--data", f"folder:{images_dir}", "--held-out",
                                 "--val-fraction", "0.25", "--json")
        assert code == 0, err
        scores[path] = json.loads(out)
        assert scores[path]["n"] == 9
    assert scores[fp32]["accuracy"] == scores[checkpoint]["accuracy"]
    assert abs(scores[int8]["accuracy"] - scores[fp32]["accuracy"]) <= 2 / 9


def test_bad_quantize_flags_are_one_line_errors(exported, capsys, tmp_path):
    images_dir, checkpoint, _, _ = exported
    other = write_image_folder(tmp_path / "other")
    (other / "red").rename(other / "purple")
    out = tmp_path / "q.onnx"
    base = ["export", "--checkpoint", checkpoint, "--out", out]
    cases = [
        ([*base, "--format", "safetensors", "--quantize", "int8", "--calibrate", f"folder:{images_dir}"],
         "--quantize is for --format onnx, not safetensors"),
        ([*base, "--format", "onnx", "--quantize", "int4", "--calibrate", f"folder:{images_dir}"],
         "--quantize must be int8, not 'int4'"),
        ([*base, "--format", "onnx", "--quantize", "int8"], "--quantize int8 needs --calibrate SOURCE"),
        ([*base, "--format", "onnx", "--calibrate", f"folder:{images_dir}"], "--calibrate is for --quantize int8"),
        ([*base, "--format", "onnx", "--quantize", "int8", "--calibrate", f"folder:{images_dir}",
          "--calibrate-images", "0"], "--calibrate-images must be at least 1, not 0"),
        ([*base, "--format", "onnx", "--quantize", "int8", "--calibrate", f"folder:{other}"],
         "has classes the model does not know: purple"),
        ([*base, "--format", "onnx", "--quantize", "int8", "--calibrate", f"folder:{tmp_path / 'missing'}"],
         "missing"),
        ([*base, "--format", "onnx", "--quantize", "int8", "--calibrate", "nonsense"], "unknown data source 'nonsense'"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 1, (argv, err)
        # One error line, the last (a folder's "decoding N images" note may come before it).
        lines = err.strip().splitlines()
        assert [line for line in lines if line.startswith("vitlab ")] == lines[-1:], err
        assert lines[-1].startswith("vitlab export: error: "), err
        assert message in err, (message, err)
        assert not out.exists()


def test_inference_benchmark_table_matches_an_independent_evaluation(exported, capsys, tmp_path):
    images_dir, checkpoint, _, _ = exported
    result = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--checkpoint", str(checkpoint), "--data", f"folder:{images_dir}",
         "--repeats", "3", "--batches", "2", "--warmup", "1", "--rounds", "2", "--batch-size", "8", "--calibrate-images", "16",
         "--out-dir", str(tmp_path / "exports"), "--variants"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = dict(re.findall(r"^\| (torch eager|torch compiled|onnxruntime fp32|onnxruntime int8) \| (.*) \|$", out, re.M))
    assert list(rows) == ["torch eager", "torch compiled", "onnxruntime fp32", "onnxruntime int8"], out
    figures = {name: [float(v.strip().rstrip("%").replace(",", "")) for v in row.split("|")] for name, row in rows.items()}
    assert all(len(values) == 3 and values[1] > 0 and values[2] > 0 for values in figures.values())
    code, eval_out, err = run_cli(capsys, "eval", "--checkpoint", checkpoint, "--data", f"folder:{images_dir}",
                                  "--held-out", "--json")
    assert code == 0, err
    expected = json.loads(eval_out)["accuracy"]
    for name in ("torch eager", "torch compiled", "onnxruntime fp32"):
        assert figures[name][0] == pytest.approx(100 * expected, abs=0.005), (name, out)
    assert abs(figures["onnxruntime int8"][0] - 100 * expected) <= 100 * 2 / 9
    assert re.search(r"^held-out images: 9 of folder:", out, re.M), out
    assert re.search(r"^CPU: .*, \d+ threads for every runtime \(torch.get_num_threads\(\)", out, re.M), out
    assert re.search(r"^int8: calibrated on 16 training images", out, re.M), out
    # --variants: every recipe, calibrated on the same images; vitlab's own is the int8 row again.
    variants = re.findall(r"^\| ([^|]+) \| ([\d.]+)% \| ([\d.]+)% \| [\d.]+ \| [\d,]+ \| [\d.]+ \|$", out, re.M)
    assert len(variants) == 7, out
    [own] = [row for row in variants if "vitlab's choice" in row[0]]
    assert float(own[1]) == figures["onnxruntime int8"][0], out
    sizes = dict(re.findall(r"^\| (checkpoint \(.ckpt\)|safetensors|onnx fp32|onnx int8) \| ([\d.]+) \|$", out, re.M))
    assert len(sizes) == 4, out
    exports = tmp_path / "exports"
    for name, path in [("safetensors", exports / "model.safetensors"), ("onnx fp32", exports / "model.onnx"),
                       ("onnx int8", exports / "model-int8.onnx"), ("checkpoint (.ckpt)", checkpoint)]:
        assert float(sizes[name]) == pytest.approx(path.stat().st_size / 1e6, abs=0.006)
