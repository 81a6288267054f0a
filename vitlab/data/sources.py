"""Data sources: one object per kind of `data.source` (cifar10/cifar100, fake[:N], folder:PATH,
shards:DIR_OR_URL), each answering the same questions, so that training, evaluation and packing never
tell the kinds apart:

- `train_val()`: the training and validation parts and the statistics that normalise them: in
  memory (ImageSets), or for a pack the indices of the items to stream;
- `held_out()`: the validation part, decoded, exactly as training holds it out (`eval --held-out`);
- `test_set()`: what `vitlab eval` scores without --held-out (CIFAR's test split, else every image);
- `pack()`: the images as LitData chunks (`vitlab pack`);
- `summary()`: what a planned run needs to know of the images (`DataSummary`), without decoding them.

One split rule (images.split_indices, over the source's own order) and one statistics rule (those of
the training part, images.mean_std) hold for every kind, so a folder and its pack hold out the same
images and normalise alike. A folder with a sibling `val/` folder validates on that instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitlab.config import CIFAR_NAMES, DataConfig, parse_source
from vitlab.data.images import (
    CIFAR,
    ImageSet,
    download_cifar,
    list_image_folder,
    load_image_folder,
    make_fake,
    read_cifar_batches,
    resize_images,
    split_indices,
)
from vitlab.errors import VitlabError

assert set(CIFAR) == set(CIFAR_NAMES)  # config names the kinds that this module implements


@dataclass(frozen=True)
class DataSummary:
    """A source's images as a planned run sees them (vitlab.planning)."""

    images: int  # every image of the source (held-out part included)
    classes: int
    smallest_class: int | None  # images in the smallest class; None when the source does not say
    side: int  # the images' typical (median) shorter side, in pixels
    aspect: float  # their typical longer / shorter side
    grayscale: bool  # every image looked at has one channel
    validation_apart: bool = False  # validated on a separate set (a folder's sibling val/): every image trains

    @property
    def per_class(self) -> float:
        return self.images / self.classes


SUMMARY_SAMPLE = 200  # how many of a folder's files summary() opens (headers only: milliseconds each)


class Source:
    """An in-memory source: subclasses say what `images()` are (every training image, in the
    source's own order) and may add a separate validation set."""

    streams = False  # its training images are streamed (shards), not held in memory
    grey = False  # it can give its images in one channel (grey): a folder converts them as it reads them

    def __init__(self, config: DataConfig, image_size: int, channels: int = 3):
        if channels not in (1, 3):
            raise VitlabError(f"model.in_channels {channels}: images are read as RGB (3) or grey (1)")
        if channels != 3 and not self.grey:
            raise VitlabError(f"{config.source} gives colour images: a model of model.in_channels {channels} "
                              f"trains on folders (folder:PATH) only")
        self.config = config
        self.image_size = image_size
        self.channels = channels

    def images(self) -> ImageSet:
        raise NotImplementedError

    def validation_images(self, classes: list[str]) -> ImageSet | None:
        """A validation set of its own, with labels indexing `classes`; None: a part of images() is held out."""
        return None

    def train_val(self) -> tuple[ImageSet, ImageSet, tuple, tuple]:
        """(train, val, mean, std): mean and std of the training images."""
        images = self.images()
        val = self.validation_images(images.classes)
        if val is None:
            train_indices, val_indices = split_indices(len(images), self.config.val_fraction, self.config.split_seed)
            images, val = images.subset(train_indices), images.subset(val_indices)
        return images, val, *images.mean_std()

    def held_out(self) -> ImageSet:
        return self.train_val()[1]

    def test_set(self) -> ImageSet:
        return self.images()

    def summary(self) -> DataSummary:
        raise NotImplementedError

    def pack(self, out_dir: Path, jpeg_quality: int | None, workers: int, test: bool = False):
        from vitlab.data import shards

        images, part = (self.test_set(), "test") if test else (self.images(), "train")
        return shards.pack_image_set(images, out_dir, f"{self.config.source.split(':')[0]}-{part}", jpeg_quality,
                                     workers)

    @property
    def description(self) -> str:
        return self.config.source


