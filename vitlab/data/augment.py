"""Augmentation and normalisation of uint8 image batches, on the training device.

Everything here works on a whole batch at once, with no per-image Python and nothing read back to
the host (each image's random choices are tensors, applied with torch.where, gathers and one
grid_sample), so that augmenting never makes a GPU wait:
- `random_crop_flip`: random translation with reflect padding + horizontal flip, one uint8 gather;
- `random_resized_crop_flip`: RandomResizedCrop + horizontal flip as one resampling;
- `tutorial_geometry`: the tutorial's flip, resized crop and rotation ±30° as one resampling;
- an op library with torchvision.transforms.v2's semantics (`apply_op` and the ops it dispatches to),
  and on it `rand_augment` and `auto_augment_cifar10`: torchvision's RandAugment and AutoAugment
  (CIFAR-10 policy);
- `mix`: timm's Mixup / CutMix of a normalised batch and its soft targets;
- `augment_batch`: a training batch augmented as the data.* options say.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from vitlab.config import DataConfig, crop_padding
from vitlab.errors import VitlabError

@torch.compiler.disable  # a cached table, built outside any compiled graph (as the two below)
@lru_cache(maxsize=16)
def pixel_statistics(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """mean and std (in [0, 1] units) as two (1, C, 1, 1) tensors in pixel units on device: built once
    per (mean, std, device), not every batch."""
    return (torch.tensor([mean, std], device=device) * 255).view(2, 1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with per-channel mean and std (in [0, 1] units)."""
    mean_t, std_t = pixel_statistics(tuple(mean), tuple(std), images.device)
    # One new tensor, updated in place: no temporaries of the batch's size.
    return images.to(torch.float32, copy=True).sub_(mean_t).div_(std_t)


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in (-size, 2 * size - 1) mirrored into [0, size) as reflect padding does (the edge
    pixel is not repeated): -1 -> 1, size -> size - 2."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def flip_translate(images: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W), each mirrored left-right where flip (B,) is True, then moved by dy (B,) rows
    down and dx (B,) columns right, the uncovered border filled by reflection (as reflect padding would).
    One gather of the images' own dtype: uint8 stays uint8."""
    B, C, H, W = images.shape
    rows = reflect(torch.arange(H, device=images.device) - dy[:, None], H)  # (B, H)
    cols = reflect(torch.arange(W, device=images.device) - dx[:, None], W)  # (B, W)
    cols = torch.where(flip[:, None], W - 1 - cols, cols)
    pixels = (rows[:, :, None] * W + cols[:, None, :]).view(B, 1, H * W)  # (B, 1, H*W) source of each pixel
    return images.reshape(B, C, H * W).gather(2, pixels.expand(B, C, H * W)).view(B, C, H, W)


