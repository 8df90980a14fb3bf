"""Classifier architectures by name, with the parameter names that published checkpoints use.

`lenet` and `resnet18_32x32` have exactly the parameter and buffer names and shapes of the
OpenOOD benchmark networks, so OpenOOD checkpoints load with `strict=True`. `wrn40_2`, `wrn40_4`
and `densenet_bc100` use the names of the CIFAR WideResNet and DenseNet-BC code of Hendrycks et
al., "Deep Anomaly Detection with Outlier Exposure" (ICLR 2019), which the Unleashing Mask
experiments also use. The remaining names are torchvision ImageNet builders, always built
without pretrained weights, so nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.models
from torch import nn

from core.errors import ConfigError

__all__ = ["ARCHITECTURES", "ArchSpec", "build_model", "first_conv", "get_spec", "last_linear"]


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture.

    Attributes:
        builder: Function `(num_classes, in_channels) -> nn.Module` that returns a freshly
            initialized model.
        input_size: Default side length in pixels of the square input images.
        in_channels: Default number of input channels.
    """

    builder: Callable[[int, int], nn.Module]
    input_size: int
    in_channels: int = 3


# --- OpenOOD networks -------------------------------------------------------------------------


class LeNet(nn.Module):
    """LeNet-5 for 28x28 inputs, with the module names of the OpenOOD MNIST network."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block2 = nn.Sequential(nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2))
        # A 28x28 input is 5x5 here, so this convolution leaves a 120-channel 1x1 map.
        self.block3 = nn.Sequential(nn.Conv2d(16, 120, kernel_size=5), nn.ReLU())
        self.classifier1 = nn.Linear(120, 84)
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch `[N, C, 28, 28]`."""
        out = self.block3(self.block2(self.block1(x)))
        out = torch.flatten(out, 1)
        out = F.relu(self.classifier1(out))
        return self.fc(out)


class ResNetBasicBlock(nn.Module):
    """Post-activation basic block: two 3x3 convolutions plus a shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        # An empty Sequential is the identity and adds no state_dict keys.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), named as OpenOOD's `resnet18_32x32`."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)

        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = nn.Sequential(
                ResNetBasicBlock(in_planes, planes, stride),
                ResNetBasicBlock(planes, planes, 1),
            )
            stages.append(blocks)
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch `[N, C, H, W]`."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


# --- Outlier Exposure CIFAR networks ----------------------------------------------------------


def _init_cifar_weights(model: nn.Module) -> None:
    """Initialize as the Outlier Exposure CIFAR code does (He normal with fan-out, zero biases)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


class WideBasicBlock(nn.Module):
    """Pre-activation WideResNet block (BN, ReLU, conv3x3, BN, ReLU, conv3x3, plus shortcut).

    When the channel count changes, the 1x1 `convShortcut` takes the pre-activated input,
    otherwise the shortcut is the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Conv2d | None = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        if self.convShortcut is None:
            return x + out
        return self.convShortcut(activated) + out


class WideResNetStage(nn.Module):
    """A run of WideResNet blocks, stored under `layer` as in the Outlier Exposure code."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the blocks in order."""
        return self.layer(x)


