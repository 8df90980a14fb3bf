"""Parsing of dataset references and the allowed-roots check.

The grammar is documented in the `core.datasets` package docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, DatasetError

SPLITS = ("train", "test")

# Every scheme that a reference may start with. The loaders for each live in `formats.py`
# (files on disk) and `builtin.py` (sets bundled with installed packages).
FILE_SCHEMES = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder", "npz")
BUILTIN_SCHEME = "builtin"
SCHEMES = (*FILE_SCHEMES, BUILTIN_SCHEME)

OPTIONS = {
    "split": "train or test",
    "limit": "a positive integer: keep that many images, chosen by a shuffle with seed 0",
}


@dataclass(frozen=True)
class DatasetReference:
    """A parsed dataset reference.

    Attributes:
        text: The reference as written.
        scheme: The part before the first colon, lower-cased (`mnist`, `builtin`, ...).
        target: The path for file schemes, the set name for `builtin`.
        split: The `split=` option, or None when the reference has none.
        limit: The `limit=` option, or None when the reference has none.
    """

    text: str
    scheme: str
    target: str
    split: str | None = None
    limit: int | None = None

    @property
    def is_builtin(self) -> bool:
        """Whether the reference names a built-in set rather than files on disk."""
        return self.scheme == BUILTIN_SCHEME


def parse_reference(reference: str) -> DatasetReference:
    """Parse `SCHEME:TARGET[?OPTION=VALUE&...]` without touching the file system.

    Raises:
        DatasetError: The reference is malformed, its scheme is unknown or an option is invalid.
    """
    if not isinstance(reference, str):
        raise DatasetError(
            f"dataset reference {reference!r} is not a string: pass e.g. 'mnist:/data/mnist'"
        )
    text = reference.strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.strip().lower()
    if not colon or not scheme:
        raise DatasetError(
            f"dataset reference {reference!r} has no scheme: write SCHEME:PATH, e.g. "
            f"'cifar10:/data/cifar10', with SCHEME one of {', '.join(SCHEMES)}"
        )
    if scheme not in SCHEMES:
        raise DatasetError(
            f"dataset reference {reference!r} has the unknown scheme {scheme!r}: use one of "
            f"{', '.join(SCHEMES)}"
        )
    target, question_mark, option_text = rest.partition("?")
    target = target.strip()
    if not target:
        missing = "a built-in set name" if scheme == BUILTIN_SCHEME else "a path"
        raise DatasetError(
            f"dataset reference {reference!r} is missing {missing} after '{scheme}:'"
        )
    options = _parse_options(reference, option_text) if question_mark else {}
    return DatasetReference(text=text, scheme=scheme, target=target, **options)


def _parse_options(reference: str, option_text: str) -> dict[str, str | int]:
    valid = "; ".join(f"{name}= ({meaning})" for name, meaning in OPTIONS.items())
    if not option_text.strip():
        raise DatasetError(
            f"dataset reference {reference!r} has an empty option list after '?': use {valid}"
        )
    options: dict[str, str | int] = {}
    for item in option_text.split("&"):
        key, equals, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if not equals or not key:
            raise DatasetError(
                f"dataset reference {reference!r} has the option {item!r} without a value: write "
                f"KEY=VALUE, valid options are {valid}"
            )
        if key not in OPTIONS:
            raise DatasetError(
                f"dataset reference {reference!r} has the unknown option {key!r}: valid options "
                f"are {valid}"
            )
        if key in options:
            raise DatasetError(
                f"dataset reference {reference!r} sets the option {key!r} twice: set it once"
            )
        if key == "split":
            options[key] = validate_split(value, reference)
        else:
            options[key] = _parse_limit(value, reference)
    return options


def validate_split(split: str, reference: str) -> str:
    """Return `split` if it is `train` or `test`.

    Raises:
        DatasetError: The split is another value.
    """
    if split not in SPLITS:
        raise DatasetError(
            f"dataset reference {reference!r} has the invalid split {split!r}: use split=train or "
            "split=test"
        )
    return split


def _parse_limit(value: str, reference: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise DatasetError(
            f"dataset reference {reference!r} has the invalid limit {value!r}: use limit=N with N "
            "a positive integer"
        )
    return int(value)


def resolve_path(parsed: DatasetReference) -> Path:
    """Return the absolute path of a file reference, with `~`, `..` and symlinks resolved."""
    return Path(parsed.target).expanduser().resolve(strict=False)


def check_path_within_roots(
    path: Path, reference: str, allowed_roots: Sequence[Path | str] | None
) -> None:
    """Raise DatasetError unless the resolved `path` lies inside one of `allowed_roots`.

    `path` must already be resolved, so that `..` and symlinks cannot lead out of a root.
    None means no restriction.
    """
    if allowed_roots is None:
        return
    roots = [Path(root).expanduser().resolve(strict=False) for root in allowed_roots]
    for root in roots:
        if path == root or path.is_relative_to(root):
            return
    listed = ", ".join(str(root) for root in roots) or "none configured"
    raise DatasetError(
        f"dataset reference {reference!r} resolves to {path}, which is outside the allowed data "
        f"roots ({listed}): place the data under one of them and reference it there"
    )


def check_reference(reference: str, allowed_roots: Sequence[Path | str] | None) -> None:
    """Parse a reference and check its path against the allowed roots without reading any data.

    The check is cheap: the path is resolved but not required to exist.

    Raises:
        DatasetError: The reference is malformed, names an unknown built-in set, or points outside
            every allowed root.
    """
    parsed = parse_reference(reference)
    if parsed.is_builtin:
        # Imported here because builtin.py imports this module.
        from core.datasets.builtin import get_builtin_set

        get_builtin_set(parsed.target, reference)
        return
    check_path_within_roots(resolve_path(parsed), reference, allowed_roots)


def validate_target_shape(channels: int | None, size: int | None) -> None:
    """Raise ConfigError unless `channels` is None, 1 or 3 and `size` is None or positive."""
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"channels={channels!r} is not supported: use 1 (grayscale) or 3 (RGB)")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"size={size!r} is invalid: use a positive image side in pixels")
