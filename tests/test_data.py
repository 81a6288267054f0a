import dataclasses
import math
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitlab.data import images as image_files
from vitlab.data.augment import flip_translate, normalize, random_crop_flip, tutorial_geometry
from vitlab.config import DataConfig, parse_source
from vitlab.data.datamodule import ImageDataModule
from vitlab.data.sources import load_eval_set, open_source
from vitlab.data.images import CIFAR, download_cifar, load_image_folder, read_image
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
    train, val, mean, std = open_source(config, 32).train_val()
    # Validation is held out of the 100 train images; the 20 test images are only for `vitlab eval`.
    assert (len(train), len(val)) == (90, 10) and train.images.dtype == torch.uint8
    assert train.classes == [f"c{i}" for i in range(10)]
    assert (mean, std) == train.mean_std()  # the training part's statistics, as for every source
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
    assert len(open_source(config, 32).train_val()[0]) == 90


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

    monkeypatch.setattr(image_files, "read_image", no_decoding)
    again = load_image_folder(root, 16, cache)
    assert torch.equal(again.images, image_set.images) and again.paths == image_set.paths

    # A changed folder is not served from the stale cache.
    monkeypatch.undo()
    Image.new("RGB", (32, 32)).save(root / "green" / "new.png")
    assert len(load_image_folder(root, 16, cache)) == 12


def test_the_decode_cache_is_per_resolution(tmp_path, monkeypatch):
    # A plan may train one folder at 32, 64 or 128 px: each side has its own cache, and each is reused.
    root = write_image_folder(tmp_path / "imgs", per_class=2, size=64)
    cache = tmp_path / "cache"
    small, large = load_image_folder(root, 32, cache), load_image_folder(root, 64, cache)
    assert small.images.shape[-2:] == (32, 32) and large.images.shape[-2:] == (64, 64)
    assert len(list(cache.glob("*.pt"))) == 2

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(image_files, "read_image", no_decoding)
    assert torch.equal(load_image_folder(root, 32, cache).images, small.images)
    assert torch.equal(load_image_folder(root, 64, cache).images, large.images)


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


