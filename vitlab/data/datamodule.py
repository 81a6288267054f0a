"""Datasets, splits and loaders: everything about data that training needs, in one LightningDataModule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitlab.data.augment import AUGMENTATIONS, normalize, random_crop_flip, tutorial_transform
from vitlab.data.sources import (
    CIFAR,
    ImageSet,
    download_cifar,
    load_image_folder,
    make_fake,
    read_cifar_batches,
    resize_images,
)
from vitlab.errors import VitlabError

SOURCES_HELP = "cifar10, cifar100, fake, folder:PATH or shards:DIR_OR_URL"


@dataclass
class DataConfig:
    source: str = "cifar10"  # cifar10 | cifar100 | fake | folder:PATH | shards:DIR_OR_URL (packed by `vitlab pack`)
    root: str = "data"  # where CIFAR is downloaded to
    cache_dir: str = "~/.cache/vitlab"  # decoded image folders are cached here
    val_fraction: float = 0.1  # held out of train unless a folder has a sibling val/ folder
    split_seed: int = 0  # fixes the held-out part, independently of the training seed
    batch_size: int = 128
    num_workers: int = 0  # loader processes; only the per-sample `tutorial` augmentation needs them
    augment: str = "crop-flip"  # crop-flip (batched, fast) | tutorial (per-sample) | none
    crop_padding: int = 4  # crop-flip translates images by up to this many pixels
    autoaugment: bool = False  # add AutoAugment(CIFAR10) to the `tutorial` augmentation
    skip_bad_images: bool = False  # skip unreadable images in folders instead of stopping
    shard_cache_size: str = "25GB"  # the most of a remote shards: source kept in cache_dir at once

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise VitlabError(f"data.augment must be one of {', '.join(AUGMENTATIONS)}, not '{self.augment}'")
        if self.crop_padding < 0:
            raise VitlabError(f"data.crop_padding must be 0 or more, not {self.crop_padding}")
        if not 0 < self.val_fraction < 1:
            raise VitlabError(f"data.val_fraction must be between 0 and 1, not {self.val_fraction}")
        parse_source(self.source)


def parse_source(source: str) -> tuple[str, Path | str | None]:
    """'cifar10' -> ('cifar10', None); 'folder:PATH' -> ('folder', PATH); 'shards:LOCATION' ->
    ('shards', LOCATION), a folder or a bucket URL (kept as text: a Path would mangle s3://)."""
    if source in CIFAR or source == "fake":
        return source, None
    if source.startswith("folder:") and len(source) > len("folder:"):
        return "folder", Path(source[len("folder:"):]).expanduser()
    if source.startswith("shards:") and len(source) > len("shards:"):
        location = source[len("shards:"):]
        return "shards", location if "://" in location or location.startswith("local:") else str(Path(location).expanduser())
    raise VitlabError(f"unknown data source '{source}' (expected {SOURCES_HELP})")


def align_classes(image_set: ImageSet, classes: list[str], where: str) -> ImageSet:
    """Relabel image_set so that its labels index `classes` (e.g. a checkpoint's class names)."""
    unknown = [c for c in image_set.classes if c not in classes]
    if unknown:
        raise VitlabError(f"{where} has classes the model does not know: {', '.join(unknown)}")
    mapping = torch.tensor([classes.index(c) for c in image_set.classes])
    return ImageSet(image_set.images, mapping[image_set.labels], classes, image_set.paths)


def split_train_val(image_set: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A fixed, seeded random split: the same images are held out in every run with this seed."""
    n_val = round(len(image_set) * fraction)
    if not 0 < n_val < len(image_set):
        raise VitlabError(
            f"--val-fraction {fraction} of {len(image_set)} images leaves no training or validation images"
        )
    order = torch.randperm(len(image_set), generator=torch.Generator().manual_seed(seed))
    return image_set.subset(order[n_val:]), image_set.subset(order[:n_val])


def load_folder(path: Path, config: DataConfig, image_size: int) -> ImageSet:
    return load_image_folder(path, image_size, Path(config.cache_dir).expanduser(), config.skip_bad_images)


def load_cifar(name: str, config: DataConfig, image_size: int, train: bool) -> ImageSet:
    spec = CIFAR[name]
    folder = download_cifar(name, Path(config.root).expanduser())
    image_set = read_cifar_batches(folder, spec, spec.train_files if train else spec.test_files)
    image_set.images = resize_images(image_set.images, image_size)
    return image_set


def load_train_val(config: DataConfig, image_size: int) -> tuple[ImageSet, ImageSet, tuple, tuple]:
    """(train, val, mean, std) for a source. Validation is a sibling `val/` folder when there is one,
    else a seeded part of train. CIFAR's test split is never used in training: `vitlab eval` scores it."""
    kind, path = parse_source(config.source)
    if kind in CIFAR:
        images = load_cifar(kind, config, image_size, train=True)
    elif kind == "fake":
        images = make_fake(image_size=image_size)
    else:
        images = load_folder(path, config, image_size)
        sibling = path.resolve().parent / "val"
        if path.resolve().name != "val" and sibling.is_dir():
            val = align_classes(load_folder(sibling, config, image_size), images.classes, str(sibling))
            return images, val, *images.mean_std()
    train, val = split_train_val(images, config.val_fraction, config.split_seed)
    mean, std = (CIFAR[kind].mean, CIFAR[kind].std) if kind in CIFAR else train.mean_std()
    return train, val, mean, std


def load_eval_set(config: DataConfig, image_size: int, classes: list[str], held_out: bool = False) -> ImageSet:
    """The images `vitlab eval` scores: with held_out, the validation part of the source exactly as
    training splits it (fake data has only that); else CIFAR's test split or every image of a folder."""
    kind, path = parse_source(config.source)
    if kind == "shards":  # streamed data, decoded into memory for scoring
        from vitlab.data import shards

        indices = None
        if held_out:
            count = shards.read_manifest(path).count
            indices = shards.split_indices(count, config.val_fraction, config.split_seed)[1]
        image_set = shards.load_shards(path, image_size, indices, cache_dir=shard_cache(config))
    elif held_out or kind == "fake":
        image_set = load_train_val(config, image_size)[1]
    elif kind in CIFAR:
        image_set = load_cifar(kind, config, image_size, train=False)
    else:
        image_set = load_folder(path, config, image_size)
    return align_classes(image_set, classes, f"data folder {path}" if path else config.source)


def shard_cache(config: DataConfig) -> Path:
    """Where chunks of remote shards are cached (at most data.shard_cache_size of them)."""
    return Path(config.cache_dir).expanduser() / "shards"


class ImageTensorDataset(Dataset):
    """Whole batches of an in-memory ImageSet: `index` is a list of indices, so a batch is one
    indexing operation; a per-sample transform (the `tutorial` augmentation) runs on each image."""

    def __init__(self, image_set: ImageSet, transform=None):
        self.image_set = image_set
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.image_set.images[indices]
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        return images, self.image_set.labels[indices]


class EpochBatches(Sampler[list[int]]):
    """The batches one process takes in one epoch, as lists of indices.

    Shuffled, the order is a permutation seeded by (seed, epoch), so any epoch's order can be made
    again: that is what lets a run resume part-way through an epoch without taking the batches it
    already took (`skip`), and what lets `world` processes share an epoch without talking: each
    makes the same permutation, cut into full batches, and process `rank` takes every world-th
    batch. Every image is then seen once per epoch across processes (but for the remainder that
    does not fill a batch on every process), and every process takes the same number of batches, as
    DDP's all-reduce needs. Training drops the last partial batch (every step sees a full batch, and
    compiled, one shape), except in one process with fewer images than a batch. Unshuffled
    (validation), batches are in order, every image once, the last one partial."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0
        self.skip = 0  # batches of this epoch already taken before a resume
        if shuffle and world > 1 and size < world * batch_size:
            raise VitlabError(f"{size} training images do not fill one batch of {batch_size} on each of "
                              f"{world} processes: lower data.batch_size or use fewer devices")

    def set_epoch(self, epoch: int):  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def total(self) -> int:
        """How many batches all processes take together this epoch."""
        if not self.shuffle:
            return -(-self.size // self.batch_size)
        return max(self.size // self.batch_size // self.world * self.world, 1)  # 1: one process, a partial batch

    def batches(self) -> list[torch.Tensor]:
        """All processes' batches of this epoch, in order."""
        order = (torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
                 if self.shuffle else torch.arange(self.size))
        return list(order[:self.total() * self.batch_size].split(self.batch_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.total(), self.world))

    def __iter__(self):
        mine = self.batches()[self.rank::self.world]
        start, self.skip = self.skip, 0
        for batch in mine[start:]:
            yield batch.tolist()


class ResumableLoader(DataLoader):
    """A DataLoader over EpochBatches that counts the batches training has taken, so a checkpoint
    records where in the epoch it was made (Lightning saves `state_dict` of loaders that have one)."""

    def __init__(self, dataset: ImageTensorDataset, batches: EpochBatches, num_workers: int = 0):
        # Its own generator: starting an epoch's iterator then draws nothing from the global random
        # state, which a resumed run restores from its checkpoint for augmentation and dropout.
        super().__init__(dataset, sampler=batches, batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                         generator=torch.Generator().manual_seed(batches.seed))
        self.taken = 0

    def __iter__(self):
        self.taken = self.sampler.skip
        for batch in super().__iter__():
            self.taken += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict):
        self.sampler.epoch, self.sampler.skip = state["epoch"], state["taken"]


class ImageDataModule(L.LightningDataModule):
    """Loaders yield uint8 batches; augmentation and normalisation happen after transfer to the device.
    `seed` fixes the training order of every epoch."""

    def __init__(self, config: DataConfig, image_size: int, seed: int = 0):
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.seed = seed
        self.train_set = self.val_set = None
        self.manifest = None  # for shards: sources, which stream instead of living in memory
        self.mean = self.std = None

    def setup(self, stage: str | None = None):
        if self.train_set is not None or self.manifest is not None:
            return
        kind, location = parse_source(self.config.source)
        if kind == "shards":
            from vitlab.data import shards

            self.manifest = shards.read_manifest(location)
            self.train_indices, self.val_indices = shards.split_indices(
                self.manifest.count, self.config.val_fraction, self.config.split_seed)
            self.mean, self.std = self.manifest.mean, self.manifest.std
        else:
            self.train_set, self.val_set, self.mean, self.std = load_train_val(self.config, self.image_size)

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes if self.manifest is not None else self.train_set.classes

    def shard_loader(self, indices: list[int], train: bool, transform=None):
        """A streaming loader over part of a pack: decoding (and per-sample augmentation) in the
        loader's workers, split across ranks and workers by LitData, resumable mid-epoch."""
        from vitlab.data import shards

        dataset = shards.shard_dataset(parse_source(self.config.source)[1], self.image_size, indices, shuffle=train,
                                       seed=self.seed, transform=transform, cache_dir=shard_cache(self.config),
                                       max_cache_size=self.config.shard_cache_size)
        return shards.shard_loader(dataset, self.config.batch_size, self.config.num_workers)

    def train_dataloader(self):
        transform = None
        if self.config.augment == "tutorial":
            transform = tutorial_transform(self.image_size, self.config.autoaugment)
        if self.manifest is not None:
            return self.shard_loader(self.train_indices, train=True, transform=transform)
        batches = EpochBatches(len(self.train_set), self.config.batch_size, shuffle=True, seed=self.seed,
                               **self.shard())
        return ResumableLoader(ImageTensorDataset(self.train_set, transform), batches, self.config.num_workers)

    def val_dataloader(self):
        if self.manifest is not None:
            return self.shard_loader(self.val_indices, train=False)
        batches = EpochBatches(len(self.val_set), self.config.batch_size, shuffle=False, **self.shard())
        return ResumableLoader(ImageTensorDataset(self.val_set), batches)

    def shard(self) -> dict:
        """This process's share of the data: its rank among the training processes."""
        if self.trainer is None:
            return {"rank": 0, "world": 1}
        return {"rank": self.trainer.global_rank, "world": self.trainer.world_size}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if self.trainer is not None and self.trainer.training and self.config.augment == "crop-flip":
            images = random_crop_flip(images, self.config.crop_padding)
        return normalize(images, self.mean, self.std), labels
