"""Settings: defaults, environment parsing and start-up validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings, sqlite_file

pytestmark = pytest.mark.service


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove the HARDEN_* variables that the service fixtures export."""
    for name in list(os.environ):
        if name.startswith("HARDEN_"):
            monkeypatch.delenv(name)


def test_defaults_live_under_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path}/var/harden.db"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path}/var/broker.sqlite"
    assert settings.storage_dir == tmp_path / "var" / "storage"
    assert settings.data_roots == [Path("/usr/share/datasets"), tmp_path / "var" / "data"]
    assert settings.max_upload_bytes == 2 * 1024**3


def test_data_roots_from_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARDEN_DATA_ROOTS", "/srv/a, /srv/b")
    assert Settings().data_roots == [Path("/srv/a"), Path("/srv/b")]


def test_empty_data_roots_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARDEN_DATA_ROOTS", " , ")
    with pytest.raises(ValidationError, match="data_roots is empty"):
        Settings()


def test_hard_limit_below_soft_rejected() -> None:
    with pytest.raises(ValidationError, match=r"job_time_limit_s \(100\) must be larger"):
        Settings(job_soft_time_limit_s=100, job_time_limit_s=100)


def test_short_lease_rejected() -> None:
    with pytest.raises(ValidationError, match=r"lease_timeout_s \(1.0\) must be at least twice"):
        Settings(heartbeat_interval_s=1, lease_timeout_s=1)


def test_unknown_database_rejected() -> None:
    with pytest.raises(ValidationError, match="unsupported database 'mysql'"):
        Settings(database_url="mysql://user@host/db")


def test_invalid_device_rejected() -> None:
    with pytest.raises(ValidationError, match="device 'gpu' is invalid"):
        Settings(device="gpu")


def test_postgres_url_kept() -> None:
    url = "postgresql+psycopg://harden@db:5432/harden"
    assert Settings(database_url=url).database_url == url


def test_sqlite_file_of_url() -> None:
    assert sqlite_file("sqla+sqlite:////srv/broker.sqlite") == Path("/srv/broker.sqlite")
    assert sqlite_file("postgresql+psycopg://db/harden") is None
