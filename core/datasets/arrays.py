"""Loaders for array files: IDX (MNIST, Fashion-MNIST), CIFAR python batches, SVHN .mat and npz.

Each format has two steps. `locate_*` finds the files of a split without reading them, so the
loader can check them against the allowed roots and fingerprint them for the cache. `decode_*`
reads them into an `ImageSet` at the files' own channel count and size.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from core.datasets.imageset import ImageSet
from core.datasets.safe_pickle import load_array_pickle
from core.datasets.sources import SourceFiles, check_labels, not_found_error
from core.errors import DatasetError

# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

_IDX_UBYTE = 0x08
_READ_CHUNK = 16 * 1024 * 1024


def _read_up_to(stream: BinaryIO, count: int) -> bytes:
    """Read `count` bytes or until the end of the stream, in chunks.

    Memory grows with the data actually present, so a header that declares a huge shape cannot
    make the reader allocate it up front.
    """
    parts = []
    remaining = count
    while remaining > 0:
        chunk = stream.read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def locate_idx(path: Path, split: str, kind: str, torchvision_folder: str) -> SourceFiles:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    # torchvision keeps the same files under ROOT/<DatasetClass>/raw.
    directories = [path, path / "raw", path / torchvision_folder / "raw"]
    for directory in directories:
        found = []
        for stem in stems:
            candidates = [directory / stem, directory / f"{stem}.gz"]
            existing = [candidate for candidate in candidates if candidate.is_file()]
            if existing:
                found.append(existing[0])
        if len(found) == len(stems):
            return SourceFiles(root=directory, files=tuple(found))
    names = [f"{stem}[.gz]" for stem in stems]
    raise not_found_error(kind, path, directories, names)


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or gzip) into an array of its declared shape.

    The header is two zero bytes, the type code 0x08, the number of dimensions and one
    big-endian uint32 per dimension, followed by exactly prod(dims) bytes.

    Raises:
        DatasetError: The file is unreadable, its magic number or dimension count is wrong, or
            its size does not match the header.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            magic = stream.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _IDX_UBYTE:
                raise DatasetError(
                    f"{path} is not an unsigned-byte IDX file: its magic number is "
                    f"0x{magic.hex() or 'empty'}, expected 0x0000080{expected_dims}. Replace it "
                    "with the original dataset file"
                )
            if magic[3] != expected_dims:
                raise DatasetError(
                    f"{path} has {magic[3]} dimensions, expected {expected_dims}: check that "
                    "images and labels files are not swapped"
                )
            header = stream.read(4 * expected_dims)
            if len(header) != 4 * expected_dims:
                raise DatasetError(
                    f"{path} is truncated inside its header: replace it with the original dataset "
                    "file"
                )
            dims = struct.unpack(f">{expected_dims}I", header)
            expected_bytes = math.prod(dims)
            data = _read_up_to(stream, expected_bytes)
            trailing = stream.read(1)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(
            f"{path} could not be read ({type(error).__name__}: {error}): replace it with the "
            "original dataset file"
        ) from error
    if len(data) != expected_bytes:
        raise DatasetError(
            f"{path} is truncated: its header declares shape {dims} ({expected_bytes} bytes) but "
            f"it has {len(data)} bytes of data. Replace it with the original dataset file"
        )
    if trailing:
        raise DatasetError(
            f"{path} has data after the {expected_bytes} bytes its header declares: replace it "
            "with the original dataset file"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def decode_idx(source: SourceFiles, channels: int | None, size: int | None) -> ImageSet:
    images_path, labels_path = source.files
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} "
            "labels: use the images and labels files of the same split"
        )
    check_labels(labels, 10, labels_path)
    return ImageSet(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        name=str(source.root),
        num_classes=10,
    )


# --- CIFAR python batches ---------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{index}" for index in range(1, 6)),
        ("test_batch",),
        "labels",
        10,
    ),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}

_CIFAR_SIDE = 32


def locate_cifar(path: Path, split: str, kind: str) -> SourceFiles:
    layout = _CIFAR_LAYOUTS[kind]
    names = layout.train_files if split == "train" else layout.test_files
    directories = [path, path / layout.folder]
    for directory in directories:
        files = tuple(directory / name for name in names)
        if all(file.is_file() for file in files):
            return SourceFiles(root=directory, files=files)
    raise not_found_error(kind, path, directories, list(names))


def decode_cifar(source: SourceFiles, kind: str) -> ImageSet:
    layout = _CIFAR_LAYOUTS[kind]
    image_parts = []
    label_parts = []
    for file in source.files:
        batch = load_array_pickle(file)
        if not isinstance(batch, dict):
            raise DatasetError(
                f"{file} contains a {type(batch).__name__}, expected a dict: use the original "
                "batch file"
            )
        # Batches written by Python 2 have str keys, those re-saved by Python 3 may have bytes keys.
        entries = {
            key.decode("latin1") if isinstance(key, bytes) else key: value
            for key, value in batch.items()
        }
        if "data" not in entries or layout.label_key not in entries:
            raise DatasetError(
                f"{file} has the keys {sorted(map(str, entries))}, expected 'data' and "
                f"{layout.label_key!r}: use the original {kind} batch file"
            )
        data = entries["data"]
        labels = np.asarray(entries[layout.label_key])
        pixels = 3 * _CIFAR_SIDE * _CIFAR_SIDE
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != pixels
        ):
            description = (
                f"{data.dtype} {data.shape}"
                if isinstance(data, np.ndarray)
                else type(data).__name__
            )
            raise DatasetError(
                f"{file}: 'data' is {description}, expected a uint8 array [N, {pixels}]: use the "
                "original batch file"
            )
        if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"{file}: {layout.label_key!r} has shape {labels.shape} and type {labels.dtype}, "
                f"expected {data.shape[0]} integer labels: use the original batch file"
            )
        check_labels(labels, layout.num_classes, file)
        image_parts.append(data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE))
        label_parts.append(labels.astype(np.int64))
    return ImageSet(
        images=torch.from_numpy(np.concatenate(image_parts)),
        labels=torch.from_numpy(np.concatenate(label_parts)),
        name=str(source.root),
        num_classes=layout.num_classes,
    )


# --- SVHN (cropped digits) ----------------------------------------------------------------------


def locate_svhn(path: Path, split: str) -> SourceFiles:
    name = f"{split}_32x32.mat"
    if (path / name).is_file():
        return SourceFiles(root=path, files=(path / name,))
    raise not_found_error("svhn", path, [path], [name])


def decode_svhn(source: SourceFiles, channels: int | None, size: int | None) -> ImageSet:
    import scipy.io

    (file,) = source.files
    try:
        contents = scipy.io.loadmat(file, variable_names=["X", "y"])
    except (
        OSError,
        ValueError,
        NotImplementedError,
        TypeError,
        scipy.io.matlab.MatReadError,
    ) as error:
        raise DatasetError(
            f"{file} could not be read as a MATLAB file ({type(error).__name__}: {error}): use "
            "the original SVHN download (format 2, cropped digits)"
        ) from error
    if "X" not in contents or "y" not in contents:
        raise DatasetError(
            f"{file} lacks the variables 'X' and 'y': use the original SVHN cropped-digits file"
        )
    images = contents["X"]
    labels = np.asarray(contents["y"]).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != 3:
        raise DatasetError(
            f"{file}: 'X' is {images.dtype} {images.shape}, expected uint8 [32, 32, 3, N]: use "
            "the original SVHN file"
        )
    if labels.shape[0] != images.shape[3] or not np.issubdtype(labels.dtype, np.number):
        raise DatasetError(
            f"{file}: 'y' has {labels.shape[0]} entries for {images.shape[3]} images: use the "
            "original SVHN file"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DatasetError(
            f"{file}: labels range from {labels.min()} to {labels.max()}, expected 1 to 10: use "
            "the original SVHN file"
        )
    # SVHN stores the digit 0 as label 10.
    labels[labels == 10] = 0
    return ImageSet(
        images=torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1))),
        labels=torch.from_numpy(labels),
        name=str(source.root),
        num_classes=10,
    )


# --- npz arrays ---------------------------------------------------------------------------------

_CHANNEL_COUNTS = (1, 3, 4)


def locate_npz(path: Path, split: str) -> SourceFiles:
    if not path.is_file():
        raise not_found_error("npz", path, [path.parent], [path.name])
    return SourceFiles(root=path, files=(path,))


def _images_to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[3] in _CHANNEL_COUNTS:
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in _CHANNEL_COUNTS:
        return images
    raise DatasetError(
        f"{path}: array 'x' has shape {images.shape}, expected [N, H, W], [N, H, W, C] or [N, C, "
        "H, W] with C one of 1, 3, 4: save the images in one of those layouts"
    )


def decode_npz(source: SourceFiles, channels: int | None, size: int | None) -> ImageSet:
    (file,) = source.files
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetError(
                f"{file} is a single .npy array, expected an .npz archive: save it with "
                "np.savez(path, x=images, y=labels)"
            )
        with loaded as archive:
            if "x" not in archive.files:
                raise DatasetError(
                    f"{file} has the arrays {archive.files} but no 'x': save the images as "
                    "np.savez(path, x=..., y=...)"
                )
            images = archive["x"]
            labels = archive["y"] if "y" in archive.files else None
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(
            f"{file} could not be read as an npz archive without pickled objects "
            f"({type(error).__name__}: {error}): save plain numeric arrays with np.savez"
        ) from error
    if images.dtype != np.uint8:
        raise DatasetError(
            f"{file}: array 'x' has dtype {images.dtype}, expected uint8: scale the pixels to "
            "0..255 and save them as uint8"
        )
    images = np.ascontiguousarray(_images_to_nchw(images, file))
    if labels is None:
        return ImageSet(
            images=torch.from_numpy(images),
            labels=torch.full((images.shape[0],), -1, dtype=torch.int64),
            name=str(file),
        )
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{file}: array 'y' is {labels.dtype} {labels.shape}, expected {images.shape[0]} "
            "integer labels: save one label per image"
        )
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise DatasetError(
            f"{file}: array 'y' contains {labels.min()}, expected labels >= 0 (or -1 for "
            "unlabelled images)"
        )
    num_classes = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else None
    return ImageSet(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        name=str(file),
        num_classes=num_classes,
    )
