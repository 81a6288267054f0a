"""How a run is put together (vitlab/training/run.py): precision, early stopping, the number of
classes, and the checks between config sections."""

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

import vitlab
from vitlab import config as configs
from vitlab.errors import VitlabError
from vitlab.training.callbacks import StopRequests
from vitlab.training.run import build_callbacks, default_precision

TINY = {"model.dim": 32, "model.depth": 1, "model.heads": 2, "model.patch_size": 8, "data.batch_size": 8}


def test_precision_follows_the_accelerator_not_whether_a_gpu_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_precision("cpu") == "32-true"  # a CPU run on a GPU machine: fp32, not bf16
    assert default_precision("gpu") == default_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("auto") == default_precision("cpu") == "32-true"


@pytest.mark.parametrize("patience, every, validations", [(10, 8, 2), (10, 1, 10), (8, 8, 1), (3, 2, 2)])
def test_early_stopping_patience_counts_epochs(tmp_path, patience, every, validations):
    """Lightning's patience counts validations: the run's key counts epochs, so with a validation
    every `every` epochs, the fewest validations that span `patience` epochs."""
    config = configs.resolve(overrides={"trainer.early_stopping_patience": patience,
                                        "trainer.val_every_n_epochs": every})
    stopper, = [c for c in build_callbacks(config, tmp_path, False, StopRequests()) if isinstance(c, EarlyStopping)]
    assert stopper.patience == validations


def test_a_number_of_classes_that_is_not_the_datas_is_an_error(tmp_path):
    with pytest.raises(VitlabError, match="model.num_classes is 5 but fake:64 has 10 classes"):
        vitlab.train(data="fake:64", max_epochs=1, run_dir=tmp_path / "a", overrides={**TINY, "model.num_classes": 5})
    assert not (tmp_path / "a" / "config.yaml").exists()
    run = vitlab.train(data="fake:64", max_epochs=1, run_dir=tmp_path / "b", overrides={**TINY, "model.num_classes": 10})
    assert vitlab.load_model(run.last_checkpoint).config.num_classes == 10
    run = vitlab.train(data="fake:64", max_epochs=1, run_dir=tmp_path / "c", overrides=TINY)  # unset: the data's
    assert run.config.model.num_classes is None
    assert vitlab.load_model(run.last_checkpoint).config.num_classes == 10


@pytest.mark.parametrize("padding, size", [(32, 32), (40, 32), (16, 16)])
def test_crop_padding_at_or_above_the_image_size_is_an_error(padding, size):
    with pytest.raises(VitlabError, match=f"data.crop_padding {padding} must be smaller than the image "
                                          f"\\(model.image_size {size}\\)"):
        configs.resolve(overrides={"data.crop_padding": padding, "model.image_size": size, "model.patch_size": 4})
    configs.resolve(overrides={"data.crop_padding": padding, "model.image_size": size, "data.augment": "none",
                               "model.patch_size": 4})  # no crop: the padding is unused


def test_crop_padding_is_an_eighth_of_the_side_unless_set():
    assert [configs.crop_padding(configs.DataConfig(), size) for size in (32, 64, 128)] == [4, 8, 16]
    assert configs.crop_padding(configs.DataConfig(crop_padding=3), 128) == 3


def test_info_of_a_preset_imports_no_lightning():
    code = ("import sys; from vitlab.cli import main; main(['info', '--preset', 'cpu-hour']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'litdata')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "preset cpu-hour: ViT dim 256, depth 1" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_a_run_prints_vitlabs_lines_and_nothing_of_lightnings(tmp_path):
    """No advertising tip, no "Total FLOPs: 0", no warnings from inside Lightning, no CUDA_HOME notice, no
    "weights_only was not set" at each checkpoint: the model's own summary, the progress, the result."""
    command = [sys.executable, "-m", "vitlab.cli", "train", "--preset", "smoke", "--data", "fake:256", "--max-epochs",
               "2", "--run-dir", str(tmp_path / "run"), "trainer.checkpoint_every=00:00:00", "model.dim=32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "model:\n  ViT dim 32, depth 2" in done.stderr and "forward FLOPs per image: 0.004 GFLOP" in done.stderr
    for noise in ("Tip", "litlogger", "FLOPs: 0", "LeafSpec", "deprecated", "Warning", "CUDA_HOME", "weights_only",
                  "GPU available", "TPU available", "Trainer.fit` stopped"):
        assert noise not in output
    assert done.stdout.strip().splitlines()[-1].startswith("run written to")


def test_a_model_of_other_than_one_or_three_channels_is_refused_in_one_line():
    with pytest.raises(VitlabError, match="model.in_channels must be 3 \\(colour\\) or 1 \\(grey.*not 4"):
        configs.resolve(overrides={"model.in_channels": 4})
    assert configs.resolve(overrides={"model.in_channels": 1}).model.in_channels == 1
