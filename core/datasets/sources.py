"""The files that one split of an on-disk dataset consists of, and errors shared by the loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DatasetError


@dataclass(frozen=True)
class SourceFiles:
    """The files that make up one split of a dataset on disk.

    Attributes:
        root: The directory (or, for npz, the file) the split was found in.
        files: Every file the decoder reads, in reading order.
        classes: Class folder names of an image folder, sorted; empty for other formats.
    """

    root: Path
    files: tuple[Path, ...]
    classes: tuple[str, ...] = ()


def not_found_error(
    kind: str, path: Path, directories: list[Path], names: list[str]
) -> DatasetError:
    searched = ", ".join(str(directory) for directory in dict.fromkeys(directories))
    expected_files = ", ".join(names)
    hint = "" if path.exists() else f" ({path} does not exist)"
    return DatasetError(
        f"{kind} data not found for {path}{hint}: looked in {searched} for {expected_files}. Put "
        "the dataset's files in that directory or fix the path"
    )


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path} has labels from {labels.min()} to {labels.max()}, expected 0 to "
            f"{num_classes - 1}: replace it with the original dataset file"
        )
