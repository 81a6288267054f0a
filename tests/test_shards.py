"""Packing images as LitData chunks and streaming them back: the round trip is exact, an epoch sees
each image once, a run stopped part-way through an epoch resumes without repeating or missing one,
and bad inputs are one-line errors."""

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import lightning as L
import litdata
import pytest
import torch
from PIL import Image

from vitlab.data import shards
from vitlab.config import DataConfig
from vitlab.data.images import ImageSet, make_fake, read_image, split_indices
from vitlab.data.sources import open_source
from vitlab.errors import VitlabError
from tests.conftest import CLASS_COLOURS, write_image_folder
from tests.test_images import time_limit

CLASSES = sorted(CLASS_COLOURS)
SMALL_CHUNKS = 6000  # bytes: a few images a chunk, so that shuffling and resuming cross chunks


@pytest.fixture(autouse=True)
def no_hang():
    with time_limit(60, "this shards test"):
        yield


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """36 PNG images of 32 px in three classes, packed at 32 px in chunks of a few images."""
    root = write_image_folder(tmp_path_factory.mktemp("data") / "images")
    out = root.parent / "shards"
    return root, out, shards.pack_folder(root, out, 32, chunk_bytes=SMALL_CHUNKS)


def stored_items(out) -> dict[str, dict]:
    """The raw items of a pack by name, as written (no decoding)."""
    dataset = litdata.StreamingDataset(str(out))
    return {item["name"]: {**item, "image": bytes(item["image"])} for item in (dataset[i] for i in range(len(dataset)))}


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def streamed_names(loader) -> list[str]:
    return [name for _, _, names in loader for name in names]


def test_pack_round_trip_keeps_every_image_its_label_and_its_bytes(packed):
    root, out, manifest = packed
    items = stored_items(out)
    assert manifest.classes == CLASSES and manifest.count == len(items) == 36 and manifest.image_size == 32
    assert sorted(items) == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    for name, item in items.items():
        assert item["label"] == CLASSES.index(name.split("/")[0])
        assert item["image"] == (root / name).read_bytes()  # a PNG at the image size is kept as it is
    assert shards.read_manifest(str(out)) == manifest
    folder = ImageSet(torch.stack([read_image(root / n, 32) for n in items]), torch.zeros(36), CLASSES)
    assert sum(shards.train_mean_std(manifest, list(range(36))), ()) == pytest.approx(sum(folder.mean_std(), ()))


def test_streamed_pixels_are_the_folder_pixels_exactly(packed):
    root, out, _ = packed
    for images, labels, names in shards.shard_loader(shards.shard_dataset(str(out), 32, names=True), 8):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64
        for image, label, name in zip(images, labels, names):
            assert torch.equal(image, read_image(root / name, 32)) and label == CLASSES.index(name.split("/")[0])


def test_a_pack_loads_into_memory_for_evaluation(packed):
    root, out, manifest = packed
    _, held_out = shards.split(manifest, 0.25, seed=0)
    loaded = shards.load_shards(str(out), 32, held_out, num_workers=1)
    assert loaded.classes == CLASSES and len(loaded) == 9 and len(set(loaded.paths)) == 9
    names = list(stored_items(out))  # in pack order
    assert loaded.paths == [names[i] for i in held_out]
    for image, label, name in zip(loaded.images, loaded.labels, loaded.paths):
        assert torch.equal(image, read_image(root / name, 32)) and label == CLASSES.index(name.split("/")[0])


def test_resized_images_are_stored_as_png_and_decode_exactly(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=3, size=40)
    shards.pack_folder(root, tmp_path / "shards", 24)
    for name, item in stored_items(tmp_path / "shards").items():
        assert Image.open(io.BytesIO(item["image"])).format == "PNG"
        decoded = shards.decode_item(item, 24, False)[0]
        assert torch.equal(decoded, read_image(root / name, 24))


def test_jpeg_files_are_kept_as_they_are_and_png_becomes_jpeg_when_asked(tmp_path):
    jpegs = write_image_folder(tmp_path / "jpegs", per_class=3, fmt="jpg")
    shards.pack_folder(jpegs, tmp_path / "a", 32)
    assert all(item["image"] == (jpegs / name).read_bytes() for name, item in stored_items(tmp_path / "a").items())
    pngs = write_image_folder(tmp_path / "pngs", per_class=3)
    shards.pack_folder(pngs, tmp_path / "b", 32, jpeg_quality=90)
    assert all(Image.open(io.BytesIO(item["image"])).format == "JPEG" for item in stored_items(tmp_path / "b").values())


