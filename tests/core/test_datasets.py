"""Tests of core.datasets: reference forms, built-in sets, options, roots, cache and batching."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.datasets import (
    BUILTIN_SETS,
    ImageSet,
    Normalization,
    check_reference,
    clear_cache,
    convert_channels,
    default_normalization,
    iterate_batches,
    load_dataset,
    parse_reference,
    resize_square,
    split_holdout,
    subset,
)
from core.errors import ConfigError, DatasetError

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def empty_cache():
    clear_cache()
    yield
    clear_cache()


# --- helpers that write small datasets -----------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist(
    directory: Path, compress: bool, train_count: int = 6, test_count: int = 4
) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = images
        arrays[f"{prefix}-labels"] = labels
    return arrays


def write_cifar_batch(
    path: Path, data: np.ndarray, labels: list[int], label_key: str, protocol: int
) -> None:
    batch = {
        "batch_label": "test batch",
        label_key: labels,
        "data": data,
        "filenames": ["x.png"] * len(labels),
    }
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def write_cifar10(parent: Path, per_batch: int = 3) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        write_cifar_batch(
            folder / f"data_batch_{index}", data, [index % 10] * per_batch, "labels", protocol=2
        )
    data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", data, list(range(per_batch)), "labels", protocol=4)
    return folder


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image_bytes(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


# --- IDX: MNIST and Fashion-MNIST ----------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_loads_both_splits(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress)

    train = load_dataset(f"mnist:{tmp_path}")
    test = load_dataset(f"fashion-mnist:{tmp_path}", split="test")

    assert train.images.shape == (6, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train"]))
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert train.num_classes == 10
    assert test.images.shape == (4, 1, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k"]))


def test_idx_finds_torchvision_raw_folder(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", compress=True)

    loaded = load_dataset(f"fashion-mnist:{tmp_path}")

    assert len(loaded) == 6


def test_idx_missing_names_path_and_files(tmp_path):
    with pytest.raises(
        DatasetError, match=r"looked in .*train-images-idx3-ubyte\[\.gz\], train-labels-idx1-ubyte"
    ):
        load_dataset(f"mnist:{tmp_path / 'absent'}")


def test_idx_bad_magic_rejected(tmp_path):
    write_mnist(tmp_path, compress=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)

    with pytest.raises(DatasetError, match=r"magic number is 0x00000903, expected 0x00000803"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_truncated_rejected(tmp_path):
    write_mnist(tmp_path, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-10]))

    with pytest.raises(
        DatasetError, match=r"is truncated: its header declares shape \(6, 28, 28\)"
    ):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_huge_header_rejected(tmp_path):
    write_mnist(tmp_path, compress=False)
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**31, 2**31)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + b"\x00" * 100)

    with pytest.raises(DatasetError, match=r"is truncated: .* but it has 100 bytes of data"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_trailing_data_rejected(tmp_path):
    write_mnist(tmp_path, compress=False)
    with open(tmp_path / "train-labels-idx1-ubyte", "ab") as stream:
        stream.write(b"\x01")

    with pytest.raises(DatasetError, match=r"has data after the 6 bytes its header declares"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_corrupt_gzip_rejected(tmp_path):
    write_mnist(tmp_path, compress=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")

    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz could not be read"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_count_mismatch_rejected(tmp_path):
    write_mnist(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8), compress=False)

    with pytest.raises(DatasetError, match=r"has 6 images but .* has 5 labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_idx_label_out_of_range_rejected(tmp_path):
    write_mnist(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(6, 12, dtype=np.uint8), compress=False)

    with pytest.raises(DatasetError, match=r"labels from 12 to 12, expected 0 to 9"):
        load_dataset(f"mnist:{tmp_path}")


# --- CIFAR batches -------------------------------------------------------------------------------


def test_cifar10_loads_from_parent_and_folder(tmp_path):
    folder = write_cifar10(tmp_path)

    from_parent = load_dataset(f"cifar10:{tmp_path}")
    from_folder = load_dataset(f"cifar10:{folder}", split="test")

    assert from_parent.images.shape == (15, 3, 32, 32)
    assert from_parent.labels.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert from_parent.num_classes == 10
    assert from_folder.images.shape == (3, 3, 32, 32)
    assert from_folder.labels.tolist() == [0, 1, 2]


def test_cifar10_pixel_layout_is_channel_planes(tmp_path):
    folder = write_cifar10(tmp_path)
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 1024:2048] = 200  # the green plane
    write_cifar_batch(folder / "test_batch", data, [7], "labels", protocol=2)

    loaded = load_dataset(f"cifar10:{folder}?split=test")

    assert loaded.images[0, 1].unique().tolist() == [200]
    assert loaded.images[0, 0].unique().tolist() == [0]


def test_cifar_numpy1_pickle_loads(tmp_path):
    folder = write_cifar10(tmp_path)
    data = np.full((2, 3072), 17, dtype=np.uint8)
    payload = pickle.dumps({"data": data, "labels": [3, 4]}, protocol=2)
    # numpy < 2 names its array constructor numpy.core.multiarray, as the original batches do.
    legacy = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (folder / "test_batch").write_bytes(legacy)

    loaded = load_dataset(f"cifar10:{folder}", split="test")

    assert b"numpy.core.multiarray\n_reconstruct" in legacy
    assert loaded.labels.tolist() == [3, 4]
    assert loaded.images.unique().tolist() == [17]


def test_cifar100_loads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.full((4, 3072), 9, dtype=np.uint8)
    for name in ("train", "test"):
        batch = {b"data": data, b"fine_labels": [0, 42, 99, 5], b"coarse_labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=5))

    loaded = load_dataset(f"cifar100:{tmp_path}", split="test")

    assert loaded.labels.tolist() == [0, 42, 99, 5]
    assert loaded.num_classes == 100
    assert loaded.images.shape == (4, 3, 32, 32)


def test_cifar_missing_batch_listed(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()

    with pytest.raises(
        DatasetError, match=r"looked in .* for data_batch_1, data_batch_2, data_batch_3"
    ):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_malicious_pickle_rejected(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "marker"
    # Protocol 0 pickle that calls os.system("touch MARKER") when loaded by a plain unpickler.
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "test_batch").write_bytes(payload)

    with pytest.raises(
        DatasetError,
        match=r"test_batch is not a plain CIFAR batch: it references the global os\.system",
    ):
        load_dataset(f"cifar10:{folder}", split="test")
    assert not marker.exists()


def test_cifar_reduce_payload_rejected(tmp_path):
    class Payload:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}))

    with pytest.raises(DatasetError, match=r"references the global builtins\.eval"):
        load_dataset(f"cifar10:{folder}", split="test")


def test_cifar_wrong_data_shape_rejected(tmp_path):
    folder = write_cifar10(tmp_path)
    write_cifar_batch(
        folder / "test_batch", np.zeros((2, 100), dtype=np.uint8), [0, 1], "labels", protocol=4
    )

    with pytest.raises(
        DatasetError, match=r"'data' is uint8 \(2, 100\), expected a uint8 array \[N, 3072\]"
    ):
        load_dataset(f"cifar10:{folder}", split="test")


# --- SVHN ----------------------------------------------------------------------------------------


def test_svhn_maps_label_ten_to_zero(tmp_path):
    import scipy.io

    images = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3, 3), dtype=np.uint8)
    scipy.io.savemat(
        tmp_path / "test_32x32.mat", {"X": images, "y": np.array([[10], [1], [9]], dtype=np.uint8)}
    )

    loaded = load_dataset(f"svhn:{tmp_path}?split=test")

    assert loaded.labels.tolist() == [0, 1, 9]
    assert loaded.images.shape == (3, 3, 32, 32)
    assert torch.equal(
        loaded.images[1], torch.from_numpy(images[:, :, :, 1].transpose(2, 0, 1).copy())
    )


def test_svhn_missing_file_named(tmp_path):
    with pytest.raises(DatasetError, match=r"looked in .* for train_32x32\.mat"):
        load_dataset(f"svhn:{tmp_path}")


def test_svhn_not_a_mat_file_rejected(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"not a matlab file")

    with pytest.raises(DatasetError, match=r"train_32x32\.mat could not be read as a MATLAB file"):
        load_dataset(f"svhn:{tmp_path}")


# --- Image folders -------------------------------------------------------------------------------


def test_imagefolder_sorted_classes(tmp_path):
    write_png(tmp_path / "zebra" / "a.png", np.full((8, 8, 3), 10, dtype=np.uint8))
    write_png(tmp_path / "ant" / "b.png", np.full((8, 8, 3), 20, dtype=np.uint8))
    write_png(tmp_path / "ant" / "c.jpg", np.full((8, 8, 3), 30, dtype=np.uint8))

    loaded = load_dataset(f"imagefolder:{tmp_path}")

    assert loaded.labels.tolist() == [0, 0, 1]
    assert loaded.num_classes == 2
    assert loaded.images.shape == (3, 3, 8, 8)
    assert loaded.images[0].unique().tolist() == [20]


def test_imagefolder_uses_split_folders(tmp_path):
    write_png(tmp_path / "train" / "a" / "1.png", np.zeros((6, 6), dtype=np.uint8))
    write_png(tmp_path / "train" / "b" / "2.png", np.zeros((6, 6), dtype=np.uint8))
    write_png(tmp_path / "test" / "a" / "3.png", np.full((6, 6), 255, dtype=np.uint8))

    train = load_dataset(f"imagefolder:{tmp_path}")
    test = load_dataset(f"imagefolder:{tmp_path}?split=test")

    assert len(train) == 2
    assert len(test) == 1
    assert test.images.shape == (1, 1, 6, 6)
    assert test.images.unique().tolist() == [255]


def test_imagefolder_resizes_mixed_sizes(tmp_path):
    write_png(tmp_path / "a" / "1.png", np.zeros((10, 20, 3), dtype=np.uint8))
    write_png(tmp_path / "a" / "2.png", np.zeros((30, 30), dtype=np.uint8))

    loaded = load_dataset(f"imagefolder:{tmp_path}", size=12, channels=3)

    assert loaded.images.shape == (2, 3, 12, 12)


def test_imagefolder_mixed_sizes_need_size(tmp_path):
    write_png(tmp_path / "a" / "1.png", np.zeros((10, 20, 3), dtype=np.uint8))
    write_png(tmp_path / "a" / "2.png", np.zeros((30, 30, 3), dtype=np.uint8))

    with pytest.raises(DatasetError, match=r"have different sizes .*: pass a size"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_flat_folder_unlabelled(tmp_path):
    write_png(tmp_path / "1.png", np.zeros((5, 5), dtype=np.uint8))
    write_png(tmp_path / "2.png", np.zeros((5, 5), dtype=np.uint8))

    loaded = load_dataset(f"imagefolder:{tmp_path}")

    assert loaded.labels.tolist() == [-1, -1]
    assert loaded.num_classes is None


def test_imagefolder_corrupt_image_named(tmp_path):
    write_png(tmp_path / "a" / "good.png", np.zeros((5, 5), dtype=np.uint8))
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")

    with pytest.raises(DatasetError, match=r"bad\.png could not be decoded as an image"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_empty_folder_rejected(tmp_path):
    (tmp_path / "a").mkdir()

    with pytest.raises(DatasetError, match=r"imagefolder data not found"):
        load_dataset(f"imagefolder:{tmp_path}")


# --- npz -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "transpose"),
    [
        ((4, 6, 6), None),
        ((4, 6, 6, 3), (0, 3, 1, 2)),
        ((4, 3, 6, 6), (0, 1, 2, 3)),
        ((4, 1, 6, 6), (0, 1, 2, 3)),
    ],
)
def test_npz_layouts(tmp_path, shape, transpose):
    images = np.random.default_rng(3).integers(0, 256, size=shape, dtype=np.uint8)
    np.savez(tmp_path / "set.npz", x=images, y=np.array([0, 1, 2, 3]))
    expected = images[:, None] if transpose is None else images.transpose(transpose)

    loaded = load_dataset(f"npz:{tmp_path / 'set.npz'}")

    assert tuple(loaded.images.shape) == expected.shape
    assert torch.equal(loaded.images, torch.from_numpy(np.ascontiguousarray(expected)))
    assert loaded.labels.tolist() == [0, 1, 2, 3]
    assert loaded.num_classes == 4


def test_npz_without_labels(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.zeros((2, 4, 4), dtype=np.uint8))

    loaded = load_dataset(f"npz:{tmp_path / 'set.npz'}")

    assert loaded.labels.tolist() == [-1, -1]
    assert loaded.num_classes is None


def test_npz_float_images_rejected(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.zeros((2, 4, 4), dtype=np.float32))

    with pytest.raises(DatasetError, match=r"array 'x' has dtype float32, expected uint8"):
        load_dataset(f"npz:{tmp_path / 'set.npz'}")


def test_npz_object_array_rejected(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.array([{"a": 1}], dtype=object))

    with pytest.raises(
        DatasetError, match=r"could not be read as an npz archive without pickled objects"
    ):
        load_dataset(f"npz:{tmp_path / 'set.npz'}")


def test_npz_missing_x_rejected(tmp_path):
    np.savez(tmp_path / "set.npz", images=np.zeros((2, 4, 4), dtype=np.uint8))

    with pytest.raises(DatasetError, match=r"has the arrays \['images'\] but no 'x'"):
        load_dataset(f"npz:{tmp_path / 'set.npz'}")


def test_npz_bad_layout_rejected(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.zeros((2, 5, 6, 7), dtype=np.uint8))

    with pytest.raises(DatasetError, match=r"array 'x' has shape \(2, 5, 6, 7\)"):
        load_dataset(f"npz:{tmp_path / 'set.npz'}")


def test_npz_missing_file_named(tmp_path):
    with pytest.raises(DatasetError, match=r"npz data not found .*for absent\.npz"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


def test_file_set_converted_when_requested(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.full((2, 8, 8), 100, dtype=np.uint8))

    loaded = load_dataset(f"npz:{tmp_path / 'set.npz'}", channels=3, size=4)

    assert loaded.images.shape == (2, 3, 4, 4)
    assert loaded.images.unique().tolist() == [100]


# --- built-in sets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_SETS))
def test_builtin_channels_and_size(name):
    rgb = load_dataset(f"builtin:{name}", channels=3, size=20, split="test")
    gray = load_dataset(f"builtin:{name}?limit=7", channels=1, size=16)

    assert rgb.images.dtype == torch.uint8
    assert tuple(rgb.images.shape[1:]) == (3, 20, 20)
    assert len(rgb) > 0
    assert tuple(gray.images.shape) == (7, 1, 16, 16)
    assert gray.labels.dtype == torch.int64


@pytest.mark.parametrize("name", sorted(BUILTIN_SETS))
def test_builtin_splits_disjoint(name):
    train = load_dataset(f"builtin:{name}", split="train")
    test = load_dataset(f"builtin:{name}", split="test")

    assert image_bytes(train.images).isdisjoint(image_bytes(test.images))


@pytest.mark.parametrize(
    ("name", "count", "shape"),
    [
        ("mnist-5k", 2500, (1, 28, 28)),
        ("sklearn-digits", 899, (1, 28, 28)),
        ("lfw-faces", 50, (1, 25, 25)),
        ("skimage-natural", 1000, (3, 32, 32)),
        ("gaussian-noise", 1000, (3, 32, 32)),
    ],
)
def test_builtin_defaults(name, count, shape):
    loaded = load_dataset(f"builtin:{name}")

    assert len(loaded) == count
    assert tuple(loaded.images.shape[1:]) == shape


def test_builtin_deterministic():
    first = load_dataset("builtin:skimage-textures", size=24)
    clear_cache()
    second = load_dataset("builtin:skimage-textures", size=24)

    assert torch.equal(first.images, second.images)


def test_builtin_mnist_labels_balanced():
    loaded = load_dataset("builtin:mnist-5k", split="test")

    assert loaded.num_classes == 10
    assert sorted(loaded.labels.unique().tolist()) == list(range(10))


def test_builtin_needs_no_path_under_roots():
    check_reference("builtin:uniform-noise?split=test", allowed_roots=[])


# --- reference parsing and options ---------------------------------------------------------------


def test_parse_reference_options():
    parsed = parse_reference("fashion-mnist:/data/fmnist?split=test&limit=2000")

    assert parsed.scheme == "fashion-mnist"
    assert parsed.target == "/data/fmnist"
    assert parsed.split == "test"
    assert parsed.limit == 2000


def test_parse_reference_without_options():
    parsed = parse_reference("  CIFAR10:/data/c10 ")

    assert parsed.scheme == "cifar10"
    assert parsed.split is None
    assert parsed.limit is None


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("/data/mnist", r"has no scheme: write SCHEME:PATH"),
        ("tiff:/data", r"unknown scheme 'tiff': use one of mnist, fashion-mnist"),
        ("mnist:", r"is missing a path after 'mnist:'"),
        ("builtin:?split=test", r"is missing a built-in set name"),
        (
            "mnist:/d?size=3",
            r"unknown option 'size': valid options are split= \(train or test\); limit=",
        ),
        ("mnist:/d?split=val", r"invalid split 'val': use split=train or split=test"),
        ("mnist:/d?limit=0", r"invalid limit '0': use limit=N with N a positive integer"),
        ("mnist:/d?limit=ten", r"invalid limit 'ten'"),
        ("mnist:/d?limit=-3", r"invalid limit '-3'"),
        ("mnist:/d?split", r"option 'split' without a value"),
        ("mnist:/d?split=test&split=train", r"sets the option 'split' twice"),
        ("mnist:/d?", r"empty option list"),
        (
            "builtin:imagenet",
            r"unknown built-in set 'imagenet': use one of mnist-5k, sklearn-digits",
        ),
    ],
)
def test_reference_errors(reference, message):
    with pytest.raises(DatasetError, match=message):
        check_reference(reference, allowed_roots=None)


def test_split_keyword_invalid():
    with pytest.raises(DatasetError, match=r"invalid split 'validation'"):
        load_dataset("builtin:uniform-noise", split="validation")


def test_reference_split_overrides_keyword(tmp_path):
    write_mnist(tmp_path, compress=False)

    loaded = load_dataset(f"mnist:{tmp_path}?split=test", split="train")

    assert len(loaded) == 4


def test_limit_takes_seeded_subset(tmp_path):
    images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1)
    np.savez(tmp_path / "set.npz", x=images, y=np.arange(20))

    loaded = load_dataset(f"npz:{tmp_path / 'set.npz'}?limit=5")
    expected = subset(
        ImageSet(torch.from_numpy(images[:, None]), torch.arange(20), "set"), 5, seed=0
    )

    assert loaded.labels.tolist() == expected.labels.tolist()
    assert loaded.labels.tolist() == sorted(loaded.labels.tolist())
    assert loaded.labels.tolist() != [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("channels", "size"), [(2, None), (None, 0), (3, -5)])
def test_invalid_target_shape(channels, size):
    with pytest.raises(ConfigError, match=r"is (not supported|invalid)"):
        load_dataset("builtin:uniform-noise", channels=channels, size=size)


# --- allowed roots -------------------------------------------------------------------------------


def test_roots_accept_inside(tmp_path):
    write_mnist(tmp_path / "root" / "mnist", compress=True)

    loaded = load_dataset(f"mnist:{tmp_path / 'root' / 'mnist'}", allowed_roots=[tmp_path / "root"])

    assert len(loaded) == 6


def test_roots_reject_dotdot(tmp_path):
    (tmp_path / "root").mkdir()
    write_mnist(tmp_path / "outside", compress=True)
    reference = f"mnist:{tmp_path / 'root' / '..' / 'outside'}"

    with pytest.raises(
        DatasetError, match=r"outside the allowed data roots .*: place the data under one of them"
    ):
        load_dataset(reference, allowed_roots=[tmp_path / "root"])
    with pytest.raises(DatasetError, match=r"resolves to .*outside, which is outside"):
        check_reference(reference, allowed_roots=[tmp_path / "root"])


def test_roots_reject_symlink_out(tmp_path):
    (tmp_path / "root").mkdir()
    np.savez(tmp_path / "secret.npz", x=np.zeros((1, 2, 2), dtype=np.uint8))
    (tmp_path / "root" / "link.npz").symlink_to(tmp_path / "secret.npz")

    with pytest.raises(DatasetError, match=r"outside the allowed data roots"):
        check_reference(f"npz:{tmp_path / 'root' / 'link.npz'}", allowed_roots=[tmp_path / "root"])


def test_roots_reject_symlinked_file_in_folder(tmp_path):
    root = tmp_path / "root"
    write_png(root / "set" / "a" / "1.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(tmp_path / "private.png", np.zeros((4, 4), dtype=np.uint8))
    (root / "set" / "a" / "2.png").symlink_to(tmp_path / "private.png")

    with pytest.raises(
        DatasetError, match=r"private\.png, which is outside the allowed data roots"
    ):
        load_dataset(f"imagefolder:{root / 'set'}", allowed_roots=[root])


def test_roots_none_allows_any_path(tmp_path):
    np.savez(tmp_path / "set.npz", x=np.zeros((1, 2, 2), dtype=np.uint8))

    check_reference(f"npz:{tmp_path / 'set.npz'}", allowed_roots=None)


# --- cache ---------------------------------------------------------------------------------------


def test_cache_returns_same_tensor(tmp_path):
    write_mnist(tmp_path, compress=True)

    first = load_dataset(f"mnist:{tmp_path}", channels=1)
    second = load_dataset(f"mnist:{tmp_path}/.", channels=1)

    assert second.images.data_ptr() == first.images.data_ptr()
    assert second.name == f"mnist:{tmp_path}/."


def test_cache_misses_after_file_change(tmp_path):
    write_mnist(tmp_path, compress=True)
    first = load_dataset(f"mnist:{tmp_path}")
    stat = (tmp_path / "train-images-idx3-ubyte.gz").stat()
    os.utime(
        tmp_path / "train-images-idx3-ubyte.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)
    )

    second = load_dataset(f"mnist:{tmp_path}")

    assert second.images.data_ptr() != first.images.data_ptr()


def test_cache_keys_on_size(tmp_path):
    write_mnist(tmp_path, compress=True)

    native = load_dataset(f"mnist:{tmp_path}")
    resized = load_dataset(f"mnist:{tmp_path}", size=14)

    assert tuple(native.images.shape[-2:]) == (28, 28)
    assert tuple(resized.images.shape[-2:]) == (14, 14)


# --- normalization and batching ------------------------------------------------------------------


def test_iterate_batches_values():
    images = (
        torch.tensor([0, 255, 51, 102, 0], dtype=torch.uint8)
        .view(5, 1, 1, 1)
        .expand(5, 1, 2, 2)
        .contiguous()
    )
    data = ImageSet(images=images, labels=torch.arange(5), name="toy", num_classes=5)
    normalization = Normalization(mean=(0.5,), std=(0.5,))

    batches = list(iterate_batches(data, normalization, batch_size=2))

    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    assert batches[0][0].dtype == torch.float32
    assert batches[0][1].dtype == torch.int64
    assert batches[0][0][:, 0, 0, 0].tolist() == [-1.0, 1.0]
    assert batches[1][0][:, 0, 0, 0].tolist() == pytest.approx([-0.6, -0.2])


def test_iterate_batches_shuffle_with_generator():
    data = ImageSet(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10), "toy", 10)
    normalization = Normalization(mean=(0.0,), std=(1.0,))

    first = [
        int(label)
        for _, labels in iterate_batches(
            data, normalization, 3, shuffle=True, generator=torch.Generator().manual_seed(5)
        )
        for label in labels
    ]
    second = [
        int(label)
        for _, labels in iterate_batches(
            data, normalization, 3, shuffle=True, generator=torch.Generator().manual_seed(5)
        )
        for label in labels
    ]

    assert sorted(first) == list(range(10))
    assert first == second
    assert first != list(range(10))


def test_iterate_batches_rejects_bad_batch_size():
    data = ImageSet(
        torch.zeros(2, 1, 1, 1, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), "toy"
    )

    with pytest.raises(ConfigError, match=r"batch_size=0 is invalid"):
        list(iterate_batches(data, Normalization((0.0,), (1.0,)), 0))


def test_normalization_per_channel():
    batch = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    normalization = Normalization(mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))

    assert normalization.apply(batch).flatten().tolist() == [1.0, 1.0, 0.0]


def test_normalization_channel_mismatch():
    with pytest.raises(DatasetError, match=r"batch has 1 channels but the normalization mean"):
        Normalization((0.1, 0.2, 0.3), (1.0, 1.0, 1.0)).apply(
            torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
        )


@pytest.mark.parametrize(("mean", "std"), [((0.5,), (0.0,)), ((0.5, 0.5), (0.2,)), ((), ())])
def test_normalization_invalid(mean, std):
    with pytest.raises(ConfigError, match=r"normalization mean"):
        Normalization(mean, std)


@pytest.mark.parametrize(
    ("reference", "channels", "mean", "std"),
    [
        ("mnist:/d", 1, (0.1307,), (0.3081,)),
        ("fashion-mnist:/d", 1, (0.2860,), (0.3530,)),
        ("fashion-mnist:/d", 3, (0.2860,) * 3, (0.3530,) * 3),
        ("cifar10:/d", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("cifar100:/d", 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        ("svhn:/d", 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
        ("imagefolder:/d", 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("npz:/d.npz", 1, (0.449,), (0.226,)),
        ("builtin:mnist-5k", 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_default_normalization(reference, channels, mean, std):
    normalization = default_normalization(reference, channels)

    assert normalization.mean == pytest.approx(mean)
    assert normalization.std == pytest.approx(std)


def test_default_normalization_bad_channels():
    with pytest.raises(ConfigError, match=r"channels=4 is not supported"):
        default_normalization("mnist:/d", 4)


# --- conversion, hold-out and subsets ------------------------------------------------------------


def test_convert_channels_luma():
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)

    assert convert_channels(red, 1).item() == 76


def test_convert_channels_repeat_and_alpha():
    gray = torch.full((1, 1, 2, 2), 9, dtype=torch.uint8)
    rgba = torch.full((1, 4, 2, 2), 9, dtype=torch.uint8)

    assert tuple(convert_channels(gray, 3).shape) == (1, 3, 2, 2)
    assert tuple(convert_channels(rgba, 3).shape) == (1, 3, 2, 2)


def test_resize_square_center_crops():
    batch = torch.zeros(1, 1, 4, 8, dtype=torch.uint8)
    batch[..., 2:6] = 200

    resized = resize_square(batch, 4)

    assert tuple(resized.shape) == (1, 1, 4, 4)
    assert resized.unique().tolist() == [200]


def test_split_holdout_disjoint():
    data = ImageSet(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10), "toy", 10)

    remaining, holdout = split_holdout(data, 0.3, seed=1)
    again, _ = split_holdout(data, 0.3, seed=1)

    assert len(holdout) == 3
    assert len(remaining) == 7
    assert set(remaining.labels.tolist()).isdisjoint(holdout.labels.tolist())
    assert sorted(remaining.labels.tolist() + holdout.labels.tolist()) == list(range(10))
    assert again.labels.tolist() == remaining.labels.tolist()


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.01])
def test_split_holdout_invalid_fraction(fraction):
    data = ImageSet(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10), "toy", 10)

    with pytest.raises(ConfigError, match=r"holdout fraction"):
        split_holdout(data, fraction, seed=0)


def test_subset_size_and_seed():
    data = ImageSet(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10), "toy", 10)

    first = subset(data, 4, seed=3)
    second = subset(data, 4, seed=3)

    assert len(first) == 4
    assert first.labels.tolist() == second.labels.tolist()
    assert subset(data, 20, seed=3) is data


# --- real data -----------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist_test_split():
    loaded = load_dataset(f"fashion-mnist:{REAL_FASHION_MNIST}?split=test")

    assert tuple(loaded.images.shape) == (10000, 1, 28, 28)
    assert loaded.labels.bincount().tolist() == [1000] * 10
