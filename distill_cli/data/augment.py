"""Batched augmentation on the device: the same semantics as torchvision's per-image transforms.

`random_crop(pad)` equals `RandomCrop(size, padding=pad)` (zero padding, then a uniformly random
crop of the original size), which for MNIST-style data is a +-pad pixel jitter; `random_flip`
equals `RandomHorizontalFlip(0.5)`; `random_color_jitter(strength)` is torchvision's
`ColorJitter(brightness=s, contrast=s, saturation=s)` with the three adjustments always in that order
(torchvision shuffles the order per image). All work on uint8 batches before normalisation, and draw
from the caller's generator so the augmented views are reproducible. `augment_one` is the per-sample
form the stream pipeline's workers apply, written the way torchvision's transforms do it (pad,
slice one window, maybe mirror), so the two pipelines can be checked against each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Augment

# (size of the whole batch, this process's rows of it): the random draws are made for the whole batch
# and this process keeps its rows, so data-parallel ranks augment exactly as one process would
Part = tuple[int, slice]


def _rows(images: torch.Tensor, part: Part | None) -> Part:
    return part if part is not None else (len(images), slice(None))


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator, part: Part | None = None) -> torch.Tensor:
    """Zero-pad each image by `pad` pixels and crop it back to its size at a random offset."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    total, rows = _rows(images, part)
    offsets = torch.randint(0, 2 * pad + 1, (2, total), generator=generator, device=images.device)[:, rows]
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    # advanced indexing over (batch, row, col) picks each image's window: (B, H, W, C)
    windows = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return windows.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator, part: Part | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    total, rows = _rows(images, part)
    flip = torch.rand(total, generator=generator, device=images.device)[rows] < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_color_jitter(
    images: torch.Tensor, strength: float, generator: torch.Generator, part: Part | None = None
) -> torch.Tensor:
    """Scale each image's brightness, contrast and saturation by factors drawn from [1 - s, 1 + s].

    Brightness multiplies the pixels; contrast blends each image with the mean of its grey image;
    saturation blends each pixel with its grey value (a no-op for one channel). The arithmetic is in
    float32, clamped to [0, 255] after each step and rounded to uint8 once at the end.
    """
    channels = images.shape[1]
    total, rows = _rows(images, part)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    factors = torch.rand((3, total, 1, 1, 1), generator=generator, device=images.device)[:, rows] * (high - low) + low
    brightness, contrast, saturation = factors
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
    if augment.pad:
        images = random_crop(images, augment.pad, generator, part)
    if augment.flip:
        images = random_flip(images, generator, part)
    if augment.color_jitter:
        images = random_color_jitter(images, augment.color_jitter, generator, part)
    return images


def augment_one(image: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply a dataset's augmentation preset to one uint8 image (C, H, W)."""
    if augment.pad:
        _, height, width = image.shape
        top, left = torch.randint(0, 2 * augment.pad + 1, (2,), generator=generator).tolist()
        image = F.pad(image, (augment.pad,) * 4)[:, top : top + height, left : left + width]
    if augment.flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(2)
    if augment.color_jitter:
        image = random_color_jitter(image[None], augment.color_jitter, generator)[0]
    return image
