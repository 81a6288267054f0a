"""Small data made by the tests themselves: image folders and a fake CIFAR-10 in the real format."""

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A tiny model and batch for end-to-end runs on small data.
TINY = ["model.dim=32", "model.depth=1", "model.heads=2", "model.patch_size=8", "data.batch_size=8"]

CLASS_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_image_folder(root: Path, per_class: int = 12, size: int = 32, fmt: str = "png") -> Path:
    """root/<colour>/<n>.<fmt>: noisy images of one dominant colour per class, easy to learn."""
    rng = np.random.default_rng(0)
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The folder cache (~/.cache/vitlab) goes to a per-test home, default runs/ to a per-test folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def write_fake_cifar10(directory: Path, per_batch: int = 20) -> tuple[Path, str]:
    """A cifar-10-python.tar.gz in the real layout (pickled dicts of uint8 rows); returns (path, md5)."""
    rng = np.random.default_rng(0)
    members = {"batches.meta": {"label_names": [f"c{i}" for i in range(10)]}}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        members[name] = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
    archive = directory / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in members.items():
            data = pickle.dumps(content)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()
