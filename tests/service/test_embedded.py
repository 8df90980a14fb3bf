"""The embedded default: SQLite database and the SQLite Celery transport, no servers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import ID_DATASET, REPO_ROOT

pytestmark = pytest.mark.service


def test_submit_queues_message_in_sqlite(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app import repository
    from app.config import Settings
    from app.db.session import dispose_engines, session_scope
    from app.main import create_app
    from core.architectures import build_model
    from core.checkpoints import save_checkpoint

    lenet_file = tmp_path / "untrained.pt"
    save_checkpoint(build_model("lenet", 10, 1), lenet_file)

    env = {"HARDEN_DATABASE_URL": f"sqlite:///{tmp_path}/var/harden.db", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    settings = Settings(
        database_url=env["HARDEN_DATABASE_URL"],
        broker_url=f"sqla+sqlite:///{tmp_path}/var/broker.sqlite",
        storage_dir=tmp_path / "var" / "storage",
    )
    with session_scope(settings.database_url) as session:
        _, key = repository.create_api_key(session, "erin")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with TestClient(create_app(settings)) as client:
            ready = client.get("/readyz")
            with lenet_file.open("rb") as handle:
                checkpoint = client.post(
                    "/v1/checkpoints",
                    headers=headers,
                    files={"file": ("m.pt", handle)},
                    data={"arch": "lenet"},
                ).json()
            body = {
                "checkpoint_id": checkpoint["id"],
                "method": "um",
                "id_dataset": ID_DATASET,
                "ood_datasets": ["builtin:gaussian-noise"],
            }
            response = client.post("/v1/jobs", headers=headers, json=body)
    finally:
        dispose_engines()

    with sqlite3.connect(tmp_path / "var" / "broker.sqlite") as broker:
        payloads = [row[0] for row in broker.execute("SELECT payload FROM kombu_message")]
    assert ready.status_code == 200
    assert response.status_code == 202
    assert len(payloads) == 1
    assert response.json()["id"] in payloads[0]
