"""Reading images: CIFAR-10/100's batches, folders of image files (decoded once, cached), synthetic
data; and the pixel statistics that normalise them.

Every in-memory source ends as an `ImageSet`: all images decoded once into one uint8 tensor (N, C, H, W)
held in memory, so that training never decodes or touches Python per sample again.
"""

from __future__ import annotations

import hashlib
import http.client
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vitlab.errors import VitlabError
from vitlab.io import atomic_write, made_by_one
from vitlab.progress import progress


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    paths: list[str] | None = None  # the file of each image, for sources read from disk

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        paths = [self.paths[i] for i in indices.tolist()] if self.paths is not None else None
        return ImageSet(self.images[indices], self.labels[indices], self.classes, paths)

    def mean_std(self, chunk_pixels: int = 1 << 20) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the pixels (see `mean_std`), summed over chunks
        of about chunk_pixels values, so memory stays small: a float copy of the whole set would be
        8x its uint8 size."""
        rows = max(1, chunk_pixels // self.images[0].numel())
        sums = sum(image_sums(batch).sum(0) for batch in self.images.split(rows))
        return mean_std(sums, len(self) * self.images[0, 0].numel())


def split_indices(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one split rule, for every source: (train, held-out) indices into the source's images in
    its own order (a folder's listing, CIFAR's batches; a pack maps them back to that order), a
    seeded permutation's first round(count x fraction) held out: the same images in every run with
    this seed and fraction."""
    n_val = round(count * fraction)
    if not 0 < n_val < count:
        raise VitlabError(f"--val-fraction {fraction} of {count} images leaves no training or validation images")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def image_sums(images: torch.Tensor) -> torch.Tensor:
    """(N, 2, C) float64: per image, the sums of its pixel values and of their squares, per channel.
    Exact integers, so the statistics of any part of a data set add up from them (shards keep them)."""
    x = images.double()  # (N, C, H, W)
    return torch.stack([x.sum((2, 3)), x.square().sum((2, 3))], 1)


def mean_std(sums: torch.Tensor, pixels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The one statistics rule: per-channel mean and unbiased standard deviation, in [0, 1] units, from
    sums (2, C) of pixel values and their squares over `pixels` values per channel. Every source
    normalises by the statistics of the images it trains on, never those it holds out."""
    mean = sums[0] / pixels
    var = (sums[1] - pixels * mean.square()) / (pixels - 1)
    return tuple((mean / 255).tolist()), tuple((var.clamp_min(0).sqrt() / 255).tolist())


@dataclass(frozen=True)
class CifarSpec:
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


CIFAR = {
    "cifar10": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar(name: str, root: Path) -> Path:
    """Download and unpack CIFAR into root (once, by one process at a time); return the folder
    holding its batches."""
    spec = CIFAR[name]
    folder = root / spec.folder
    if (folder / spec.meta_file).exists():
        return folder
    archive = root / Path(spec.url).name
    with made_by_one(archive, "download"):
        if (folder / spec.meta_file).exists():  # another process made it while this one waited
            return folder
        if not archive.exists():
            print(f"downloading {spec.url} to {archive}", file=sys.stderr)
            atomic_write(archive, lambda out: fetch(name, spec, out, archive, root), "download")
        if md5sum(archive) != spec.md5:
            raise VitlabError(f"{archive} is corrupt (MD5 checksum does not match); delete it and run again")
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    return folder


def fetch(name: str, spec: CifarSpec, out, archive: Path, root: Path):
    """Write spec.url's bytes to `out`; a network failure says how to do without one."""
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        raise VitlabError(
            f"could not download {name} from {spec.url} ({e}); with no network, put a copy of "
            f"{archive.name} or its unpacked {spec.folder}/ in {root} (the data root, --data-root), "
            f"or use --data folder:PATH for images on disk"
        ) from None


def read_cifar_batches(folder: Path, spec: CifarSpec, files: tuple[str, ...]) -> ImageSet:
    """Parse CIFAR's pickled batches straight into uint8 tensors."""
    with open(folder / spec.meta_file, "rb") as f:
        classes = pickle.load(f, encoding="latin1")[spec.names_key]
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[spec.label_key], dtype=np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), classes)


