"""Tables of the service: API keys, uploaded checkpoints, hardening jobs and their artifacts.

The Alembic migrations in `migrations/versions/` must build exactly this schema; a test compares
them on PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
METHODS = ("um", "umap")
ARTIFACT_KINDS = ("mask", "weights")

# Portable JSON: jsonb on PostgreSQL, JSON text on SQLite.
JsonColumn = JSON().with_variant(JSONB(), "postgresql")


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """Return a random 32-character hex identifier."""
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so constraint names match across databases."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class ApiKey(Base):
    """An API key; only the SHA-256 hex digest of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Checkpoint(Base):
    """An uploaded checkpoint that loaded cleanly for its architecture.

    The file lives in the storage directory under its SHA-256 name, shared by all records with the
    same bytes. `fingerprint` is the SHA-256 of the file digest plus the model settings, so an
    identical upload by the same owner finds the existing record.
    """

    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("owner", "fingerprint", name="uq_checkpoints_owner_fingerprint"),
        Index("ix_checkpoints_owner_created", "owner", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(80))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    arch: Mapped[str] = mapped_column(String(64))
    num_classes: Mapped[int] = mapped_column(Integer)
    in_channels: Mapped[int] = mapped_column(Integer)
    input_size: Mapped[int | None] = mapped_column(Integer)
    mean: Mapped[list[float] | None] = mapped_column(JsonColumn)
    std: Mapped[list[float] | None] = mapped_column(JsonColumn)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Job(Base):
    """A hardening job and its lease.

    A worker claims a job by setting `claimed_by`, `heartbeat_at` and `attempt` in one conditional
    UPDATE; a running job whose heartbeat is older than the lease timeout belongs to a dead worker
    and may be taken over.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="status_known",
        ),
        CheckConstraint("method IN ('um', 'umap')", name="method_known"),
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner", "created_at", "id"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64))
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="RESTRICT"))
    method: Mapped[str] = mapped_column(String(8))
    id_dataset: Mapped[str] = mapped_column(Text)
    ood_datasets: Mapped[list[str]] = mapped_column(JsonColumn)
    val_ood_datasets: Mapped[list[str]] = mapped_column(JsonColumn)
    params: Mapped[dict[str, Any]] = mapped_column(JsonColumn)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonColumn)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    claimed_by: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempt: Mapped[int] = mapped_column(Integer, default=0)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Artifact(Base):
    """The result file of a succeeded job: a UMAP mask or UM weights in safetensors format.

    At most one per job (unique `job_id`), written in the same transaction that marks the job
    succeeded.
    """

    __tablename__ = "artifacts"
    __table_args__ = (CheckConstraint("kind IN ('mask', 'weights')", name="kind_known"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    threshold: Mapped[float] = mapped_column(Float)
    score_name: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
