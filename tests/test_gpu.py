"""The GPU paths: bf16-mixed training, torch.compile on CUDA, and a GPU-trained checkpoint used on
the CPU. Skipped where no CUDA device is present (as in CI)."""

import pytest
import torch

from vitlab import ViT, ViTConfig, load_model
from vitlab.cli import main
from vitlab.evaluation import predict_logits
from vitlab.model import Dropout
from vitlab.training.run import default_precision
from tests.conftest import write_image_folder
from tests.test_cli import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_trains_in_bf16_and_its_checkpoint_runs_on_the_cpu(tmp_path):
    assert default_precision() == "bf16-mixed"
    images = write_image_folder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", f"folder:{images}", "--max-epochs", "2", "--run-dir", str(run_dir),
                 "--val-fraction", "0.25", "trainer.compile=true", *TINY]) == 0
    model = load_model(run_dir / "checkpoints" / "last.ckpt")  # loads onto the CPU
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    images_u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.isfinite(predict_logits(model, images_u8)).all()


def test_compiled_step_on_cuda_under_bf16_autocast_matches_eager():
    torch.manual_seed(0)
    model = ViT(ViTConfig(dim=64, depth=2, heads=2, tokenizer="conv", conv_channels=16, patch_size=8,
                          pool="attention")).cuda().eval()
    compiled = torch.compile(model)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_out, compiled_out = model(x), compiled(x)
    torch.testing.assert_close(compiled_out.float(), eager_out.float(), atol=5e-2, rtol=5e-2)


def test_dropout_on_cuda_keeps_nn_dropout_statistics():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, device="cuda")
    y = Dropout(0.25).train()(x)
    assert y.device.type == "cuda"
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert y[y != 0].unique().tolist() == pytest.approx([1 / 0.75])
