"""Datasets, splits and loaders: everything about data that training needs, in one LightningDataModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitlab.config import DataConfig
from vitlab.data.augment import augment_batch, mix, normalize
from vitlab.data.images import ImageSet
from vitlab.data.sources import open_source
from vitlab.errors import VitlabError


class ImageTensorDataset(Dataset):
    """Whole batches of an in-memory ImageSet: `index` is a tensor of indices (on the images'
    device), so a batch is one indexing operation where the images live."""

    def __init__(self, image_set: ImageSet):
        self.image_set = image_set

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_set.images[indices], self.image_set.labels[indices]


class EpochBatches(Sampler[torch.Tensor]):
    """The batches one process takes in one epoch, as tensors of indices on `device`.

    Shuffled, the order is a permutation seeded by (seed, epoch), so any epoch's order can be made
    again: that is what lets a run resume part-way through an epoch without taking the batches it
    already took (`skip`), and what lets `world` processes share an epoch without talking: each
    makes the same permutation, cut into full batches, and process `rank` takes every world-th
    batch. Every image is then seen once per epoch across processes (but for the remainder that
    does not fill a batch on every process), and every process takes the same number of batches, as
    DDP's all-reduce needs. Training drops the last partial batch (every step sees a full batch, and
    compiled, one shape), except in one process with fewer images than a batch. Unshuffled
    (validation), batches are in order, every image once, the last one partial.
    The order is made on the CPU (the same on every device) and copied to `device` once per epoch:
    indices copied per batch would make each step wait for the GPU."""

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world, self.device = rank, world, device
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
        return list(order[:self.total() * self.batch_size].to(self.device).split(self.batch_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.total(), self.world))

    def __iter__(self):
        mine = self.batches()[self.rank::self.world]
        start, self.skip = self.skip, 0
        yield from mine[start:]


class ResumableLoader(DataLoader):
    """A DataLoader over EpochBatches that counts the batches training has taken, so a checkpoint
    records where in the epoch it was made (Lightning saves `state_dict` of loaders that have one).
    The images already live on the training device: no worker processes, no pinned copies."""

    def __init__(self, dataset: ImageTensorDataset, batches: EpochBatches):
        # Its own generator: starting an epoch's iterator then draws nothing from the global random
        # state, which a resumed run restores from its checkpoint for augmentation and dropout.
        super().__init__(dataset, sampler=batches, batch_size=None,
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
    """Loaders yield uint8 batches; augmentation and normalisation happen on whole batches on the
    training device (airbench's idea: no per-image work on the host). In-memory images live on that
    device too, so a batch is one indexing operation there; streamed (shards:) batches are decoded in
    loader workers and copied. `seed` fixes the training order of every epoch; `compile` compiles the
    augmentation on a GPU (see on_after_batch_transfer)."""

    def __init__(self, config: DataConfig, image_size: int, seed: int = 0, compile: bool = False, channels: int = 3):
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.compile = compile
        self.train_augment = None  # self.augment, compiled or not: decided at the first training batch
        self.source = None  # the Source config.source names, once set up
        self.train = self.val = None  # ImageSets in memory, or for a streamed source the items' indices
        self.mean = self.std = None

    def setup(self, stage: str | None = None):
        if self.source is not None:
            return
        self.source = open_source(self.config, self.image_size, self.channels)
        self.train, self.val, self.mean, self.std = self.source.train_val()

    @property
    def classes(self) -> list[str]:
        return self.source.classes if self.source.streams else self.train.classes

    def shard_loader(self, indices: list[int], train: bool):
        """A streaming loader over part of a pack: decoding in the loader's workers, split across
        ranks and workers by LitData, resumable mid-epoch."""
        from vitlab.data import shards

        world, batch = self.shard()["world"], self.config.batch_size
        if not train and world > 1 and len(indices) // batch < world:
            # LitData gives each process whole batches and the last one the rest: a process with none
            # would skip validation while the others wait for it in the metrics' reduction.
            raise VitlabError(f"the {len(indices)} held-out images of {self.config.source} do not fill one batch "
                              f"of {batch} on each of {world} processes: lower data.batch_size or raise "
                              f"data.val_fraction")
        dataset = shards.shard_dataset(self.source.location, self.image_size, indices, shuffle=train, seed=self.seed,
                                       drop_last=None if train else False,
                                       cache_dir=self.source.cache_dir, max_cache_size=self.config.shard_cache_size)
        return shards.shard_loader(dataset, self.config.batch_size, self.config.num_workers)

    def in_memory_loader(self, image_set: ImageSet, train: bool) -> ResumableLoader:
        """Batches of image_set, which is copied to the training device once (one copy per loader)."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        on_device = ImageSet(image_set.images.to(device), image_set.labels.to(device), image_set.classes)
        batches = EpochBatches(len(image_set), self.config.batch_size, shuffle=train, seed=self.seed,
                               device=device, **self.shard())
        return ResumableLoader(ImageTensorDataset(on_device), batches)

    def loader(self, part, train: bool):
        return self.shard_loader(part, train) if self.source.streams else self.in_memory_loader(part, train)

    def train_dataloader(self):
        return self.loader(self.train, train=True)

    def val_dataloader(self):
        return self.loader(self.val, train=False)

    def shard(self) -> dict:
        """This process's share of the data: its rank among the training processes."""
        if self.trainer is None:
            return {"rank": 0, "world": 1}
        return {"rank": self.trainer.global_rank, "world": self.trainer.world_size}

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return augment_batch(images, self.config, self.image_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches come out as (normalised images, targets): class indices (B,), or class
        probabilities (B, num_classes) when mixup/CutMix blends images and their labels."""
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        if training:
            if self.train_augment is None:
                # Compiled on a GPU: eager, each of the ~480 small ops of crop-flip and two RandAugment
                # layers (on a batch of any size) waits for its own kernel launch, longer than the
                # training step the batch feeds. Eager on a CPU, where the compiled code ran 2-3x
                # slower (benchmarks/throughput.py counts the ops and times both).
                self.train_augment = (torch.compile(self.augment, dynamic=False) if self.compile and images.is_cuda
                                      else self.augment)
            images = self.train_augment(images)
        images = normalize(images, self.mean, self.std)
        if training and (self.config.mixup_alpha or self.config.cutmix_alpha):
            images, labels = mix(images, labels, len(self.classes), self.config.mixup_alpha, self.config.cutmix_alpha)
        return images, labels
