"""vitlab: train Vision Transformers from scratch on small image datasets."""

from vitlab.inference import load_model
from vitlab.model import ViT, ViTConfig

__all__ = ["ViT", "ViTConfig", "load_model"]
