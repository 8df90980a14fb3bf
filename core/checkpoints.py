"""Reading, validating and writing model weights.

Checkpoints come from users, so nothing in them is ever executed: `.safetensors` files are
parsed by safetensors, and everything else goes through `torch.load(weights_only=True)`, which
rebuilds only tensors and plain containers and rejects any other pickled object. A checkpoint
loads only when its keys and shapes match the architecture exactly (strict matching).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from core.architectures import ARCHITECTURES, build_model, first_conv, get_spec, last_linear
from core.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
    "sha256_file",
]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth")

# Keys under which training scripts commonly nest the state_dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "net")

# DataParallel and DistributedDataParallel prefix every key with this.
DATA_PARALLEL_PREFIX = "module."

# torch.load(weights_only=True) in torch 2.14 names a blocked global as `GLOBAL module.name`.
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")

# Number of key names quoted per category in a mismatch message.
_QUOTED_KEYS = 3

_RESAVE_ADVICE = (
    "re-save the weights from the original model with `torch.save(model.state_dict(), path)` "
    "or as a .safetensors file"
)


@dataclass
class LoadedModel:
    """A model with verified weights, in eval mode on the CPU.

    Attributes:
        model: The model with the checkpoint's weights loaded.
        arch: Architecture name, a key of `ARCHITECTURES`.
        num_classes: Number of logits the model outputs.
        in_channels: Number of input channels the model reads.
        sha256: Hex SHA-256 digest of the checkpoint file.
        path: The checkpoint file.
    """

    model: nn.Module
    arch: str
    num_classes: int
    in_channels: int
    sha256: str
    path: Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 digest of a file's bytes.

    Raises:
        CheckpointError: The file is missing or cannot be read.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        with path.open("rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError as error:
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({error.strerror or error}). Check the file's "
            "permissions and that it is not being written."
        ) from error


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from a checkpoint file without executing anything in it.

    A `.safetensors` file is read with safetensors. Any other file is read with
    `torch.load(weights_only=True, map_location="cpu")`. A state_dict nested under
    `state_dict`, `model` or `net` is unwrapped, and `module.` key prefixes are removed.

    Raises:
        CheckpointError: The file is missing, is not a checkpoint, contains pickled objects
            other than tensors and containers, or does not contain a dict of tensors.
    """
    path = Path(path)
    return _parse_state_dict(_read_bytes(path), path, arch=None)


def load_model(
    path: str | os.PathLike[str],
    arch: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
) -> LoadedModel:
    """Build a model of `arch` and load a checkpoint into it with strict key and shape matching.

    Args:
        path: A `.safetensors` file or a file written by `torch.save(state_dict, path)`.
        arch: A key of `ARCHITECTURES`.
        num_classes: Number of classes. When None, it is read from the shape of the classifier
            head weight (`last_linear`) in the checkpoint.
        in_channels: Number of input channels. When None, it is read from the first
            convolution's weight in the checkpoint.

    Returns:
        The loaded model (eval mode, CPU) with the settings it was built with and the file's
        SHA-256 digest, computed from the same bytes that were loaded.

    Raises:
        ConfigError: `arch` is unknown, or `num_classes` or `in_channels` is not a positive
            integer.
        CheckpointError: The file is missing or unreadable, is not a state_dict, does not fit the
            architecture (missing keys, unexpected keys or shape mismatches), or contains NaN or
            infinite values.

    A checkpoint without the `num_batches_tracked` buffers of its batch-norm layers, as written
    by PyTorch before 0.4.1, loads with those counters set to 0. That buffer only matters when
    training with `momentum=None`. Every other missing key is an error.
    """
    get_spec(arch)
    path = Path(path)
    data = _read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    state = _parse_state_dict(data, path, arch=arch)

    num_classes, in_channels = _infer_settings(state, arch, num_classes, in_channels)
    with torch.device("meta"):
        expected = build_model(arch, num_classes, in_channels).state_dict()
    state = _add_missing_batch_counters(state, expected, path)
    _check_keys_and_shapes(state, expected, path, arch, num_classes, in_channels)
    _check_finite(state, path, arch)

    model = build_model(arch, num_classes, in_channels)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # Keys and shapes were compared above, so this is a dtype or storage problem.
        raise CheckpointError(
            f"Checkpoint {path} could not be loaded into architecture {arch!r}: {error}. "
            f"Check that the file belongs to this architecture, or {_RESAVE_ADVICE}."
        ) from error
    model.eval()

    logger.info(
        "Loaded checkpoint %s as %s (%d classes, %d input channels, sha256 %s)",
        path,
        arch,
        num_classes,
        in_channels,
        digest,
    )
    return LoadedModel(
        model=model,
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        sha256=digest,
        path=path,
    )


