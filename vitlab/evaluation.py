"""Scoring a trained model on a labelled image set, with or without test-time augmentation, and
the report of a scoring (figures and report.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vitlab.data.augment import flip_translate, normalize
from vitlab.data.images import ImageSet
from vitlab.errors import VitlabError
from vitlab.io import atomic_write
from vitlab.model import ViT
from vitlab.progress import progress

# Test-time augmentation: the views whose logits are averaged, each (mirrored, rows down, columns right),
# the moves in units of tta_shift pixels. The views are those that crop-flip training makes as likely
# as the image itself.
TTA_VIEWS = {
    "none": [(False, 0, 0)],
    "flip": [(False, 0, 0), (True, 0, 0)],
    # Both of those, each also moved up-left and down-right (reflect-padded, as the training crop).
    "flip-shift": [(False, 0, 0), (True, 0, 0), (False, -1, -1), (False, 1, 1), (True, -1, -1), (True, 1, 1)],
}


def tta_shift(image_size: int) -> int:
    """How far flip-shift moves its views, in pixels: a sixteenth of the side (2 px at 32, 8 px at
    128), the same share of the picture at every resolution, as crop-flip's translation is."""
    return max(1, image_size // 16)


def tta_views(name: str) -> list[tuple[bool, int, int]]:
    """The views of the test-time augmentation called name, each (mirrored, dy, dx)."""
    if name not in TTA_VIEWS:
        raise VitlabError(f"unknown test-time augmentation '{name}' (choose from {', '.join(TTA_VIEWS)})")
    return TTA_VIEWS[name]


def tta_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
               views: str = "none") -> torch.Tensor:
    """The mean logits (B, num_classes) over the TTA_VIEWS[views] of each image (B, C, H, W), by
    model (a module, or any function from images to logits)."""
    return view_logits(model, images, views).mean(0)


def view_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                views: str = "none") -> torch.Tensor:
    """The logits (V, B, num_classes) of each of the V views TTA_VIEWS[views] of each image; the
    first view is the image itself, so [0] is the plain logits.
    All views go through the model as one batch: one forward pass, not one per view (exact, as the
    model is in eval mode: BatchNorm uses its running statistics, not the batch's)."""
    view_list = tta_views(views)
    if view_list == [(False, 0, 0)]:  # the image itself
        return model(images)[None]
    B, V = len(images), len(view_list)
    # Each view's (mirrored, dy, dx) once per image, view by view as images.repeat lays out the batch.
    flip, dy, dx = torch.tensor(view_list, device=images.device).repeat_interleave(B, dim=0).T  # 3 x (V*B,)
    shift = tta_shift(images.shape[-1])
    dy, dx = dy * shift, dx * shift
    batch = flip_translate(images.repeat(V, 1, 1, 1), flip.bool(), dy, dx)  # (V*B, C, H, W)
    return model(batch).view(V, B, -1)


@torch.no_grad()
def predict_logits(model: ViT, images: torch.Tensor, batch_size: int = 500, tta: str = "none",
                   description: str | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> logits (N, num_classes), normalised as the model was trained.
    `model` is a ViT from load_model, or anything with its class_names/image_mean/image_std (OnnxModel).
    tta: test-time augmentation, the views whose logits are averaged (TTA_VIEWS).
    batch_size: the images of one forward pass, test-time views included.
    description: show a progress bar (on a terminal) with this label."""
    batch_size = max(1, batch_size // len(tta_views(tta)))
    starts = range(0, len(images), batch_size)
    if description:
        starts = progress(starts, len(starts), description)
    chunks = []
    for i in starts:
        batch = normalize(images[i:i + batch_size], model.image_mean, model.image_std)
        chunks.append(tta_logits(model, batch, tta))
    return torch.cat(chunks)


def evaluate(model: ViT, image_set: ImageSet, tta: str = "none") -> tuple[dict, torch.Tensor]:
    """Accuracy, mean cross-entropy, per-class accuracy and confusion matrix of model on image_set
    (whose labels index model.class_names); also returns the logits for further analysis.
    tta: test-time augmentation (see predict_logits)."""
    logits = predict_logits(model, image_set.images, tta=tta, description="evaluating")
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


def write_report(out_dir: Path, result: dict, logits, image_set, classes: list[str], worst: int = 16):
    """Figures and numbers of an evaluation, in out_dir."""
    import numpy as np

    from vitlab import plots

    probs = logits.softmax(-1)
    confidence, predicted = probs.max(-1)
    wrong = (predicted != image_set.labels).nonzero().squeeze(1)
    wrong = wrong[confidence[wrong].argsort(descending=True)][:worst].tolist()
    errors = [{"index": i, "path": image_set.paths[i] if image_set.paths else None,
               "true": classes[image_set.labels[i]], "predicted": classes[predicted[i]],
               "probability": round(confidence[i].item(), 4)} for i in wrong]
    plots.plot_confusion_matrix(np.array(result["confusion"]), classes, out_dir / "confusion_matrix.png")
    plots.plot_per_class_accuracy(result["per_class"], out_dir / "per_class_accuracy.png")
    plots.plot_confident_errors(image_set.images[wrong],
                                [f"true: {e['true']}\npredicted: {e['predicted']} ({e['probability']:.0%})"
                                 for e in errors], out_dir / "confident_errors.png")
    report = {**result, "classes": classes, "confident_errors": errors}
    atomic_write(out_dir / "report.json", json.dumps(report, indent=1), "report")
    print(f"report written to {out_dir}", file=sys.stderr)