class WideResNet(nn.Module):
    """CIFAR WideResNet-depth-widen (Zagoruyko and Komodakis, 2016) for 32x32 inputs."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(
                f"WideResNet depth {depth} is invalid: it must be 6n + 4 (for example 16, 28 or "
                "40). Choose a depth of that form."
            )
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideResNetStage(blocks_per_stage, widths[0], widths[1], 1)
        self.block2 = WideResNetStage(blocks_per_stage, widths[1], widths[2], 2)
        self.block3 = WideResNetStage(blocks_per_stage, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init_cifar_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch `[N, C, H, W]`."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        # At 32x32 inputs the map is 8x8 here, so this equals the original 8x8 average pool.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


class DenseBottleneck(nn.Module):
    """DenseNet-BC layer: BN, ReLU, 1x1 conv to 4k channels, BN, ReLU, 3x3 conv to k channels.

    The output is the input with the k new channels appended.
    """

    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        inter_planes = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, inter_planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter_planes)
        self.conv2 = nn.Conv2d(inter_planes, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer and concatenate its output to the input channels."""
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class DenseStage(nn.Module):
    """A dense block of bottleneck layers, stored under `layer` as in the Outlier Exposure code."""

    def __init__(self, num_layers: int, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(DenseBottleneck(in_planes + i * growth_rate, growth_rate) for i in range(num_layers))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers in order."""
        return self.layer(x)


class DenseTransition(nn.Module):
    """Transition between dense blocks: BN, ReLU, 1x1 conv, 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the transition."""
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseNetBC(nn.Module):
    """CIFAR DenseNet-BC (Huang et al., 2017) with three dense blocks, for 32x32 inputs.

    For depth 100, growth rate 12 and compression 0.5 the channel counts are 24 after the stem,
    216 -> 108 after block 1, 300 -> 150 after block 2 and 342 after block 3.
    """

    def __init__(
        self,
        depth: int,
        growth_rate: int,
        compression: float,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(
                f"DenseNet-BC depth {depth} is invalid: it must be 6n + 4 (for example 40, 100 "
                "or 190). Choose a depth of that form."
            )
        layers_per_block = (depth - 4) // 6

        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=1, padding=1, bias=False)

        self.block1 = DenseStage(layers_per_block, planes, growth_rate)
        planes += layers_per_block * growth_rate
        self.trans1 = DenseTransition(planes, math.floor(planes * compression))
        planes = math.floor(planes * compression)

        self.block2 = DenseStage(layers_per_block, planes, growth_rate)
        planes += layers_per_block * growth_rate
        self.trans2 = DenseTransition(planes, math.floor(planes * compression))
        planes = math.floor(planes * compression)

        self.block3 = DenseStage(layers_per_block, planes, growth_rate)
        planes += layers_per_block * growth_rate
        self.bn1 = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        _init_cifar_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch `[N, C, H, W]`."""
        out = self.trans1(self.block1(self.conv1(x)))
        out = self.trans2(self.block2(out))
        out = F.relu(self.bn1(self.block3(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


# --- torchvision networks ---------------------------------------------------------------------


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """Return the name and module of the first `nn.Conv2d` in `model.named_modules()` order.

    For every registered architecture this is the convolution that reads the input image.

    Raises:
        ConfigError: The model has no `nn.Conv2d`.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ConfigError(
        f"Model {type(model).__name__} has no nn.Conv2d layer, so its input channel count is "
        "unknown. Use an architecture from ARCHITECTURES."
    )


def _replace_input_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the input convolution (or ViT patch embedding) for one reading `in_channels`."""
    name, old = first_conv(model)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, new)


def _build_torchvision(
    constructor: Callable[..., nn.Module], num_classes: int, in_channels: int
) -> nn.Module:
    """Build a torchvision model without pretrained weights and adapt its input channels."""
    model = constructor(weights=None, num_classes=num_classes)
    _replace_input_conv(model, in_channels)
    return model


def _torchvision_spec(constructor: Callable[..., nn.Module]) -> ArchSpec:
    return ArchSpec(builder=functools.partial(_build_torchvision, constructor), input_size=224)


ARCHITECTURES: dict[str, ArchSpec] = {
    "lenet": ArchSpec(builder=LeNet, input_size=28, in_channels=1),
    "resnet18_32x32": ArchSpec(builder=CifarResNet18, input_size=32),
    "wrn40_2": ArchSpec(builder=functools.partial(WideResNet, 40, 2), input_size=32),
    "wrn40_4": ArchSpec(builder=functools.partial(WideResNet, 40, 4), input_size=32),
    "densenet_bc100": ArchSpec(builder=functools.partial(DenseNetBC, 100, 12, 0.5), input_size=32),
    "resnet18": _torchvision_spec(torchvision.models.resnet18),
    "resnet50": _torchvision_spec(torchvision.models.resnet50),
    "wide_resnet50_2": _torchvision_spec(torchvision.models.wide_resnet50_2),
    "densenet121": _torchvision_spec(torchvision.models.densenet121),
    "vgg16_bn": _torchvision_spec(torchvision.models.vgg16_bn),
    "mobilenet_v3_large": _torchvision_spec(torchvision.models.mobilenet_v3_large),
    "efficientnet_b0": _torchvision_spec(torchvision.models.efficientnet_b0),
    "convnext_tiny": _torchvision_spec(torchvision.models.convnext_tiny),
    "vit_b_16": _torchvision_spec(torchvision.models.vit_b_16),
}


def get_spec(arch: str) -> ArchSpec:
    """Return the registered spec of `arch`.

    Raises:
        ConfigError: `arch` is not a registered name. The message lists the known names.
    """
    spec = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"Unknown architecture {arch!r}. Choose one of: {known}.")
    return spec


def _check_positive_int(value: object, setting: str, arch: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{setting} for architecture {arch!r} is {value!r}, but it must be a positive "
            f"integer. Set {setting} to the value the model was trained with."
        )
    return value


def build_model(arch: str, num_classes: int = 10, in_channels: int | None = None) -> nn.Module:
    """Build a freshly initialized model of a registered architecture.

    Args:
        arch: A key of `ARCHITECTURES`.
        num_classes: Number of logits the classifier head outputs.
        in_channels: Number of input channels, or None for the architecture's default.

    Returns:
        The model in training mode, on the CPU.

    Raises:
        ConfigError: `arch` is unknown, or `num_classes` or `in_channels` is not a positive
            integer.
    """
    spec = get_spec(arch)
    num_classes = _check_positive_int(num_classes, "num_classes", arch)
    if in_channels is None:
        in_channels = spec.in_channels
    in_channels = _check_positive_int(in_channels, "in_channels", arch)
    return spec.builder(num_classes, in_channels)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return the name and module of the classifier head.

    The head is the last `nn.Linear` in `model.named_modules()` order. Its input is the
    penultimate feature vector and its `weight` has shape `[num_classes, features]`.

    Raises:
        ConfigError: The model has no `nn.Linear`.
    """
    head: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            head = (name, module)
    if head is None:
        raise ConfigError(
            f"Model {type(model).__name__} has no nn.Linear layer, so it has no classifier head "
            "to read logits or penultimate features from. Use an architecture from ARCHITECTURES."
        )
    return head
