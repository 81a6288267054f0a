"""vitlab: train Vision Transformers from scratch on small image datasets."""

from vitlab.errors import VitlabError
from vitlab.inference import load_model
from vitlab.io import VERSION as __version__
from vitlab.model import ViT, ViTConfig

__all__ = ["Run", "ViT", "ViTConfig", "VitlabError", "load_model", "train", "__version__"]


def __getattr__(name: str):
    # Training pulls in Lightning: imported when first used, so `import vitlab` stays quick.
    if name in ("train", "Run"):
        from vitlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitlab' has no attribute '{name}'")
