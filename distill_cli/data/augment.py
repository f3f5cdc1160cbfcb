"""Batched augmentation on the device: the same semantics as torchvision's per-image transforms.

`random_crop(pad)` equals `RandomCrop(size, padding=pad)` (zero padding, then a uniformly random
crop of the original size), which for MNIST-style data is a +-pad pixel jitter; `random_flip`
equals `RandomHorizontalFlip(0.5)`. Both work on uint8 batches before normalisation, and draw from
the caller's generator so the augmented views are reproducible. `augment_one` is the per-sample
form the stream pipeline's workers apply, written the way torchvision's transforms do it (pad,
slice one window, maybe mirror), so the two pipelines can be checked against each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Augment


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by `pad` pixels and crop it back to its size at a random offset."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    # advanced indexing over (batch, row, col) picks each image's window: (B, H, W, C)
    windows = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return windows.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def apply(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply a dataset's augmentation preset to a uint8 batch."""
    if augment.pad:
        images = random_crop(images, augment.pad, generator)
    if augment.flip:
        images = random_flip(images, generator)
    return images


def augment_one(image: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply a dataset's augmentation preset to one uint8 image (C, H, W)."""
    if augment.pad:
        _, height, width = image.shape
        top, left = torch.randint(0, 2 * augment.pad + 1, (2,), generator=generator).tolist()
        image = F.pad(image, (augment.pad,) * 4)[:, top : top + height, left : left + width]
    if augment.flip and torch.rand((), generator=generator) < 0.5:
        image = image.flip(2)
    return image
