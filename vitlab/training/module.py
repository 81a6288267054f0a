"""The LightningModule: loss, metrics, optimiser and schedule around a ViT. It knows nothing of data."""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vitlab.config import DataConfig, OptimConfig
from vitlab.evaluation import view_logits
from vitlab.model import ViT, ViTConfig
from vitlab.pretrained import is_pretrained
from vitlab.training.callbacks import RunClock


def param_groups(model: nn.Module, weight_decay: float, pretrained_lr_scale: float | None = None) -> list[dict]:
    """The decay rule, in one place: weight matrices and conv kernels decay; biases, norms and the
    embedding-like parameters the model lists in `no_weight_decay` do not.
    With pretrained_lr_scale (a model started from model.init), the pre-trained parameters form
    groups of their own whose LR is scaled by it ("lr_scale"); the first group is always new weights."""
    skip = set(getattr(model, "no_weight_decay", ()))
    groups = {(scaled, decays): [] for scaled in (False, True) for decays in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scaled = pretrained_lr_scale is not None and is_pretrained(name)
        groups[scaled, p.ndim >= 2 and name not in skip].append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr_scale": pretrained_lr_scale if scaled else 1.0}
            for (scaled, decays), params in groups.items() if params or not scaled]


def warmup_cosine(progress: float, warmup: float, min_ratio: float) -> float:
    """LR multiplier at `progress` in [0, 1] of training: linear warm-up over the first `warmup`
    fraction, then a cosine from 1 down to min_ratio at the end."""
    if progress < warmup:
        return progress / warmup
    t = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# What fixes the images a run holds out: its source, and how the one split rule splits it.
SPLIT_KEYS = ("source", "val_fraction", "split_seed", "skip_bad_images")