class Cifar(Source):
    def load(self, train: bool) -> ImageSet:
        spec = CIFAR[self.config.source]
        folder = download_cifar(self.config.source, Path(self.config.root).expanduser())
        image_set = read_cifar_batches(folder, spec, spec.train_files if train else spec.test_files)
        image_set.images = resize_images(image_set.images, self.image_size)
        return image_set

    def images(self) -> ImageSet:
        return self.load(train=True)

    def test_set(self) -> ImageSet:  # never used in training
        return self.load(train=False)

    def summary(self) -> DataSummary:
        download_cifar(self.config.source, Path(self.config.root).expanduser())  # absent and offline: said now
        classes = 10 if self.config.source == "cifar10" else 100
        return DataSummary(50_000, classes, 50_000 // classes, side=32, aspect=1.0, grayscale=False)


class Fake(Source):
    def images(self) -> ImageSet:
        return make_fake(num_images=parse_source(self.config.source)[1], image_size=self.image_size)

    def test_set(self) -> ImageSet:  # it has no other images
        return self.held_out()

    def summary(self) -> DataSummary:
        count = parse_source(self.config.source)[1]
        return DataSummary(count, 10, None, side=32, aspect=1.0, grayscale=False)


class Folder(Source):
    grey = True

    @property
    def path(self) -> Path:
        return parse_source(self.config.source)[1]

    @property
    def description(self) -> str:
        return f"data folder {self.path}"

    def load(self, path: Path) -> ImageSet:
        return load_image_folder(path, self.image_size, Path(self.config.cache_dir).expanduser(),
                                 self.config.skip_bad_images, self.channels)

    def images(self) -> ImageSet:
        return self.load(self.path)

    @property
    def validation_folder(self) -> Path | None:
        """The sibling val/ folder that validates this one's training, if there is one."""
        sibling = self.path.resolve().parent / "val"
        return sibling if self.path.resolve().name != "val" and sibling.is_dir() else None

    def validation_images(self, classes: list[str]) -> ImageSet | None:
        sibling = self.validation_folder
        return None if sibling is None else align_classes(self.load(sibling), classes, f"data folder {sibling}")

    def summary(self) -> DataSummary:
        """Counted from the listing; sizes and channels from the headers of up to SUMMARY_SAMPLE files
        spread evenly over it (no pixels are decoded)."""
        from PIL import Image

        classes, samples = list_image_folder(self.path)
        counts = [0] * len(classes)
        for _, label in samples:
            counts[label] += 1
        k = min(SUMMARY_SAMPLE, len(samples))
        looked_at = [samples[i * len(samples) // k][0] for i in range(k)]  # evenly over every class
        shorter, longer, grey = [], [], []
        for path in looked_at:
            try:
                with Image.open(path) as img:
                    (w, h), mode = img.size, img.mode
            except Exception:  # unreadable files are training's to report (or skip)
                continue
            shorter.append(min(w, h))
            longer.append(max(w, h) / min(w, h))
            grey.append(mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"))
        if not shorter:
            raise VitlabError(f"data folder {self.path}: none of the {len(looked_at)} "
                              f"images looked at could be read")
        return DataSummary(len(samples), len(classes), min(counts), side=sorted(shorter)[len(shorter) // 2],
                           aspect=sorted(longer)[len(longer) // 2], grayscale=all(grey),
                           validation_apart=self.validation_folder is not None)

    def pack(self, out_dir: Path, jpeg_quality: int | None, workers: int, test: bool = False):
        from vitlab.data import shards

        return shards.pack_folder(self.path, out_dir, self.image_size, jpeg_quality, self.config.skip_bad_images,
                                  workers)


class Shards(Source):
    """A pack made by `vitlab pack`, streamed for training; decoded into memory for evaluation."""

    streams = True

    def __init__(self, config: DataConfig, image_size: int, channels: int = 3):
        from vitlab.data import shards

        super().__init__(config, image_size, channels)
        self.location = parse_source(config.source)[1]
        self.manifest = shards.read_manifest(self.location)

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def cache_dir(self) -> Path:
        """Where chunks of a remote pack are cached (at most data.shard_cache_size of them)."""
        return Path(self.config.cache_dir).expanduser() / "shards"

    def train_val(self) -> tuple[list[int], list[int], tuple, tuple]:
        """(train item indices, validation item indices, mean, std)."""
        from vitlab.data import shards

        train, val = shards.split(self.manifest, self.config.val_fraction, self.config.split_seed)
        return train, val, *shards.train_mean_std(self.manifest, train)

    def decode(self, indices: list[int] | None) -> ImageSet:
        from vitlab.data import shards

        return shards.load_shards(self.location, self.image_size, indices, cache_dir=self.cache_dir)

    def images(self) -> ImageSet:
        return self.decode(None)

    def held_out(self) -> ImageSet:
        return self.decode(self.train_val()[1])

    def summary(self) -> DataSummary:
        m = self.manifest
        return DataSummary(m.count, len(m.classes), None, side=m.image_size, aspect=1.0, grayscale=False)

    def pack(self, out_dir: Path, jpeg_quality: int | None, workers: int, test: bool = False):
        raise VitlabError(f"{self.config.source} is packed already")


def open_source(config: DataConfig, image_size: int, channels: int = 3) -> Source:
    """The source that config.source names, giving images of image_size with `channels` (3: RGB, 1: grey)."""
    kind = parse_source(config.source)[0]
    kinds = {"fake": Fake, "folder": Folder, "shards": Shards, **{name: Cifar for name in CIFAR_NAMES}}
    return kinds[kind](config, image_size, channels)


def same_source(a: str, b: str) -> bool:
    """Whether two data.source values name the same images (paths compared resolved)."""
    (kind_a, where_a), (kind_b, where_b) = parse_source(a), parse_source(b)
    if isinstance(where_a, Path) and isinstance(where_b, Path):
        return kind_a == kind_b and where_a.resolve() == where_b.resolve()
    if kind_a == kind_b == "shards" and "://" not in str(where_a) + str(where_b):
        return Path(where_a).resolve() == Path(where_b).resolve()
    return (kind_a, where_a) == (kind_b, where_b)


def align_classes(image_set: ImageSet, classes: list[str], where: str) -> ImageSet:
    """Relabel image_set so that its labels index `classes` (e.g. a checkpoint's class names)."""
    import torch

    unknown = [c for c in image_set.classes if c not in classes]
    if unknown:
        raise VitlabError(f"{where} has classes the model does not know: {', '.join(unknown)}")
    mapping = torch.tensor([classes.index(c) for c in image_set.classes])
    return ImageSet(image_set.images, mapping[image_set.labels], classes, image_set.paths)


def load_eval_set(config: DataConfig, image_size: int, classes: list[str], held_out: bool = False,
                  channels: int = 3) -> ImageSet:
    """The images `vitlab eval` scores, labelled by `classes`: with held_out, the validation part of
    the source exactly as training holds it out; else its test set."""
    source = open_source(config, image_size, channels)
    image_set = source.held_out() if held_out else source.test_set()
    return align_classes(image_set, classes, source.description)
