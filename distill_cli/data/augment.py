"""Batched augmentation on the device: the same semantics as torchvision's per-image transforms.

`random_crop(pad)` equals `RandomCrop(size, padding=pad)` (zero padding, then a uniformly random
crop of the original size), which for MNIST-style data is a +-pad pixel jitter; `random_flip`
equals `RandomHorizontalFlip(0.5)`; `random_color_jitter(strength)` is torchvision's
`ColorJitter(brightness=s, contrast=s, saturation=s)` with the three adjustments always in that order
(torchvision shuffles the order per image). All work on uint8 batches before normalisation, and draw
from the caller's generator so the augmented views are reproducible. `augment_one` is the per-sample
form the stream pipeline's workers apply, written the way torchvision's transforms do it (pad,
slice one window, maybe mirror), so the two pipelines can be checked against each other.

Crop and flip have finitely many views per image ((2 pad + 1)^2 x 2 for pad and flip): both pipelines
report the view each image got (`view_id`), and `views_of` makes any view again, so a frozen teacher's
outputs can be computed once per view and looked up in every epoch (`kd.teachers`, `cache_teacher=views`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import Augment

# (size of the whole batch, this process's rows of it): the random draws are made for the whole batch
# and this process keeps its rows, so data-parallel ranks augment exactly as one process would
Part = tuple[int, slice]


def _rows(images: torch.Tensor, part: Part | None) -> Part:
    return part if part is not None else (len(images), slice(None))


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator, part: Part | None = None) -> torch.Tensor:
    """Zero-pad each image by `pad` pixels and crop it back to its size at a random offset."""
    return crop_at(images, pad, _crop_offsets(images, pad, generator, part))


def _crop_offsets(images: torch.Tensor, pad: int, generator: torch.Generator, part: Part | None) -> torch.Tensor:
    """The (top, left) offset of each image's window in the padded image, drawn: (2, B)."""
    total, rows = _rows(images, part)
    return torch.randint(0, 2 * pad + 1, (2, total), generator=generator, device=images.device)[:, rows]


