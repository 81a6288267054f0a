"""Scoring a trained model on a labelled image set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.data.augment import normalize
from vitlab.data.sources import ImageSet
from vitlab.model import ViT, tta_logits


@torch.no_grad()
def predict_logits(model: ViT, images: torch.Tensor, batch_size: int = 500, tta: str = "none") -> torch.Tensor:
    """uint8 images (N, C, H, W) -> logits (N, num_classes), normalised as the model was trained.
    `model` is a ViT from load_model, or anything with its class_names/image_mean/image_std (OnnxModel).
    tta: test-time augmentation, the views whose logits are averaged (model.tta_logits)."""
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = normalize(images[i:i + batch_size], model.image_mean, model.image_std)
        chunks.append(tta_logits(model, batch, tta))
    return torch.cat(chunks)


def evaluate(model: ViT, image_set: ImageSet, tta: str = "none") -> tuple[dict, torch.Tensor]:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix of model on image_set
    (whose labels index model.class_names); also returns the logits for further analysis.
    tta: test-time augmentation (see predict_logits)."""
    logits = predict_logits(model, image_set.images, tta=tta)
    labels = image_set.labels
    num_classes = len(model.class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # rows: true, columns: predicted
    confusion.index_put_((labels, logits.argmax(-1)), torch.ones_like(labels), accumulate=True)
    totals = confusion.sum(1)
    per_class = {name: (confusion[i, i] / totals[i]).item()
                 for i, name in enumerate(model.class_names) if totals[i] > 0}
    result = {
        "accuracy": (confusion.diag().sum() / len(labels)).item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "per_class": per_class,
        "n": len(labels),
        "confusion": confusion.tolist(),
    }
    return result, logits
