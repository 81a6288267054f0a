"""Pictures: learning curves, evaluation report figures and attention maps, written as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vitlab.errors import VitlabError  # noqa: E402
from vitlab.io import atomic_write, read_metric_rows  # noqa: E402


def save(fig, path: Path):
    """Write the figure atomically (a crash never leaves half a PNG) and close it."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), "figure")
    finally:
        plt.close(fig)


def to_numpy_image(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W, 3) for imshow: a grey image (one channel) in three equal ones."""
    return image.expand(3, -1, -1).permute(1, 2, 0).numpy()


# --- learning curves -----------------------------------------------------------------------------

def read_metrics(run_dir: Path) -> dict[str, list[float]]:

    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise VitlabError(f"{run_dir} has no metrics.csv (is it a vitlab run directory with a finished epoch?)")
    rows = read_metric_rows(run_dir)
    if not rows:
        raise VitlabError(f"{path} has no epochs yet")

    def column(name):
        return [float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows]

    return {name: column(name) for name in rows[0]}


def plot_learning_curves(run_dir: Path, out: Path):
    m = read_metrics(run_dir)
    epochs = [e + 1 for e in m["epoch"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(epochs, m["train_loss"], "o-", label="train")
    axes[0].plot(epochs, m["val_loss"], "o-", label="validation")
    axes[0].set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    axes[1].plot(epochs, [100 * a for a in m["train_acc"]], "o-", label="train")
    axes[1].plot(epochs, [100 * a for a in m["val_acc"]], "o-", label="validation")
    axes[1].set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    axes[2].plot(epochs, m["lr"], "o-", color="tab:green")
    axes[2].set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="learning rate")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"Training of {run_dir.name}: {len(epochs)} epochs, best validation accuracy "
                 f"{100 * np.nanmax(m['val_acc']):.1f}%")
    save(fig, out)


# --- evaluation report ---------------------------------------------------------------------------

def plot_confusion_matrix(confusion: np.ndarray, classes: list[str], out: Path):
    rates = confusion / np.maximum(1, confusion.sum(1, keepdims=True))  # each row sums to 1
    size = max(6, 0.45 * len(classes) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (each row sums to 1)")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    save(fig, out)


def plot_per_class_accuracy(per_class: dict[str, float], out: Path):
    names = list(per_class)
    values = [100 * per_class[n] for n in names]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.35 * len(names) + 1)))
    ax.barh(names, values, color="tab:blue")
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="accuracy (%)", title="Accuracy per class")
    for y, v in enumerate(values):
        ax.text(min(v + 1, 92), y, f"{v:.1f}", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save(fig, out)


def plot_confident_errors(images: torch.Tensor, titles: list[str], out: Path):
    """A grid of images (uint8 (N, C, H, W)) each titled 'true ... / predicted ...'."""
    cols = 4
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(to_numpy_image(image), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.suptitle("Most confidently wrong predictions" if len(images) else "No wrong predictions")
    save(fig, out)


# --- attention -----------------------------------------------------------------------------------

def overlay(ax, image: torch.Tensor, heat: torch.Tensor, title: str):
    """Show image with a heat map (h, w) stretched over it."""
    h, w = image.shape[1:]
    ax.imshow(to_numpy_image(image), interpolation="bilinear")
    ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
              interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_attention(images: torch.Tensor, names: list[str], titles: list[str], rollout: torch.Tensor,
                   per_layer: list[torch.Tensor], layer_label: str, out: Path):
    """One row per image: the input, the attention rollout, then one map per layer (or pooling).

    rollout: (B, h, w); per_layer: maps (B, h, w); layer_label says what they show."""
    cols = 2 + len(per_layer)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.2 * cols, 2.6 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        ax = axes[row, 0]
        ax.imshow(to_numpy_image(image), interpolation="bilinear")
        ax.set_title(f"{names[row]}\n{titles[row]}", fontsize=9)
        ax.axis("off")
        overlay(axes[row, 1], image, rollout[row], "attention rollout")
        for i, maps in enumerate(per_layer):
            overlay(axes[row, 2 + i], image, maps[row], layer_label if len(per_layer) == 1 else f"layer {i + 1}")
    what = "the pooling weights" if len(per_layer) == 1 else f"the {layer_label} in each layer"
    fig.suptitle(f"Attention rollout over all layers, and {what}", fontsize=11)
    save(fig, out)


def plot_attention_of_images(model, paths: list, out: Path):
    """`plot_attention` for image files and a model from load_model: each image resized as in
    training, titled with the predicted class and its probability."""
    from vitlab.data.augment import normalize
    from vitlab.data.images import read_image
    from vitlab.inspection import attention_summary

    images = torch.stack([read_image(p, model.config.image_size, model.config.in_channels) for p in paths])
    summary = attention_summary(model, normalize(images, model.image_mean, model.image_std))
    confidence, predicted = summary.logits.softmax(-1).max(-1)
    titles = [f"predicted: {model.class_names[c]} ({p:.0%})" for c, p in zip(predicted.tolist(), confidence.tolist())]
    plot_attention(images, [Path(p).name for p in paths], titles, summary.rollout, summary.per_layer,
                   summary.layer_label, out)
