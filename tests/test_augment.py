"""The batched augmentations against torchvision's per-image ones, and their randomness per image."""

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.data.augment import (
    CIFAR10_POLICY,
    OPS,
    RAND_AUGMENT_OPS,
    SPACE,
    _magnitude,
    apply_op,
    auto_augment_cifar10,
    flip_crop_rotate,
    mix,
    rand_augment,
    random_resized_crop_flip,
    tutorial_geometry,
)
from vitlab.errors import VitlabError

# torchvision's own dispatch from op name and magnitude to v2.functional (the code its AutoAugment and
# RandAugment run), nearest interpolation and fill 0 as their defaults.
_TORCHVISION = v2.RandAugment()


def reference(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    return _TORCHVISION._apply_image_or_video_transform(
        image, name, magnitude, interpolation=v2.InterpolationMode.NEAREST, fill=_TORCHVISION._fill)


def sample_images(channels: int = 3, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """Noise over the full range, noise over a narrow range (which autocontrast and equalize stretch), a
    smooth pattern and a constant image (which they keep)."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    smooth = (127 + 100 * torch.sin(x / 3.0 + torch.arange(channels)[:, None, None]) * torch.cos(y / 5.0)).round()
    return torch.cat((
        torch.randint(0, 256, (3, channels, *size), generator=g),
        torch.randint(60, 190, (2, channels, *size), generator=g),
        smooth[None],
        torch.full((1, channels, *size), 77),
    )).to(torch.uint8)


def apply_one(images: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    B = len(images)
    return apply_op(images, torch.full((B,), OPS.index(name)), torch.full((B,), magnitude))


COLOUR_CASES = [(name, m) for name in ("Brightness", "Color", "Contrast", "Sharpness")
                for m in (-0.9, -0.3, 0.0, 0.27, 0.9)]
COLOUR_CASES += [("Posterize", bits) for bits in (0.0, 4.0, 5.0, 7.0, 8.0)]
COLOUR_CASES += [("Solarize", t) for t in (0.0, 0.3, 0.7, 1.0)]
COLOUR_CASES += [(name, 0.0) for name in ("Identity", "AutoContrast", "Equalize", "Invert")]


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name, magnitude", COLOUR_CASES)
def test_colour_ops_match_torchvision(name, magnitude, channels):
    """Within 1 level, at under 1% of the values (torchvision truncates blends to uint8: rounding in the
    last float bit may move a value by 1); on this CPU they are equal."""
    images = sample_images(channels)
    expected = torch.stack([reference(image, name, magnitude) for image in images])
    difference = (apply_one(images, name, magnitude).int() - expected.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


GEOMETRIC_CASES = [(name, m) for name in ("ShearX", "ShearY") for m in (-0.3, -0.1, 0.01, 0.27)]
GEOMETRIC_CASES += [(name, m) for name in ("TranslateX", "TranslateY") for m in (-14.5, -3.0, 3.7, 9.0)]
GEOMETRIC_CASES += [("Rotate", m) for m in (-30.0, -7.0, 1.0, 13.0, 30.0)]


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("name, magnitude", GEOMETRIC_CASES)
def test_geometric_ops_match_torchvision(name, magnitude, size):
    """Nearest resampling at the same sample points: equal but at under 0.5% of the pixels (a point on a
    rounding boundary may go either way by the last float bit); on this CPU all are equal. A non-square
    size checks the centre and the shears' origin (the top-left corner, as torchvision's centre=[0, 0])."""
    images = sample_images(3, size)
    expected = torch.stack([reference(image, name, magnitude) for image in images])
    different = (apply_one(images, name, magnitude) != expected).any(dim=1)
    assert different.float().mean() < 0.005


def test_each_image_takes_its_own_op_and_magnitude():
    """One batch where every image has a different op and magnitude equals each image done alone."""
    base = sample_images()[[0, 3, 5]]  # full-range noise, narrow noise, smooth
    cases = [(name, sign * _magnitude(name, 9 + i % 7, 31, 32, 32)) for i, name in enumerate(OPS)
             for sign in (1, -1) if sign == 1 or SPACE[name][1]]
    images = base[torch.arange(len(cases)) % len(base)]
    op = torch.tensor([OPS.index(name) for name, _ in cases])
    out = apply_op(images, op, torch.tensor([m for _, m in cases]))
    for image, result, (name, m) in zip(images, out, cases):
        assert (result.int() - reference(image, name, m).int()).abs().max() <= 1, (name, m)


def test_magnitudes_and_policy_are_torchvisions():
    """Each op's magnitude at every bin equals torchvision's table (RandAugment's 31 bins, AutoAugment's 10),
    fractional bins interpolate, and the CIFAR-10 policy is torchvision's."""
    assert set(RAND_AUGMENT_OPS) == set(v2.RandAugment._AUGMENTATION_SPACE)
    assert set(OPS) - set(RAND_AUGMENT_OPS) == {"Invert"}
    for space, bins in ((v2.RandAugment._AUGMENTATION_SPACE, 31), (v2.AutoAugment._AUGMENTATION_SPACE, 10)):
        for name, (magnitudes, signed) in space.items():
            assert SPACE[name][1] == signed
            values = magnitudes(bins, 24, 40)
            for index in range(bins):
                expected = 0.0 if values is None else float(values[index])
                assert _magnitude(name, index, bins, 24, 40) == expected, (name, index)
    assert _magnitude("Rotate", 4.5, 31, 32, 32) == pytest.approx(4.5)
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    assert list(CIFAR10_POLICY) == [tuple(sub_policy) for sub_policy in policy]


def outcomes(image: torch.Tensor, steps) -> list[torch.Tensor]:
    """Every image that a sequence of (op name, magnitude, may be skipped) steps can make of image: each step
    applied or not, with either sign where signed."""
    images = [image]
    for name, magnitude, optional in steps:
        signs = (1, -1) if SPACE[name][1] else (1,)
        made = [reference(x, name, s * magnitude) for x in images for s in signs]
        images = made + (images if optional else [])
    return images


def matches(results: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """(B, len(candidates)): which candidates each of results (B, C, H, W) equals, within 1 level."""
    return torch.stack([(results.short() - c.short()).abs().flatten(1).amax(dim=1) <= 1 for c in candidates], dim=1)


def test_rand_augment_draws_an_op_and_a_sign_per_image():
    """Every output of a batch of one image is that image under one of RandAugment's ops with either
    sign, and the batch uses every op and both signs."""
    image = sample_images()[3]  # narrow noise: every op changes it
    torch.manual_seed(0)
    out = rand_augment(image.expand(400, -1, -1, -1), num_ops=1, magnitude=9)
    candidates = [(name, s) for name in RAND_AUGMENT_OPS for s in ((1, -1) if SPACE[name][1] else (1,))]
    made = [reference(image, name, s * _magnitude(name, 9, 31, 32, 32)) for name, s in candidates]
    found = matches(out, made)  # (400, len(candidates))
    assert found.any(dim=1).all(), "an output that no single op makes"
    assert found.any(dim=0).all(), "an op or sign never drawn"


def test_rand_augment_is_seeded_and_checks_its_arguments():
    images = sample_images()
    torch.manual_seed(1)
    first = rand_augment(images, 2, 14.5)
    torch.manual_seed(1)
    assert torch.equal(rand_augment(images, 2, 14.5), first)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert not torch.equal(rand_augment(images, 2, 14.5), first)
    assert torch.equal(rand_augment(images, 0, 9), images)
    with pytest.raises(VitlabError, match="-1"):
        rand_augment(images, -1, 9)
    with pytest.raises(VitlabError, match="31"):
        rand_augment(images, 2, 31)


def test_auto_augment_follows_the_cifar10_policy():
    """Every output is one that some sub-policy makes (each op applied or not, either sign), and images
    left as they were are as frequent as the policy's probabilities say."""
    image = sample_images()[3]
    B = 600
    torch.manual_seed(0)
    out = auto_augment_cifar10(image.expand(B, -1, -1, -1))
    assert out.shape == (B, 3, 32, 32) and out.dtype == torch.uint8
    made = [x for sub_policy in CIFAR10_POLICY
            for x in outcomes(image, [(name, _magnitude(name, index or 0, 10, 32, 32), True)
                                      for name, _, index in sub_policy])]
    assert matches(out, made).any(dim=1).all()
    # On this image every op changes it, so an image is kept when neither of its policy's ops applies.
    kept = (out == image).flatten(1).all(dim=1).float().mean()
    expected = sum((1 - p1) * (1 - p2) for (_, p1, _), (_, p2, _) in CIFAR10_POLICY) / len(CIFAR10_POLICY)
    assert abs(kept - expected) < 4 * math.sqrt(expected * (1 - expected) / B)
    assert len(torch.unique(out.flatten(1), dim=0)) > 40
    torch.manual_seed(0)
    assert torch.equal(auto_augment_cifar10(image.expand(B, -1, -1, -1)), out)


def test_tutorial_geometry_is_torchvisions_flip_crop_rotation():
    """With fixed parameters, the one bilinear resampling is torchvision's flip, resized crop and (nearest)
    rotation up to interpolation: the same pixels uncovered (0), a mean difference of a few levels on a
    smooth image (a mirrored or reversed rotation would differ by about 50)."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    image = 127 + 100 * torch.sin(x / 6.0 + torch.arange(3)[:, None, None]) * torch.cos(y / 8.0)
    image = image.round().to(torch.uint8)
    params = [(False, 0, 0, 32, 32, 0.0), (True, 2, 1, 29, 27, 0.0), (False, 3, 0, 28, 30, 25.0),
              (True, 0, 4, 30, 28, -17.0)]
    for flip, top, left, height, width, angle in params:
        theirs = TF.horizontal_flip(image) if flip else image
        theirs = TF.resized_crop(theirs, top, left, height, width, [32, 32], antialias=True)
        theirs = TF.rotate(theirs, angle, interpolation=v2.InterpolationMode.NEAREST)
        box = (torch.tensor([float(v)]) for v in (top, left, height, width))
        ours = flip_crop_rotate(image[None], torch.tensor([flip]), *box, torch.tensor([angle]))[0]
        assert torch.equal(ours == 0, theirs == 0)
        assert (ours.float() - theirs.float()).abs().mean() < 4, (flip, top, left, height, width, angle)


def test_tutorial_geometry_varies_within_its_ranges():
    B, size = 400, 32
    torch.manual_seed(0)
    # A white frame: rotation by at most 30° of a crop of at least ~72% of each side uncovers only corners.
    out = tutorial_geometry(torch.full((B, 1, size, size), 255, dtype=torch.uint8))
    covered = out.float().mean(dim=(1, 2, 3)) / 255
    assert covered.min() > 0.8 and (covered < 0.99).float().mean() > 0.5
    # A white centre square (half the side) stays white in the middle eighth: crops move the centre by
    # at most ~8% of the side and the rotation keeps it.
    centre = torch.zeros(B, 1, size, size, dtype=torch.uint8)
    centre[..., 8:24, 8:24] = 255
    middle = tutorial_geometry(centre)[..., 14:18, 14:18]
    assert (middle == 255).all()
    # Left half white: about half the images are mirrored; all images differ.
    left = torch.zeros(B, 1, size, size, dtype=torch.uint8)
    left[..., :16] = 255
    out = tutorial_geometry(left)
    mirrored = (out[..., 16:].float().mean(dim=(1, 2, 3)) > out[..., :16].float().mean(dim=(1, 2, 3))).float()
    assert 0.4 < mirrored.mean() < 0.6
    assert len(torch.unique(out.flatten(1), dim=0)) == B
    assert out.shape == left.shape and out.dtype == torch.uint8


def test_mixup_blends_with_the_reversed_batch():
    torch.manual_seed(0)
    x, labels = torch.randn(8, 3, 4, 4), torch.arange(8)
    images, targets = mix(x, labels, 10, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = targets[0, labels[0]]
    assert 0 < lam < 1 and torch.allclose(targets.sum(dim=1), torch.ones(8))
    assert torch.equal(targets[torch.arange(8), labels], lam.expand(8))
    assert torch.allclose(targets[torch.arange(8), labels.flip(0)], 1 - lam)
    assert torch.allclose(images, lam * x + (1 - lam) * x.flip(0), atol=1e-6)


def test_cutmix_pastes_a_box_of_the_reversed_batch():
    torch.manual_seed(0)
    for _ in range(5):
        x, labels = torch.randn(6, 3, 16, 16), torch.tensor([3, 1, 4, 1, 5, 9])
        images, targets = mix(x, labels, 10, mixup_alpha=0.0, cutmix_alpha=1.0)
        pasted = images != x  # (6, 3, 16, 16): the box, in every image and channel alike
        assert torch.equal(images[pasted], x.flip(0)[pasted]) and (pasted == pasted[:1, :1]).all()
        rows, cols = pasted[0, 0].any(dim=1), pasted[0, 0].any(dim=0)
        assert pasted[0, 0].sum() == rows.sum() * cols.sum()  # a rectangle
        area = pasted[0, 0].float().mean()
        expected = torch.zeros(6, 10)
        expected[torch.arange(6), labels] += 1 - area
        expected[torch.arange(6), labels.flip(0)] += area
        assert torch.allclose(targets, expected) and torch.allclose(targets.sum(dim=1), torch.ones(6))


def test_mix_takes_mixup_or_cutmix_per_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    cutmix = [bool(((images == x) | (images == x.flip(0))).all()) for images, _ in
              (mix(x, torch.arange(4), 4, 1.0, 1.0) for _ in range(40))]
    assert 10 < sum(cutmix) < 30
    with pytest.raises(VitlabError, match="0"):
        mix(x, torch.arange(4), 4, 0.0, 0.0)


def test_no_value_is_read_back_from_the_device():
    """On meta tensors, which hold no values, any read of one on the host (item, tolist, bool, int,
    nonzero, a boolean mask, unique) raises: so on a GPU none of these waits for it. mix's lam and box
    are drawn on the CPU, apart from its images and labels."""
    images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device="meta")
    for out in (rand_augment(images, 2, 9), auto_augment_cifar10(images), tutorial_geometry(images),
                random_resized_crop_flip(images, 0.25),
                apply_op(images, torch.zeros(16, dtype=torch.long, device="meta"), torch.zeros(16, device="meta"))):
        assert out.shape == images.shape and out.dtype == torch.uint8
    labels = torch.empty(16, dtype=torch.long, device="meta")
    for _ in range(10):  # mixup and CutMix both
        mixed, targets = mix(images.float(), labels, 10, 0.8, 1.0)
        assert mixed.shape == images.shape and targets.shape == (16, 10)
    with pytest.raises(Exception):
        images.sum().item()  # the check itself: a read does raise


def drawn_geometry(monkeypatch, augmentation, images: torch.Tensor) -> dict:
    """The parameters each image of `images` draws in `augmentation` (a name in vitlab.data.augment), as
    it hands them to flip_crop_rotate: flip, top, left, h, w, angle, each (B,)."""
    from vitlab.data import augment

    drawn = {}
    monkeypatch.setattr(augment, "flip_crop_rotate",
                        lambda images, flip, top, left, height, width, angle=None: drawn.update(
                            flip=flip, top=top, left=left, h=height, w=width, angle=angle) or images)
    torch.manual_seed(0)
    augmentation(images)
    return drawn


def test_tutorial_geometry_draws_crops_and_angles_as_torchvision(monkeypatch):
    # The parameters each image draws: RandomResizedCrop's box (area 0.8-1 of the image, aspect 0.9-1.1,
    # anywhere it fits, uniformly) and RandomRotation's angle (uniform in ±30°).
    from vitlab.data import augment

    drawn = drawn_geometry(monkeypatch, augment.tutorial_geometry, torch.zeros(4000, 3, 32, 32, dtype=torch.uint8))
    top, left, h, w, angle = drawn["top"], drawn["left"], drawn["h"], drawn["w"], drawn["angle"]
    assert (h <= 32).all() and (w <= 32).all() and (h < 32).any() and (w < 32).any()
    area = h * w / 1024
    assert area.min() > 0.8 - 0.04 and area.max() <= 1.0 and (area < 0.9).mean(dtype=torch.float) > 0.2
    aspect = w / h
    assert aspect.min() > 0.9 - 0.04 and aspect.max() < 1.1 + 0.04
    for offset, room in ((top, 32 - h), (left, 32 - w)):
        assert (offset >= 0).all() and (offset <= room).all() and (offset == room).any()
        spread = offset[room > 2] / room[room > 2]  # uniform over the room: mean 1/2
        assert 0.45 < spread.mean() < 0.55
    assert angle.min() >= -30 and angle.max() <= 30 and angle.min() < -29.9 and angle.max() > 29.9
    assert 0.45 < drawn["flip"].float().mean() < 0.55


def test_cutmix_pastes_squares_of_side_root_one_minus_lam_about_their_centre():
    torch.manual_seed(0)
    images = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    labels = torch.tensor([0, 1])
    unclipped, areas = 0, []
    for _ in range(400):
        mixed, targets = mix(images, labels, 2, 0.0, 1.0)
        pasted = mixed[0, 0] == 1  # image 0 gets image 1's box
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        area = int(pasted.sum())
        areas.append(area / 1024)
        assert targets[0, 1].item() == pytest.approx(area / 1024)
        if area and 0 < rows[0] and rows[-1] < 31 and 0 < cols[0] and cols[-1] < 31:  # the box lies inside
            unclipped += 1
            assert len(rows) == len(cols) and area == len(rows) * len(cols)  # a square
            assert len(rows) % 2 == 0  # half its side each way from its centre
    assert unclipped > 40
    # lam ~ Beta(1, 1): the box's area before clipping is uniform in (0, 1), mean 1/2; clipped, less.
    assert 0.25 < sum(areas) / len(areas) < 0.5


def test_mixup_alone_never_cuts():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(30):
        mixed, targets = mix(images, labels, 4, 0.8, 0.0)
        lam = targets[0, 0].item()
        torch.testing.assert_close(mixed, images * lam + images.flip(0) * (1 - lam))


def test_random_resized_crop_flip_draws_boxes_as_torchvision(monkeypatch):
    # RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3)): area at least min_scale of the image, aspect
    # in 3/4-4/3, anywhere it fits; mirrored half the time; no rotation.
    from vitlab.data import augment

    drawn = drawn_geometry(monkeypatch, lambda images: augment.random_resized_crop_flip(images, 0.25),
                           torch.zeros(4000, 3, 64, 64, dtype=torch.uint8))
    top, left, h, w = drawn["top"], drawn["left"], drawn["h"], drawn["w"]
    area = h * w / 64 ** 2
    assert area.min() > 0.25 - 0.03 and area.max() <= 1.0 and (area < 0.4).mean(dtype=torch.float) > 0.1
    aspect = w / h
    assert aspect.min() > 3 / 4 - 0.04 and aspect.max() < 4 / 3 + 0.04
    assert (aspect < 0.85).any() and (aspect > 1.2).any()
    assert (top >= 0).all() and (top <= 64 - h).all() and (left >= 0).all() and (left <= 64 - w).all()
    assert drawn["angle"] is None and 0.45 < drawn["flip"].float().mean() < 0.55


def test_random_resized_crop_flip_zooms_into_each_image():
    torch.manual_seed(0)
    images = sample_images(size=(64, 64))
    # A box of the whole area is the whole image (where the aspect rounds to 1) or does not fit (torchvision's
    # fallback: the whole image): mirrored or not, and unchanged by the resampling.
    whole = random_resized_crop_flip(images.repeat(8, 1, 1, 1), 1.0)
    for out, image in zip(whole, images.repeat(8, 1, 1, 1)):
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
    # A smaller box is resized up to the full side: a white square of a quarter of the side grows.
    square = torch.zeros(400, 1, 64, 64, dtype=torch.uint8)
    square[..., 24:40, 24:40] = 255
    out = random_resized_crop_flip(square, 0.25)
    white = (out > 127).float().mean(dim=(1, 2, 3))
    assert out.shape == square.shape and out.dtype == torch.uint8
    assert white.max() > 2 * (16 * 16) / 64 ** 2 and len(torch.unique(out.flatten(1), dim=0)) > 300