def test_a_folder_too_large_for_the_free_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", per_class=2)  # 6 images: 18,432 bytes at 32 px
    read = image_files.read_image
    monkeypatch.setattr(image_files, "available_memory", lambda: 18_000)
    monkeypatch.setattr(image_files, "read_image", lambda *args: pytest.fail("decoded"))
    with pytest.raises(VitlabError, match=r"imgs: 6 images at 32 px take 0.0 GiB in memory, more than the 0.0 GiB "
                                          r"free: train at a smaller side .*vitlab pack"):
        load_image_folder(root, 32, tmp_path / "cache")
    monkeypatch.setattr(image_files, "available_memory", lambda: 18_432)  # just enough
    monkeypatch.setattr(image_files, "read_image", read)
    assert len(load_image_folder(root, 32, tmp_path / "cache")) == 6
    monkeypatch.undo()  # the real reading of the free memory
    assert image_files.available_memory() is None or image_files.available_memory() > 0


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2, fmt="jpg")
    good = (root / "red" / "0.jpg").read_bytes()
    (root / "red" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(VitlabError, match="truncated.jpg.*--skip-bad-images"):
        load_image_folder(root, 32, tmp_path / "cache")
    image_set = load_image_folder(root, 32, tmp_path / "cache", skip_bad_images=True)
    assert len(image_set) == 6 and image_set.images.shape == (6, 3, 32, 32)
    assert torch.equal(image_set.images[0], read_image(image_set.paths[0], 32))


def test_read_image_rejects_non_images(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("hello")
    with pytest.raises(VitlabError, match="fake.png"):
        read_image(path, 32)


def test_split_is_fixed_by_its_seed_and_disjoint(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    config = DataConfig(source=f"folder:{root}", cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    train, val, mean, std = open_source(config, 32).train_val()
    assert (len(train), len(val)) == (24, 6)
    assert not set(train.paths) & set(val.paths)
    assert open_source(config, 32).train_val()[1].paths == val.paths
    other = open_source(dataclasses.replace(config, split_seed=1), 32).train_val()[1]
    assert other.paths != val.paths
    # Statistics are computed on the training part, in [0, 1] units.
    assert 0.2 < mean[0] < 0.8 and 0.05 < std[0] < 0.5


def test_sibling_val_folder_is_used_as_validation(tmp_path):
    train_root = write_image_folder(tmp_path / "ds" / "train", per_class=4)
    write_image_folder(tmp_path / "ds" / "val", per_class=2)
    config = DataConfig(source=f"folder:{train_root}", cache_dir=str(tmp_path / "cache"))
    train, val, _, _ = open_source(config, 32).train_val()
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


def test_fake_source_makes_as_many_images_as_asked():
    assert parse_source("fake") == ("fake", 2000) and parse_source("fake:300") == ("fake", 300)
    train, val, _, _ = open_source(DataConfig(source="fake:300"), 32).train_val()
    assert (len(train), len(val)) == (270, 30)
    for bad in ("fake:1", "fake:many", "fake:"):
        with pytest.raises(VitlabError, match=re.escape(f"data source '{bad}': fake:N needs a number of images N of 2 or more")):
            DataConfig(source=bad)


def crop_flip_candidates(images: torch.Tensor, pad: int) -> dict[tuple[bool, int, int], torch.Tensor]:
    """Every crop-flip of images (B, C, H, W) with shifts up to pad, written out with F.pad:
    {(mirrored, dy, dx): float images mirrored, then moved dy rows down and dx columns right}."""
    H, W = images.shape[-2:]
    candidates = {}
    for mirrored in (False, True):
        source = images.flip(3) if mirrored else images
        padded = F.pad(source.float(), (pad,) * 4, mode="reflect")
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                candidates[mirrored, dy, dx] = padded[..., pad - dy:pad - dy + H, pad - dx:pad - dx + W]
    return candidates


def identify_crop_flip(out: torch.Tensor, images: torch.Tensor, pad: int) -> list[tuple[bool, int, int]]:
    """For each image of out, the (mirrored, dy, dx) within pad that turns its source image into it
    exactly; fails if there is none."""
    found = [None] * len(out)
    for params, candidate in crop_flip_candidates(images, pad).items():
        for i in (candidate == out.float()).flatten(1).all(1).nonzero().flatten().tolist():
            found[i] = params
    missing = [i for i, f in enumerate(found) if f is None]
    assert not missing, f"{len(missing)} images (first: {missing[:5]}) are no crop-flip of their input"
    return found


def test_random_crop_flip_moves_pixels_but_keeps_content():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (512, 3, 8, 8), dtype=torch.uint8)
    before = images.clone()
    # With no padding a crop is the identity, so each image is itself or its mirror image.
    found = identify_crop_flip(random_crop_flip(images, pad=0), images, pad=0)
    assert set(found) == {(False, 0, 0), (True, 0, 0)}
    out = random_crop_flip(images, pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(images, before)  # a new tensor: the input is untouched
    # Each output is its input mirrored or not and moved by up to 2 pixels, the border reflected,
    # and every allowed shift occurs, in both orientations, independently drawn per image.
    found = identify_crop_flip(out, images, pad=2)
    assert set(found) == {(m, dy, dx) for m in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert 0.4 < sum(m for m, _, _ in found) / len(found) < 0.6


def test_normalize_uses_unit_interval_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(out, torch.full((1, 3, 2, 2), 2.0))
    # Per channel, and other statistics are not served the first ones' tensors.
    out = normalize(images, [0.0, 0.5, 1.0], [1.0, 0.5, 0.25])
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))
    assert images.dtype == torch.uint8 and images.eq(255).all()


def test_datamodule_yields_uint8_batches_then_normalises_after_transfer(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    config = DataConfig(source=f"folder:{root}", cache_dir=str(tmp_path / "cache"), batch_size=8)
    dm = ImageDataModule(config, 32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)

    def normalised(pixels):
        return (pixels.float() / 255 - mean) / std

    # Outside training (validation, or no trainer): normalised only.
    dm.trainer = SimpleNamespace(training=False)
    out, out_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32 and torch.equal(out_labels, labels)
    torch.testing.assert_close(out, normalised(images))
    # While training: each image is a crop-flip (up to crop_padding pixels) of its input, then normalised.
    torch.manual_seed(0)
    dm.trainer = SimpleNamespace(training=True)
    out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32
    pixels = (out * std + mean) * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3  # whole pixel values: moved, not interpolated
    pad = 4  # data.crop_padding unset: an eighth of the 32-pixel side
    found = identify_crop_flip(pixels.round(), images, pad=pad)
    assert any(f != (False, 0, 0) for f in found)
    crop_flips = crop_flip_candidates(images, pad)
    expected = torch.stack([crop_flips[f][i] for i, f in enumerate(found)])
    torch.testing.assert_close(out, normalised(expected))


def test_training_batches_go_through_every_augmentation_asked_for_in_order(tmp_path, monkeypatch):
    from vitlab.data import datamodule

    config = DataConfig(source="fake:64", batch_size=8, augment="tutorial", autoaugment=True, randaugment_ops=2,
                        randaugment_magnitude=5, mixup_alpha=0.8, cutmix_alpha=1.0)
    dm = ImageDataModule(config, 32)
    dm.setup("fit")
    calls = []

    def recorded(name, fn):
        def run(*args):
            calls.append((name, args[1:]) if name != "mix" else (name, args[2:]))
            return fn(*args)
        return run

    from vitlab.data import augment

    for name in ("tutorial_geometry", "auto_augment_cifar10", "rand_augment"):
        monkeypatch.setattr(augment, name, recorded(name, getattr(augment, name)))
    monkeypatch.setattr(datamodule, "mix", recorded("mix", datamodule.mix))
    images, labels = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=True)
    out, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert calls == [("tutorial_geometry", ()), ("auto_augment_cifar10", ()), ("rand_augment", (2, 5)),
                     ("mix", (10, 0.8, 1.0))]
    # Mixed: soft targets over the 10 classes, each row the image's own label and its partner's.
    assert out.dtype == torch.float32 and targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert set(targets.nonzero()[:, 1].tolist()) <= set(labels.tolist())
    # Validation batches are only normalised, with their labels as they are.
    calls.clear()
    dm.trainer = SimpleNamespace(training=False)
    out, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert calls == [] and torch.equal(targets, labels)


def test_resized_crop_flip_is_dispatched_with_its_smallest_scale(tmp_path, monkeypatch):
    from vitlab.data import augment

    calls = []
    monkeypatch.setattr(augment, "random_resized_crop_flip", lambda images, scale: calls.append(scale) or images)
    batch = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    augment.augment_batch(batch, DataConfig(augment="resized-crop-flip", crop_scale=0.5), 32)
    assert calls == [0.5]


def test_augmentation_settings_are_checked():
    for key, value, message in [("randaugment_ops", -1, "data.randaugment_ops must be 0 or more, not -1"),
                                ("randaugment_magnitude", 31, "data.randaugment_magnitude must be between 0 and 30, not 31"),
                                ("mixup_alpha", -0.5, "data.mixup_alpha must be 0 or more, not -0.5"),
                                ("cutmix_alpha", -1.0, "data.cutmix_alpha must be 0 or more, not -1.0"),
                                ("crop_scale", 1.5, "data.crop_scale must be above 0 and at most 1"),
                                ("augment", "zoom", "data.augment must be one of crop-flip, resized-crop-flip")]:
        with pytest.raises(VitlabError, match=re.escape(message)):
            DataConfig(**{key: value})


def ramp_image(size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: red rises to the right, green downwards, blue is constant (never 0)."""
    y, x = np.mgrid[:size, :size]
    return np.stack([40 + 5 * x, 40 + 5 * y, np.full_like(x, 200)], -1).astype(np.uint8)


def geometry_of(image: torch.Tensor) -> tuple[float, float, float]:
    """(determinant, rotation in degrees, vertical scale) of the map from the pixels of an augmented
    ramp_image (3, H, W) to the pixels of the original, fitted by least squares to its ramps.
    A mirror image has a negative determinant; a crop that enlarges has a scale below 1."""
    _, H, W = image.shape
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    # Pixels of the picture, not the rotation's fill (blue 0) nor the interpolated outer border.
    inside = (image[2] == 200)
    inside[:2] = inside[-2:] = inside[:, :2] = inside[:, -2:] = False
    design = torch.stack([x[inside], y[inside], torch.ones_like(x[inside])], 1)
    targets = torch.stack([image[0][inside], image[1][inside]], 1).double()
    coefficients = torch.linalg.lstsq(design, targets).solution  # (3, 2): input x, y from output x, y, 1
    A = coefficients[:2].T / 5  # (2, 2): d(input x, y) / d(output x, y)
    angle = math.degrees(math.atan2(A[1, 0], A[1, 1]))  # the input's y axis is never mirrored
    return torch.linalg.det(A).item(), angle, math.hypot(A[1, 0], A[1, 1])


def test_tutorial_augmentation_draws_for_each_image_of_a_batch(tmp_path):
    # Every training image is the same ramp: whatever differs in a batch, the augmentation drew per image.
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(ramp_image()).save(tmp_path / "imgs" / name / f"{i}.png")
    config = DataConfig(source=f"folder:{tmp_path / 'imgs'}", cache_dir=str(tmp_path / "cache"), batch_size=16,
                        augment="tutorial")
    dm = ImageDataModule(config, 32)
    dm.setup("fit")
    batch, _ = next(iter(dm.train_dataloader()))
    original = torch.from_numpy(ramp_image()).permute(2, 0, 1)
    assert torch.equal(batch, original.expand_as(batch))  # the loader only loads: augmenting is batched
    torch.manual_seed(0)
    images = dm.augment(batch)
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    assert not any(torch.equal(image, original) for image in images)
    # Each image draws its own flip, crop and rotation: they vary within the one batch.
    determinant, angle, scale = map(np.array, zip(*(geometry_of(image) for image in images)))
    assert (determinant < 0).any() and (determinant > 0).any()  # some mirrored, some not
    assert angle.min() < -10 and angle.max() > 10 and np.abs(angle).max() < 31  # rotated within ±30°
    assert scale.min() < 0.95 and scale.max() < 1.01  # cropped (enlarged), never shrunk

    def picture_blues(images):  # the most common blue of each image
        return {int(image[2].flatten().mode().values) for image in images}

    # Geometry alone keeps the picture's blue (200); AutoAugment changes colours too.
    assert picture_blues(images) == {200}
    dm = ImageDataModule(dataclasses.replace(config, autoaugment=True), 32)
    dm.setup("fit")
    assert picture_blues(dm.augment(batch)) != {200}


def test_flip_translate_moves_rows_down_and_columns_right():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    views = [(False, 1, 0), (False, 0, 1), (True, -2, 1), (True, 0, 0), (False, 2, -2), (True, 1, 2)]
    flip, dy, dx = torch.tensor(views).T
    out = flip_translate(images, flip.bool(), dy, dx)
    assert out.dtype == torch.uint8
    candidates = crop_flip_candidates(images, pad=2)
    expected = torch.stack([candidates[view][i] for i, view in enumerate(views)])
    assert torch.equal(out.float(), expected)


def test_crop_flip_translates_by_up_to_4_pixels_by_default():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    found = identify_crop_flip(random_crop_flip(images), images, pad=4)
    assert max(max(abs(dy), abs(dx)) for _, dy, dx in found) == 4


def test_crop_flip_draws_on_the_images_device():
    # The meta device stands in for an accelerator: an index or draw made on the CPU would not mix with it.
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8, device="meta")
    out = random_crop_flip(images)
    assert out.device == images.device and out.shape == images.shape and out.dtype == torch.uint8


def test_tutorial_geometry_crops_at_least_80_percent_and_rotates_up_to_30_degrees():
    torch.manual_seed(0)
    image = torch.from_numpy(ramp_image()).permute(2, 0, 1)
    images = tutorial_geometry(image.expand(200, -1, -1, -1))
    determinant, angle, scale = map(np.array, zip(*(geometry_of(image) for image in images)))
    # A crop of 0.8 to 1 of the area at aspect 0.9 to 1.1 keeps at least 27 of 32 rows
    # (sqrt(0.8 / 1.1) x 32, rounded), and is mostly smaller than the image.
    assert scale.min() > 0.84 and (scale > 0.99).mean() < 0.3
    assert np.abs(angle).max() < 30.5 and np.abs(angle).max() > 28
    assert 0.35 < (determinant < 0).mean() < 0.65