def save_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> None:
    """Write a model's state_dict to `path`, in the format its suffix names.

    `.safetensors` writes a safetensors file, and `.pt` or `.pth` a `torch.save` file that
    `torch.load(weights_only=True)` reads. Tensors are moved to the CPU. The file is written
    under a temporary name in the same folder and then renamed, so readers never see a partial
    file.

    Raises:
        CheckpointError: The suffix is not supported, or a value is not a tensor.
        OSError: The file cannot be written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in TORCH_SUFFIXES:
        supported = ", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))
        raise CheckpointError(
            f"Cannot save checkpoint {path}: suffix {path.suffix!r} is not supported. "
            f"Use one of {supported}."
        )

    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"Cannot save checkpoint {path}: entry {key!r} has type {type(value).__name__}, "
                "not Tensor. Pass a model or a dict of tensors."
            )
        # safetensors rejects tensors that share storage (tied weights), so each gets a copy.
        tensor = value.detach().to("cpu").contiguous()
        tensors[key] = tensor.clone() if suffix == SAFETENSORS_SUFFIX else tensor

    descriptor, temporary_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(descriptor)
    try:
        if suffix == SAFETENSORS_SUFFIX:
            safetensors.torch.save_file(tensors, temporary_name)
        else:
            torch.save(tensors, temporary_name)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


# --- reading --------------------------------------------------------------------------------


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(
            f"Checkpoint path {path} is a directory, not a file. Pass the path of the weights "
            "file itself."
        )
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file {path} not found. Check the path, and that the file was uploaded "
            "or mounted where the process can read it."
        )


def _read_bytes(path: Path) -> bytes:
    _check_is_file(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({error.strerror or error}). Check the file's "
            "permissions and that it is not being written."
        ) from error


def _for_arch(arch: str | None) -> str:
    return f" for architecture {arch!r}" if arch else ""


def _first_line(error: BaseException) -> str:
    message = str(error).strip()
    # torch.load's weights-only error opens with advice to retry with weights_only=False, which
    # would run code from the file; quote only the reason that follows its marker instead.
    marker = "WeightsUnpickler error:"
    if marker in message:
        message = message.split(marker, 1)[1].strip()
    text = message.splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:200] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _deserialize(data: bytes, path: Path, arch: str | None) -> object:
    """Turn checkpoint bytes into Python objects, executing nothing."""
    if not data:
        raise CheckpointError(
            f"Checkpoint {path}{_for_arch(arch)} is empty (0 bytes). Upload the file again, "
            f"or {_RESAVE_ADVICE}."
        )

    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        try:
            return safetensors.torch.load(data)
        # safetensors raises its own SafetensorError, and also other types on malformed headers.
        except Exception as error:
            raise CheckpointError(
                f"Checkpoint {path}{_for_arch(arch)} is not a valid safetensors file "
                f"({_first_line(error)}). The file may be truncated or in another format. "
                f"Upload it again, or {_RESAVE_ADVICE}."
            ) from error

    try:
        with warnings.catch_warnings():
            # The weights-only unpickler warns about every pickle protocol other than 2 before
            # it accepts or rejects the file, and the outcome is reported below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _is_rejected_pickle(data, error):
            raise _unsafe_pickle(path, arch, error) from error
        raise _not_a_checkpoint(path, arch, error) from error
    # On malformed input torch.load raises EOFError, IndexError, KeyError, RuntimeError and
    # others depending on where parsing stops, so every failure is reported the same way.
    except Exception as error:
        raise _not_a_checkpoint(path, arch, error) from error


def _not_a_checkpoint(path: Path, arch: str | None, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint {path}{_for_arch(arch)} is not a readable PyTorch checkpoint "
        f"({_first_line(error)}). The file may be truncated, corrupted or in another format. "
        f"Upload it again, or {_RESAVE_ADVICE}."
    )


def _is_rejected_pickle(data: bytes, error: pickle.UnpicklingError) -> bool:
    """Return True when the weights-only unpickler rejected a well-formed pickle.

    Random bytes can also fail inside the weights-only unpickler, so the error alone does not
    separate the two cases. A rejected pickle names a blocked global, is a `torch.save` zip
    archive (which starts with `PK`), or starts with the pickle PROTO opcode for protocol 2 to 5.
    """
    if "Weights only load failed" not in str(error):
        return False
    if _BLOCKED_GLOBAL.search(str(error)):
        return True
    is_zip = data.startswith(b"PK")
    is_pickle = len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
    return is_zip or is_pickle


def _unsafe_pickle(path: Path, arch: str | None, error: BaseException) -> CheckpointError:
    match = _BLOCKED_GLOBAL.search(str(error))
    found = f"a reference to {match.group(1)}" if match else _unpickler_reason(error)
    return CheckpointError(
        f"Checkpoint {path}{_for_arch(arch)} was rejected: it contains pickled Python objects "
        f"other than tensors and plain containers ({found}), and they are never unpickled "
        "because unpickling can run arbitrary code. If the file is a whole model written by "
        f"`torch.save(model, path)`, {_RESAVE_ADVICE}."
    )


def _unpickler_reason(error: BaseException) -> str:
    """Return the weights-only unpickler's own reason, such as `Unsupported operand 149`."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        for line in text.split(marker, 1)[1].splitlines():
            if line.strip():
                return line.strip()[:200]
    return "an unsupported pickle instruction"