class Classifier(L.LightningModule):
    """Trains a ViT for image classification.

    The hyperparameters saved in every checkpoint (model config, optimiser config, class names and
    input normalisation) are all that is needed to rebuild and use the model.
    val_tta: the test-time augmentation validation scores (vitlab.evaluation.TTA_VIEWS: none, flip, flip-shift).
    data_split: which images training held out ({SPLIT_KEYS: values}), for `vitlab eval --held-out`.
    """

    def __init__(self, model: dict, optim: dict, class_names: list[str], image_mean: list, image_std: list,
                 val_tta: str = "none", data_split: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = ViT(ViTConfig(**model))
        self.model.class_names = list(class_names)
        self.model.image_mean, self.model.image_std = tuple(image_mean), tuple(image_std)
        self.optim = OptimConfig(**optim)
        self.val_tta = val_tta
        self.val_acc = MulticlassAccuracy(len(class_names), average="micro")
        self.val_acc_plain = MulticlassAccuracy(len(class_names), average="micro")  # the image itself, no TTA
        # The mean over images, exact when summed across processes; no NaN check (it would read the
        # value back from the GPU at every batch: a diverged run is the DivergenceGuard's to catch).
        self.val_loss = MeanMetric(nan_strategy="disable")
        # The epoch's training loss and accuracy as running sums (loss x images, correct, images), kept
        # on the device (no host sync per step) and saved in checkpoints, so that an epoch resumed
        # part-way through reports the same numbers as one that ran straight through.
        # Not a buffer: DDP would overwrite every process's sums with rank 0's before each forward.
        self.train_sums = torch.zeros(3, dtype=torch.float64)
        self.schedule_start: float | None = None  # the Timer's training seconds when the first step ended

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, targets = batch  # targets: class indices (B,), or class probabilities (B, K) after mixup/CutMix
        logits = self.model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.optim.label_smoothing)
        labels = targets.argmax(-1) if targets.ndim == 2 else targets  # a mixed image counts as its larger part
        self.train_sums[0] += loss.detach().double() * len(labels)
        self.train_sums[1] += (logits.argmax(-1) == labels).sum()
        self.train_sums[2] += len(labels)
        # Logged only at the steps Lightning writes its logs (every trainer.log_every_n_steps): a log
        # call costs host time, and Lightning reads the value then (on the progress bar it would read it,
        # waiting for the GPU, every step).
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_fit_start(self):
        self.train_sums = self.train_sums.to(self.device)  # not a buffer, so not moved with the module

    def on_train_epoch_start(self):
        self.train_sums.zero_()

    def train_metrics(self) -> dict[str, float]:
        """The epoch's mean training loss and accuracy so far, over all processes (every process
        must ask at once)."""
        sums = self.train_sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        loss_sum, correct, count = sums.tolist()
        return {"train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1)}

    def setup(self, stage: str):
        # Every process starts from the same seed (the same initial weights); from here on each draws
        # its own augmentations and dropout masks.
        if stage == "fit" and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_save_checkpoint(self, checkpoint: dict):
        # With every process's random state saved, a resumed run draws the same augmentations and
        # dropout masks as one that never stopped.
        checkpoint["train_sums"] = self.train_sums.cpu()
        checkpoint["schedule_start"] = self.schedule_start
        state = (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
        states = [state]
        if self.trainer.world_size > 1:
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, state)
        checkpoint["rng"] = states

    def on_load_checkpoint(self, checkpoint: dict):
        if "train_sums" in checkpoint:
            self.train_sums.copy_(checkpoint["train_sums"])
        self.schedule_start = checkpoint.get("schedule_start", 0.0)  # older checkpoints: time from the start
        states = checkpoint.get("rng", [])
        if len(states) == self.trainer.world_size:  # a run resumed on as many processes as it had
            cpu, cuda = states[self.trainer.global_rank]
            torch.set_rng_state(cpu)
            if cuda is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(cuda)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        # The model's forward, not its compiled call: validation is short, and compiling for evaluation
        # (another graph, and another for the last, smaller batch) would cost more than it saves.
        views = view_logits(self.model.forward, images, self.val_tta)
        logits = views.mean(0)
        self.val_acc(logits, labels)
        self.val_acc_plain(views[0], labels)  # free: the first view is the image itself
        self.val_loss(F.cross_entropy(logits, labels, reduction="none"))
        self.log("val_loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val_acc_plain", self.val_acc_plain, on_epoch=True)

    def training_progress(self, step: int) -> float:
        """Fraction of training done, in [0, 1]: by steps towards max_epochs, or by wall time towards
        max_time, whichever is further, so the schedule always ends where training ends. Time is the
        RunClock's, the same in every process (it may lag by a few steps, see RunClock), counted
        from the end of the first step: the time before it went to compiling (a minute of a 5-minute
        budget on a GPU), and warm-up is a fraction of the time that trains."""
        if step == 0:
            # Asking Lightning for the number of steps this early (LambdaLR asks at construction) would
            # load the train loader before a resumed run's checkpoint is restored, losing its place in
            # the epoch.
            return 0.0
        total_steps = self.trainer.estimated_stepping_batches  # inf when only max_time limits training
        by_steps = step / total_steps if math.isfinite(total_steps) else 0.0
        clock = next((c for c in self.trainer.callbacks if isinstance(c, RunClock)), None)
        by_time = 0.0
        if clock is not None and clock.duration_s is not None and clock.agreed_step >= 1:
            if self.schedule_start is None:
                self.schedule_start = clock.agreed_elapsed
            trained = clock.agreed_elapsed - self.schedule_start
            by_time = trained / max(1e-9, clock.duration_s - self.schedule_start)
        return min(1.0, max(by_steps, by_time))

    def configure_optimizers(self):
        o = self.optim
        scale = o.init_lr_scale if self.model.config.init else None
        if scale == 0:  # frozen: no gradients computed for the pre-trained part at all
            for name, p in self.model.named_parameters():
                p.requires_grad_(not is_pretrained(name))
        groups = param_groups(self.model, o.weight_decay, scale)
        for group in groups:
            group["lr"] = o.lr * group.pop("lr_scale")
        # fused: one kernel for the whole update on a GPU, instead of several per parameter (Lightning
        # refuses to clip the gradients of a fused optimiser under mixed precision).
        fused = self.device.type == "cuda" and not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(self.training_progress(step), o.warmup, o.min_lr / o.lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @staticmethod
    def hparams_for(model_config: ViTConfig, optim: OptimConfig, classes, mean, std,
                    val_tta: str = "none", data: DataConfig | None = None) -> dict:
        """The hyperparameters of a Classifier; with data, the record of which images training held
        out (data_split), so that `vitlab eval --held-out` scores exactly those."""
        split = None if data is None else {k: getattr(data, k) for k in SPLIT_KEYS}
        return dict(model=asdict(model_config), optim=asdict(optim), class_names=list(classes),
                    image_mean=list(mean), image_std=list(std), val_tta=val_tta, data_split=split)
