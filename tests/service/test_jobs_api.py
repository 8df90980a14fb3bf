"""Job submission and management without a worker: validation, idempotency, listing, cancel.

Jobs here go through `idle_client`, whose queue no worker consumes, so they stay queued.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import ServiceEnv, job_body

pytestmark = pytest.mark.service


def _submit(
    client: Any, headers: dict[str, str], body: dict[str, Any], key: str | None = None
) -> Any:
    extra = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/jobs", headers={**headers, **extra}, json=body)


def test_submit_returns_202_and_location(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    response = _submit(idle_client, alice, job_body(alice_checkpoint, "umap"))
    job = response.json()
    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["method"] == "umap"
    assert job["params"]["epochs"] == 1
    assert job["params"]["prune_rate"] == 0.9
    assert job["artifact_sha256"] is None
    assert idle_client.get(f"/v1/jobs/{job['id']}", headers=alice).json() == job


def test_idempotent_submit_returns_same_job(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    body = job_body(alice_checkpoint)
    first = _submit(idle_client, alice, body, key="same-key")
    second = _submit(idle_client, alice, body, key="same-key")
    listed = idle_client.get("/v1/jobs?limit=200", headers=alice).json()["items"]
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert [job["id"] for job in listed].count(first.json()["id"]) == 1


def test_idempotency_key_with_other_body_is_409(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    first = _submit(idle_client, alice, job_body(alice_checkpoint), key="reused-key")
    second = _submit(idle_client, alice, job_body(alice_checkpoint, seed=7), key="reused-key")
    assert second.status_code == 409
    assert second.json()["detail"] == (
        f"Idempotency-Key 'reused-key' was already used for job {first.json()['id']} with a "
        "different request body; use a new key for a new job"
    )


def test_idempotency_keys_are_per_owner(
    idle_client: Any,
    alice: dict[str, str],
    bob: dict[str, str],
    alice_checkpoint: str,
    lenet_file: Path,
) -> None:
    from tests.service.conftest import upload

    bob_checkpoint = upload(idle_client, bob, lenet_file).json()["id"]
    mine = _submit(idle_client, alice, job_body(alice_checkpoint), key="shared-key")
    theirs = _submit(idle_client, bob, job_body(bob_checkpoint), key="shared-key")
    assert theirs.status_code == 202
    assert theirs.json()["id"] != mine.json()["id"]


def test_other_owner_job_is_404(
    idle_client: Any, alice: dict[str, str], bob: dict[str, str], alice_checkpoint: str
) -> None:
    job_id = _submit(idle_client, alice, job_body(alice_checkpoint)).json()["id"]
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/weights"),
        ("GET", f"/v1/jobs/{job_id}/mask"),
    ):
        response = idle_client.request(method, path, headers=bob)
        assert response.status_code == 404, path
        assert response.json() == {"detail": f"job {job_id!r} not found"}, path
    listed = idle_client.get("/v1/jobs?limit=200", headers=bob).json()["items"]
    assert job_id not in [job["id"] for job in listed]


def test_other_owner_checkpoint_cannot_be_used(
    idle_client: Any, bob: dict[str, str], alice_checkpoint: str
) -> None:
    response = _submit(idle_client, bob, job_body(alice_checkpoint))
    assert response.status_code == 404
    assert response.json()["detail"].startswith(f"checkpoint {alice_checkpoint!r} not found")


@pytest.mark.parametrize(
    "reference",
    [
        "fashion-mnist:/etc",
        "fashion-mnist:/usr/share/datasets/../../etc",
        "npz:/root/data.npz",
    ],
)
def test_dataset_outside_roots_is_422(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str, reference: str
) -> None:
    body = job_body(alice_checkpoint)
    body["ood_datasets"] = [*body["ood_datasets"], reference]
    response = _submit(idle_client, alice, body)
    detail = response.json()["detail"]
    assert response.status_code == 422
    assert detail.startswith("ood_datasets[1]: ")
    assert reference in detail
    assert "outside the allowed data roots" in detail


def test_symlink_out_of_root_is_422(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str, service_env: ServiceEnv
) -> None:
    link = service_env.data_root / "escape"
    if not link.exists():
        os.symlink("/etc", link)
    reference = f"imagefolder:{link}"
    response = _submit(idle_client, alice, {**job_body(alice_checkpoint), "id_dataset": reference})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("id_dataset: ")
    assert "outside the allowed data roots" in response.json()["detail"]


def test_malformed_reference_is_422(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    response = _submit(idle_client, alice, {**job_body(alice_checkpoint), "id_dataset": "nonsense"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("id_dataset: ")
    assert "nonsense" in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "location", "message"),
    [
        ({"epochs": 0}, ["body", "params", "epochs"], "Input should be greater than or equal to 1"),
        (
            {"epochs": 201},
            ["body", "params", "epochs"],
            "Input should be less than or equal to 200",
        ),
        (
            {"mask_ratio": 1.5},
            ["body", "params", "mask_ratio"],
            "Input should be less than or equal to 0.9999",
        ),
        (
            {"prune_rate": 0.0},
            ["body", "params", "prune_rate"],
            "Input should be greater than or equal to 0.05",
        ),
        (
            {"batch_size": 5000},
            ["body", "params", "batch_size"],
            "Input should be less than or equal to 4096",
        ),
        (
            {"learning_rate": 0.1},
            ["body", "params", "learning_rate"],
            "Extra inputs are not permitted",
        ),
        (
            {"scores": ["msp", "bogus"]},
            ["body", "params", "scores"],
            "Value error, unknown score 'bogus'",
        ),
        (
            {"scores": ["msp", "msp"]},
            ["body", "params", "scores"],
            "Value error, score 'msp' is listed twice",
        ),
        (
            {"selection_score": "mahalanobis"},
            ["body", "params", "selection_score"],
            "Value error, selection_score 'mahalanobis' is not supported",
        ),
    ],
)
def test_bad_params_are_422(
    idle_client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    params: dict[str, Any],
    location: list[str],
    message: str,
) -> None:
    response = _submit(idle_client, alice, job_body(alice_checkpoint, **params))
    errors = response.json()["detail"]
    assert response.status_code == 422
    assert errors[0]["loc"] == location
    assert errors[0]["msg"].startswith(message)


def test_unknown_method_is_422(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    response = _submit(idle_client, alice, {**job_body(alice_checkpoint), "method": "finetune"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "method"]


def test_no_ood_dataset_is_422(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    response = _submit(idle_client, alice, {**job_body(alice_checkpoint), "ood_datasets": []})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "ood_datasets"]


def test_cancel_queued_job_at_once(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    job_id = _submit(idle_client, alice, job_body(alice_checkpoint)).json()["id"]
    response = idle_client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    job = response.json()
    assert response.status_code == 200
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None


def test_cancel_finished_job_is_409(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    job_id = _submit(idle_client, alice, job_body(alice_checkpoint)).json()["id"]
    idle_client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    response = idle_client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"job {job_id} has already cancelled; only queued or running jobs can be cancelled"
    )


def test_artifacts_of_queued_job_are_409(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str
) -> None:
    job_id = _submit(idle_client, alice, job_body(alice_checkpoint, "umap")).json()["id"]
    mask = idle_client.get(f"/v1/jobs/{job_id}/mask", headers=alice)
    weights = idle_client.get(f"/v1/jobs/{job_id}/weights", headers=alice)
    score = idle_client.post(
        f"/v1/jobs/{job_id}/score", headers=alice, files=[("files", ("a.png", b"x", "image/png"))]
    )
    assert mask.status_code == 409
    assert mask.json()["detail"].startswith(
        f"job {job_id} is queued, so downloading its mask is not possible"
    )
    assert weights.status_code == 409
    assert weights.json()["detail"] == (
        f"job {job_id} is a UMAP job and produces mask, not weights: use GET /v1/jobs/{job_id}/mask"
    )
    assert score.status_code == 409
    assert score.json()["detail"].startswith(f"job {job_id} is queued, so scoring is not possible")


def test_list_pages_cover_all_jobs(
    idle_client: Any, settings: Any, alice_checkpoint: str, lenet_file: Path
) -> None:
    from tests.service.conftest import create_key, upload

    headers = {"Authorization": f"Bearer {create_key(settings, 'dave')}"}
    checkpoint = upload(idle_client, headers, lenet_file).json()["id"]
    created = [
        _submit(idle_client, headers, job_body(checkpoint, seed=seed)).json()["id"]
        for seed in range(5)
    ]
    idle_client.post(f"/v1/jobs/{created[1]}/cancel", headers=headers)

    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = idle_client.get(query, headers=headers).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    cancelled = idle_client.get("/v1/jobs?status=cancelled", headers=headers).json()["items"]
    assert seen == list(reversed(created))
    assert [job["id"] for job in cancelled] == [created[1]]


def test_invalid_cursor_is_422(idle_client: Any, alice: dict[str, str]) -> None:
    response = idle_client.get("/v1/jobs?cursor=not-a-cursor", headers=alice)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cursor 'not-a-cursor' is invalid")


def test_unknown_status_filter_is_422(idle_client: Any, alice: dict[str, str]) -> None:
    response = idle_client.get("/v1/jobs?status=paused", headers=alice)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "status"]
