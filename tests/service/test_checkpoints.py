"""Checkpoint uploads: storage, de-duplication, size limit and every kind of bad file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.service.conftest import UPLOAD_LIMIT, ServiceEnv, upload

pytestmark = pytest.mark.service


def _incoming(service_env: ServiceEnv) -> list[Path]:
    folder = service_env.storage_dir / "incoming"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_upload_stores_by_sha256(
    client: Any, alice: dict[str, str], lenet_file: Path, service_env: ServiceEnv
) -> None:
    response = upload(client, alice, lenet_file, mean="0.3", std="0.35")
    sha256 = hashlib.sha256(lenet_file.read_bytes()).hexdigest()
    body = response.json()
    assert response.status_code == 201
    assert body["sha256"] == sha256
    assert body["size_bytes"] == lenet_file.stat().st_size
    assert (body["arch"], body["num_classes"], body["in_channels"]) == ("lenet", 10, 1)
    assert (body["mean"], body["std"], body["input_size"]) == ([0.3], [0.35], None)
    assert (service_env.storage_dir / "checkpoints" / f"{sha256}.pt").is_file()
    assert _incoming(service_env) == []


def test_identical_upload_returns_existing(
    client: Any, alice: dict[str, str], lenet_file: Path
) -> None:
    first = upload(client, alice, lenet_file, input_size=28)
    second = upload(client, alice, lenet_file, input_size=28)
    assert first.status_code in (200, 201)
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]


def test_same_file_other_owner_is_new(
    client: Any, alice: dict[str, str], bob: dict[str, str], lenet_file: Path
) -> None:
    mine = upload(client, alice, lenet_file, input_size=28)
    theirs = upload(client, bob, lenet_file, input_size=28)
    assert theirs.status_code in (200, 201)
    assert theirs.json()["id"] != mine.json()["id"]


def test_other_owner_checkpoint_is_404(
    client: Any, alice_checkpoint: str, bob: dict[str, str]
) -> None:
    response = client.get(f"/v1/checkpoints/{alice_checkpoint}", headers=bob)
    assert response.status_code == 404
    assert response.json() == {"detail": f"checkpoint {alice_checkpoint!r} not found"}


def test_list_checkpoints_pages(client: Any, alice: dict[str, str], alice_checkpoint: str) -> None:
    first = client.get("/v1/checkpoints?limit=1", headers=alice).json()
    assert len(first["items"]) == 1
    assert first["next_cursor"] is not None
    second = client.get(
        f"/v1/checkpoints?limit=1&cursor={first['next_cursor']}", headers=alice
    ).json()
    assert second["items"][0]["id"] != first["items"][0]["id"]


def test_upload_over_limit_is_413(
    client: Any, alice: dict[str, str], tmp_path: Path, service_env: ServiceEnv
) -> None:
    # Past the file limit but within the request allowance: stopped while copying.
    big = tmp_path / "big.pt"
    big.write_bytes(os.urandom(UPLOAD_LIMIT + 1024))
    response = upload(client, alice, big)
    assert response.status_code == 413
    assert response.json()["detail"].startswith(
        f"the file is larger than the upload limit of {UPLOAD_LIMIT} bytes"
    )
    assert _incoming(service_env) == []


def test_request_over_limit_is_413(client: Any, alice: dict[str, str], tmp_path: Path) -> None:
    # The declared Content-Length alone exceeds the limit: rejected before reading the body.
    huge = tmp_path / "huge.pt"
    huge.write_bytes(os.urandom(UPLOAD_LIMIT + 2 * 1024 * 1024))
    response = upload(client, alice, huge)
    assert response.status_code == 413
    assert "request body is larger than the limit" in response.json()["detail"]


def test_corrupt_file_is_422(
    client: Any, alice: dict[str, str], tmp_path: Path, service_env: ServiceEnv
) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    response = upload(client, alice, corrupt)
    detail = response.json()["detail"]
    assert response.status_code == 422
    assert detail.startswith(
        "Checkpoint 'corrupt.pt' for architecture 'lenet' is not a readable PyTorch checkpoint"
    )
    assert str(service_env.storage_dir) not in detail
    assert _incoming(service_env) == []


class _RunsCode:
    """Pickles to a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def test_code_pickle_is_422_and_never_runs(
    client: Any, alice: dict[str, str], tmp_path: Path, service_env: ServiceEnv
) -> None:
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save({"fc.weight": _RunsCode(f"touch {marker}")}, payload)
    response = upload(client, alice, payload)
    assert response.status_code == 422
    assert "payload.pt" in response.json()["detail"]
    assert not marker.exists()
    assert _incoming(service_env) == []


def test_wrong_architecture_is_422(client: Any, alice: dict[str, str], lenet_file: Path) -> None:
    with lenet_file.open("rb") as handle:
        response = client.post(
            "/v1/checkpoints",
            headers=alice,
            files={"file": ("lenet.pt", handle)},
            data={"arch": "resnet18_32x32"},
        )
    assert response.status_code == 422
    assert response.json()["detail"].startswith(
        "Checkpoint 'lenet.pt' does not fit architecture 'resnet18_32x32'"
    )


def test_unknown_architecture_is_422(client: Any, alice: dict[str, str], lenet_file: Path) -> None:
    response = upload(client, alice, lenet_file, arch="lenet9000")
    assert response.status_code == 422
    assert "lenet9000" in response.json()["detail"]


def test_wrong_input_size_is_422(client: Any, alice: dict[str, str], lenet_file: Path) -> None:
    response = upload(client, alice, lenet_file, input_size=64)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(
        "the 'lenet' checkpoint does not accept 1x64x64 inputs"
    )


def test_mean_per_channel_required(client: Any, alice: dict[str, str], lenet_file: Path) -> None:
    response = upload(client, alice, lenet_file, mean="0.5,0.5,0.5", std="0.2,0.2,0.2")
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "mean has 3 values but the model has 1 input channels: give one value per channel"
    )


def test_mean_not_numbers_is_422(client: Any, alice: dict[str, str], lenet_file: Path) -> None:
    response = upload(client, alice, lenet_file, mean="a,b", std="0.2")
    assert response.status_code == 422
    assert response.json()["detail"].startswith("mean 'a,b' is invalid")


def test_empty_file_is_422(client: Any, alice: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    response = upload(client, alice, empty)
    assert response.status_code == 422
    assert response.json()["detail"] == "the uploaded file is empty: send the checkpoint as 'file'"
