"""Tests for core.checkpoints: safe reading, wrappers, strict matching and error messages."""

import hashlib
import io
import os
import pickle
import random
import shlex
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from core.architectures import build_model
from core.checkpoints import (
    LoadedModel,
    load_model,
    read_state_dict,
    save_checkpoint,
    sha256_file,
)
from core.errors import CheckpointError, ConfigError


class ShellCommand:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def random_state(arch: str = "lenet", num_classes: int = 10, in_channels: int | None = None):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    return {key: tensor.clone() for key, tensor in model.state_dict().items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


@pytest.fixture
def lenet_state() -> dict[str, torch.Tensor]:
    return random_state("lenet")


# --- wrappers and formats ------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda state: state, id="plain"),
        pytest.param(lambda state: {"state_dict": state, "epoch": 7}, id="state_dict"),
        pytest.param(lambda state: {"model": state, "optimizer": {"lr": 0.1}}, id="model"),
        pytest.param(lambda state: {"net": state, "acc": 0.9}, id="net"),
        pytest.param(
            lambda state: {f"module.{key}": value for key, value in state.items()},
            id="module-prefix",
        ),
        pytest.param(
            lambda state: {"state_dict": {f"module.{key}": value for key, value in state.items()}},
            id="state_dict-module-prefix",
        ),
        pytest.param(lambda state: {"checkpoint": 1, "model": {"net": state}}, id="model-net"),
    ],
)
def test_load_model_wrappers(tmp_path: Path, lenet_state: dict, wrap) -> None:
    path = tmp_path / "weights.pt"
    torch.save(wrap(lenet_state), path)
    loaded = load_model(path, "lenet")
    assert loaded.num_classes == 10
    assert_same_tensors(loaded.model.state_dict(), lenet_state)


