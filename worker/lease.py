"""Database side of running a job exactly once: claim, heartbeat, progress and outcome.

A worker claims a job with one conditional UPDATE that sets `claimed_by` to its own id. Every
later write (heartbeat, progress, outcome) is conditional on `claimed_by` still being that id and
the job still running, so a worker that lost its lease cannot overwrite the result of the worker
that took the job over. The artifact is inserted in the same transaction that marks the job
succeeded, and `artifacts.job_id` is unique.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import FINISHED_STATUSES, Artifact, Job, utc_now

logger = logging.getLogger(__name__)

ClaimOutcome = Literal["claimed", "missing", "finished", "busy"]


@dataclass
class Claim:
    """Result of a claim attempt; `job` is the row after the attempt (None when missing)."""

    outcome: ClaimOutcome
    job: Job | None


def _owned(job_id: str, worker_id: str):  # noqa: ANN202
    return and_(Job.id == job_id, Job.claimed_by == worker_id, Job.status == "running")


def claim_job(session: Session, job_id: str, worker_id: str, lease_timeout_s: float) -> Claim:
    """Claim a queued job, or a running one whose heartbeat is older than the lease timeout.

    A successful claim sets the job running, increments `attempt` and resets its progress, then
    commits.

    Returns:
        "claimed" on success, "missing" when no such job exists, "finished" when it already
        succeeded, failed or was cancelled, and "busy" when another worker has a fresh lease.
    """
    now = utc_now()
    stale_before = now - timedelta(seconds=lease_timeout_s)
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.status == "queued",
                and_(
                    Job.status == "running",
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
                ),
            ),
        )
        .values(
            status="running",
            claimed_by=worker_id,
            heartbeat_at=now,
            attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            stage="loading",
            progress={"fraction": 0.0},
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if result.rowcount == 1:
        return Claim("claimed", job)
    if job is None:
        return Claim("missing", None)
    if job.status in FINISHED_STATUSES:
        return Claim("finished", job)
    return Claim("busy", job)


def heartbeat(session: Session, job_id: str, worker_id: str) -> bool:
    """Renew the lease and commit; False when this worker lost the lease."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(heartbeat_at=utc_now())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def cancel_requested(session: Session, job_id: str, worker_id: str) -> tuple[bool, bool]:
    """Return (cancel requested, lease still held by this worker) for a running job."""
    row = session.execute(
        select(Job.cancel_requested, Job.claimed_by, Job.status).where(Job.id == job_id)
    ).one_or_none()
    session.commit()
    if row is None:
        return False, False
    lease_held = row.claimed_by == worker_id and row.status == "running"
    return bool(row.cancel_requested), lease_held


def write_progress(
    session: Session, job_id: str, worker_id: str, stage: str, progress: dict[str, Any]
) -> bool:
    """Store the stage and progress of a job and renew its lease; False when the lease is lost."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(stage=stage, progress=progress, heartbeat_at=utc_now())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def finish_job(
    session: Session, job_id: str, worker_id: str, status: str, error: str | None = None
) -> bool:
    """Mark a job failed or cancelled and commit; False when this worker lost the lease."""
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(status=status, error=error, finished_at=utc_now(), heartbeat_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def finish_succeeded(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    metrics: dict[str, Any],
    artifact: bytes,
    artifact_kind: str,
    artifact_sha256: str,
    threshold: float,
    score_name: str,
    progress: dict[str, Any],
) -> bool:
    """Mark a job succeeded and store its artifact in one transaction.

    Returns:
        False, writing nothing, when this worker lost the lease.

    Raises:
        ValueError: when `artifact_sha256` does not match the artifact bytes.
    """
    actual = hashlib.sha256(artifact).hexdigest()
    if actual != artifact_sha256:
        raise ValueError(
            f"artifact digest mismatch for job {job_id}: the pipeline reported "
            f"{artifact_sha256}, the bytes hash to {actual}"
        )
    result = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(
            status="succeeded",
            metrics=metrics,
            error=None,
            finished_at=utc_now(),
            heartbeat_at=None,
            progress=progress,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.rollback()
        return False
    session.add(
        Artifact(
            job_id=job_id,
            kind=artifact_kind,
            sha256=artifact_sha256,
            size_bytes=len(artifact),
            threshold=threshold,
            score_name=score_name,
            data=artifact,
        )
    )
    session.commit()
    return True


def fail_running_job(session: Session, job_id: str, error: str) -> bool:
    """Mark a running job failed, whichever worker holds its lease, after its process was killed."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(status="failed", error=error, finished_at=utc_now(), heartbeat_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def stale_running_jobs(session: Session, lease_timeout_s: float) -> list[str]:
    """Return the ids of running jobs whose heartbeat is older than the lease timeout."""
    stale_before = utc_now() - timedelta(seconds=lease_timeout_s)
    ids = session.scalars(
        select(Job.id).where(
            Job.status == "running",
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
        )
    ).all()
    session.commit()
    return list(ids)