def test_an_in_memory_set_packs_exactly(tmp_path):
    fake = make_fake(num_images=20, num_classes=4, image_size=16)
    manifest = shards.pack_image_set(fake, tmp_path / "shards", "fake", num_workers=2)
    assert manifest.classes == fake.classes and manifest.count == 20 and manifest.image_size == 16
    assert sum(shards.train_mean_std(manifest, list(range(20))), ()) == pytest.approx(sum(fake.mean_std(), ()))
    loader = shards.shard_loader(shards.shard_dataset(str(tmp_path / "shards"), 16, names=True), 6)
    for images, labels, names in loader:
        for image, label, name in zip(images, labels, names):
            i = int(name.removeprefix("fake/"))
            assert torch.equal(image, fake.images[i]) and label == fake.labels[i]


def test_items_are_packed_in_a_random_order(packed):
    # LitData reads a chunk's items together: chunks of one class would make batches of one class.
    labels = [item["label"] for item in litdata.StreamingDataset(str(packed[1]))]
    assert labels != sorted(labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_streamed_epoch_sees_each_image_once_in_a_seeded_order(packed, num_workers):
    _, out, manifest = packed

    def epoch(seed):
        dataset = shards.shard_dataset(str(out), 32, shuffle=True, seed=seed, names=True)
        return streamed_names(shards.shard_loader(dataset, 5, num_workers))

    first = epoch(seed=1)
    assert sorted(first) == sorted(stored_items(out)) and len(first) == manifest.count
    assert epoch(seed=1) == first and epoch(seed=2) != first


def test_the_held_out_split_is_fixed_by_its_seed_and_disjoint_from_training(packed):
    _, out, manifest = packed
    train, held_out = shards.split(manifest, 0.25, seed=3)
    assert len(held_out) == 9 and sorted(train + held_out) == list(range(36))
    assert shards.split(manifest, 0.25, seed=3) == (train, held_out)
    assert len({tuple(shards.split(manifest, 0.25, seed)[1]) for seed in range(5)}) > 1
    seen_train = streamed_names(shards.shard_loader(shards.shard_dataset(str(out), 32, train, True, names=True), 4))
    seen_held_out = streamed_names(shards.shard_loader(shards.shard_dataset(str(out), 32, held_out, names=True), 4))
    assert len(set(seen_train)) == 27 == len(seen_train) and len(seen_held_out) == 9
    assert sorted(seen_train + seen_held_out) == sorted(stored_items(out))
    with pytest.raises(VitlabError, match="leaves no training"):
        split_indices(3, 0.1, 0)


def test_streamed_validation_under_several_processes_needs_a_batch_for_each(packed):
    """LitData gives each process whole batches of the held-out items and the last one the rest; a
    process with no batch would skip validation while the others wait for it: refused in one line."""
    from types import SimpleNamespace

    from vitlab.data.datamodule import ImageDataModule

    _, out, _ = packed
    data = ImageDataModule(DataConfig(source=f"shards:{out}", val_fraction=0.25, batch_size=4), 32)
    data.setup("fit")  # 9 held-out items
    data.trainer = SimpleNamespace(global_rank=0, world_size=2, strategy=None)
    assert len(data.val_dataloader()) >= 1  # 2 batches of 4, and the rest: enough for two processes
    data.trainer.world_size = 3
    with pytest.raises(VitlabError, match=r"^the 9 held-out images of shards:.* do not fill one batch of 4 on "
                                          r"each of 3 processes: lower data.batch_size or raise data.val_fraction$"):
        data.val_dataloader()


@pytest.mark.parametrize("workers_before, workers_after", [(0, 0), (2, 2), (2, 1)])
def test_a_loader_stopped_mid_epoch_resumes_with_the_images_it_had_not_given(packed, workers_before, workers_after):
    _, out, manifest = packed
    train, _ = shards.split(manifest, 0.25, seed=0)

    def loader(num_workers):
        dataset = shards.shard_dataset(str(out), 32, train, shuffle=True, seed=1, names=True)
        return shards.shard_loader(dataset, 4, num_workers)

    before, stopped = [], loader(workers_before)
    for step, (_, _, names) in enumerate(stopped):
        before += names
        if step == 2:  # three batches taken, then the process "dies"
            break
    state = stopped.state_dict()
    resumed = loader(workers_after)
    resumed.load_state_dict(state)
    after = streamed_names(resumed)
    assert len(before) == 12 and len(after) == 15 and sorted(before + after) == sorted(streamed_names(loader(0)))
    assert len(streamed_names(resumed)) == 27  # and the next epoch is whole again


class Recorder(L.LightningModule):
    """Records which images each training step saw (by their pixels); learns nothing of interest."""

    def __init__(self, loader):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.loader = loader
        self.seen = []

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        images, _ = batch
        self.seen += [fingerprint(image) for image in images]
        return self.layer(images.float().mean((1, 2, 3)).unsqueeze(1)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Crash(Exception):
    pass


class CrashAfter(L.Callback):
    """Saves a checkpoint after `steps` training steps, as vitlab's LastCheckpoint does, then dies."""

    def __init__(self, steps: int, path):
        self.steps, self.path = steps, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.steps:
            trainer.save_checkpoint(self.path)
            raise Crash


def test_lightning_resumes_from_a_mid_epoch_checkpoint_as_if_never_stopped(packed, tmp_path):
    _, out, _ = packed

    def module():
        return Recorder(shards.shard_loader(shards.shard_dataset(str(out), 32, shuffle=True, seed=5), 4, 1))

    def trainer(*callbacks):
        return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         default_root_dir=tmp_path)

    straight = module()
    trainer().fit(straight)
    crashed = module()
    with pytest.raises(Crash):
        trainer(CrashAfter(9 + 4, tmp_path / "mid.ckpt")).fit(crashed)  # four steps into the second epoch
    resumed = module()
    trainer().fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert len(straight.seen) == 2 * 36 and len(set(straight.seen[:36])) == 36 == len(set(straight.seen[36:]))
    assert crashed.seen + resumed.seen == straight.seen  # the same images in the same order, none twice


def test_a_remote_pack_streams_through_a_bounded_cache(packed, tmp_path):
    # "local:" makes LitData treat a folder as a bucket: chunks are copied into the cache to be read.
    _, out, manifest = packed
    assert shards.read_manifest(f"local:{out}") == manifest
    for size, kept in [("25GB", True), (1, False)]:
        cache = tmp_path / f"cache-{size}"
        dataset = shards.shard_dataset(f"local:{out}", 32, names=True, cache_dir=cache, max_cache_size=size)
        assert sorted(streamed_names(shards.shard_loader(dataset, 4))) == sorted(stored_items(out))
        assert bool(list(cache.rglob("chunk-*.bin"))) == kept  # a cache too small for a chunk drops each after use


def test_bad_inputs_are_one_line_errors(packed, tmp_path):
    root, out, _ = packed
    (tmp_path / "chunks").mkdir()
    (tmp_path / "chunks" / "index.json").write_text((out / "index.json").read_text())
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "index.json").write_text("{}")
    (tmp_path / "damaged" / "vitlab.json").write_text("{not json")
    for location, message in [(tmp_path / "nowhere", "does not exist"), (tmp_path, "no index.json"),
                              (tmp_path / "chunks", "no vitlab.json"), (tmp_path / "damaged", "is damaged"),
                              (f"local:{tmp_path / 'nowhere'}", "cannot read")]:
        with pytest.raises(VitlabError, match=message) as error:
            shards.read_manifest(str(location))
        assert "\n" not in str(error.value)
    shutil.copytree(out, tmp_path / "newer")
    newer = {**json.loads((out / "vitlab.json").read_text()), "format": 99}
    (tmp_path / "newer" / "vitlab.json").write_text(json.dumps(newer))
    with pytest.raises(VitlabError, match="newer vitlab"):
        shards.read_manifest(str(tmp_path / "newer"))
    with pytest.raises(VitlabError, match="not an empty folder"):
        shards.pack_folder(root, out, 32)
    with pytest.raises(VitlabError, match="does not exist"):
        shards.pack_folder(tmp_path / "nowhere", tmp_path / "new", 32)


