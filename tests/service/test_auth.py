"""API keys: the admin command, the Authorization header and the open probes."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import ApiKey
from app.db.session import session_scope
from cli.main import main

pytestmark = pytest.mark.service


def test_healthz_needs_no_key(client: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_both_checks(client: Any) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_names_broker_down(settings: Any) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    # Port 9 (discard) has no Redis behind it on the loopback interface.
    broken = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:9/0", "broker_connect_timeout_s": 1.0}
    )
    with TestClient(create_app(broken)) as test_client:
        response = test_client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["broker"].startswith("down: ")
    assert response.json()["detail"] == "broker down"


def test_missing_key_is_401(client: Any) -> None:
    response = client.get("/v1/jobs")
    assert response.status_code == 401
    assert response.json()["detail"].startswith(
        "missing API key: send the header 'Authorization: Bearer <key>'"
    )
    assert response.headers["www-authenticate"] == "Bearer"


def test_malformed_header_is_401(client: Any) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert response.json()["detail"] == "malformed Authorization header: expected 'Bearer <key>'"


def test_unknown_key_is_401(client: Any) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer hk_not-a-key"})
    assert response.status_code == 401
    assert response.json()["detail"].startswith("invalid API key")


def test_create_key_prints_key_once(
    settings: Any, client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["admin", "create-key", "--owner", "carol"])
    captured = capsys.readouterr()
    key = captured.out.strip()
    assert code == 0
    assert key.startswith("hk_")
    assert "shown only now" in captured.err
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(ApiKey).where(ApiKey.owner == "carol")).all()
    assert [row.key_hash for row in rows] == [hashlib.sha256(key.encode()).hexdigest()]


def test_create_key_rejects_bad_owner(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["admin", "create-key", "--owner", "bad owner!"])
    assert code == 1
    assert "owner 'bad owner!' is invalid" in capsys.readouterr().err


def test_openapi_served(client: Any) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert "/v1/jobs/{job_id}/score" in response.json()["paths"]
    assert client.get("/docs").status_code == 200
