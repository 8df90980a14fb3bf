"""Loader for folders of image files, one subfolder per class, decoded with PIL."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.datasets.imageset import ImageSet, convert_channels
from core.datasets.sources import SourceFiles, not_found_error
from core.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


# --- Image folders -------------------------------------------------------------------------------


def _image_files(directory: Path) -> list[Path]:
    files = []
    for current, subdirectories, names in os.walk(directory):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                files.append(Path(current) / name)
    return files


def locate_imagefolder(path: Path, split: str) -> SourceFiles:
    root = path
    if (path / "train").is_dir() and (path / "test").is_dir():
        root = path / split
    if not root.is_dir():
        raise not_found_error("imagefolder", path, [path], ["a directory of class folders"])
    classes = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    files: list[Path] = []
    for name in classes:
        found = _image_files(root / name)
        if not found:
            logger.warning("Image folder %s: class folder %r contains no images", root, name)
        files.extend(found)
    if not files:
        # A flat folder of images is an unlabelled set.
        classes = []
        files = [
            entry
            for entry in sorted(root.iterdir())
            if entry.is_file()
            and not entry.name.startswith(".")
            and entry.name.lower().endswith(IMAGE_SUFFIXES)
        ]
    if not files:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        expected = f"class folders or images with the suffixes {suffixes}"
        raise not_found_error("imagefolder", path, [root], [expected])
    return SourceFiles(root=root, files=tuple(files), classes=tuple(classes))


def decode_image_file(path: Path, channels: int | None, size: int | None) -> torch.Tensor:
    """Decode one image file with PIL into a uint8 tensor [C, H, W].

    With `channels` None a grayscale image stays one channel and any other mode becomes RGB.

    Raises:
        DatasetError: PIL cannot decode the file or it exceeds PIL's decompression-bomb limit.
    """
    try:
        with Image.open(path) as image:
            if channels == 1 or (channels is None and image.mode in _GRAY_MODES):
                image = image.convert("L")
            else:
                image = image.convert("RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"{path} could not be decoded as an image ({type(error).__name__}: {error}): remove "
            "or replace the file"
        ) from error
    if size is not None:
        array = resize_array_square(array, size)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def resize_array_square(array: np.ndarray, size: int) -> np.ndarray:
    """Resize one uint8 image [H, W] or [H, W, 3] to `size` x `size` with PIL's bilinear filter.

    A non-square image is scaled so that its shorter side is `size`, then center-cropped, as
    `resize_square` does for tensors. PIL widens the filter when it shrinks an image, so the
    result is antialiased. PIL is used for single images because one small torch interpolate
    call per image is slowed down a lot by thread start-up on a busy machine.
    """
    height, width = array.shape[:2]
    if height == size and width == size:
        return array
    scale = size / min(height, width)
    scaled_height = max(size, round(height * scale))
    scaled_width = max(size, round(width * scale))
    top = (scaled_height - size) // 2
    left = (scaled_width - size) // 2
    # The crop window of the scaled image, in source pixel coordinates.
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    resized = Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


def decode_imagefolder(source: SourceFiles, channels: int | None, size: int | None) -> ImageSet:
    class_index = {name: index for index, name in enumerate(source.classes)}
    tensors = []
    labels = []
    for file in source.files:
        tensors.append(decode_image_file(file, channels, size))
        relative = file.relative_to(source.root)
        labels.append(class_index[relative.parts[0]] if len(relative.parts) > 1 else -1)
    if channels is None and any(tensor.shape[0] == 3 for tensor in tensors):
        tensors = [convert_channels(tensor.unsqueeze(0), 3)[0] for tensor in tensors]
    shapes = {tuple(tensor.shape) for tensor in tensors}
    if len(shapes) > 1:
        examples = ", ".join(str(shape) for shape in sorted(shapes)[:3])
        raise DatasetError(
            f"images in {source.root} have different sizes ({examples}, ...): pass a size so they "
            "are all resized to it"
        )
    return ImageSet(
        images=torch.stack(tensors),
        labels=torch.tensor(labels, dtype=torch.int64),
        name=str(source.root),
        num_classes=len(source.classes) or None,
    )