def test_an_unreadable_image_stops_packing_unless_skipped(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", per_class=2)
    (root / "red" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(VitlabError, match=r"cannot read image .*broken.png.*--skip-bad-images"):
        shards.pack_folder(root, tmp_path / "shards", 32)
    assert not (tmp_path / "shards").exists()  # nothing half-written is left behind
    manifest = shards.pack_folder(root, tmp_path / "shards", 32, skip_bad_images=True)
    assert manifest.count == 6 and "skipped 1 unreadable images" in capsys.readouterr().err
    assert json.loads((tmp_path / "shards" / "vitlab.json").read_text())["count"] == 6


def test_pack_then_train_eval_and_held_out_through_the_cli(tmp_path, capsys):
    from tests.test_cli import TINY, run_cli

    images = write_image_folder(tmp_path / "images", per_class=12)
    code, out, _ = run_cli(capsys, "pack", f"folder:{images}", "--out", tmp_path / "packed")
    assert code == 0 and "packed 36 images of 3 classes" in out
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", f"shards:{tmp_path / 'packed'}", "--run-dir", run_dir,
                           "--max-epochs", "2", "--val-fraction", "0.25", *TINY, "data.batch_size=4")
    assert code == 0 and "held-out accuracy" in out
    with open(run_dir / "metrics.csv") as f:
        last_row = list(csv.DictReader(f))[-1]
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--data",
                           f"shards:{tmp_path / 'packed'}", "--held-out", "--val-fraction", "0.25", "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == 9
    assert result["accuracy"] == pytest.approx(float(last_row["val_acc"]), abs=1e-6)
    code, _, err = run_cli(capsys, "pack", f"shards:{tmp_path / 'packed'}", "--out", tmp_path / "again")
    assert code == 1 and "is packed already" in err
    # predict streams a pack too, naming each item as it was packed.
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", run_dir / "checkpoints" / "last.ckpt", "--json",
                           f"shards:{tmp_path / 'packed'}", images / "red" / "0.png")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 37 and lines[-1]["path"] == str(images / "red" / "0.png")
    assert {line["path"] for line in lines[:-1]} == {f"{c}/{i}.png" for c in CLASS_COLOURS for i in range(12)}