def _parse_state_dict(data: bytes, path: Path, arch: str | None) -> dict[str, torch.Tensor]:
    loaded = _deserialize(data, path, arch)
    state = _unwrap(loaded, path, arch)
    return _strip_data_parallel_prefix(state, path, arch)


def _is_tensor_dict(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items()
    )


def _unwrap(loaded: object, path: Path, arch: str | None) -> dict[str, torch.Tensor]:
    """Return the dict of tensors inside `loaded`, looking under the keys in WRAPPER_KEYS."""
    current = loaded
    # Each step descends one level, so the loop ends even on a self-referencing dict.
    for _ in range(len(WRAPPER_KEYS) + 1):
        if _is_tensor_dict(current) and current:
            return dict(current)
        if not isinstance(current, Mapping):
            break
        inner = next(
            (current[key] for key in WRAPPER_KEYS if isinstance(current.get(key), Mapping)),
            None,
        )
        if inner is None:
            break
        current = inner

    raise CheckpointError(
        f"Checkpoint {path}{_for_arch(arch)} does not contain a state_dict: "
        f"{_describe_content(current)}. Expected a dict of tensors, directly or under one of "
        f"the keys {', '.join(map(repr, WRAPPER_KEYS))}, so {_RESAVE_ADVICE}."
    )


def _describe_content(value: object) -> str:
    if not isinstance(value, Mapping):
        return f"it contains a value of type {type(value).__name__}"
    if not value:
        return "it contains an empty dict"
    for key, item in value.items():
        if not isinstance(key, str):
            return f"key {key!r} has type {type(key).__name__}, not str"
        if not isinstance(item, torch.Tensor):
            keys = ", ".join(repr(name) for name in list(value)[:5])
            kind = type(item).__name__
            return f"it contains a dict with keys {keys}, and {key!r} has type {kind}"
    return "it contains an unexpected structure"


def _strip_data_parallel_prefix(
    state: dict[str, torch.Tensor], path: Path, arch: str | None
) -> dict[str, torch.Tensor]:
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        while name.startswith(DATA_PARALLEL_PREFIX):
            name = name[len(DATA_PARALLEL_PREFIX) :]
        if name in stripped:
            raise CheckpointError(
                f"Checkpoint {path}{_for_arch(arch)} contains key {name!r} both with and "
                f"without the {DATA_PARALLEL_PREFIX!r} prefix, so it is ambiguous which to use. "
                f"{_RESAVE_ADVICE.capitalize()}."
            )
        stripped[name] = tensor
    return stripped


# --- matching -------------------------------------------------------------------------------


