"""Images packed as LitData chunk files, and streamed back for training and evaluation.

For data larger than memory. `pack_folder` / `pack_image_set` write a source's images with
`litdata.optimize` (chunk-*.bin files and an index.json) and, last, a manifest DIR/vitlab.json
(class names, image size, count, and for each item its place in the source and its pixel sums): a
folder without it is not a finished pack. Each item is {"image": encoded bytes, "label": class index, "name": where it came from}; a
JPEG or PNG file already at the image size is kept byte for byte, anything else is stored as PNG
(lossless) or, when asked, as JPEG at a stated quality. Items are written in a seeded random order:
LitData reads a chunk's items together, so chunks of one class each would make batches of one class.
The manifest's `order` maps each item back to its place in the source (a folder's listing, a CIFAR
batch), so a pack holds out the same images as its source (`split`), and its `pixel_sums` give the
statistics of the training part alone (`train_mean_std`).

`shard_dataset` streams a pack from a local folder or a bucket (s3://, gs://, ...; remote chunks go
through a bounded local cache) as (uint8 image (3, S, S), int64 label) items, decoded in the
loader's workers (augmentation is batched on the training device, as for in-memory data);
`shard_loader` batches them like the in-memory loader, split across ranks and workers, and its
`state_dict` lets a run resume part-way through an epoch.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from vitlab.data.images import ImageSet, image_sums, list_image_folder, mean_std, read_image, split_indices
from vitlab.errors import VitlabError
from vitlab.io import atomic_write

# LitData may ask PyPI whether a newer version of itself exists: never (it is pinned, and training
# makes no network calls of its own). LitData reads this when it is first imported.
os.environ["LITDATA_DISABLE_VERSION_CHECK"] = "1"
import litdata  # noqa: E402
from litdata.streaming.downloader import get_downloader  # noqa: E402

MANIFEST = "vitlab.json"
FORMAT = 2  # bumped when the items or the manifest change in a way older vitlab versions cannot read
CHUNK_BYTES = "64MB"  # LitData's advice: big enough for throughput from buckets, small enough to cache
PACK_ORDER_SEED = 0
REMOTE_PREFIXES = ("s3://", "gs://", "r2://", "azure://", "local:")  # LitData reads "local:" as a bucket: tests


@dataclass(frozen=True)
class Manifest:
    classes: list[str]
    image_size: int
    count: int  # items in the pack
    order: list[int]  # of each item, its index among the source's readable images (a folder's listing order)
    pixel_sums: list[list[float]]  # of each item as decoded, image_sums: [[sum per channel], [sum of squares]]


# --- packing -------------------------------------------------------------------------------------

def pack_folder(root: Path, out_dir: Path, image_size: int, jpeg_quality: int | None = None,
                skip_bad_images: bool = False, num_workers: int = 1, chunk_bytes: int | str = CHUNK_BYTES) -> Manifest:
    """Pack an ImageFolder tree root/<class>/<image> into out_dir (which must be new or empty).
    Names are the files' paths relative to root."""
    classes, samples = list_image_folder(root)
    items = [(path, label, path.relative_to(root).as_posix()) for path, label in samples]
    return pack(items, classes, out_dir, image_size, jpeg_quality, skip_bad_images, num_workers, chunk_bytes)


def pack_image_set(image_set: ImageSet, out_dir: Path, name: str, jpeg_quality: int | None = None,
                   num_workers: int = 1, chunk_bytes: int | str = CHUNK_BYTES) -> Manifest:
    """Pack an in-memory ImageSet (CIFAR, fake data) into out_dir; the items are named name/<index>."""
    labels = image_set.labels.tolist()
    items = [(image, labels[i], f"{name}/{i}") for i, image in enumerate(image_set.images)]
    image_size = image_set.images.shape[-1]
    return pack(items, image_set.classes, out_dir, image_size, jpeg_quality, False, num_workers, chunk_bytes)