# --- folders of images ---------------------------------------------------------------------------

IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image(path: Path | str, image_size: int, channels: int = 3) -> torch.Tensor:
    """Any image Pillow reads -> uint8 tensor (channels, image_size, image_size): RGB, or with one
    channel grey (colour images converted); upright as a viewer shows it (EXIF orientation applied);
    the first frame of an animation. A non-square image is resized on its shorter side and
    centre-cropped, never squashed (as timm and torchvision evaluate)."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = to_rgb(ImageOps.exif_transpose(img), grey=channels == 1)
        if img.size != (image_size, image_size):
            img = ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC)
        array = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    except Exception as e:  # Pillow's decoders raise many kinds of exception for damaged files
        raise VitlabError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_rgb(img: Image.Image, grey: bool = False) -> Image.Image:
    """Any Pillow mode -> RGB (or with grey, L: one 8-bit channel); alpha is dropped."""
    if img.mode.startswith("I"):
        # 16-bit grey (I;16, I;16B, or I from older Pillow): convert() clips at 255 instead of
        # scaling, so keep the high byte of each value.
        img = Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when such a palette goes straight to RGB
    return img.convert("L" if grey else "RGB")


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """An ImageFolder tree root/<class>/<image> -> (class names, [(file, class index)])."""
    if not root.is_dir():
        raise VitlabError(f"data folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VitlabError(f"data folder {root} has no class folders (expected {root}/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise VitlabError(f"class folder {root / name} has no images")
        samples += [(p, index) for p in files]
    return classes, samples


DECODER_VERSION = 3  # part of the decode-cache key: bump it when read_image's output changes


def load_image_folder(root: Path, image_size: int, cache_dir: Path, skip_bad_images: bool = False,
                      channels: int = 3) -> ImageSet:
    """Decode an ImageFolder tree once into memory; cached on disk so later runs skip decoding.

    The cache key covers every file's path, size and modification time, the image size and the
    decoder version, so a changed folder is decoded again rather than served stale. A damaged cache
    is noted on stderr and replaced.
    """
    classes, samples = list_image_folder(root)
    check_fits_in_memory(root, len(samples), channels, image_size)
    grey = "|grey" if channels == 1 else ""  # (RGB caches keep the key they had)
    key = hashlib.sha1(f"{DECODER_VERSION}|{root.resolve()}|{image_size}|{skip_bad_images}{grey}".encode())
    for path, _ in samples:
        stat = path.stat()
        key.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cache_file = cache_dir / f"folder-{key.hexdigest()[:20]}.pt"
    label_of = {str(path): label for path, label in samples}
    with made_by_one(cache_file, "decode cache"):
        decoded = (read_cache(cache_file, label_of, (channels, image_size, image_size), skip_bad_images)
                   if cache_file.exists() else None)
        if decoded is None:
            print(f"decoding {len(samples)} images in {root} (cached for later runs in {cache_dir})", file=sys.stderr)
            decoded = decode_folder(root, samples, image_size, skip_bad_images, channels)
            atomic_write(cache_file, lambda f: torch.save(decoded, f), "decode cache")
    paths = decoded["paths"]
    return ImageSet(decoded["images"], torch.tensor([label_of[p] for p in paths]), classes, paths)


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (Linux's MemAvailable); None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def decoded_bytes(count: int, channels: int, image_size: int) -> int:
    """The memory `count` images take decoded (uint8, channels x image_size x image_size each)."""
    return count * channels * image_size ** 2


def check_fits_in_memory(root: Path, count: int, channels: int, image_size: int):
    """Refuse, in a line, a folder whose decoded images would not fit in the free memory (rather than
    let the system kill the process halfway through decoding)."""
    need, free = decoded_bytes(count, channels, image_size), available_memory()
    if free is not None and need > free:
        raise VitlabError(f"data folder {root}: {count:,} images at {image_size} px take {need / 2**30:.1f} GiB in "
                          f"memory, more than the {free / 2**30:.1f} GiB free: train at a smaller side "
                          f"(model.image_size) or pack the folder (vitlab pack) and stream it (--data shards:DIR)")


def decode_folder(root: Path, samples: list[tuple[Path, int]], image_size: int, skip_bad_images: bool,
                  channels: int = 3) -> dict:
    """{'images': uint8 (N, channels, S, S), 'paths': [file of each image]}: the listed files decoded,
    straight into one tensor (no list of images to stack: the memory of the set once, not twice)."""
    images = torch.empty((len(samples), channels, image_size, image_size), dtype=torch.uint8)
    paths, bad = [], []
    for path, _ in progress(samples, len(samples), "decoding"):
        try:
            images[len(paths)] = read_image(path, image_size, channels)
        except VitlabError as e:
            if not skip_bad_images:
                raise VitlabError(f"{e} (use --skip-bad-images to skip unreadable images)") from None
            bad.append(path)
            continue
        paths.append(str(path))
    if bad:
        print(f"skipped {len(bad)} unreadable images, e.g. {bad[0]}", file=sys.stderr)
    if not paths:
        raise VitlabError(f"data folder {root} has no readable images")
    # Skipped images leave unused rows: a copy of the rest (torch.save would write a view's whole storage).
    return {"images": images[:len(paths)].clone() if bad else images, "paths": paths}


def read_cache(cache_file: Path, label_of: dict[str, int], shape: tuple[int, int, int],
               skip_bad_images: bool) -> dict | None:
    """The decoded folder from cache_file, or None (saying why on stderr) when the file is damaged."""
    try:
        decoded = torch.load(cache_file, weights_only=True)
    except Exception as e:  # torch raises many kinds of exception for damaged files
        problem = f"cannot be loaded: {type(e).__name__}"
    else:
        problem = cache_problem(decoded, label_of, shape, skip_bad_images)
    if problem:
        print(f"decode cache {cache_file} is damaged ({problem}); decoding the folder again", file=sys.stderr)
        return None
    return decoded


def cache_problem(decoded, label_of: dict[str, int], shape: tuple[int, int, int], skip_bad_images: bool) -> str | None:
    """What is wrong with a loaded decode cache for this folder listing, or None."""
    if not isinstance(decoded, dict) or set(decoded) != {"images", "paths"}:
        return "not a decode cache"
    images, paths = decoded["images"], decoded["paths"]
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape[1:] != shape:
        return "images of the wrong type or size"
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or len(paths) != len(images):
        return "its file list does not match its images"
    kept = set(paths)
    # The files in listing order, each once; all of them unless unreadable ones were skipped.
    if paths != [p for p in label_of if p in kept] or (not skip_bad_images and len(paths) != len(label_of)):
        return "its file list does not match the folder"
    return None


# --- synthetic data ------------------------------------------------------------------------------

def make_fake(num_images: int = 2000, num_classes: int = 10, image_size: int = 32, seed: int = 0) -> ImageSet:
    """Synthetic images that can be learned: each class is a coarse colour pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(templates, size=image_size, mode="nearest")  # (K, 3, H, W)
    labels = torch.randint(num_classes, (num_images,), generator=g)
    noise = 0.25 * torch.randn(num_images, 3, image_size, image_size, generator=g)
    images = (templates[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return ImageSet(images, labels, [f"class_{i}" for i in range(num_classes)])


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize a uint8 batch (N, C, H, W) to image_size x image_size (no-op when it already is)."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    x = F.interpolate(images.float(), size=image_size, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)
