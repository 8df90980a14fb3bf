"""Database queries of the API: keys, checkpoints, jobs and artifacts, always scoped by owner.

Functions take an open session and commit only where their docstring states it. Rows of another
owner are treated as missing, so the API returns 404 without revealing that they exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, undefer

from app.db.models import ApiKey, Artifact, Checkpoint, Job, utc_now

KEY_PREFIX = "hk_"


class InvalidCursor(ValueError):
    """A pagination cursor that this API did not issue."""


def hash_key(key: str) -> str:
    """Return the SHA-256 hex digest under which an API key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, owner: str) -> tuple[ApiKey, str]:
    """Create and commit a new API key for `owner`.

    Returns:
        The stored row and the plaintext key, which is not stored anywhere and cannot be shown
        again.
    """
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(owner=owner, key_hash=hash_key(key))
    session.add(row)
    session.commit()
    return row, key


def owner_for_key(session: Session, key: str) -> str | None:
    """Return the owner of an API key, or None when the key is unknown."""
    return session.scalar(select(ApiKey.owner).where(ApiKey.key_hash == hash_key(key)))


def as_utc(value: datetime | None) -> datetime | None:
    """Attach UTC to datetimes that SQLite returns without a time zone."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


# Pagination: the cursor is the (created_at, id) pair of the last row of a page, base64-encoded.
# Pages are ordered newest first, with the id breaking ties between equal timestamps.


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """Return the opaque cursor that continues a listing after the given row."""
    payload = json.dumps({"t": as_utc(created_at).isoformat(), "id": row_id})
    return base64.urlsafe_b64encode(payload.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Return the (created_at, id) pair of a cursor; raises InvalidCursor when it is malformed."""
    invalid = InvalidCursor(
        f"cursor {cursor!r} is invalid: pass the next_cursor value of the previous page unchanged"
    )
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        created_at = datetime.fromisoformat(payload["t"])
        row_id = payload["id"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeError) as exc:
        raise invalid from exc
    if not isinstance(row_id, str) or created_at.tzinfo is None:
        raise invalid
    return created_at.astimezone(timezone.utc), row_id


def _after_cursor(model: type[Checkpoint] | type[Job], cursor: str | None):  # noqa: ANN202
    if cursor is None:
        return None
    created_at, row_id = decode_cursor(cursor)
    return or_(
        model.created_at < created_at,
        and_(model.created_at == created_at, model.id < row_id),
    )


# Checkpoints


def checkpoint_fingerprint(
    sha256: str,
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: int | None,
    mean: list[float] | None,
    std: list[float] | None,
) -> str:
    """Return the digest that identifies an upload: the file bytes plus the model settings."""
    canonical = json.dumps(
        [sha256, arch, num_classes, in_channels, input_size, mean, std], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def get_checkpoint(session: Session, owner: str, checkpoint_id: str) -> Checkpoint | None:
    """Return a checkpoint of `owner`, or None."""
    return session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.owner == owner)
    )


def find_checkpoint(session: Session, owner: str, fingerprint: str) -> Checkpoint | None:
    """Return the checkpoint of `owner` with this fingerprint, or None."""
    return session.scalar(
        select(Checkpoint).where(Checkpoint.owner == owner, Checkpoint.fingerprint == fingerprint)
    )


def add_checkpoint(session: Session, checkpoint: Checkpoint) -> tuple[Checkpoint, bool]:
    """Commit a new checkpoint record unless the owner already has an identical one.

    Returns:
        The stored record and True when it is new, or the existing record and False.
    """
    existing = find_checkpoint(session, checkpoint.owner, checkpoint.fingerprint)
    if existing is not None:
        return existing, False
    session.add(checkpoint)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent identical upload committed first.
        session.rollback()
        existing = find_checkpoint(session, checkpoint.owner, checkpoint.fingerprint)
        if existing is None:
            raise
        return existing, False
    return checkpoint, True


def list_checkpoints(
    session: Session, owner: str, limit: int, cursor: str | None
) -> tuple[list[Checkpoint], str | None]:
    """Return one page of the owner's checkpoints, newest first, and the cursor of the next."""
    query = select(Checkpoint).where(Checkpoint.owner == owner)
    after = _after_cursor(Checkpoint, cursor)
    if after is not None:
        query = query.where(after)
    rows = list(
        session.scalars(
            query.order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc()).limit(limit + 1)
        )
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, next_cursor


# Jobs


@dataclass
class JobView:
    """A job row with the digest of its artifact (None until the job has succeeded)."""

    job: Job
    artifact_sha256: str | None


def request_hash(body: dict[str, Any]) -> str:
    """Return the digest of a job request, used to detect a reused idempotency key."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _job_views(session: Session, query) -> list[JobView]:  # noqa: ANN001
    rows = session.execute(query.outerjoin(Artifact, Artifact.job_id == Job.id)).all()
    return [JobView(job=row[0], artifact_sha256=row[1]) for row in rows]


def get_job(session: Session, owner: str, job_id: str) -> JobView | None:
    """Return a job of `owner` with its artifact digest, or None."""
    views = _job_views(
        session,
        select(Job, Artifact.sha256).where(Job.id == job_id, Job.owner == owner),
    )
    return views[0] if views else None


def find_job_by_idempotency_key(session: Session, owner: str, key: str) -> JobView | None:
    """Return the job that `owner` created with this idempotency key, or None."""
    views = _job_views(
        session,
        select(Job, Artifact.sha256).where(Job.owner == owner, Job.idempotency_key == key),
    )
    return views[0] if views else None


def add_job(session: Session, job: Job) -> Job:
    """Commit a new job; raises IntegrityError when its idempotency key is already used."""
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise
    return job


def delete_job(session: Session, job_id: str) -> None:
    """Delete and commit a job that could not be queued."""
    session.execute(delete(Job).where(Job.id == job_id))
    session.commit()


def list_jobs(
    session: Session, owner: str, status: str | None, limit: int, cursor: str | None
) -> tuple[list[JobView], str | None]:
    """Return one page of the owner's jobs, newest first, and the cursor of the next page."""
    query = select(Job, Artifact.sha256).where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    after = _after_cursor(Job, cursor)
    if after is not None:
        query = query.where(after)
    views = _job_views(
        session, query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    )
    next_cursor = None
    if len(views) > limit:
        views = views[:limit]
        last = views[-1].job
        next_cursor = encode_cursor(last.created_at, last.id)
    return views, next_cursor


CancelOutcome = Literal["cancelled", "requested", "finished"]


def cancel_job(session: Session, job_id: str) -> CancelOutcome:
    """Cancel a job and commit.

    A queued job is cancelled at once. A running job gets its cancel flag set, and its worker stops
    at the next step. Both updates are conditional on the status, so a worker claiming the job at
    the same moment cannot make a queued job run after it was reported cancelled.

    Returns:
        "cancelled", "requested", or "finished" when the job had already finished.
    """
    now = utc_now()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now)
    )
    if result.rowcount == 1:
        session.commit()
        return "cancelled"
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True)
    )
    session.commit()
    return "requested" if result.rowcount == 1 else "finished"


# Artifacts


def get_artifact(session: Session, job_id: str, with_data: bool = False) -> Artifact | None:
    """Return the artifact of a job, loading its bytes only when `with_data` is set."""
    query = select(Artifact).where(Artifact.job_id == job_id)
    if with_data:
        query = query.options(undefer(Artifact.data))
    return session.scalar(query)