def crop_at(images: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by `pad` pixels and crop it back to its size at its (top, left) `offsets` (2, B)."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    # advanced indexing over (batch, row, col) picks each image's window: (B, H, W, C)
    windows = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return windows.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator, part: Part | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    return flip_where(images, _flips(images, generator, part))


def _flips(images: torch.Tensor, generator: torch.Generator, part: Part | None) -> torch.Tensor:
    """Whether each image is mirrored, drawn: (B,) bool."""
    total, rows = _rows(images, part)
    return torch.rand(total, generator=generator, device=images.device)[rows] < 0.5


def flip_where(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right where `flip` (B,) is true."""
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_color_jitter(
    images: torch.Tensor, strength: float, generator: torch.Generator, part: Part | None = None
) -> torch.Tensor:
    """Scale each image's brightness, contrast and saturation by factors drawn from [1 - s, 1 + s].

    Brightness multiplies the pixels; contrast blends each image with the mean of its grey image;
    saturation blends each pixel with its grey value (a no-op for one channel). The arithmetic is in
    float32, clamped to [0, 255] after each step and rounded to uint8 once at the end.
    """
    total, rows = _rows(images, part)
    return jitter_by(images, _jitter_factors(strength, (total,), generator, images.device)[:, rows])


def _jitter_factors(strength: float, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Brightness, contrast and saturation factors drawn uniformly from [1 - s, 1 + s]: (3, *shape)."""
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    return torch.rand((3, *shape), generator=generator, device=device) * (high - low) + low


def jitter_by(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image's brightness, contrast and saturation scaled by its `factors` (3, B) (see `random_color_jitter`)."""
    channels = images.shape[1]
    brightness, contrast, saturation = factors.float()[:, :, None, None, None]
    pixels = (images.float() * brightness).clamp_(0, 255)
    grey_mean = _grey(pixels).mean(dim=(1, 2, 3), keepdim=True)
    pixels = (contrast * pixels + (1 - contrast) * grey_mean).clamp_(0, 255)
    if channels == 3:
        pixels = (saturation * pixels + (1 - saturation) * _grey(pixels)).clamp_(0, 255)
    return pixels.round_().to(torch.uint8)


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of an RGB batch (B, 1, H, W); a one-channel batch is its own grey image."""
    if pixels.shape[1] == 1:
        return pixels
    weights = torch.tensor([0.299, 0.587, 0.114], device=pixels.device).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)


def apply(images: torch.Tensor, augment: Augment, generator: torch.Generator, part: Part | None = None) -> torch.Tensor:
    """Apply a dataset's augmentation preset to a uint8 batch (`part`: these images are those rows of
    a larger batch, whose draws are made)."""
    return apply_with_views(images, augment, generator, part)[0]


def apply_with_views(
    images: torch.Tensor, augment: Augment, generator: torch.Generator, part: Part | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`apply`, with the view each image got (`view_id`) when the preset's views can be enumerated
    (`Augment.view_count`; None with colour jitter). The same draws as `apply`."""
    batch = len(images)
    offsets = torch.zeros((2, batch), dtype=torch.long, device=images.device)
    flips = torch.zeros(batch, dtype=torch.bool, device=images.device)
    if augment.pad:
        offsets = _crop_offsets(images, augment.pad, generator, part)
        images = crop_at(images, augment.pad, offsets)
    if augment.flip:
        flips = _flips(images, generator, part)
        images = flip_where(images, flips)
    if augment.color_jitter:
        images = random_color_jitter(images, augment.color_jitter, generator, part)
    return images, view_id(augment, offsets, flips) if augment.view_count else None


def view_id(augment: Augment, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """The number of each view in 0..view_count-1: (top * (2 pad + 1) + left) * (2 with flips, else 1) + flipped."""
    sides = 2 if augment.flip else 1
    return (offsets[0] * (2 * augment.pad + 1) + offsets[1]) * sides + flips.long()


def views_of(images: torch.Tensor, augment: Augment, views: torch.Tensor) -> torch.Tensor:
    """The uint8 images as seen in the views `views` (B,): the inverse of `view_id`, so that the view a batch
    drew can be made again (the teacher-view store is built this way)."""
    sides = 2 if augment.flip else 1
    window = views // sides
    offsets = torch.stack([window // (2 * augment.pad + 1), window % (2 * augment.pad + 1)])
    if augment.pad:
        images = crop_at(images, augment.pad, offsets)
    return flip_where(images, views % sides == 1) if augment.flip else images


# the seed of `draw_views`: fixed, so every seed of a sweep trains on (and one store holds) the same views
DRAWN_VIEWS_SEED = 0


def draw_views(augment: Augment, num_images: int) -> torch.Tensor:
    """`augment.drawn` views of each of `num_images` images, drawn once (seeded with DRAWN_VIEWS_SEED): their
    parameters (N, drawn, 6) float32, per view: crop top, crop left, flipped, brightness, contrast, saturation."""
    generator = torch.Generator().manual_seed(DRAWN_VIEWS_SEED)
    shape = (num_images, augment.drawn)
    offsets = torch.randint(0, 2 * augment.pad + 1, (2, *shape), generator=generator)
    flips = torch.rand(shape, generator=generator) < 0.5 if augment.flip else torch.zeros(shape, dtype=torch.bool)
    factors = _jitter_factors(augment.color_jitter, shape, generator, "cpu") if augment.color_jitter else torch.ones((3, *shape))
    return torch.cat([offsets.float(), flips[None].float(), factors]).permute(1, 2, 0).contiguous()


def apply_drawn(images: torch.Tensor, augment: Augment, params: torch.Tensor) -> torch.Tensor:
    """The uint8 images (B, C, H, W) as seen in the drawn views whose parameters are `params` (B, 6) (`draw_views`)."""
    if augment.pad:
        images = crop_at(images, augment.pad, params[:, :2].long().T)
    if augment.flip:
        images = flip_where(images, params[:, 2] > 0.5)
    if augment.color_jitter:
        images = jitter_by(images, params[:, 3:].T)
    return images


def apply_drawn_views(
    images: torch.Tensor, positions: torch.Tensor, augment: Augment, drawn: torch.Tensor, generator: torch.Generator,
    part: Part | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image (at `positions` of its split) shown in one of its views drawn once (`drawn`: `draw_views` of
    the split), picked uniformly: the images and the view numbers (B,) picked."""
    total, rows = _rows(images, part)
    views = torch.randint(0, augment.drawn, (total,), generator=generator, device=generator.device)[rows].to(images.device)
    return apply_drawn(images, augment, drawn[positions, views]), views


# torchvision's RandomResizedCrop defaults: the crop's share of the image's area, and the range of its aspect ratio
RESIZED_SCALE = (0.08, 1.0)
RESIZED_RATIO = (3 / 4, 4 / 3)
RESIZED_ATTEMPTS = 10


def resized_crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random-resized crop of a `height` x `width` image, drawn as
    torchvision's `RandomResizedCrop.get_params` draws it (area share uniform in RESIZED_SCALE, aspect ratio
    log-uniform in RESIZED_RATIO, up to RESIZED_ATTEMPTS tries; else the centre crop at the nearest ratio), but from
    `generator`, so that a sample's crop depends on its seed alone."""
    area = height * width
    log_ratio = torch.log(torch.tensor(RESIZED_RATIO))
    for _ in range(RESIZED_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(*RESIZED_SCALE, generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)).item()
        crop_width = round((target_area * aspect) ** 0.5)
        crop_height = round((target_area / aspect) ** 0.5)
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
            return top, left, crop_height, crop_width
    ratio = width / height
    if ratio < RESIZED_RATIO[0]:
        crop_width, crop_height = width, round(width / RESIZED_RATIO[0])
    elif ratio > RESIZED_RATIO[1]:
        crop_height, crop_width = height, round(height * RESIZED_RATIO[1])
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(image: Image.Image, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A Pillow image of any size: a random-resized crop (`resized_crop_box`) resized to `size` (H, W), bilinear, as
    torchvision's RandomResizedCrop does it on Pillow images; uint8 (C, H, W)."""
    top, left, height, width = resized_crop_box(image.height, image.width, generator)
    crop = image.crop((left, top, left + width, top + height))  # then resized: a box given to resize would blend in its surroundings
    return image_tensor(crop.resize((size[1], size[0]), Image.Resampling.BILINEAR))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A Pillow RGB image as a uint8 (C, H, W) tensor."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def augment_one(
    image: torch.Tensor | Image.Image, augment: Augment, generator: torch.Generator, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Apply a dataset's augmentation preset to one uint8 image (C, H, W); `size`: the random-resized crop's."""
    return augment_one_with_view(image, augment, generator, size)[0]


def augment_one_with_view(
    image: torch.Tensor | Image.Image, augment: Augment, generator: torch.Generator, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, int]:
    """`augment_one`, with the view the image got (`view_id`; -1 when the views cannot be enumerated). With
    `augment.resized`, `image` is the decoded file (a Pillow image at its own size) and `size` the crop's (H, W)."""
    top = left = 0
    flipped = False
    if augment.resized:
        image = random_resized_crop(image, size, generator)
    if augment.pad:
        _, height, width = image.shape
        top, left = torch.randint(0, 2 * augment.pad + 1, (2,), generator=generator).tolist()
        image = F.pad(image, (augment.pad,) * 4)[:, top : top + height, left : left + width]
    if augment.flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(2)
        flipped = True
    if augment.color_jitter:
        image = random_color_jitter(image[None], augment.color_jitter, generator)[0]
    if not augment.view_count:
        return image, -1
    return image, int(view_id(augment, torch.tensor([[top], [left]]), torch.tensor([flipped]))[0])
