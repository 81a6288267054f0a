import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import sources
from vitlab.data.augment import normalize, random_crop_flip
from vitlab.data.datamodule import DataConfig, ImageDataModule, load_eval_set, load_train_val, parse_source
from vitlab.data.sources import CIFAR, download_cifar, load_image_folder, read_image
from vitlab.errors import VitlabError
from tests.conftest import write_fake_cifar10, write_image_folder


@pytest.fixture
def fake_cifar_url(tmp_path, monkeypatch):
    """Point the real CIFAR-10 download code at a local archive in the real format."""
    served = tmp_path / "served"
    served.mkdir()
    archive, md5 = write_fake_cifar10(served)
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(CIFAR["cifar10"], url=archive.as_uri(), md5=md5))
    return archive


def test_cifar_download_checks_and_parses_pickled_batches(tmp_path, fake_cifar_url):
    root = tmp_path / "data"
    config = DataConfig(source="cifar10", root=str(root))
    train, val, mean, std = load_train_val(config, image_size=32)
    # Validation is held out of the 100 train images; the 20 test images are only for `vitlab eval`.
    assert (len(train), len(val)) == (90, 10) and train.images.dtype == torch.uint8
    assert train.classes == [f"c{i}" for i in range(10)] and mean == CIFAR["cifar10"].mean
    test = load_eval_set(config, 32, train.classes)
    assert test.images.shape == (20, 3, 32, 32)
    # Row layout: 1024 red values, then green, then blue, each row-major.
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        first = pickle.load(f, encoding="latin1")
    assert torch.equal(test.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert test.labels[0].item() == first["labels"][0]
    held_out = load_eval_set(config, 32, train.classes, held_out=True)
    assert torch.equal(held_out.images, val.images)
    # Once unpacked it is not downloaded again.
    fake_cifar_url.unlink()
    assert len(load_train_val(config, image_size=32)[0]) == 90


def test_cifar_download_failure_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    missing = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(CIFAR["cifar10"], url=missing))
    with pytest.raises(VitlabError, match="could not download cifar10.*folder:PATH"):
        download_cifar("cifar10", tmp_path / "data")
    assert not list((tmp_path / "data").glob("*.part"))


def test_cifar_checksum_mismatch_is_reported(tmp_path, fake_cifar_url, monkeypatch):
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(CIFAR["cifar10"], md5="0" * 32))
    with pytest.raises(VitlabError, match="checksum"):
        download_cifar("cifar10", tmp_path / "data")


def test_folder_loading_resizes_any_mode_and_caches(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", per_class=3, size=32)
    Image.new("L", (50, 40), 128).save(root / "red" / "gray.png")  # other size and mode
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(root / "blue" / "alpha.png")
    (root / "blue" / "notes.txt").write_text("not an image, ignored")
    cache = tmp_path / "cache"
    image_set = load_image_folder(root, 16, cache)
    assert image_set.classes == ["blue", "green", "red"]
    assert image_set.images.shape == (11, 3, 16, 16)
    assert torch.bincount(image_set.labels).tolist() == [4, 3, 4]
    assert len(list(cache.glob("*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(sources, "read_image", no_decoding)
    again = load_image_folder(root, 16, cache)
    assert torch.equal(again.images, image_set.images) and again.paths == image_set.paths

    # A changed folder is not served from the stale cache.
    monkeypatch.undo()
    Image.new("RGB", (32, 32)).save(root / "green" / "new.png")
    assert len(load_image_folder(root, 16, cache)) == 12


def test_folder_errors_name_the_problem(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(VitlabError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 32, cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitlabError, match="no class folders"):
        load_image_folder(tmp_path / "empty", 32, cache)
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    (root / "yellow").mkdir()
    with pytest.raises(VitlabError, match="class folder .*yellow has no images"):
        load_image_folder(root, 32, cache)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2, fmt="jpg")
    good = (root / "red" / "0.jpg").read_bytes()
    (root / "red" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(VitlabError, match="truncated.jpg.*--skip-bad-images"):
        load_image_folder(root, 32, tmp_path / "cache")
    image_set = load_image_folder(root, 32, tmp_path / "cache", skip_bad_images=True)
    assert len(image_set) == 6


def test_read_image_rejects_non_images(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("hello")
    with pytest.raises(VitlabError, match="fake.png"):
        read_image(path, 32)


def test_split_is_fixed_by_its_seed_and_disjoint(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    config = DataConfig(source=f"folder:{root}", cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    train, val, mean, std = load_train_val(config, 32)
    assert (len(train), len(val)) == (24, 6)
    assert not set(train.paths) & set(val.paths)
    assert load_train_val(config, 32)[1].paths == val.paths
    other = load_train_val(dataclasses.replace(config, split_seed=1), 32)[1]
    assert other.paths != val.paths
    # Statistics are computed on the training part, in [0, 1] units.
    assert 0.2 < mean[0] < 0.8 and 0.05 < std[0] < 0.5


def test_sibling_val_folder_is_used_as_validation(tmp_path):
    train_root = write_image_folder(tmp_path / "ds" / "train", per_class=4)
    write_image_folder(tmp_path / "ds" / "val", per_class=2)
    config = DataConfig(source=f"folder:{train_root}", cache_dir=str(tmp_path / "cache"))
    train, val, _, _ = load_train_val(config, 32)
    assert (len(train), len(val)) == (12, 6)
    assert all("/val/" in p for p in val.paths)


def test_eval_set_matches_folder_classes_to_model_classes(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    config = DataConfig(source=f"folder:{root}", cache_dir=str(tmp_path / "cache"))
    image_set = load_eval_set(config, 32, ["red", "green", "blue", "black"])
    assert image_set.classes == ["red", "green", "blue", "black"]
    # Folder classes sort as blue, green, red; labels must now index the model's classes.
    assert image_set.labels.tolist() == [2, 2, 1, 1, 0, 0]
    with pytest.raises(VitlabError, match="classes the model does not know: red"):
        load_eval_set(config, 32, ["green", "blue"])


def test_unknown_source_is_refused():
    assert parse_source("folder:/x") == ("folder", Path("/x"))
    with pytest.raises(VitlabError, match="unknown data source 'imagenet'"):
        DataConfig(source="imagenet")


def test_random_crop_flip_moves_pixels_but_keeps_content():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, pad=0)
    # With no padding a crop is the identity, so each image is itself or its mirror image.
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()
    shifted = random_crop_flip(images, pad=2)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert not torch.equal(shifted, images)


def test_normalize_uses_unit_interval_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(out, torch.full((1, 3, 2, 2), 2.0))


def test_datamodule_yields_uint8_batches_then_normalises_after_transfer(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    config = DataConfig(source=f"folder:{root}", cache_dir=str(tmp_path / "cache"), batch_size=8)
    dm = ImageDataModule(config, 32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    normalised, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert normalised.dtype == torch.float32
    assert abs(normalised.mean().item()) < 1.0


def test_tutorial_augmentation_runs_per_sample(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    config = DataConfig(source=f"folder:{root}", cache_dir=str(tmp_path / "cache"), batch_size=4,
                        augment="tutorial", autoaugment=True)
    dm = ImageDataModule(config, 32)
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
