"""Scoring a trained model on a labelled image set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlab.data.augment import normalize
from vitlab.data.sources import ImageSet
from vitlab.model import ViT, flip_tta_logits


@torch.no_grad()
def predict_logits(model: ViT, images: torch.Tensor, batch_size: int = 500, flip: bool = False) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> logits (N, num_classes), normalised as the model was trained.
    `model` is a ViT from load_model, or anything with its class_names/image_mean/image_std (OnnxModel).
    flip: test-time augmentation, the mean of the logits of each image and its mirror image."""
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = normalize(images[i:i + batch_size], model.image_mean, model.image_std)
        chunks.append(flip_tta_logits(model, batch) if flip else model(batch))
    return torch.cat(chunks)


def evaluate(model: ViT, image_set: ImageSet, flip: bool = False) -> tuple[dict, torch.Tensor]:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix of model on image_set
    (whose labels index model.class_names); also returns the logits for further analysis.
    flip: average each image's logits with its mirror image's (see predict_logits)."""
    logits = predict_logits(model, image_set.images, flip=flip)
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
