"""In-memory image sets, normalization, batching and channel/size conversion."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from core.errors import ConfigError, DatasetError

# Images per chunk when converting, so that a float32 copy of a large set is never made at once.
_CONVERT_CHUNK = 256

# ITU-R BT.601 luma weights, as used by PIL's "L" mode and torchvision's rgb_to_grayscale.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class ImageSet:
    """Decoded images with their labels.

    Attributes:
        images: uint8 tensor [N, C, H, W] with pixel values 0..255.
        labels: int64 tensor [N]; -1 marks an unlabelled image.
        name: The dataset reference the images came from.
        num_classes: Number of classes of a labelled set, None for an unlabelled one.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"dataset {self.name!r}: images must be a uint8 tensor [N, C, H, W], got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DatasetError(
                f"dataset {self.name!r}: labels must be an int64 tensor [{self.images.shape[0]}], "
                f"got {self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the model input, on the 0..1 pixel scale."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean = tuple(float(value) for value in self.mean)
        std = tuple(float(value) for value in self.std)
        if not mean or len(mean) != len(std):
            raise ConfigError(
                f"normalization mean {mean} and std {std} must be non-empty and have one value "
                "per channel each"
            )
        if not all(math.isfinite(value) for value in mean + std) or any(
            value <= 0 for value in std
        ):
            raise ConfigError(
                f"normalization mean {mean} and std {std} are invalid: every value must be finite "
                "and every std positive"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def channels(self) -> int:
        """Number of channels the normalization applies to."""
        return len(self.mean)

    def apply(self, batch: torch.Tensor) -> torch.Tensor:
        """Convert a uint8 batch [N, C, H, W] to float32 `(x / 255 - mean) / std`.

        The result lives on the batch's device.

        Raises:
            DatasetError: The batch is not uint8 [N, C, H, W] with one channel per mean value.
        """
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise DatasetError(
                f"normalization expects a uint8 batch [N, C, H, W], got {batch.dtype} with shape "
                f"{tuple(batch.shape)}"
            )
        if batch.shape[1] != self.channels:
            raise DatasetError(
                f"batch has {batch.shape[1]} channels but the normalization mean {self.mean} has "
                f"{self.channels}: load the data with the model's channel count or pass a "
                "matching mean and std"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        return (batch.to(torch.float32) / 255.0 - mean) / std


def iterate_batches(
    images: ImageSet,
    normalization: Normalization,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized float32 batches and their int64 labels on `device`.

    The uint8 images move to `device` before normalization, so a transfer carries a quarter of
    the bytes. The last batch is smaller when `batch_size` does not divide the set.

    Args:
        images: The set to iterate over.
        normalization: Mean and std applied to every batch.
        batch_size: Images per batch.
        shuffle: Visit the images in a random order drawn from `generator`.
        generator: A CPU generator for the shuffle. None uses torch's global generator.
        device: Where the yielded tensors live.

    Raises:
        ConfigError: `batch_size` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid: use a positive integer")
    count = len(images)
    order = torch.randperm(count, generator=generator) if shuffle else None
    for start in range(0, count, batch_size):
        if order is None:
            batch = images.images[start : start + batch_size]
            labels = images.labels[start : start + batch_size]
        else:
            indices = order[start : start + batch_size]
            batch = images.images[indices]
            labels = images.labels[indices]
        yield normalization.apply(batch.to(device)), labels.to(device)


def _permutation(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)


def select(images: ImageSet, indices: torch.Tensor) -> ImageSet:
    """Return the images at `indices`, in that order, as a new set with the same name and "
    "classes."""
    return replace(images, images=images.images[indices], labels=images.labels[indices])


def split_holdout(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split a set into disjoint (remaining, holdout) parts, chosen by a shuffle with `seed`.

    The holdout part has `round(fraction * N)` images. Both parts keep the original order.

    Raises:
        ConfigError: `fraction` is outside (0, 1) or leaves one part empty.
    """
    count = len(images)
    if not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"holdout fraction {fraction!r} is invalid: use a value strictly between 0 and 1"
        )
    holdout_count = round(fraction * count)
    if holdout_count < 1 or holdout_count > count - 1:
        raise ConfigError(
            f"holdout fraction {fraction} of {count} images in {images.name!r} leaves "
            f"{holdout_count} held-out and {count - holdout_count} remaining images: both parts "
            "need at least one, so use more data or another fraction"
        )
    order = _permutation(count, seed)
    holdout_indices = order[:holdout_count].sort().values
    remaining_indices = order[holdout_count:].sort().values
    return select(images, remaining_indices), select(images, holdout_indices)


def subset(images: ImageSet, limit: int, seed: int) -> ImageSet:
    """Return `limit` images chosen by a shuffle with `seed`, in their original order.

    A set with at most `limit` images is returned unchanged.

    Raises:
        ConfigError: `limit` is not a positive integer.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit={limit!r} is invalid: use a positive integer")
    if len(images) <= limit:
        return images
    indices = _permutation(len(images), seed)[:limit].sort().values
    return select(images, indices)


def convert_channels(batch: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert a uint8 batch [N, C, H, W] to 1 or 3 channels.

    RGB becomes gray by BT.601 luma, gray becomes RGB by repetition, and a fourth (alpha) channel
    is dropped.

    Raises:
        DatasetError: The batch has a channel count other than 1, 3 or 4.
    """
    if batch.shape[1] == 4:
        batch = batch[:, :3]
    source = batch.shape[1]
    if source not in (1, 3):
        raise DatasetError(
            f"images with {source} channels cannot be converted: use images with 1, 3 or 4 channels"
        )
    if source == channels:
        return batch
    if channels == 3:
        return batch.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor(_LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
    gray = (batch.to(torch.float32) * weights).sum(dim=1, keepdim=True)
    return gray.round().clamp(0, 255).to(torch.uint8)


def resize_square(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch [N, C, H, W] to [N, C, size, size] with antialiased bilinear filtering.

    A non-square image is scaled so that its shorter side is `size`, then center-cropped.
    """
    height, width = batch.shape[-2:]
    if height == size and width == size:
        return batch
    scale = size / min(height, width)
    scaled = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(
        batch.to(torch.float32), size=scaled, mode="bilinear", align_corners=False, antialias=True
    )
    top = (scaled[0] - size) // 2
    left = (scaled[1] - size) // 2
    cropped = resized[:, :, top : top + size, left : left + size]
    return cropped.round().clamp(0, 255).to(torch.uint8)


def convert_images(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """Convert a uint8 tensor [N, C, H, W] to `channels` and a `size` x `size` side, chunk by chunk.

    None keeps the channel count (after dropping an alpha channel) or the side unchanged.
    """
    target_channels = channels
    if target_channels is None:
        target_channels = 3 if images.shape[1] == 4 else images.shape[1]
    same_side = size is None or tuple(images.shape[-2:]) == (size, size)
    if images.shape[1] == target_channels and same_side:
        return images
    chunks = []
    for start in range(0, images.shape[0], _CONVERT_CHUNK):
        chunk = convert_channels(images[start : start + _CONVERT_CHUNK], target_channels)
        if size is not None:
            chunk = resize_square(chunk, size)
        chunks.append(chunk)
    if not chunks:
        side = images.shape[-2:] if size is None else (size, size)
        return images.new_zeros((0, target_channels, *side))
    return torch.cat(chunks)