def test_larger_images_stream_at_128_pixels(tmp_path, capsys):
    from tests.test_cli import TINY, run_cli

    images = write_image_folder(tmp_path / "images", per_class=6, size=128)
    assert run_cli(capsys, "pack", f"folder:{images}", "--out", tmp_path / "packed", "--image-size", "128")[0] == 0
    code, _, _ = run_cli(capsys, "train", "--data", f"shards:{tmp_path / 'packed'}", "--run-dir", tmp_path / "run",
                         "--max-epochs", "1", *TINY, "data.batch_size=4", "model.image_size=128", "model.patch_size=16")
    assert code == 0


@pytest.mark.parametrize("skip", [False, True])
def test_a_folder_and_its_pack_hold_out_the_same_images_and_normalise_alike(tmp_path, skip):
    """One split rule and one statistics rule: packing a folder changes neither which images are held
    out nor the normalisation, which comes from the training images alone (with an unreadable image
    skipped too)."""
    root = write_image_folder(tmp_path / "images", per_class=10)
    if skip:
        (root / "green" / "0b.png").write_bytes(b"not an image")  # lists between green/0.png and green/1.png
    shards.pack_folder(root, tmp_path / "packed", 32, skip_bad_images=skip)
    for seed in (0, 1):
        config = DataConfig(source=f"folder:{root}", val_fraction=0.3, split_seed=seed, skip_bad_images=skip,
                            cache_dir=str(tmp_path / "cache"))
        folder_train, folder_val, *folder_stats = open_source(config, 32).train_val()
        packed = open_source(DataConfig(source=f"shards:{tmp_path / 'packed'}", val_fraction=0.3, split_seed=seed), 32)
        train, val, *stats = packed.train_val()
        held_out = packed.held_out()
        assert sorted(held_out.paths) == sorted(str(Path(p).relative_to(root)) for p in folder_val.paths)
        assert len(train) == len(folder_train) and len(val) == len(folder_val) == 9
        assert sum(stats, ()) == pytest.approx(sum(folder_stats, ())) != sum(held_out.mean_std(), ())


def test_a_pack_of_an_older_format_is_refused(packed, tmp_path):
    _, out, _ = packed
    shutil.copytree(out, tmp_path / "older")
    older = {**json.loads((out / "vitlab.json").read_text()), "format": 1}
    (tmp_path / "older" / "vitlab.json").write_text(json.dumps(older))
    with pytest.raises(VitlabError, match="packed by an older vitlab .format 1.*pack the images again"):
        shards.read_manifest(str(tmp_path / "older"))
