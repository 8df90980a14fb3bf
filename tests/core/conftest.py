"""Shared fixtures: a small LeNet trained on a real Fashion-MNIST subset, cached per test session."""

from pathlib import Path

import pytest

from core.architectures import build_model
from core.checkpoints import save_checkpoint
from core.datasets import default_normalization, load_dataset, subset
from core.hardening import train_classifier

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST = f"fashion-mnist:{FASHION_MNIST_DIR}"


@pytest.fixture(scope="session")
def fashion_subset():
    """2,000 real Fashion-MNIST training images and 500 test images."""
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} is missing: install Debian's dataset-fashion-mnist package")
    train = subset(load_dataset(FASHION_MNIST, channels=1, size=28, split="train"), 2000, seed=0)
    test = subset(load_dataset(FASHION_MNIST, channels=1, size=28, split="test"), 500, seed=0)
    return train, test, default_normalization(FASHION_MNIST, 1)


@pytest.fixture(scope="session")
def trained_lenet(fashion_subset, tmp_path_factory):
    """A LeNet trained for five epochs on the subset, and its checkpoint file."""
    train, _, normalization = fashion_subset
    model = build_model("lenet", num_classes=10, in_channels=1)
    train_classifier(model, train, normalization, epochs=5, seed=0)
    path = tmp_path_factory.mktemp("checkpoint") / "lenet.safetensors"
    save_checkpoint(model, path)
    return model, path
