"""Tests for core.architectures: registry, OpenOOD key compatibility, forward shapes, heads."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.architectures import ARCHITECTURES, build_model, first_conv, get_spec, last_linear
from core.errors import ConfigError

REFERENCE_DIR = Path(__file__).parents[2].parent / "shared" / "data"

CIFAR_ARCHS = ["lenet", "resnet18_32x32", "wrn40_2", "wrn40_4", "densenet_bc100"]
TORCHVISION_ARCHS = [
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "densenet121",
    "vgg16_bn",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
]
# resnet18 runs one full 224-pixel forward pass. The other torchvision CNNs end in adaptive
# pooling, so a 32-pixel batch checks their replaced stem and their head at a fraction of the
# cost. vit_b_16 accepts only its configured image size, so it always runs at 224.
FULL_SIZE_FORWARD = {"resnet18", "vit_b_16"}
SMALL_FORWARD_SIZE = 32


def load_reference_shapes(arch: str) -> dict[str, list[int]]:
    path = REFERENCE_DIR / f"openood_{arch}_keys.json"
    if not path.is_file():
        pytest.skip(f"OpenOOD key list {path} is not available in this checkout")
    return json.loads(path.read_text())


def randomized_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return the model's state_dict with random floats, including batch-norm statistics."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            state[key] = tensor.clone()
        elif key.endswith("running_var"):
            state[key] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(tensor.shape, generator=generator) * 0.2
    return state


def test_registry_lists_every_name() -> None:
    assert sorted(ARCHITECTURES) == sorted(CIFAR_ARCHS + TORCHVISION_ARCHS)


@pytest.mark.parametrize(
    ("arch", "input_size", "in_channels"),
    [("lenet", 28, 1), ("resnet18_32x32", 32, 3), ("densenet_bc100", 32, 3), ("vit_b_16", 224, 3)],
)
def test_spec_defaults(arch: str, input_size: int, in_channels: int) -> None:
    spec = ARCHITECTURES[arch]
    assert spec.input_size == input_size
    assert spec.in_channels == in_channels


@pytest.mark.parametrize("arch", ["lenet", "resnet18_32x32"])
def test_openood_key_names_in_order(arch: str) -> None:
    reference = load_reference_shapes(arch)
    state = build_model(arch, num_classes=10).state_dict()
    assert list(state) == list(reference)


@pytest.mark.parametrize("arch", ["lenet", "resnet18_32x32"])
def test_openood_key_shapes(arch: str) -> None:
    reference = load_reference_shapes(arch)
    state = build_model(arch, num_classes=10).state_dict()
    shapes = {key: list(tensor.shape) for key, tensor in state.items()}
    assert shapes == reference


@pytest.mark.parametrize("arch", ["lenet", "resnet18_32x32"])
def test_openood_checkpoint_loads_strict(arch: str) -> None:
    reference = load_reference_shapes(arch)
    checkpoint = {key: torch.zeros(shape) for key, shape in reference.items()}
    for key in checkpoint:
        if key.endswith("num_batches_tracked"):
            checkpoint[key] = torch.tensor(0, dtype=torch.long)
    result = build_model(arch, num_classes=10).load_state_dict(checkpoint, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_small_arch_logits_shape(arch: str, in_channels: int) -> None:
    size = ARCHITECTURES[arch].input_size
    model = build_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)


@pytest.mark.slow
@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_arch_logits_shape(arch: str, in_channels: int) -> None:
    model = build_model(arch, num_classes=7, in_channels=in_channels).eval()
    _, stem = first_conv(model)
    assert stem.in_channels == in_channels

    size = ARCHITECTURES[arch].input_size if arch in FULL_SIZE_FORWARD else SMALL_FORWARD_SIZE
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)


@pytest.mark.parametrize(
    ("arch", "head_name", "features"),
    [
        ("lenet", "fc", 84),
        ("resnet18_32x32", "fc", 512),
        ("wrn40_2", "fc", 128),
        ("wrn40_4", "fc", 256),
        ("densenet_bc100", "fc", 342),
        ("resnet18", "fc", 512),
        ("resnet50", "fc", 2048),
        ("wide_resnet50_2", "fc", 2048),
        ("densenet121", "classifier", 1024),
        ("vgg16_bn", "classifier.6", 4096),
        ("mobilenet_v3_large", "classifier.3", 1280),
        ("efficientnet_b0", "classifier.1", 1280),
        ("convnext_tiny", "classifier.2", 768),
        ("vit_b_16", "heads.head", 768),
    ],
)
def test_last_linear_is_head(arch: str, head_name: str, features: int) -> None:
    with torch.device("meta"):
        model = build_model(arch, num_classes=13)
    name, head = last_linear(model)
    assert name == head_name
    assert head.in_features == features
    assert head.out_features == 13


def test_last_linear_without_linear() -> None:
    with pytest.raises(ConfigError, match="Sequential has no nn.Linear layer"):
        last_linear(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_first_conv_without_conv() -> None:
    with pytest.raises(ConfigError, match="Linear has no nn.Conv2d layer"):
        first_conv(nn.Linear(3, 4))


def test_build_unknown_arch() -> None:
    with pytest.raises(ConfigError, match=r"Unknown architecture 'resnet19'\. Choose one of: .*"):
        build_model("resnet19")


def test_unknown_arch_lists_names() -> None:
    with pytest.raises(ConfigError) as caught:
        get_spec("nope")
    assert "densenet121, densenet_bc100, efficientnet_b0" in str(caught.value)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_build_invalid_num_classes(num_classes: object) -> None:
    with pytest.raises(ConfigError, match="num_classes for architecture 'lenet' is .* positive"):
        build_model("lenet", num_classes=num_classes)  # type: ignore[arg-type]


def test_build_invalid_in_channels() -> None:
    with pytest.raises(ConfigError, match="in_channels for architecture 'resnet18' is 0"):
        build_model("resnet18", in_channels=0)


def test_build_default_in_channels() -> None:
    _, stem = first_conv(build_model("lenet"))
    assert stem.in_channels == 1


def test_densenet_bc100_channel_counts() -> None:
    state = build_model("densenet_bc100", num_classes=10).state_dict()
    assert state["conv1.weight"].shape == (24, 3, 3, 3)
    assert state["trans1.conv1.weight"].shape == (108, 216, 1, 1)
    assert state["trans2.conv1.weight"].shape == (150, 300, 1, 1)
    assert state["bn1.weight"].shape == (342,)


def test_densenet_bc100_depth() -> None:
    model = build_model("densenet_bc100")
    convs = sum(isinstance(module, nn.Conv2d) for module in model.modules())
    linears = sum(isinstance(module, nn.Linear) for module in model.modules())
    assert convs + linears == 100


@pytest.mark.parametrize(("arch", "widen"), [("wrn40_2", 2), ("wrn40_4", 4)])
def test_wide_resnet_layout(arch: str, widen: int) -> None:
    model = build_model(arch)
    kernels = [module.kernel_size for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert kernels.count((3, 3)) == 37
    assert kernels.count((1, 1)) == 3
    assert model.state_dict()["block3.layer.5.conv2.weight"].shape == (64 * widen,) * 2 + (3, 3)


# --- forward passes against functional references built from the state_dict ----------------


def batch_norm(x: torch.Tensor, state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
    )


def reference_lenet(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    out = F.conv2d(x, state["block1.0.weight"], state["block1.0.bias"], padding=2)
    out = F.max_pool2d(F.relu(out), 2)
    out = F.conv2d(out, state["block2.0.weight"], state["block2.0.bias"])
    out = F.max_pool2d(F.relu(out), 2)
    out = F.relu(F.conv2d(out, state["block3.0.weight"], state["block3.0.bias"]))
    out = F.relu(F.linear(out.flatten(1), state["classifier1.weight"], state["classifier1.bias"]))
    return F.linear(out, state["fc.weight"], state["fc.bias"])


def reference_resnet18_32x32(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    out = F.relu(batch_norm(F.conv2d(x, state["conv1.weight"], padding=1), state, "bn1"))
    for stage, first_stride in ((1, 1), (2, 2), (3, 2), (4, 2)):
        for index in (0, 1):
            block = f"layer{stage}.{index}"
            stride = first_stride if index == 0 else 1
            inner = F.conv2d(out, state[f"{block}.conv1.weight"], stride=stride, padding=1)
            inner = F.relu(batch_norm(inner, state, f"{block}.bn1"))
            inner = F.conv2d(inner, state[f"{block}.conv2.weight"], padding=1)
            inner = batch_norm(inner, state, f"{block}.bn2")
            shortcut = out
            if f"{block}.shortcut.0.weight" in state:
                shortcut = F.conv2d(out, state[f"{block}.shortcut.0.weight"], stride=stride)
                shortcut = batch_norm(shortcut, state, f"{block}.shortcut.1")
            out = F.relu(inner + shortcut)
    out = out.mean(dim=(2, 3))
    return F.linear(out, state["fc.weight"], state["fc.bias"])


def reference_wrn40_2(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    out = F.conv2d(x, state["conv1.weight"], padding=1)
    for stage, first_stride in ((1, 1), (2, 2), (3, 2)):
        for index in range(6):
            block = f"block{stage}.layer.{index}"
            stride = first_stride if index == 0 else 1
            activated = F.relu(batch_norm(out, state, f"{block}.bn1"))
            inner = F.conv2d(activated, state[f"{block}.conv1.weight"], stride=stride, padding=1)
            inner = F.relu(batch_norm(inner, state, f"{block}.bn2"))
            inner = F.conv2d(inner, state[f"{block}.conv2.weight"], padding=1)
            if f"{block}.convShortcut.weight" in state:
                out = F.conv2d(activated, state[f"{block}.convShortcut.weight"], stride=stride)
            out = out + inner
    out = F.relu(batch_norm(out, state, "bn1"))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, state["fc.weight"], state["fc.bias"])


@pytest.mark.parametrize(
    ("arch", "reference"),
    [
        ("lenet", reference_lenet),
        ("resnet18_32x32", reference_resnet18_32x32),
        ("wrn40_2", reference_wrn40_2),
    ],
)
def test_forward_matches_reference(arch: str, reference: Callable) -> None:
    model = build_model(arch, num_classes=10).eval()
    state = randomized_state(model)
    model.load_state_dict(state)
    size = ARCHITECTURES[arch].input_size
    channels = ARCHITECTURES[arch].in_channels
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        expected = reference(x, state)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