def test_load_model_safetensors(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(lenet_state, str(path))
    loaded = load_model(path, "lenet")
    assert_same_tensors(loaded.model.state_dict(), lenet_state)


def test_load_model_legacy_format(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "weights.pth"
    torch.save(lenet_state, path, _use_new_zipfile_serialization=False)
    loaded = load_model(path, "lenet")
    assert_same_tensors(loaded.model.state_dict(), lenet_state)


def test_read_state_dict_strips_prefix(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "ddp.pt"
    torch.save({"module.module." + key: value for key, value in lenet_state.items()}, path)
    assert_same_tensors(read_state_dict(path), lenet_state)


def test_load_model_result_fields(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "weights.pt"
    torch.save(lenet_state, path)
    loaded = load_model(path, "lenet")
    assert isinstance(loaded, LoadedModel)
    assert loaded.arch == "lenet"
    assert loaded.in_channels == 1
    assert loaded.path == path
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.model.training is False
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_load_model_infers_settings(tmp_path: Path) -> None:
    state = random_state("lenet", num_classes=7, in_channels=3)
    path = tmp_path / "rgb7.pt"
    torch.save(state, path)
    loaded = load_model(path, "lenet")
    assert loaded.num_classes == 7
    assert loaded.in_channels == 3
    with torch.no_grad():
        logits = loaded.model(torch.zeros(2, 3, 28, 28))
    assert logits.shape == (2, 7)


def test_load_model_infers_cifar_classes(tmp_path: Path) -> None:
    state = random_state("wrn40_2", num_classes=100)
    path = tmp_path / "wrn.safetensors"
    safetensors.torch.save_file(state, str(path))
    loaded = load_model(path, "wrn40_2")
    assert loaded.num_classes == 100
    assert loaded.in_channels == 3


def test_load_model_explicit_settings(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "weights.pt"
    torch.save(lenet_state, path)
    loaded = load_model(path, "lenet", num_classes=10, in_channels=1)
    assert loaded.num_classes == 10


def test_load_model_old_batch_norm(tmp_path: Path) -> None:
    state = random_state("wrn40_2")
    old_state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(old_state, path)
    loaded = load_model(path, "wrn40_2")
    counter = loaded.model.state_dict()["block1.layer.0.bn1.num_batches_tracked"]
    assert int(counter) == 0
    assert torch.equal(loaded.model.state_dict()["fc.weight"], state["fc.weight"])


# --- unsafe and malformed files ------------------------------------------------------------


def test_raw_pickle_code_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = ShellCommand(f"touch {shlex.quote(str(marker))}")
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="pickled Python objects") as caught:
        load_model(path, "lenet")
    assert not marker.exists()
    assert "system" in str(caught.value)
    assert str(path) in str(caught.value)


def test_modern_pickle_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = ShellCommand(f"touch {shlex.quote(str(marker))}")
    path.write_bytes(pickle.dumps(payload, protocol=5))
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_model(path, "lenet")
    assert not marker.exists()


def test_torch_save_code_not_run(tmp_path: Path, lenet_state: dict) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": lenet_state, "hook": ShellCommand(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match="never unpickled"):
        read_state_dict(path)
    assert not marker.exists()


def test_whole_model_pickle_rejected(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(build_model("lenet"), path)
    with pytest.raises(CheckpointError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        load_model(path, "lenet")


# Fixed bytes keep the test deterministic. They start with 0x8f rather than the pickle PROTO
# opcode 0x80, so they must be reported as not a checkpoint rather than as a rejected pickle.
RANDOM_BYTES = bytes([0x8F]) + random.Random(0).randbytes(4095)


def truncated_zip(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "make_bytes", "reason"),
    [
        ("random.pt", lambda state: RANDOM_BYTES, "not a readable PyTorch checkpoint"),
        ("empty.pt", lambda state: b"", r"is empty \(0 bytes\)"),
        ("text.pt", lambda state: b"hello world\n", "not a readable PyTorch checkpoint"),
        ("truncated.pt", truncated_zip, "not a readable PyTorch checkpoint"),
        ("random.safetensors", lambda state: RANDOM_BYTES, "not a valid safetensors file"),
        ("empty.safetensors", lambda state: b"", r"is empty \(0 bytes\)"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, lenet_state: dict, name, make_bytes, reason) -> None:
    path = tmp_path / name
    path.write_bytes(make_bytes(lenet_state))
    with pytest.raises(CheckpointError, match=reason) as caught:
        load_model(path, "lenet")
    message = str(caught.value)
    assert str(path) in message
    assert "architecture 'lenet'" in message
    assert "torch.save(model.state_dict(), path)" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match=f"Checkpoint file {path} not found"):
        load_model(path, "lenet")


def test_directory_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory, not a file"):
        read_state_dict(tmp_path)


def test_unknown_arch_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown architecture 'lenet5'"):
        load_model(tmp_path / "absent.pt", "lenet5")


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (
            {"epoch": 3, "optimizer": {"lr": 0.1}},
            "keys 'epoch', 'optimizer', and 'epoch' has type int",
        ),
        (torch.zeros(3), "it contains a value of type Tensor"),
        ({}, "it contains an empty dict"),
        ({1: torch.zeros(1)}, "key 1 has type int, not str"),
    ],
)
def test_not_a_state_dict(tmp_path: Path, content, detail) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="does not contain a state_dict") as caught:
        read_state_dict(path)
    assert detail in str(caught.value)


def test_prefix_duplicates_rejected(tmp_path: Path, lenet_state: dict) -> None:
    state = dict(lenet_state)
    state["module.fc.bias"] = state["fc.bias"]
    path = tmp_path / "both.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="'fc.bias' both with and without"):
        read_state_dict(path)


# --- strict matching -----------------------------------------------------------------------


def test_key_mismatch_message(tmp_path: Path, lenet_state: dict) -> None:
    state = {key.replace("fc.", "head."): value for key, value in lenet_state.items()}
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "lenet", num_classes=10)
    message = str(caught.value)
    assert f"Checkpoint {path} does not fit architecture 'lenet'" in message
    assert "2 missing keys ('fc.weight', 'fc.bias')" in message
    assert "2 unexpected keys ('head.weight', 'head.bias')" in message
    assert "--arch" in message
    assert "torch.save(model.state_dict(), path)" in message
    assert "\n" not in message


def test_key_mismatch_other_arch(tmp_path: Path) -> None:
    path = tmp_path / "wrn.pt"
    torch.save(random_state("wrn40_2"), path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "resnet18_32x32")
    message = str(caught.value)
    assert "'layer1.0.conv1.weight', 'layer1.0.bn1.weight', 'layer1.0.bn1.bias' and" in message
    assert "unexpected keys ('block1.layer.0.bn1.weight'," in message


def test_key_mismatch_many_keys_counted(tmp_path: Path, lenet_state: dict) -> None:
    state = {f"extra.{index}": torch.zeros(1) for index in range(5)} | lenet_state
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "lenet")
    assert "5 unexpected keys ('extra.0', 'extra.1', 'extra.2' and 2 more)" in str(caught.value)


def test_shape_mismatch_message(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "weights.pt"
    torch.save(lenet_state, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "lenet", num_classes=5)
    message = str(caught.value)
    assert "with 5 classes and 1 input channels" in message
    assert "2 shape mismatches (first: 'fc.weight' is [10, 84] in the checkpoint" in message
    assert "but [5, 84] in the model" in message
    assert "--num-classes" in message


def test_in_channels_mismatch(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "weights.pt"
    torch.save(lenet_state, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "lenet", in_channels=3)
    message = str(caught.value)
    assert "'block1.0.weight' is [6, 1, 5, 5] in the checkpoint" in message
    assert "but [6, 3, 5, 5] in the model" in message


def test_missing_head_reported(tmp_path: Path, lenet_state: dict) -> None:
    state = {k: v for k, v in lenet_state.items() if not k.startswith("fc.")}
    path = tmp_path / "headless.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"2 missing keys \('fc.weight', 'fc.bias'\)\."):
        load_model(path, "lenet")


def test_wrapper_prefix_hint(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({f"backbone.{key}": value for key, value in lenet_state.items()}, path)
    with pytest.raises(CheckpointError, match="extra prefix 'backbone.'"):
        load_model(path, "lenet")


def test_non_finite_rejected(tmp_path: Path, lenet_state: dict) -> None:
    lenet_state["classifier1.bias"][3] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(lenet_state, path)
    with pytest.raises(CheckpointError, match="NaN or infinite values in 'classifier1.bias'"):
        load_model(path, "lenet")


def test_batch_norm_gap_still_strict(tmp_path: Path) -> None:
    state = random_state("wrn40_2")
    del state["block1.layer.0.bn1.running_mean"]
    del state["block1.layer.0.bn1.num_batches_tracked"]
    path = tmp_path / "gap.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_model(path, "wrn40_2")
    message = str(caught.value)
    assert "2 missing keys ('block1.layer.0.bn1.running_mean', " in message
    assert "'block1.layer.0.bn1.num_batches_tracked')" in message


# --- hashing and saving --------------------------------------------------------------------


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        sha256_file(tmp_path / "absent.bin")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_save_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    model = build_model("lenet")
    path = tmp_path / f"saved{suffix}"
    save_checkpoint(model, path)
    assert_same_tensors(read_state_dict(path), model.state_dict())
    assert_same_tensors(load_model(path, "lenet").model.state_dict(), model.state_dict())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_checkpoint_state_dict(tmp_path: Path, lenet_state: dict, suffix: str) -> None:
    path = tmp_path / f"saved{suffix}"
    save_checkpoint(lenet_state, path)
    assert_same_tensors(read_state_dict(path), lenet_state)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_checkpoint_pt_is_weights_only(tmp_path: Path, lenet_state: dict) -> None:
    path = tmp_path / "saved.pt"
    save_checkpoint(lenet_state, path)
    loaded = torch.load(path, weights_only=True)
    assert sorted(loaded) == sorted(lenet_state)


def test_save_checkpoint_tied_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path)
    state = read_state_dict(path)
    assert torch.equal(state["1.weight"], model[0].weight.detach())


def test_save_checkpoint_bad_suffix(tmp_path: Path, lenet_state: dict) -> None:
    with pytest.raises(CheckpointError, match=r"suffix '\.ckpt' is not supported"):
        save_checkpoint(lenet_state, tmp_path / "model.ckpt")


def test_save_checkpoint_non_tensor(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="entry 'epoch' has type int, not Tensor"):
        save_checkpoint({"epoch": 3}, tmp_path / "model.pt")
