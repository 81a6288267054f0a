"""Using a trained model: load it from a checkpoint, prepare images, and predict."""

from __future__ import annotations

from pathlib import Path

import torch

from vitlab.data.augment import normalize
from vitlab.data.sources import is_image_file, read_image
from vitlab.errors import VitlabError
from vitlab.model import ViT, ViTConfig

HPARAMS_KEYS = {"model", "class_names", "image_mean", "image_std"}


def read_checkpoint(path: Path | str) -> dict:
    """A vitlab checkpoint's contents, or a clear error. Loaded with weights_only: no code runs."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for files that are not checkpoints
        raise VitlabError(f"{path} is not a vitlab checkpoint (cannot be loaded: {type(e).__name__})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not HPARAMS_KEYS <= set(hparams) or "state_dict" not in checkpoint:
        raise VitlabError(f"{path} is not a vitlab checkpoint (no vitlab model config or weights in it)")
    return checkpoint


def load_model(checkpoint_path: Path | str) -> ViT:
    """The trained ViT from a checkpoint, in eval mode, with `class_names`, `image_mean` and `image_std`."""
    checkpoint = read_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    model = ViT(ViTConfig(**hparams["model"]))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise VitlabError(f"{checkpoint_path}: weights do not fit its model config ({str(e).splitlines()[0]})") from None
    model.class_names = list(hparams["class_names"])
    model.image_mean, model.image_std = tuple(hparams["image_mean"]), tuple(hparams["image_std"])
    return model.eval()


def expand_image_paths(paths: list[str]) -> list[Path]:
    """Files as given, plus every image file under each given directory (sorted)."""
    result = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise VitlabError(f"folder {p} has no images")
            result += found
        elif p.is_file():
            result.append(p)
        else:
            raise VitlabError(f"image {p} does not exist")
    return result


@torch.no_grad()
def predict(model: ViT, paths: list[Path], top_k: int = 5, batch_size: int = 256) -> list[dict]:
    """For each image: {'path', 'top': [{'class', 'probability'}, ...]} with the top_k classes."""
    top_k = min(top_k, len(model.class_names))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = torch.stack([read_image(p, model.config.image_size) for p in chunk])
        probs = model(normalize(images, model.image_mean, model.image_std)).softmax(dim=-1)
        values, indices = probs.topk(top_k, dim=-1)
        for path, v, i in zip(chunk, values.tolist(), indices.tolist()):
            top = [{"class": model.class_names[c], "probability": round(p, 6)} for p, c in zip(v, i)]
            results.append({"path": str(path), "top": top})
    return results
