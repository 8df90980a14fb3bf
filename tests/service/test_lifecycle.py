"""End to end with a real Celery worker: UM and UMAP jobs, downloads, scoring, cancellation and a
worker killed in the middle of a job."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load as load_safetensors
from sqlalchemy import func, select

from app.db.models import Artifact
from app.db.session import session_scope
from tests.service.conftest import WorkerPool, job_body, png_bytes, wait_finished, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]


def _artifact_count(settings: Any, job_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(
            select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)
        )


@pytest.mark.parametrize("method", ["um", "umap"])
def test_job_succeeds_with_metrics(
    method: str, um_job: dict[str, Any], umap_job: dict[str, Any], settings: Any
) -> None:
    job = um_job if method == "um" else umap_job
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1
    assert job["error"] is None
    assert job["progress"]["fraction"] == 1.0
    assert job["started_at"] is not None
    assert job["finished_at"] >= job["started_at"]
    assert job["metrics"]["method"] == method
    assert set(job["metrics"]["hardened"]["scores"]) == {"msp", "energy"}
    energy = job["metrics"]["hardened"]["scores"]["energy"]["sets"]["builtin:gaussian-noise"]
    assert set(energy) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    assert 0.0 <= energy["auroc"] <= 1.0
    assert 0.0 <= job["metrics"]["hardened"]["id_accuracy"] <= 1.0
    assert job["metrics"]["train_size"] == 500
    assert len(job["artifact_sha256"]) == 64
    assert _artifact_count(settings, job["id"]) == 1


@pytest.mark.parametrize(
    ("method", "kind", "other"), [("um", "weights", "mask"), ("umap", "mask", "weights")]
)
def test_artifact_download(
    method: str,
    kind: str,
    other: str,
    client: Any,
    alice: dict[str, str],
    um_job: dict[str, Any],
    umap_job: dict[str, Any],
) -> None:
    job = um_job if method == "um" else umap_job
    response = client.get(f"/v1/jobs/{job['id']}/{kind}", headers=alice)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert (
        response.headers["content-disposition"]
        == f'attachment; filename="{job["id"]}-{kind}.safetensors"'
    )
    assert response.headers["etag"] == f'"{job["artifact_sha256"]}"'
    assert hashlib.sha256(response.content).hexdigest() == job["artifact_sha256"]
    assert len(load_safetensors(response.content)) > 0

    cached = client.get(
        f"/v1/jobs/{job['id']}/{kind}", headers={**alice, "If-None-Match": response.headers["etag"]}
    )
    assert cached.status_code == 304
    assert cached.content == b""

    wrong = client.get(f"/v1/jobs/{job['id']}/{other}", headers=alice)
    assert wrong.status_code == 409
    assert wrong.json()["detail"].endswith(f"use GET /v1/jobs/{job['id']}/{kind}")


@pytest.mark.parametrize("method", ["um", "umap"])
def test_score_png_files(
    method: str,
    client: Any,
    alice: dict[str, str],
    um_job: dict[str, Any],
    umap_job: dict[str, Any],
    fmnist_images: np.ndarray,
) -> None:
    job = um_job if method == "um" else umap_job
    files = [
        ("files", (f"image{i}.png", png_bytes(image), "image/png"))
        for i, image in enumerate(fmnist_images[:3])
    ]
    response = client.post(f"/v1/jobs/{job['id']}/score", headers=alice, files=files)
    body = response.json()
    assert response.status_code == 200, body
    assert body["score_name"] == "energy"
    assert body["threshold"] == pytest.approx(job["metrics"]["threshold"])
    assert len(body["results"]) == 3
    for result in body["results"]:
        assert 0 <= result["predicted_class"] < 10
        assert 0.0 < result["probability"] <= 1.0
        assert result["is_ood"] == (result["ood_score"] < body["threshold"])


def test_score_npy_batch(
    client: Any, alice: dict[str, str], um_job: dict[str, Any], fmnist_images: np.ndarray
) -> None:
    buffer = io.BytesIO()
    np.save(buffer, fmnist_images)
    files = [("files", ("batch.npy", buffer.getvalue(), "application/octet-stream"))]
    response = client.post(f"/v1/jobs/{um_job['id']}/score", headers=alice, files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 4


def test_score_noise_flagged_more_than_images(
    client: Any, alice: dict[str, str], umap_job: dict[str, Any], fmnist_images: np.ndarray
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    scores = {}
    for name, batch in (("images", fmnist_images), ("noise", noise)):
        buffer = io.BytesIO()
        np.save(buffer, batch)
        response = client.post(
            f"/v1/jobs/{umap_job['id']}/score",
            headers=alice,
            files=[("files", (f"{name}.npy", buffer.getvalue()))],
        )
        scores[name] = np.mean([result["ood_score"] for result in response.json()["results"]])
    assert scores["images"] > scores["noise"]


def test_score_undecodable_file_is_422(
    client: Any, alice: dict[str, str], um_job: dict[str, Any], fmnist_images: np.ndarray
) -> None:
    files = [
        ("files", ("good.png", png_bytes(fmnist_images[0]), "image/png")),
        ("files", ("broken.png", b"\x89PNG not really", "image/png")),
    ]
    response = client.post(f"/v1/jobs/{um_job['id']}/score", headers=alice, files=files)
    assert response.status_code == 422
    assert "'broken.png'" in response.json()["detail"]


def test_score_other_owner_is_404(
    client: Any, bob: dict[str, str], um_job: dict[str, Any], fmnist_images: np.ndarray
) -> None:
    files = [("files", ("a.png", png_bytes(fmnist_images[0]), "image/png"))]
    response = client.post(f"/v1/jobs/{um_job['id']}/score", headers=bob, files=files)
    assert response.status_code == 404


def test_cancel_running_job(
    client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    worker_pool: WorkerPool,
    settings: Any,
) -> None:
    worker_pool.live()
    body = job_body(alice_checkpoint, "um", epochs=200, max_train_samples=2000, loss_constraint=0.5)
    job_id = client.post("/v1/jobs", headers=alice, json=body).json()["id"]
    running = wait_for(
        client,
        alice,
        job_id,
        lambda job: job["stage"] == "training" and job["progress"]["epoch"] is not None,
        timeout_s=120,
        description="the training stage",
    )
    assert running["status"] == "running"
    assert running["progress"]["loss_constraint"] == 0.5

    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True

    job = wait_finished(client, alice, job_id, timeout_s=60)
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None
    assert job["artifact_sha256"] is None
    assert _artifact_count(settings, job_id) == 0
    assert client.get(f"/v1/jobs/{job_id}/weights", headers=alice).status_code == 409


def test_killed_worker_job_runs_once(
    client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    worker_pool: WorkerPool,
    settings: Any,
) -> None:
    first = worker_pool.live()
    body = job_body(alice_checkpoint, "umap", epochs=3, max_train_samples=1000)
    job_id = client.post("/v1/jobs", headers=alice, json=body).json()["id"]
    wait_for(
        client,
        alice,
        job_id,
        lambda job: job["stage"] == "training",
        timeout_s=120,
        description="the training stage",
    )

    first.kill()
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "running"

    second = worker_pool.start_new()
    job = wait_finished(client, alice, job_id, timeout_s=240)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    assert _artifact_count(settings, job_id) == 1
    assert f"job {job_id}: taking over" in second.log_text()


def test_missing_data_fails_with_message(
    client: Any,
    alice: dict[str, str],
    alice_checkpoint: str,
    worker_pool: WorkerPool,
    service_env: Any,
    settings: Any,
) -> None:
    worker_pool.live()
    empty = service_env.data_root / "empty-fmnist"
    empty.mkdir(exist_ok=True)
    reference = f"fashion-mnist:{empty}"
    body = {**job_body(alice_checkpoint, "um"), "id_dataset": reference}
    response = client.post("/v1/jobs", headers=alice, json=body)
    assert response.status_code == 202

    job = wait_finished(client, alice, response.json()["id"], timeout_s=120)
    assert job["status"] == "failed"
    assert str(empty) in job["error"]
    assert not job["error"].startswith("internal error")
    assert job["attempt"] == 1
    assert _artifact_count(settings, job["id"]) == 0
