"""Using a trained model: load it from a checkpoint, prepare images, and predict."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import torch

from vitlab.data.images import is_image_file, read_image
from vitlab.errors import VitlabError
from vitlab.evaluation import predict_logits
from vitlab.export import read_hub_folder, read_metadata
from vitlab.io import read_checkpoint, read_safetensors
from vitlab.model import ViT, ViTConfig
from vitlab.progress import progress

def build_model(path: Path, config: dict, state: dict, class_names, image_mean, image_std) -> ViT:
    model = ViT(ViTConfig(**config))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise VitlabError(f"{path}: weights do not fit its model config ({str(e).splitlines()[0]})") from None
    model.class_names = list(class_names)
    model.image_mean, model.image_std = tuple(image_mean), tuple(image_std)
    model.loaded_from = path  # an export of a checkpoint finds its run directory by it
    return model.eval()


def load_safetensors(path: Path) -> ViT:
    state, meta = read_safetensors(path)
    values = read_metadata(meta, path)
    return build_model(path, values["config"], state, values["class_names"], values["image_mean"],
                       values["image_std"])


def load_folder(path: Path) -> ViT:
    """A Hub folder that `vitlab export --format hf` wrote: config.json's vitlab section and model.safetensors."""
    values = read_hub_folder(path)
    if values is None:
        raise VitlabError(f"{path}/config.json has no vitlab section: it is not a vitlab export "
                          f"(a timm ViT's folder can start a run: model.init={path})")
    state, _ = read_safetensors(path / "model.safetensors")
    return build_model(path, values["config"], state, values["class_names"], values["image_mean"],
                       values["image_std"])


def load_model(checkpoint_path: Path | str) -> ViT:
    """The trained ViT from a checkpoint (.ckpt), a safetensors export or a Hub folder export, in
    eval mode, with `class_names`, `image_mean`, `image_std` and `loaded_from` (its path) set."""
    path = Path(checkpoint_path)
    if path.is_dir():
        return load_folder(path)
    if not path.is_file():
        raise VitlabError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model = build_model(path, hparams["model"], state, hparams["class_names"], hparams["image_mean"],
                        hparams["image_std"])
    model.data_split = hparams.get("data_split")  # which images its run held out (older checkpoints: None)
    return model


class OnnxModel:
    """A model exported to ONNX, run with onnxruntime; usable wherever `predict` takes a ViT."""

    def __init__(self, path: Path | str, threads: int | None = None):
        """threads: onnxruntime's intra-op threads (default: its own, one per physical core)."""
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise VitlabError(f"ONNX model {path} does not exist")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise VitlabError(f"{path} is not an ONNX model ({type(e).__name__})") from None
        values = read_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.config = ViTConfig(**values["config"])
        self.class_names = values["class_names"]
        self.image_mean, self.image_std = tuple(values["image_mean"]), tuple(values["image_std"])
        # An int8 export's {'format', 'calibration_images', ...}; None for fp32.
        self.quantization: dict | None = values.get("quantization")
        self.data_split = None  # an export does not record which images its run held out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], {"images": images.numpy()})[0])


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


def predict(model: ViT | OnnxModel, paths: list[Path], top_k: int = 5, batch_size: int = 256) -> Iterator[dict]:
    """For each image: {'path', 'top': [{'class', 'probability'}, ...]} with the top_k classes.

    A generator: each batch is read, predicted and yielded before the next is read, so results
    arrive as they are done and memory does not grow with the number of images."""
    files = iter(progress(paths, len(paths), "predicting"))
    while chunk := list(itertools.islice(files, batch_size)):
        images = torch.stack([read_image(p, model.config.image_size, model.config.in_channels) for p in chunk])
        yield from top_classes(model, images, [str(p) for p in chunk], top_k)


def predict_shards(model: ViT | OnnxModel, location: str, top_k: int = 5, batch_size: int = 256) -> Iterator[dict]:
    """`predict` for every image of a pack (`vitlab pack`), streamed; 'path' is the item's name."""
    from vitlab.data import shards

    if model.config.in_channels != 3:
        raise VitlabError(f"packs hold colour images; this model reads {model.config.in_channels} channel(s): "
                          f"predict on the image files")
    loader = shards.shard_loader(shards.shard_dataset(location, model.config.image_size, names=True), batch_size)
    for images, _, names in progress(loader, len(loader), "predicting"):
        yield from top_classes(model, images, names, top_k)


def top_classes(model: ViT | OnnxModel, images: torch.Tensor, names: list[str], top_k: int) -> Iterator[dict]:
    probs = predict_logits(model, images).softmax(dim=-1)
    values, indices = probs.topk(min(top_k, len(model.class_names)), dim=-1)
    for name, v, i in zip(names, values.tolist(), indices.tolist()):
        yield {"path": name, "top": [{"class": model.class_names[c], "probability": round(p, 6)} for p, c in zip(v, i)]}
