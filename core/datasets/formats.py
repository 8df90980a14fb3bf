"""The registry of file-based dataset formats: how to find, decode and normalize each.

Loading has two steps. `locate` finds the files of a split without reading them, so the loader
can check them against the allowed roots and fingerprint them for the cache. `decode` reads them
into an `ImageSet` at the files' own channel count and size, except image folders, whose images
are converted and resized one by one because their sizes may differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.datasets.arrays import (
    decode_cifar,
    decode_idx,
    decode_npz,
    decode_svhn,
    locate_cifar,
    locate_idx,
    locate_npz,
    locate_svhn,
)
from core.datasets.imagefolder import decode_imagefolder, locate_imagefolder
from core.datasets.imageset import ImageSet
from core.datasets.sources import SourceFiles


@dataclass(frozen=True)
class FormatSpec:
    """How to find, decode and normalize one file-based dataset format.

    Attributes:
        locate: Finds the files of a split: `(path, split) -> SourceFiles`.
        decode: Reads them: `(source, channels, size) -> ImageSet`. Only image folders use
            `channels` and `size`. The returned set is named after `source.root`.
        mean: Default per-channel mean on the 0..1 scale, None for ImageNet's.
        std: Default per-channel std, None for ImageNet's.
    """

    locate: Callable[[Path, str], SourceFiles]
    decode: Callable[[SourceFiles, int | None, int | None], ImageSet]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


FORMATS: dict[str, FormatSpec] = {
    "mnist": FormatSpec(
        locate=lambda path, split: locate_idx(path, split, "mnist", "MNIST"),
        decode=decode_idx,
        mean=(0.1307,),
        std=(0.3081,),
    ),
    "fashion-mnist": FormatSpec(
        locate=lambda path, split: locate_idx(path, split, "fashion-mnist", "FashionMNIST"),
        decode=decode_idx,
        mean=(0.2860,),
        std=(0.3530,),
    ),
    "cifar10": FormatSpec(
        locate=lambda path, split: locate_cifar(path, split, "cifar10"),
        decode=lambda source, channels, size: decode_cifar(source, "cifar10"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": FormatSpec(
        locate=lambda path, split: locate_cifar(path, split, "cifar100"),
        decode=lambda source, channels, size: decode_cifar(source, "cifar100"),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "svhn": FormatSpec(
        locate=locate_svhn,
        decode=decode_svhn,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
    ),
    "imagefolder": FormatSpec(locate=locate_imagefolder, decode=decode_imagefolder),
    "npz": FormatSpec(locate=locate_npz, decode=decode_npz),
}
