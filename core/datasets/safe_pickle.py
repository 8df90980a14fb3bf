"""Restricted unpickling of the CIFAR python batches.

A pickle can call any importable function while it loads. The CIFAR batches contain only dicts,
lists, strings, ints and numpy arrays, so the unpickler here resolves only the few globals that
rebuild a numpy array or scalar and rejects every other global before anything is called.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DatasetError


def _numpy_internals() -> tuple[Any, Any]:
    # numpy 2 moved numpy.core to numpy._core. Pickles name either module, depending on the
    # numpy version that wrote them, so both names map to the objects of the installed numpy.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_internals()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles bytes with protocol 2 as _codecs.encode(text, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        # Arrays pickled with protocol 5 are rebuilt by numeric._frombuffer.
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BufferedIOBase, path: Path) -> None:
        # latin1 decodes the Python 2 strings of the original batches byte for byte, as numpy needs.
        super().__init__(stream, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self._path} is not a plain CIFAR batch: it references the global "
                f"{module}.{name}, and only numpy array globals are allowed. Replace the file "
                "with the original dataset download"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(
            f"{self._path} is not a plain CIFAR batch: it contains a persistent id. Replace the "
            "file with the original dataset download"
        )


def load_array_pickle(path: Path) -> Any:
    """Unpickle `path`, allowing only the globals that rebuild numpy arrays.

    Raises:
        DatasetError: The file is unreadable, corrupt, or references any other global.
    """
    try:
        with open(path, "rb") as stream:
            return _ArrayOnlyUnpickler(stream, path).load()
    except DatasetError:
        raise
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
    ) as error:
        raise DatasetError(
            f"{path} could not be read as a CIFAR batch ({type(error).__name__}: {error}): "
            "replace the file with the original dataset download"
        ) from error