def pack(items: list[tuple[Path | torch.Tensor, int, str]], classes: list[str], out_dir: Path, image_size: int,
         jpeg_quality: int | None, skip_bad_images: bool, num_workers: int, chunk_bytes: int | str) -> Manifest:
    """Write items (image file or uint8 (3, S, S) tensor, label, name) as chunks, then read them
    back as training will: that pass finds unreadable files and sums each item's pixels."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise VitlabError(f"pack output {out_dir} exists and is not an empty folder: choose a new folder")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 95:
        raise VitlabError(f"JPEG quality must be between 1 and 95, not {jpeg_quality}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(PACK_ORDER_SEED))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        litdata.optimize(
            partial(encode_item, image_size=image_size, jpeg_quality=jpeg_quality),
            [items[i] for i in order.tolist()], str(out_dir), chunk_bytes=chunk_bytes, num_workers=num_workers,
            keep_data_ordered=True, reorder_files=False, verbose=False,
            # fork: workers start at once, without importing torch again or pickling in-memory images.
            start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn",
        )
        written = any(out_dir.glob("chunk-*.bin"))
        names, sums = read_back(out_dir, image_size) if written else ([], [])
        kept = set(names)
        unreadable = [source for source, _, name in items if name not in kept]
        if unreadable and not skip_bad_images:
            raise VitlabError(f"{why_unreadable(unreadable[0], image_size)} "
                              f"(use --skip-bad-images to skip unreadable images)")
        if not names:
            raise VitlabError(f"none of the {len(items)} images could be read: nothing to pack")
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # all ours: it was new or empty
        raise
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable images, e.g. {unreadable[0]}", file=sys.stderr)
    # An item's place among the readable images, in the order the source lists them.
    place = {name: i for i, name in enumerate(name for _, _, name in items if name in kept)}
    manifest = Manifest(list(classes), image_size, len(names), [place[n] for n in names], sums)
    atomic_write(out_dir / MANIFEST, json.dumps({"format": FORMAT, **asdict(manifest)}, indent=1), "shard manifest")
    return manifest


def why_unreadable(path: Path, image_size: int) -> str:
    """read_image's one-line error for a file that could not be packed."""
    try:
        read_image(path, image_size)
    except VitlabError as e:
        return str(e)
    return f"cannot pack image {path}"  # readable now: it changed while packing


def encode_item(item: tuple[Path | torch.Tensor, int, str], image_size: int, jpeg_quality: int | None):
    """One item for optimize, run in its workers. An unreadable file yields nothing: an exception in
    an optimize worker leaves processes behind, so pack() finds the gap when it reads the pack back."""
    source, label, name = item
    try:
        data = encode_image(source, image_size, jpeg_quality)
    except VitlabError:
        return
    yield {"image": data, "label": label, "name": name}


def encode_image(source: Path | torch.Tensor, image_size: int, jpeg_quality: int | None) -> bytes:
    """The bytes to store: the file itself when it is a JPEG, or a PNG (unless JPEG is asked for),
    already at the image size; else the image as training decodes it, encoded as PNG or JPEG."""
    if isinstance(source, Path):
        data = source.read_bytes()
        image = read_image(NamedBytes(data, str(source)), image_size)  # the file must decode
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            keep = img.format == "JPEG" or (img.format == "PNG" and jpeg_quality is None)
            if keep and img.size == (image_size, image_size):
                return data
    else:
        image = source
    out = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())  # (S, S, 3)
    if jpeg_quality is None:
        pil.save(out, "PNG")
    else:
        pil.save(out, "JPEG", quality=jpeg_quality)
    return out.getvalue()


def read_back(out_dir: Path, image_size: int) -> tuple[list[str], list[list[float]]]:
    """The names and pixel sums (image_sums) of a pack's items, in item order, read as training reads
    them. One process: the items must come back in order."""
    names, sums = [], []
    for images, _, batch_names in shard_loader(shard_dataset(str(out_dir), image_size, names=True), 256):
        names += batch_names
        sums += image_sums(images).tolist()
    return names, sums


# --- streaming -----------------------------------------------------------------------------------

class NamedBytes(io.BytesIO):
    """Encoded image bytes that read_image's errors name by where the image came from."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def decode_item(item: dict, image_size: int, names: bool) -> tuple:
    """A stored item -> (uint8 image (3, S, S), label[, name]); run in the loader's workers."""
    image = read_image(NamedBytes(item["image"], item["name"]), image_size)
    return (image, item["label"], item["name"]) if names else (image, item["label"])


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_PREFIXES)


def read_remote(url: str) -> str:
    """A small file from a bucket, with LitData's client for that store (its credentials and options)."""
    if url.startswith("local:"):
        return Path(url.removeprefix("local:")).read_text()
    buffer = io.BytesIO()
    # download_fileobj: the store's plain client. download_file would start obstore's runtime in this
    # process, which the loader's forked workers then inherit broken (LitData avoids it for index.json).
    get_downloader(url, tempfile.gettempdir(), []).download_fileobj(url, buffer)
    return buffer.getvalue().decode()


