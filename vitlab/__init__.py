"""vitlab: train Vision Transformers from scratch on small image datasets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vitlab")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "unknown"

from vitlab.errors import VitlabError
from vitlab.inference import load_model
from vitlab.model import ViT, ViTConfig

__all__ = ["Run", "ViT", "ViTConfig", "VitlabError", "load_model", "train", "__version__"]


def __getattr__(name: str):
    # Training pulls in Lightning: imported when first used, so `import vitlab` stays quick.
    if name in ("train", "Run"):
        from vitlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitlab' has no attribute '{name}'")
