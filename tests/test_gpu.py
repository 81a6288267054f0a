"""The GPU paths: bf16-mixed training, torch.compile on CUDA, and a GPU-trained checkpoint used on
the CPU. Skipped where no CUDA device is present (as in CI)."""

import pytest
import torch
import torch.nn.functional as F

from vitlab import ViT, ViTConfig, load_model
from vitlab.cli import main
from vitlab.evaluation import predict_logits
from vitlab.model import Dropout
from vitlab.training.run import default_precision
from tests.conftest import TINY, write_image_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_trains_in_bf16_and_its_checkpoint_runs_on_the_cpu(tmp_path, monkeypatch):
    assert default_precision("auto") == "bf16-mixed"
    # The logits of every training step as they reach the loss: bf16 on the GPU says autocast ran the model.
    seen = []
    cross_entropy = F.cross_entropy

    def recording_cross_entropy(logits, labels, **options):
        if torch.is_grad_enabled():  # a training step, not validation
            seen.append((logits.dtype, logits.device.type, torch.is_autocast_enabled("cuda")))
        return cross_entropy(logits, labels, **options)

    monkeypatch.setattr(F, "cross_entropy", recording_cross_entropy)
    images = write_image_folder(tmp_path / "images", per_class=12)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", f"folder:{images}", "--max-epochs", "2", "--run-dir", str(run_dir),
                 "--val-fraction", "0.25", "trainer.compile=true", *TINY]) == 0
    assert seen and set(seen) == {(torch.bfloat16, "cuda", True)}
    model = load_model(run_dir / "checkpoints" / "last.ckpt")  # loads onto the CPU
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    images_u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.isfinite(predict_logits(model, images_u8)).all()


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 matmuls and convolutions at full precision, so that in fp32 only compilation can differ."""
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    yield
    torch.set_float32_matmul_precision(matmul_precision)


# fp32: errors of ~3e-6 measured (compiled on a CPU). bf16: compiled kernels keep fp32 between fused
# ops where eager rounds each op's output to bf16, so the conv stem's gradients differ by ~5%.
@pytest.mark.parametrize("bf16, tolerance", [(False, 1e-4), (True, 0.2)])
def test_compiled_training_step_on_cuda_matches_eager(bf16, tolerance, no_tf32):
    torch.manual_seed(0)
    # Dropout is off (the default), so both runs compute the same function; BatchNorm uses batch statistics.
    model = ViT(ViTConfig(num_classes=10, dim=64, depth=2, heads=2, tokenizer="conv", conv_channels=16, patch_size=8,
                          pool="attention")).cuda().train()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the head starts at zero: let gradients reach every layer
    x = torch.randn(16, 3, 32, 32, device="cuda")
    y = torch.randint(10, (16,), device="cuda")

    def train_step(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}

    eager_loss, eager_grads = train_step(model)
    compiled_loss, compiled_grads = train_step(torch.compile(model))
    assert model.training and eager_grads["patch_embed.layers.0.weight"].norm() > 0
    assert abs(compiled_loss - eager_loss) <= tolerance * eager_loss
    # Each gradient's error relative to its norm, or to a thousandth of the whole gradient's norm for
    # one that is zero but for rounding (the pooling score's bias: a softmax ignores a shift).
    floor = 1e-3 * torch.cat([g.flatten() for g in eager_grads.values()]).norm()
    for name, grad in eager_grads.items():
        error = ((compiled_grads[name] - grad).norm() / torch.maximum(grad.norm(), floor)).item()
        assert error < tolerance, f"{name}: compiled gradient differs from eager by {error:.1e} (relative norm)"


def test_dropout_on_cuda_keeps_nn_dropout_statistics():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, device="cuda")
    y = Dropout(0.25).train()(x)
    assert y.device.type == "cuda"
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert y[y != 0].unique().tolist() == pytest.approx([1 / 0.75])


def test_training_steps_on_cuda_never_wait_for_the_gpu(tmp_path, monkeypatch):
    """CUDA's sync debug mode raises at any operation that makes the host wait for the GPU (.item(),
    a copy to the host, a pageable copy to the device, nonzero, ...). It is on from one step's start
    to the next, for every step but the first epoch's (which compile), each epoch's first (whose loader
    copies the epoch's order to the GPU) and last (whose end reads the epoch's metrics) and those where
    Lightning writes its logs, with every batched augmentation and mixup on."""
    import vitlab
    from vitlab.training.module import Classifier

    strict_steps = []

    def on_train_batch_start(module, batch, batch_idx):
        trainer = module.trainer
        strict = (trainer.current_epoch > 0 and 0 < batch_idx < trainer.num_training_batches - 1
                  and (module.global_step + 1) % trainer.log_every_n_steps != 0)
        torch.cuda.set_sync_debug_mode("error" if strict else "default")
        strict_steps.append(strict)

    monkeypatch.setattr(Classifier, "on_train_batch_start", on_train_batch_start)
    try:
        vitlab.train("smoke", "fake:1200", max_epochs=3, run_dir=tmp_path / "run",
                     overrides={"data.batch_size": 32, "data.augment": "tutorial", "data.autoaugment": True,
                                "data.randaugment_ops": 2, "data.mixup_alpha": 0.8, "data.cutmix_alpha": 1.0,
                                "model.drop_path": 0.1, "trainer.compile": True, "trainer.accelerator": "gpu",
                                "trainer.checkpoint_every": "01:00:00"})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(strict_steps) > 50


@pytest.mark.parametrize("op", range(15))
def test_augmentation_ops_on_cuda_equal_the_cpu(op):
    from vitlab.data.augment import OPS, apply_op

    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    magnitude = torch.linspace(-0.9, 0.9, 64) if OPS[op] not in ("Posterize", "Solarize") else torch.linspace(0, 1, 64)
    if OPS[op] == "Posterize":
        magnitude = torch.arange(64) % 8 + 1.0
    elif OPS[op].startswith(("Translate", "Rotate")):
        magnitude = magnitude * 10
    choice = torch.full((64,), op)
    on_cpu = apply_op(images, choice, magnitude)
    on_cuda = apply_op(images.cuda(), choice.cuda(), magnitude.cuda()).cpu()
    # Blends may round a value differently on the two devices (one level); resampling may pick another
    # source pixel where a sample point falls on a pixel edge.
    differ = (on_cuda.int() - on_cpu.int()).abs()
    assert (differ > 1).float().mean() < 0.005 and differ.float().mean() < 0.05


def test_gradient_clipping_under_bf16_on_cuda(tmp_path):
    # Lightning refuses to clip a fused optimiser's gradients under mixed precision: clipped runs
    # take the unfused AdamW.
    import vitlab

    run = vitlab.train("smoke", "fake:400", max_epochs=1, run_dir=tmp_path / "run",
                       overrides={"trainer.gradient_clip": 1.0, "trainer.accelerator": "gpu"})
    assert run.accuracy is not None