def read_manifest(location: str) -> Manifest:
    """The manifest of a pack in a local folder or at a bucket URL, or a one-line error saying what
    is missing."""
    if is_remote(location):
        url = f"{location.rstrip('/')}/{MANIFEST}"
        try:
            text = read_remote(url)
        except Exception as e:  # each store's client raises its own kinds
            raise VitlabError(f"cannot read {url}: {' '.join(str(e).split()) or type(e).__name__}") from None
    else:
        folder = Path(location)
        if not folder.is_dir():
            raise VitlabError(f"shards folder {folder} does not exist")
        if not (folder / "index.json").is_file():
            raise VitlabError(f"{folder} has no index.json: not LitData chunks (make them with vitlab pack)")
        if not (folder / MANIFEST).is_file():
            raise VitlabError(f"{folder} has no {MANIFEST}: not made by vitlab pack, or packing did not finish")
        text = (folder / MANIFEST).read_text()
    try:
        fields = json.loads(text)
        found = fields.pop("format")
        if found > FORMAT:
            raise VitlabError(f"{location} was packed by a newer vitlab (this one reads up to format {FORMAT}): "
                              f"upgrade vitlab")
        if found < FORMAT:
            raise VitlabError(f"{location} was packed by an older vitlab (format {found}; this one reads "
                              f"format {FORMAT}): pack the images again with vitlab pack")
        return Manifest(**fields)
    except (ValueError, KeyError, TypeError):
        raise VitlabError(f"{location}/{MANIFEST} is damaged (not a vitlab shard manifest)") from None


def split(manifest: Manifest, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) item indices: the images its source holds out (the one split rule,
    split_indices, over the source's order), in item order, so LitData reads runs of neighbours."""
    train, held_out = split_indices(manifest.count, fraction, seed)
    item_of = {place: item for item, place in enumerate(manifest.order)}
    return sorted(item_of[p] for p in train.tolist()), sorted(item_of[p] for p in held_out.tolist())


def train_mean_std(manifest: Manifest, indices: list[int]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation statistics of the items at indices (the training part), as ImageSet.mean_std."""
    sums = torch.tensor(manifest.pixel_sums, dtype=torch.float64)[indices].sum(0)  # (2, C)
    return mean_std(sums, len(indices) * manifest.image_size ** 2)


def shard_dataset(location: str, image_size: int, indices: list[int] | None = None, shuffle: bool = False,
                  seed: int = 0, names: bool = False, drop_last: bool | None = None,
                  cache_dir: Path | None = None, max_cache_size: str = "25GB") -> litdata.StreamingDataset:
    """The items of a pack (those at `indices`, else all) as (uint8 image (3, S, S), label) pairs,
    or triples with the item's name. Shuffled by (seed, epoch) when asked. A remote pack's chunks
    are cached in cache_dir, at most max_cache_size of them (LitData warns below 25GB). drop_last:
    LitData's default (with several processes, each drops what does not fill its last batch, so all
    take the same steps); False for validation, which must score every image."""
    try:
        dataset = litdata.StreamingDataset(
            location, cache_dir=str(cache_dir) if cache_dir and is_remote(location) else None, shuffle=shuffle,
            seed=seed, max_cache_size=max_cache_size, drop_last=drop_last,
            transform=partial(decode_item, image_size=image_size, names=names),
        )
    except (ValueError, AssertionError, OSError) as e:  # LitData checks some inputs with assert
        raise VitlabError(f"cannot read shards {location}: {' '.join(str(e).split())}") from None
    return dataset if indices is None else dataset.subset(indices)


def shard_loader(dataset: litdata.StreamingDataset, batch_size: int,
                 num_workers: int = 0) -> litdata.StreamingDataLoader:
    """Batches of (uint8 images (B, 3, S, S), int64 labels), each rank and worker reading its own
    share of the chunks. Its state_dict records how far into the epoch it is (Lightning saves it in
    checkpoints); load_state_dict on a new loader continues from there. Each worker's last batch of
    an epoch may be short."""
    return litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available())


def load_shards(location: str, image_size: int, indices: list[int] | None = None, num_workers: int = 0,
                cache_dir: Path | None = None) -> ImageSet:
    """The items of a pack (those at `indices`, else all) decoded into memory, with their names as
    paths: for evaluation and its reports, which want every image at hand."""
    classes = read_manifest(location).classes
    dataset = shard_dataset(location, image_size, indices, names=True, cache_dir=cache_dir)
    images, labels, names = [], [], []
    for batch_images, batch_labels, batch_names in shard_loader(dataset, 256, num_workers):
        images.append(batch_images)
        labels.append(batch_labels)
        names += batch_names
    return ImageSet(torch.cat(images), torch.cat(labels), classes, names)
