"""`load_dataset`, its process-level cache, and the default normalization of each dataset."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from pathlib import Path

from core.datasets.builtin import build_builtin, get_builtin_set
from core.datasets.formats import FORMATS
from core.datasets.imageset import ImageSet, Normalization, convert_images, subset
from core.datasets.reference import (
    check_path_within_roots,
    parse_reference,
    resolve_path,
    validate_split,
    validate_target_shape,
)
from core.datasets.sources import SourceFiles
from core.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Seed of the shuffle that picks the images kept by a reference's `limit=` option.
LIMIT_SEED = 0

# Bounds of the decoded-set cache. A set larger than CACHE_MAX_BYTES is returned but not kept.
CACHE_MAX_ENTRIES = 16
CACHE_MAX_BYTES = 2 * 1024**3

_cache: OrderedDict[Hashable, ImageSet] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Drop every decoded set that `load_dataset` keeps in memory."""
    with _cache_lock:
        _cache.clear()


def _set_bytes(images: ImageSet) -> int:
    return images.images.numel() * images.images.element_size() + images.labels.numel() * 8


def _load_cached(key: Hashable, reference: str, load: Callable[[], ImageSet]) -> ImageSet:
    """Return the cached set for `key`, or load, cache and return it.

    The cached tensors are shared between callers, so callers must not modify them in place.
    """
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
    if cached is not None:
        logger.debug("Dataset %s served from the in-memory cache", reference)
        return replace(cached, name=reference)
    loaded = load()
    size = _set_bytes(loaded)
    if size > CACHE_MAX_BYTES:
        logger.info(
            "Dataset %s (%d bytes) exceeds the cache limit of %d bytes: not cached",
            reference,
            size,
            CACHE_MAX_BYTES,
        )
        return loaded
    with _cache_lock:
        _cache[key] = loaded
        _cache.move_to_end(key)
        total = sum(_set_bytes(entry) for entry in _cache.values())
        while len(_cache) > CACHE_MAX_ENTRIES or total > CACHE_MAX_BYTES:
            _, evicted = _cache.popitem(last=False)
            total -= _set_bytes(evicted)
    # A fresh ImageSet per caller, so reassigning a field never changes the cached entry.
    return replace(loaded)


def _fingerprint(source: SourceFiles) -> tuple[int, int, int]:
    """Return (file count, latest mtime in ns, total bytes), which changes when any file changes."""
    stats = [file.stat() for file in source.files]
    return len(stats), max(stat.st_mtime_ns for stat in stats), sum(stat.st_size for stat in stats)


def _finish(
    decoded: ImageSet, reference: str, limit: int | None, channels: int | None, size: int | None
) -> ImageSet:
    if len(decoded) == 0:
        raise DatasetError(
            f"dataset reference {reference!r} contains no images: check the path and the split"
        )
    if limit is not None:
        decoded = subset(decoded, limit, LIMIT_SEED)
    images = convert_images(decoded.images, channels, size)
    return ImageSet(
        images=images, labels=decoded.labels, name=reference, num_classes=decoded.num_classes
    )


def load_dataset(
    reference: str,
    *,
    channels: int | None = None,
    size: int | None = None,
    allowed_roots: Sequence[Path | str] | None = None,
    split: str = "train",
) -> ImageSet:
    """Load one split of a dataset reference as uint8 images.

    Decoded sets are cached for the life of the process, keyed by the resolved reference, the
    files' modification times, `channels` and `size`. A repeated load returns the cached
    tensors, which callers must not modify in place.

    Args:
        reference: `SCHEME:PATH[?split=...&limit=N]` or `builtin:NAME[?...]`.
        channels: Channel count to convert to (1 or 3). None keeps a file set's own count and
            gives a built-in set its default.
        size: Square image side to resize to. None keeps a file set's own size and gives a
            built-in set its default.
        allowed_roots: Directories the data must resolve into. None allows any path.
        split: `train` or `test`. A `split=` option in the reference takes precedence.

    Raises:
        DatasetError: The reference is invalid or outside the allowed roots, or its files are
            missing or corrupt.
        ConfigError: `channels` or `size` is invalid.
    """
    validate_target_shape(channels, size)
    parsed = parse_reference(reference)
    split = parsed.split or validate_split(split, reference)
    start = time.perf_counter()

    if parsed.is_builtin:
        spec = get_builtin_set(parsed.target, reference)
        build_channels = channels or spec.channels
        build_size = size or spec.size

        def load_builtin() -> ImageSet:
            images, labels, num_classes = build_builtin(
                parsed.target, reference, split, build_channels, build_size
            )
            built = ImageSet(images=images, labels=labels, name=reference, num_classes=num_classes)
            return _finish(built, reference, parsed.limit, build_channels, build_size)

        key = ("builtin", parsed.target, split, parsed.limit, build_channels, build_size)
        loaded = _load_cached(key, reference, load_builtin)
    else:
        path = resolve_path(parsed)
        check_path_within_roots(path, reference, allowed_roots)
        data_format = FORMATS[parsed.scheme]
        source = data_format.locate(path, split)
        for file in source.files:
            # A symlink inside an allowed directory may still point out of it.
            check_path_within_roots(file.resolve(), reference, allowed_roots)

        def load_files() -> ImageSet:
            decoded = data_format.decode(source, channels, size)
            return _finish(decoded, reference, parsed.limit, channels, size)

        key = (parsed.scheme, str(path), split, parsed.limit, channels, size, _fingerprint(source))
        loaded = _load_cached(key, reference, load_files)

    logger.info(
        "Loaded %s (%s split): %d images of shape %s in %.2f s",
        reference,
        split,
        len(loaded),
        tuple(loaded.images.shape[1:]),
        time.perf_counter() - start,
    )
    return loaded


def _fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    # Three-channel statistics for a grayscale input: the mean over the channels.
    return (sum(values) / len(values),)


def default_normalization(reference: str, channels: int) -> Normalization:
    """Return the usual mean and std for a dataset reference, adapted to `channels`.

    MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 and SVHN have their own statistics. Every other
    reference gets ImageNet's. One-channel statistics are repeated for RGB input, and
    three-channel statistics are averaged for grayscale input.

    Raises:
        DatasetError: The reference is malformed.
        ConfigError: `channels` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels!r} is not supported: use 1 (grayscale) or 3 (RGB)")
    parsed = parse_reference(reference)
    data_format = FORMATS.get(parsed.scheme)
    if data_format is not None and data_format.mean is not None and data_format.std is not None:
        mean, std = data_format.mean, data_format.std
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Normalization(mean=_fit_channels(mean, channels), std=_fit_channels(std, channels))
