"""Reading every kind of image file, damaged ones included; the folder decode cache under races and
damage; pixel statistics in bounded memory; progress bars; predictions streamed batch by batch."""

import contextlib
import io
import multiprocessing
import random
import signal
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vitlab.data import images as image_files
from vitlab.data.images import ImageSet, load_image_folder, read_image
from vitlab.errors import VitlabError
from vitlab.evaluation import evaluate
from vitlab.inference import predict
from vitlab.progress import progress
from tests.conftest import CLASS_COLOURS, write_image_folder

REPO = Path(__file__).parents[1]
RED = (200, 30, 40)


def palette_image(transparency) -> Image.Image:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([*RED, 0, 0, 0])
    img.info["transparency"] = transparency
    return img


def save_red_then_blue_gif(path: Path):
    first, second = Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), (0, 0, 255))
    first.save(path, save_all=True, append_images=[second])


@pytest.mark.parametrize("name, write, colour", [
    ("grey.png", lambda p: Image.new("L", (4, 4), 77).save(p), (77, 77, 77)),
    ("bilevel.png", lambda p: Image.new("1", (4, 4), 1).save(p), (255, 255, 255)),
    ("palette.png", lambda p: palette_image(1).save(p), RED),
    # Alpha per palette entry: Pillow warns when such a palette is converted straight to RGB.
    ("palette-alpha.png", lambda p: palette_image(b"\x80\x00").save(p), RED),
    ("rgba.png", lambda p: Image.new("RGBA", (4, 4), (*RED, 7)).save(p), RED),
    ("grey-alpha.png", lambda p: Image.new("LA", (4, 4), (77, 7)).save(p), (77, 77, 77)),
    ("cmyk.tiff", lambda p: Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(p), (255, 0, 0)),
    # 16-bit grey is scaled to 8 bits (0xABCD -> 0xAB), not clipped to white.
    ("grey16.png", lambda p: Image.fromarray(np.full((4, 4), 0xABCD, np.uint16)).save(p), (0xAB,) * 3),
    ("grey16.tiff", lambda p: Image.fromarray(np.full((4, 4), 0xABCD, np.uint16)).save(p), (0xAB,) * 3),
    ("grey32.tiff", lambda p: Image.fromarray(np.full((4, 4), 0xABCD, np.int32)).save(p), (0xAB,) * 3),
    ("lossless.webp", lambda p: Image.new("RGB", (4, 4), RED).save(p, lossless=True), RED),
    ("rgb.bmp", lambda p: Image.new("RGB", (4, 4), RED).save(p), RED),
    ("rgb.tiff", lambda p: Image.new("RGB", (4, 4), RED).save(p), RED),
    ("animation.gif", save_red_then_blue_gif, RED),  # the first frame
])
def test_every_kind_of_image_reads_as_the_colours_it_shows(tmp_path, name, write, colour):
    path = tmp_path / name
    write(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(path, 4)
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 4)
    assert image.flatten(1).T.unique(dim=0).tolist() == [list(colour)]


@pytest.mark.parametrize("orientation, corner", [(3, (-1, -1)), (6, (0, -1)), (8, (-1, 0))])
def test_exif_rotated_photos_are_read_upright(tmp_path, orientation, corner):
    # Blue with a red top-left quarter; viewers turn it by the EXIF orientation: 3 half a turn, 6 a
    # quarter turn clockwise, 8 a quarter turn anticlockwise.
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[..., 2] = 255
    pixels[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "photo.jpg", 8).int()
    red = (image[0] > 150) & (image[2] < 100)  # (8, 8)
    assert red[corner] and not red[0, 0]


