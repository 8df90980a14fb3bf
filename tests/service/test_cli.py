"""The service commands of the `harden` CLI against the API under test."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cli import service_commands
from cli.main import main
from tests.service.conftest import ID_DATASET, png_bytes

pytestmark = pytest.mark.service


@pytest.fixture
def use_api(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Route the CLI's HTTP requests to a TestClient of the given API instead of a URL."""
    from fastapi.testclient import TestClient

    def route(api_client: Any, headers: dict[str, str]) -> None:
        monkeypatch.setattr(
            service_commands,
            "make_client",
            lambda args: TestClient(api_client.app, headers=headers),
        )

    return route


def test_submit_prints_job_id(
    use_api: Any,
    idle_client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_api(idle_client, alice)
    code = main(
        [
            "submit",
            "--checkpoint-id",
            alice_checkpoint,
            "--method",
            "umap",
            "--id-dataset",
            ID_DATASET,
            "--ood-dataset",
            "builtin:gaussian-noise",
            "--param",
            "epochs=2",
            "--param",
            "scores=msp,energy",
            "--idempotency-key",
            "cli-submit",
        ]
    )
    job_id = capsys.readouterr().out.strip()
    job = idle_client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert code == 0
    assert job["status"] == "queued"
    assert job["params"]["epochs"] == 2
    assert job["params"]["scores"] == ["msp", "energy"]


def test_submit_uploads_checkpoint(
    use_api: Any,
    idle_client: Any,
    alice: dict[str, str],
    lenet_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_api(idle_client, alice)
    code = main(
        [
            "submit",
            "--checkpoint",
            str(lenet_file),
            "--arch",
            "lenet",
            "--method",
            "um",
            "--id-dataset",
            ID_DATASET,
            "--ood-dataset",
            "builtin:uniform-noise",
            "--json",
        ]
    )
    job = json.loads(capsys.readouterr().out)
    assert code == 0
    assert job["method"] == "um"
    assert job["status"] == "queued"


def test_submit_bad_param_reports_api_error(
    use_api: Any,
    idle_client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_api(idle_client, alice)
    code = main(
        [
            "submit",
            "--checkpoint-id",
            alice_checkpoint,
            "--method",
            "um",
            "--id-dataset",
            ID_DATASET,
            "--ood-dataset",
            "builtin:gaussian-noise",
            "--param",
            "epochs=0",
        ]
    )
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "error: HTTP 422: body.params.epochs: Input should be greater than or equal to 1"
    )


def test_status_of_unknown_job(
    use_api: Any, client: Any, alice: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    use_api(client, alice)
    code = main(["status", "no-such-job"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "error: HTTP 404: job 'no-such-job' not found"


def test_wait_succeeded_exits_0(
    use_api: Any,
    client: Any,
    alice: dict[str, str],
    um_job: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_api(client, alice)
    code = main(["wait", um_job["id"], "--interval", "0.1"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"job {um_job['id']}: succeeded"
    assert lines[1] == um_job["metrics"]["selection"]["summary"]


def test_wait_cancelled_exits_1(
    use_api: Any,
    idle_client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.service.conftest import job_body

    job_id = idle_client.post("/v1/jobs", headers=alice, json=job_body(alice_checkpoint)).json()[
        "id"
    ]
    idle_client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    use_api(idle_client, alice)
    code = main(["wait", job_id, "--interval", "0.1"])
    assert code == 1
    assert capsys.readouterr().out.strip() == f"job {job_id}: cancelled"


def test_download_writes_verified_file(
    use_api: Any,
    client: Any,
    alice: dict[str, str],
    um_job: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_api(client, alice)
    output = tmp_path / "weights.safetensors"
    code = main(["download", um_job["id"], "-o", str(output)])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(output)
    assert hashlib.sha256(output.read_bytes()).hexdigest() == um_job["artifact_sha256"]
    assert not output.with_name(output.name + ".part").exists()


def test_remote_score_prints_verdicts(
    use_api: Any,
    client: Any,
    alice: dict[str, str],
    umap_job: dict[str, Any],
    fmnist_images: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = []
    for index in range(2):
        path = tmp_path / f"shirt{index}.png"
        path.write_bytes(png_bytes(fmnist_images[index]))
        paths.append(str(path))
    use_api(client, alice)
    code = main(["remote-score", umap_job["id"], *paths])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert lines[0].startswith("score energy, threshold ")
    assert [line.split("\t")[0] for line in lines[1:]] == ["shirt0.png", "shirt1.png"]


def test_missing_key_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HARDEN_API_KEY", raising=False)
    code = main(["status", "some-job"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "error: no API key: pass --key or set HARDEN_API_KEY"


def test_unreachable_api_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "status",
            "some-job",
            "--url",
            "http://127.0.0.1:9",
            "--key",
            "hk_x",
            "--http-timeout",
            "2",
        ]
    )
    assert code == 1
    assert capsys.readouterr().err.startswith("error: cannot reach the API at http://127.0.0.1:9")