def random_crop_flip(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Batched random crop (translate by up to `pad` pixels, reflect-padded) and horizontal flip."""
    B = len(images)
    flip = torch.rand(B, device=images.device) < 0.5
    dy, dx = torch.randint(-pad, pad + 1, (2, B), device=images.device)
    return flip_translate(images, flip, dy, dx)


# The op library. Each op takes a uint8 batch (B, C, H, W) and per-sample magnitudes (B,) in the op's own
# units, as torchvision's AutoAugment hands them to its ops: shear as the tangent of the angle, translation
# in pixels, rotation in degrees counter-clockwise, brightness/colour/contrast/sharpness factors as
# 1 + magnitude, posterize in bits kept, solarize's threshold as a fraction of 255.

# The geometric ops are inverse affine maps (B, 2, 3), output pixel -> input point, in torchvision's frame:
# coordinates in pixels measured from the image centre (pixel (i, j) has its centre at j + 0.5 - W / 2,
# i + 0.5 - H / 2). They are built in float64 as torchvision builds them in Python floats, then resampled
# by `affine`, so any mix of them over a batch is one grid_sample.


def _matrix(a, b, tx, c, d, ty) -> torch.Tensor:
    """(B,) tensors -> the maps (B, 2, 3) [[a, b, tx], [c, d, ty]]."""
    return torch.stack((a, b, tx, c, d, ty), dim=-1).view(-1, 2, 3)


def shear_x_matrix(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """x_in = x + m * (y + H / 2): a shear about the top edge, as torchvision's centre=[0, 0]."""
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _matrix(one, m, m * (height / 2), zero, one, zero)


def shear_y_matrix(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """y_in = y + m * (x + W / 2): a shear about the left edge."""
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _matrix(one, zero, zero, m, one, m * (width / 2))


def translate_x_matrix(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Move right by int(m) pixels (torchvision truncates the magnitude)."""
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _matrix(one, zero, -m.trunc(), zero, one, zero)


def translate_y_matrix(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Move down by int(m) pixels."""
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _matrix(one, zero, zero, zero, one, -m.trunc())


def rotate_matrix(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rotate by m degrees counter-clockwise about the centre, as F.rotate."""
    r = torch.deg2rad(magnitude.double())
    zero = torch.zeros_like(r)
    return _matrix(r.cos(), -r.sin(), zero, r.sin(), r.cos(), zero)


def _grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The input point of each output pixel under theta (B, 2, 3), as grid_sample reads it: (B, H, W, 2),
    -1 and 1 at the image's edges. torchvision's arithmetic, so that nearest resampling picks its pixels."""
    device = theta.device
    x = torch.arange(width, device=device) + (0.5 - width / 2)  # (W,) pixel centres from the image centre
    y = torch.arange(height, device=device) + (0.5 - height / 2)  # (H,)
    base = torch.stack(torch.broadcast_tensors(x, y[:, None], torch.ones(1, 1, device=device)), dim=-1)
    theta = torch.cat((theta[:, :1] / (width / 2), theta[:, 1:] / (height / 2)), dim=1).float()
    return (base.view(1, height * width, 3) @ theta.transpose(1, 2)).view(-1, height, width, 2)


def affine(images: torch.Tensor, theta: torch.Tensor, interpolation: str = "nearest") -> torch.Tensor:
    """uint8 images (B, C, H, W) resampled through their inverse maps theta (B, 2, 3) (see above), the
    outside filled with 0: one grid_sample for the batch (an identity map leaves an image exactly as it was
    under nearest interpolation)."""
    grid = _grid(theta, *images.shape[-2:])
    out = F.grid_sample(images.float(), grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8)


def _per_image(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with factor 1 + m: (1 + m) * images - m * degenerate, clamped and truncated
    (addcmul rounds as torchvision's add with alpha does: the same uint8 values)."""
    m = _per_image(magnitude)
    return torch.addcmul(images * (1 + m), degenerate, -m).clamp_(0, 255).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 1, H, W) float luma, floored as torchvision does for uint8."""
    r, g, b = images.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def brightness(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Scale the values by 1 + m."""
    return (images * (1 + _per_image(magnitude))).clamp_(0, 255).to(torch.uint8)


def color(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the grayscale image (a 1-channel image is returned as is, as PIL does)."""
    if images.shape[1] == 1:
        return images
    return _blend(images, _grayscale(images), magnitude)


def contrast(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean gray level."""
    gray = _grayscale(images) if images.shape[1] == 3 else images.float()
    return _blend(images, gray.mean(dim=(1, 2, 3), keepdim=True), magnitude)


def sharpness(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Blend the inner pixels with a 3x3 smoothing (5 in the middle, 1 around, over 13); the border is kept."""
    B, C, H, W = images.shape
    if H <= 2 or W <= 2:
        return images
    kernel = torch.full((C, 1, 3, 3), 1 / 13, device=images.device)  # made here: a copy to the GPU would wait
    kernel[:, :, 1, 1] = 5 / 13
    out = images.float()
    blurred = F.conv2d(out, kernel, groups=C).round_()  # (B, C, H-2, W-2)
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred.sub_(inner), -_per_image(magnitude))  # x + (1 - factor) * (blurred - x)
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Keep the int(m) high bits of each value."""
    bits = magnitude.int().clamp(0, 8)
    mask = (255 << (8 - bits)) & 255
    return images & _per_image(mask.to(torch.uint8))


def solarize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above 255 * m."""
    return torch.where(images >= _per_image(255 * magnitude), images.bitwise_not(), images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to 0..255 (a constant channel is kept)."""
    x = images.float()
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    constant = high == low
    scale = torch.where(constant, 1.0, (high - low) * (1 / 255))
    low = torch.where(constant, 0.0, low)
    return x.sub_(low).div_(scale).clamp_(0, 255).to(torch.uint8)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image with PIL's lookup table (as torchvision's)."""
    B, C, H, W = images.shape
    pixels = images.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=images.device)
    hist.scatter_add_(1, pixels, hist.new_ones(1).expand_as(pixels))  # (B*C, 256)
    cumulative = hist.cumsum(dim=1)
    # PIL spreads all but the pixels of the largest value present (the first bin where the count is complete).
    top_count = hist.gather(1, cumulative.argmax(dim=1, keepdim=True))  # (B*C, 1)
    step = (H * W - top_count) // 255
    lut = (cumulative[:, :-1] + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat((torch.zeros_like(lut[:, :1]), lut), dim=1)  # (B*C, 256): value k takes lut[k]
    equalized = lut.gather(1, pixels).to(torch.uint8)
    return torch.where(step == 0, pixels.to(torch.uint8), equalized).view(B, C, H, W)  # step 0: kept


def invert(images: torch.Tensor) -> torch.Tensor:
    return images.bitwise_not()


# Each op's magnitudes over the bins (a function of (num_bins, H, W), None for an op without one) and
# whether they take a random sign: torchvision's _AUGMENTATION_SPACE, in RandAugment's order, then Invert,
# which only AutoAugment uses.
SPACE = {
    "Identity": (None, False),
    "ShearX": (lambda bins, H, W: torch.linspace(0.0, 0.3, bins), True),
    "ShearY": (lambda bins, H, W: torch.linspace(0.0, 0.3, bins), True),
    "TranslateX": (lambda bins, H, W: torch.linspace(0.0, 150.0 / 331.0 * W, bins), True),
    "TranslateY": (lambda bins, H, W: torch.linspace(0.0, 150.0 / 331.0 * H, bins), True),
    "Rotate": (lambda bins, H, W: torch.linspace(0.0, 30.0, bins), True),
    "Brightness": (lambda bins, H, W: torch.linspace(0.0, 0.9, bins), True),
    "Color": (lambda bins, H, W: torch.linspace(0.0, 0.9, bins), True),
    "Contrast": (lambda bins, H, W: torch.linspace(0.0, 0.9, bins), True),
    "Sharpness": (lambda bins, H, W: torch.linspace(0.0, 0.9, bins), True),
    "Posterize": (lambda bins, H, W: (8 - (torch.arange(bins) / ((bins - 1) / 4))).round(), False),
    "Solarize": (lambda bins, H, W: torch.linspace(1.0, 0.0, bins), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
}
OPS = tuple(SPACE)
RAND_AUGMENT_OPS = OPS[:-1]
GEOMETRIC_OPS = {"ShearX": shear_x_matrix, "ShearY": shear_y_matrix, "TranslateX": translate_x_matrix,
                 "TranslateY": translate_y_matrix, "Rotate": rotate_matrix}
COLOUR_OPS = {
    "Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
    "Posterize": posterize, "Solarize": solarize,
    "AutoContrast": lambda images, _: autocontrast(images),
    "Equalize": lambda images, _: equalize(images),
    "Invert": lambda images, _: invert(images),
}


def apply_op(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W), image i transformed by OPS[op[i]] with magnitude[i]. The geometric ops
    of all images are one resampling; every colour op is computed for the whole batch and kept where chosen:
    choosing per image without reading the choice back costs computing every op."""
    B, _, H, W = images.shape
    theta = torch.eye(2, 3, dtype=torch.float64, device=images.device).expand(B, 2, 3)
    for name, matrix in GEOMETRIC_OPS.items():
        theta = torch.where((op == OPS.index(name)).view(B, 1, 1), matrix(magnitude, H, W), theta)
    out = affine(images, theta)
    for name, transform in COLOUR_OPS.items():
        out = torch.where((op == OPS.index(name)).view(B, 1, 1, 1), transform(images, magnitude), out)
    return out


def _random_sign(magnitude: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """magnitude (B,) negated with probability 1/2 where signed (B,), as torchvision draws it per op."""
    negate = signed & (torch.rand(magnitude.shape, device=magnitude.device) <= 0.5)
    return torch.where(negate, -magnitude, magnitude)


def _magnitude(name: str, magnitude: float, num_bins: int, height: int, width: int) -> float:
    """Op name's magnitude at bin `magnitude` of num_bins (interpolated between bins when fractional)."""
    space, _ = SPACE[name]
    if space is None:
        return 0.0
    values = space(num_bins, height, width).float()
    low = min(int(magnitude), num_bins - 2)
    return float(torch.lerp(values[low], values[low + 1], magnitude - low))


@torch.compiler.disable
@lru_cache(maxsize=16)
def _rand_augment_table(magnitude: float, num_bins: int, height: int, width: int, device: torch.device):
    """Every op's magnitude and sign flag as (len(OPS),) tensors on device, made once, not per batch (a
    copy to the GPU would wait for it)."""
    values = [_magnitude(name, magnitude, num_bins, height, width) for name in OPS]
    return torch.tensor(values, device=device), torch.tensor([s for _, s in SPACE.values()], device=device)


def rand_augment(images: torch.Tensor, num_ops: int, magnitude: float, num_magnitude_bins: int = 31) -> torch.Tensor:
    """torchvision's v2.RandAugment on a uint8 batch (B, C, H, W): each image applies num_ops ops, each
    drawn uniformly from RAND_AUGMENT_OPS with its own random sign, at bin `magnitude` of
    num_magnitude_bins (nearest interpolation, fill 0)."""
    if num_ops < 0:
        raise VitlabError(f"RandAugment's number of ops must be 0 or more, not {num_ops}")
    if num_magnitude_bins < 2:
        raise VitlabError(f"RandAugment needs 2 or more magnitude bins, not {num_magnitude_bins}")
    if not 0 <= magnitude <= num_magnitude_bins - 1:
        raise VitlabError(f"RandAugment's magnitude must be between 0 and {num_magnitude_bins - 1}, not {magnitude}")
    B, _, H, W = images.shape
    values, signed = _rand_augment_table(magnitude, num_magnitude_bins, H, W, images.device)  # (len(OPS),)
    for _ in range(num_ops):
        op = torch.randint(len(RAND_AUGMENT_OPS), (B,), device=images.device)
        images = apply_op(images, op, _random_sign(values[op], signed[op]))
    return images


# AutoAugment's CIFAR-10 policy (torchvision's): 25 sub-policies of two (op, probability, magnitude bin of 10).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


@torch.compiler.disable
@lru_cache(maxsize=16)
def _cifar10_table(height: int, width: int, device: torch.device):
    """The policy as (25, 2) tensors on device: op index, probability, magnitude, signed."""
    steps = [step for sub_policy in CIFAR10_POLICY for step in sub_policy]
    op = [OPS.index(name) for name, _, _ in steps]
    probability = [p for _, p, _ in steps]
    magnitude = [_magnitude(name, index or 0, 10, height, width) for name, _, index in steps]
    signed = [SPACE[name][1] for name, _, _ in steps]
    return tuple(torch.tensor(column, device=device).view(-1, 2) for column in (op, probability, magnitude, signed))


def auto_augment_cifar10(images: torch.Tensor) -> torch.Tensor:
    """torchvision's v2.AutoAugment(AutoAugmentPolicy.CIFAR10) on a uint8 batch (B, C, H, W): each image
    draws a sub-policy, applies each of its two ops with the op's probability and a random sign (nearest
    interpolation, fill 0)."""
    B, _, H, W = images.shape
    ops, probabilities, magnitudes, signed = _cifar10_table(H, W, images.device)
    policy = torch.randint(len(CIFAR10_POLICY), (B,), device=images.device)
    for step in range(2):
        applied = torch.rand(B, device=images.device) <= probabilities[policy, step]
        op = torch.where(applied, ops[policy, step], OPS.index("Identity"))
        images = apply_op(images, op, _random_sign(magnitudes[policy, step], signed[policy, step]))
    return images


def flip_crop_rotate(images: torch.Tensor, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                     height: torch.Tensor, width: torch.Tensor, angle: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (B, C, H, W), each mirrored left-right where flip, cropped to the box (top, left, height,
    width) resized to (H, W), rotated by angle degrees counter-clockwise (fill 0; None: not rotated): one
    map per image, one bilinear resampling. All (B,) tensors."""
    H, W = images.shape[-2:]
    sx, sy = width.double() / W, height.double() / H  # the box's size over the output's
    r = torch.deg2rad(angle.double()) if angle is not None else torch.zeros_like(sx)
    cos, sin = r.cos(), r.sin()
    cx, cy = (left + width / 2 - W / 2).double(), (top + height / 2 - H / 2).double()  # its centre, from the image's
    mirror = torch.where(flip, -1.0, 1.0).double()
    # From an output pixel: undo the rotation, then the resize (about the box's centre), then the mirror.
    theta = _matrix(mirror * sx * cos, -mirror * sx * sin, mirror * cx, sy * sin, sy * cos, cy)
    out = affine(images, theta, "bilinear")
    if angle is None:  # a box inside the image uncovers nothing
        return out
    # torchvision rotates the resized crop: what the rotation uncovers is 0, also where the image goes on
    # beyond the box.
    uncovered = (_grid(rotate_matrix(angle, H, W), H, W).abs() > 1).any(dim=-1)  # (B, H, W)
    return out.masked_fill_(uncovered[:, None], 0)


def tutorial_geometry(images: torch.Tensor) -> torch.Tensor:
    """The tutorial's RandomHorizontalFlip(), RandomResizedCrop(size, scale=(0.8, 1), ratio=(0.9, 1.1)) and
    RandomRotation(30) (fill 0) on a uint8 batch (B, C, H, W), each image its own, as one affine map per
    image and one bilinear resampling. torchvision resamples twice (a bilinear resize, then a nearest
    rotation); composing them into one changes only the interpolation, not the geometry. The crop is
    resized to (H, W), the same shape (torchvision's size=H makes it H x H: the same for square images)."""
    B = len(images)
    flip = torch.rand(B, device=images.device) < 0.5
    box = resized_crop_boxes(images, (0.8, 1.0), (0.9, 1.1))
    angle = torch.empty(B, device=images.device).uniform_(-30.0, 30.0)
    return flip_crop_rotate(images, flip, *box, angle)


def resized_crop_boxes(images: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]):
    """RandomResizedCrop's boxes for a batch (B, C, H, W): (top, left, height, width), each (B,). As
    torchvision: area a uniform share `scale` of the image's, aspect log-uniform in `ratio`, the first of
    10 draws whose box fits in the image (all 10 drawn for every image), else the whole image."""
    B, _, H, W = images.shape
    device = images.device
    area = torch.empty(B, 10, device=device).uniform_(*scale) * (H * W)
    aspect = torch.empty(B, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp_()
    w, h = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()  # (B, 10)
    fits = (w <= W) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)  # (B, 1) the first try that fits
    w = torch.where(fits.any(dim=1), w.gather(1, first).squeeze(1), W)  # (B,)
    h = torch.where(fits.any(dim=1), h.gather(1, first).squeeze(1), H)
    top = (torch.rand(B, device=device) * (H - h + 1)).floor_()
    left = (torch.rand(B, device=device) * (W - w + 1)).floor_()
    return top, left, h, w


def random_resized_crop_flip(images: torch.Tensor, min_scale: float) -> torch.Tensor:
    """Batched RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3)) and horizontal flip: each image a
    box of its own resized back to the full side, mirrored or not, in one bilinear resampling. A zoom as
    well as a translation: the augmentation of photos at larger sides (timm's and DeiT's, with a larger
    min_scale for short runs from scratch)."""
    B = len(images)
    flip = torch.rand(B, device=images.device) < 0.5
    box = resized_crop_boxes(images, (min_scale, 1.0), (3 / 4, 4 / 3))
    return flip_crop_rotate(images, flip, *box)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) -> (B, num_classes) float; a scatter, which unlike F.one_hot never checks the labels on the host."""
    return torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float,
        cutmix_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch Mixup / CutMix: float images (B, C, H, W) mixed with the batch reversed, and soft
    targets (B, num_classes) = lam * one_hot(labels) + (1 - lam) * one_hot(labels reversed). With both
    alphas above 0, each call takes mixup or CutMix with probability 1/2; lam ~ Beta(alpha, alpha). CutMix
    pastes a box of side sqrt(1 - lam) of the image's, centred uniformly and clipped, and lam becomes the
    area left. lam and the box are drawn on the CPU: nothing is read back from the images' device."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise VitlabError(f"mix needs mixup_alpha or cutmix_alpha above 0, not {mixup_alpha} and {cutmix_alpha}")
    cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand(())) < 0.5)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if cutmix:
        H, W = images.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = images[..., y0:y1, x0:x1].flip(0)
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = images * lam + images.flip(0) * (1 - lam)
    targets = _one_hot(labels, num_classes) * lam + _one_hot(labels.flip(0), num_classes) * (1 - lam)
    return images, targets


def augment_batch(images: torch.Tensor, config: DataConfig, image_size: int) -> torch.Tensor:
    """A uint8 training batch (B, C, H, W) augmented as data.augment, autoaugment and randaugment_* say."""
    if config.augment == "crop-flip":
        images = random_crop_flip(images, crop_padding(config, image_size))
    elif config.augment == "resized-crop-flip":
        images = random_resized_crop_flip(images, config.crop_scale)
    elif config.augment == "tutorial":
        images = tutorial_geometry(images)
    if config.autoaugment:
        images = auto_augment_cifar10(images)
    if config.randaugment_ops:
        images = rand_augment(images, config.randaugment_ops, config.randaugment_magnitude)
    return images
