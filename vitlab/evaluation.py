"""Scoring a trained model on a labelled image set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.data.augment import normalize
from vitlab.data.sources import ImageSet
from vitlab.model import ViT


@torch.no_grad()
def evaluate(model: ViT, image_set: ImageSet, batch_size: int = 500) -> dict:
    """Accuracy, mean cross-entropy and per-class accuracy of model on image_set (labels index
    model.class_names)."""
    num_classes = len(model.class_names)
    correct = torch.zeros(num_classes)
    total = torch.zeros(num_classes)
    loss_sum = 0.0
    for start in range(0, len(image_set), batch_size):
        images = normalize(image_set.images[start:start + batch_size], model.image_mean, model.image_std)
        labels = image_set.labels[start:start + batch_size]
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        hits = (logits.argmax(-1) == labels).float()
        correct.index_add_(0, labels, hits)
        total.index_add_(0, labels, torch.ones_like(hits))
    n = int(total.sum())
    per_class = {name: (correct[i] / total[i]).item() for i, name in enumerate(model.class_names) if total[i] > 0}
    return {"accuracy": (correct.sum() / n).item(), "loss": loss_sum / n, "per_class": per_class, "n": n}