@pytest.mark.parametrize("width, height", [(48, 16), (16, 48)])
def test_a_non_square_image_is_resized_on_its_shorter_side_and_centre_cropped(tmp_path, width, height):
    # Three equal bands along the long side, red | green | blue: the square kept is the green middle,
    # whole (not squashed, which would keep a third of each colour).
    pixels = np.zeros((height, width, 3), np.uint8)
    third = max(width, height) // 3
    for band, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if width > height:
            pixels[:, band * third:(band + 1) * third] = colour
        else:
            pixels[band * third:(band + 1) * third] = colour
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png", 8)
    assert image.shape == (3, 8, 8)
    assert image[1].min() >= 200 and image[0].max() <= 40 and image[2].max() <= 40  # bicubic blurs the edges a little


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_image(size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def assert_names_file_on_one_line(error: VitlabError, path: Path):
    message = str(error)
    assert message.startswith(f"cannot read image {path}: ") and "\n" not in message, message


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    jpeg, png = encode(noise_image(64), "JPEG"), encode(noise_image(64), "PNG")
    broken = {"empty.jpg": b"", "text.png": b"hello, not an image\n",
              "truncated.jpg": jpeg[:len(jpeg) // 2], "truncated.png": png[:len(png) // 2]}
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VitlabError) as error:
            read_image(tmp_path / name, 8)
        assert_names_file_on_one_line(error.value, tmp_path / name)
    # With LOAD_TRUNCATED_IMAGES a cut-off JPEG would decode, its missing half grey: nothing that
    # vitlab imports (Lightning included) may turn it on.
    import vitlab.training.run  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # 40 x 40 is over the limit, where Pillow only warns; 100 x 100 is over twice it, where it refuses.
    for size in (40, 100):
        path = tmp_path / f"{size}.png"
        Image.new("L", (size, size)).save(path)
        with pytest.raises(VitlabError, match="decompression bomb") as error:
            read_image(path, 8)
        assert_names_file_on_one_line(error.value, path)


def damaged_copies(data: bytes, other: bytes, rng: random.Random) -> dict[str, bytes]:
    """Ways a file gets damaged: cut short, bytes overwritten, another format's header in front,
    a run of zeros, a part repeated."""
    i, j = sorted(rng.sample(range(1, len(data)), 2))
    overwritten = bytearray(data)
    for k in rng.sample(range(len(data)), rng.randint(1, 8)):
        overwritten[k] = rng.randrange(256)
    header = rng.randint(8, 64)
    return {"cut": data[:i], "overwritten": bytes(overwritten), "spliced": other[:header] + data[header:],
            "zeroed": data[:i] + bytes(j - i) + data[j:], "repeated": data[:j] + data[i:j] + data[j:]}


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Fail the test when the block runs longer than seconds (SIGALRM: a hang in Python code too)."""
    def fail(*_):
        pytest.fail(f"{what} took more than {seconds} s")  # raises a BaseException: no except catches it

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_damaged_files_decode_or_fail_cleanly(tmp_path):
    """Seeded fuzzing: every damaged file is an image or a one-line VitlabError, quickly."""
    rng = random.Random(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation (kept by PNG, JPEG, WebP and TIFF), so damage reaches the EXIF reader too
    encoded = {fmt: encode(noise_image(), fmt, exif=exif) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")}
    decoded = refused = 0
    for round_ in range(10):
        for fmt, data in encoded.items():
            other = encoded[rng.choice([f for f in encoded if f != fmt])]
            for damage, damaged in damaged_copies(data, other, rng).items():
                path = tmp_path / f"{round_}-{damage}.{fmt.lower()}"
                path.write_bytes(damaged)
                with time_limit(5, f"reading {path.name}"):
                    try:
                        image = read_image(path, 16)
                    except VitlabError as e:
                        assert_names_file_on_one_line(e, path)
                        refused += 1
                        continue
                assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
                decoded += 1
    print(f"fuzz: {decoded + refused} damaged files, {decoded} decoded, {refused} refused with a clear error")
    assert decoded + refused == 300


def fail_to_decode(*args):
    raise AssertionError("decoded again despite the cache")


def decode_and_note(root: Path, cache: Path, notes: Path):
    """In a child process: load root through the cache, noting in `notes` each time it is decoded."""
    decode = image_files.decode_folder

    def decode_noted(*args):
        with open(notes, "a") as f:
            f.write("decoded\n")
        return decode(*args)

    image_files.decode_folder = decode_noted
    load_image_folder(root, 16, cache)


def test_two_processes_decoding_one_folder_at_once_leave_one_valid_cache(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    cache, notes = tmp_path / "cache", tmp_path / "notes"
    spawn = multiprocessing.get_context("spawn")
    children = [spawn.Process(target=decode_and_note, args=(root, cache, notes)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    hung = [child for child in children if child.is_alive()]
    for child in hung:
        child.kill()
    assert not hung and [child.exitcode for child in children] == [0, 0]
    assert notes.read_text().splitlines() == ["decoded"]  # one decoded, the other waited and read the cache
    [cache_file] = cache.glob("*.pt")
    assert not list(cache.glob("*.tmp"))  # no temporary file left behind
    monkeypatch.setattr(image_files, "read_image", fail_to_decode)
    assert len(load_image_folder(root, 16, cache)) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated", "old layout", "wrong size", "images missing",
                                    "lengths differ"])
def test_damaged_decode_cache_is_noted_and_replaced(tmp_path, capsys, monkeypatch, damage):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    cache = tmp_path / "cache"
    fresh = load_image_folder(root, 16, cache)
    [cache_file] = cache.glob("*.pt")
    whole = cache_file.read_bytes()
    images, paths = fresh.images, fresh.paths
    replacement = {
        "garbage": b"\x80\x02 not a torch file " * 50,
        "truncated": whole[:len(whole) // 2],
        "old layout": {"images": images, "labels": fresh.labels, "classes": fresh.classes, "paths": paths},
        "wrong size": {"images": images[..., :8, :8], "paths": paths},
        "images missing": {"images": images[1:], "paths": paths[1:]},
        "lengths differ": {"images": images, "paths": paths[1:]},
    }[damage]
    if isinstance(replacement, bytes):
        cache_file.write_bytes(replacement)
    else:
        torch.save(replacement, cache_file)
    capsys.readouterr()

    again = load_image_folder(root, 16, cache)
    assert torch.equal(again.images, fresh.images) and again.paths == paths
    assert torch.equal(again.labels, fresh.labels)
    [note] = [line for line in capsys.readouterr().err.splitlines() if " is damaged (" in line]
    assert note.startswith(f"decode cache {cache_file} is damaged (")
    assert note.endswith("); decoding the folder again")
    # The cache was rewritten whole: the next load decodes nothing.
    monkeypatch.setattr(image_files, "read_image", fail_to_decode)
    assert torch.equal(load_image_folder(root, 16, cache).images, fresh.images)


def test_mean_std_in_chunks_equals_the_whole_set_formula():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = ImageSet(images, torch.zeros(50), ["a"]).mean_std(chunk_pixels=1000)  # 6 images a chunk
    x = images.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W): the float copy it avoids
    np.testing.assert_allclose(mean, x.mean(1).tolist(), atol=1e-6)
    np.testing.assert_allclose(std, x.std(1).tolist(), atol=1e-6)


MEAN_STD_PEAK_MEMORY = """
import resource, torch
from vitlab.data.images import ImageSet
images = torch.empty(4096, 3, 64, 64, dtype=torch.uint8).random_(0, 256)  # 48 MiB
image_set = ImageSet(images, torch.zeros(len(images), dtype=torch.long), ["a"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image_set.mean_std()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_mean_std_makes_no_copy_of_the_whole_set():
    # In a fresh process, so that its peak memory is its own; a float copy would add 192 MiB.
    out = subprocess.run([sys.executable, "-c", MEAN_STD_PEAK_MEMORY], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    grown_mib = int(out.stdout) / 1024
    assert grown_mib < 24, f"peak memory grew by {grown_mib:.0f} MiB for a 48 MiB image set"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_on_a_terminal_only(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress(range(3), 3, "counting")) == [0, 1, 2]
    load_image_folder(write_image_folder(tmp_path / "imgs", per_class=2), 16, tmp_path / "cache")
    evaluate(ColourModel(), ImageSet(torch.zeros(1200, 3, 8, 8, dtype=torch.uint8), torch.zeros(1200, dtype=torch.long),
                                     list(CLASS_COLOURS)))
    shown = terminal.getvalue()
    assert "counting: 100%" in shown and "3/3" in shown
    assert "decoding: 100%" in shown and "6/6" in shown
    assert "evaluating: 100%" in shown and "3/3" in shown  # 1,200 images in batches of 500

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(progress(range(3), 3, "counting")) == [0, 1, 2]
    assert pipe.getvalue() == ""


class ColourModel:
    """Stands in for a trained model: the logits of an image are its mean red, green and blue."""
    class_names = list(CLASS_COLOURS)  # red, green, blue
    image_mean, image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    config = SimpleNamespace(image_size=8, in_channels=3)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3)) * 10  # (B, 3, H, W) -> (B, 3)


def test_predict_yields_each_batch_before_reading_the_next(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    paths = sorted(root.rglob("*.png"))[:4] + [broken]  # blue, blue, green, green, broken
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    results = predict(ColourModel(), paths, top_k=1, batch_size=2)
    assert [next(results)["top"][0]["class"] for _ in range(4)] == ["blue", "blue", "green", "green"]
    with pytest.raises(VitlabError, match="broken.png"):
        next(results)
    assert "predicting" in terminal.getvalue()


def test_predict_memory_does_not_grow_with_the_number_of_images(tmp_path):
    paths = sorted(write_image_folder(tmp_path / "imgs", per_class=4, size=8).rglob("*.png"))

    def peak_memory(paths: list[Path]) -> int:
        tracemalloc.start()
        for _ in predict(ColourModel(), paths, batch_size=8):
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    peak_memory(paths)  # first use: imports and caches
    few, many = peak_memory(paths * 4), peak_memory(paths * 16)
    assert many < 1.5 * few, f"peak memory {few} bytes for {4 * len(paths)} images, {many} for {16 * len(paths)}"
