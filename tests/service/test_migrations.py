"""The Alembic migrations build exactly the schema of app.db.models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db.models import Base
from tests.service.conftest import REPO_ROOT, ServiceEnv

pytestmark = pytest.mark.service


def test_models_match_migrations_on_postgres(service_env: ServiceEnv) -> None:
    engine = create_engine(service_env.database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_upgrade_and_downgrade_on_sqlite(tmp_path: Path) -> None:
    database = tmp_path / "nested" / "harden.db"
    env = {"HARDEN_DATABASE_URL": f"sqlite:///{database}", "PATH": "/usr/bin:/bin"}
    for command in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        subprocess.run(
            [sys.executable, "-m", "alembic", *command],
            cwd=REPO_ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    engine = create_engine(f"sqlite:///{database}")
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables == {"alembic_version", "api_keys", "checkpoints", "jobs", "artifacts"}