def _infer_settings(
    state: Mapping[str, torch.Tensor],
    arch: str,
    num_classes: int | None,
    in_channels: int | None,
) -> tuple[int, int]:
    """Fill in `num_classes` and `in_channels` from the checkpoint's head and first convolution.

    A value that cannot be read from the checkpoint falls back to the architecture's default.
    The strict key comparison that follows then reports the missing or misshaped key.
    """
    spec = get_spec(arch)
    with torch.device("meta"):
        probe = build_model(arch, 10, spec.in_channels)

    if num_classes is None:
        head_name, _ = last_linear(probe)
        head_weight = state.get(f"{head_name}.weight")
        num_classes = 10
        if head_weight is not None and head_weight.ndim == 2 and head_weight.shape[0] > 0:
            num_classes = int(head_weight.shape[0])

    if in_channels is None:
        conv_name, conv = first_conv(probe)
        conv_weight = state.get(f"{conv_name}.weight")
        in_channels = spec.in_channels
        if conv_weight is not None and conv_weight.ndim == 4 and conv_weight.shape[1] > 0:
            in_channels = int(conv_weight.shape[1]) * conv.groups

    return num_classes, in_channels


def _add_missing_batch_counters(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """Add zero `num_batches_tracked` buffers where only those are missing (pre-0.4.1 files)."""
    missing = [
        key
        for key in expected
        if key not in state
        and key.endswith(".num_batches_tracked")
        and key.removesuffix("num_batches_tracked") + "running_mean" in state
    ]
    if not missing:
        return state
    logger.info(
        "Checkpoint %s has no num_batches_tracked buffers for %d batch-norm layers, "
        "so they are set to 0",
        path,
        len(missing),
    )
    completed = dict(state)
    for key in missing:
        completed[key] = torch.tensor(0, dtype=torch.long)
    return completed


def _quote_keys(keys: list[str]) -> str:
    quoted = ", ".join(repr(key) for key in keys[:_QUOTED_KEYS])
    if len(keys) > _QUOTED_KEYS:
        quoted += f" and {len(keys) - _QUOTED_KEYS} more"
    return quoted


def _count(number: int, singular: str, plural: str | None = None) -> str:
    noun = singular if number == 1 else (plural or singular + "s")
    return f"{number} {noun}"


def _shape_text(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _check_keys_and_shapes(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: Path,
    arch: str,
    num_classes: int,
    in_channels: int,
) -> None:
    """Raise CheckpointError unless `state` has exactly the keys and shapes of `expected`."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shapes = [
        key for key in expected if key in state and state[key].shape != expected[key].shape
    ]
    if not (missing or unexpected or wrong_shapes):
        return

    problems = []
    if missing:
        problems.append(f"{_count(len(missing), 'missing key')} ({_quote_keys(missing)})")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key')} ({_quote_keys(unexpected)})")
    if wrong_shapes:
        first = wrong_shapes[0]
        problems.append(
            f"{_count(len(wrong_shapes), 'shape mismatch', 'shape mismatches')} (first: "
            f"{first!r} is {_shape_text(state[first].shape)} in the checkpoint but "
            f"{_shape_text(expected[first].shape)} in the model)"
        )
    if len(problems) > 1:
        problems[-1] = "and " + problems[-1]

    hint = _prefix_hint(unexpected, expected)
    known = ", ".join(sorted(ARCHITECTURES))
    raise CheckpointError(
        f"Checkpoint {path} does not fit architecture {arch!r} with {num_classes} classes and "
        f"{in_channels} input channels. It has {', '.join(problems)}.{hint} Pick the architecture "
        f"(--arch) that produced the checkpoint (known: {known}), set --num-classes and "
        f"--in-channels to the values it was trained with, or {_RESAVE_ADVICE}."
    )


def _prefix_hint(unexpected: list[str], expected: Mapping[str, torch.Tensor]) -> str:
    """Name a common extra key prefix (such as `backbone.`) when removing it would fix the keys."""
    if not unexpected:
        return ""
    prefixes = {key.split(".", 1)[0] for key in unexpected if "." in key}
    if len(prefixes) != 1:
        return ""
    prefix = prefixes.pop() + "."
    if all(key.startswith(prefix) and key[len(prefix) :] in expected for key in unexpected):
        return (
            f" Every unexpected key is an expected key with the extra prefix {prefix!r}, so the "
            "file contains a wrapper model's weights."
        )
    return ""


def _check_finite(state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"Checkpoint {path} for architecture {arch!r} contains NaN or infinite values "
                f"in {key!r}, so the model's outputs would be meaningless. Use a checkpoint "
                "from before training diverged."
            )
