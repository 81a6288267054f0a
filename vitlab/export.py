"""Exporting a trained model for use without vitlab: ONNX (runs under onnxruntime, no PyTorch) and
safetensors (weights that cannot run code when loaded, unlike a pickled checkpoint)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from vitlab.errors import VitlabError
from vitlab.io import atomic_write
from vitlab.model import ViT

FORMATS = ("onnx", "safetensors")


def metadata(model: ViT) -> dict[str, str]:
    """What a user of the exported file needs besides the weights, as JSON strings. Not where its
    weights started (model.init): a path on the trainer's machine is no business of the model's users."""
    return {
        "vitlab.config": json.dumps({**asdict(model.config), "init": None}),
        "vitlab.class_names": json.dumps(model.class_names),
        "vitlab.image_mean": json.dumps(list(model.image_mean)),
        "vitlab.image_std": json.dumps(list(model.image_std)),
    }


def read_metadata(meta: dict[str, str], path: Path) -> dict:
    """The inverse of `metadata`: {'config', 'class_names', 'image_mean', 'image_std'}."""
    if not all(key in meta for key in ("vitlab.config", "vitlab.class_names", "vitlab.image_mean", "vitlab.image_std")):
        raise VitlabError(f"{path} is not a vitlab export (its metadata has no vitlab config)")
    return {key.removeprefix("vitlab."): json.loads(value) for key, value in meta.items() if key.startswith("vitlab.")}


def export_onnx(model: ViT, out: Path):
    """ONNX graph: normalised float images (batch, C, H, W) -> logits (batch, num_classes); the
    batch axis is dynamic. The metadata of the file carries the class names and normalisation."""
    c = model.config
    example = torch.zeros(2, c.in_channels, c.image_size, c.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    graph = program.model_proto
    for key, value in metadata(model).items():
        graph.metadata_props.add(key=key, value=value)
    atomic_write(out, graph.SerializeToString(), "ONNX export")


def export_safetensors(model: ViT, out: Path):
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, save(state, metadata=metadata(model)), "safetensors export")


def export(model: ViT, fmt: str, out: Path):
    if fmt not in FORMATS:
        raise VitlabError(f"unknown export format '{fmt}' (expected {' or '.join(FORMATS)})")
    {"onnx": export_onnx, "safetensors": export_safetensors}[fmt](model, out)
