"""Streaming of uploaded checkpoint files into the storage directory.

An upload is written to `storage_dir/incoming/` while its SHA-256 is computed, checked, and then
moved to `storage_dir/checkpoints/<sha256><suffix>`. Records with the same bytes share one file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"


class UploadTooLarge(ValueError):
    """The uploaded file is larger than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the file is larger than the upload limit of {limit} bytes; upload a smaller "
            "checkpoint or raise HARDEN_MAX_UPLOAD_BYTES"
        )
        self.limit = limit


@dataclass
class ReceivedFile:
    """An upload written to the incoming directory but not yet accepted."""

    path: Path
    sha256: str
    size_bytes: int
    suffix: str


def checkpoint_suffix(head: bytes, file_name: str | None) -> str:
    """Choose the file suffix that makes `core.checkpoints` read the file with the right loader.

    The format is taken from the content when it is recognisable: a zip archive is a `torch.save`
    file, and a safetensors file starts with an 8-byte header length followed by a JSON object.
    Otherwise the uploaded file name decides.
    """
    if head.startswith(_ZIP_MAGIC):
        return ".pt"
    if len(head) > 8 and head[8:9] == b"{":
        return ".safetensors"
    if file_name and file_name.lower().endswith(".safetensors"):
        return ".safetensors"
    return ".pt"


def receive_upload(
    source: BinaryIO, storage_dir: Path, max_bytes: int, file_name: str | None
) -> ReceivedFile:
    """Copy `source` in chunks to the incoming directory, enforcing the size limit.

    Raises:
        UploadTooLarge: past `max_bytes`; the partial file is removed.
    """
    incoming = storage_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    first = source.read(CHUNK_BYTES)
    suffix = checkpoint_suffix(first, file_name)
    path = incoming / f"{uuid.uuid4().hex}{suffix}"
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("wb") as target:
            chunk = first
            while chunk:
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                digest.update(chunk)
                target.write(chunk)
                chunk = source.read(CHUNK_BYTES)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReceivedFile(path=path, sha256=digest.hexdigest(), size_bytes=size, suffix=suffix)


def accept_upload(received: ReceivedFile, storage_dir: Path) -> str:
    """Move a checked upload to its SHA-256 name and return that file name.

    When a file with the same bytes is already stored, the new copy is deleted instead.
    """
    target_dir = storage_dir / "checkpoints"
    target_dir.mkdir(parents=True, exist_ok=True)
    file_name = f"{received.sha256}{received.suffix}"
    target = target_dir / file_name
    if target.exists():
        received.path.unlink(missing_ok=True)
    else:
        os.replace(received.path, target)
    return file_name


def checkpoint_path(storage_dir: Path, file_name: str) -> Path:
    """Return the path of a stored checkpoint file."""
    return storage_dir / "checkpoints" / file_name
