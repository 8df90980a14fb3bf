"""The worker's delivery logic, run in-process against the test database with a replaced pipeline.

These cases are hard to produce with a real worker: an internal error, a fresh or stale lease held
by another worker, a lost lease, too many attempts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.db.models import Job, utc_now
from app.db.session import session_scope
from core.errors import Cancelled, DatasetError
from tests.service.conftest import job_body
from worker import lease, runner
from worker.runner import JobRunner

pytestmark = pytest.mark.service


@pytest.fixture
def queued_job(
    idle_client: Any, alice: dict[str, str], alice_checkpoint: str, settings: Any
) -> Iterator[str]:
    """Id of a new queued job that no worker will pick up; it ends finished in any case."""
    response = idle_client.post("/v1/jobs", headers=alice, json=job_body(alice_checkpoint))
    assert response.status_code == 202
    job_id = response.json()["id"]
    yield job_id
    # A job left running would be queued again by the start-up check of a later worker.
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(("queued", "running")))
            .values(status="cancelled", finished_at=utc_now())
        )
        session.commit()


class Redispatches(list):
    """List of the (job id, delay) pairs that a runner queues for another delivery."""

    def __call__(self, job_id: str, delay: float) -> None:
        self.append((job_id, delay))


def _job(settings: Any, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)


def _set(settings: Any, job_id: str, **values: Any) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _fake_result() -> Any:
    from core.pipeline import JobResult

    artifact = b"fake safetensors bytes"
    return JobResult(
        metrics={"auroc": float("nan"), "nested": {"loss": 0.5}},
        artifact=artifact,
        artifact_kind="weights",
        artifact_sha256=hashlib.sha256(artifact).hexdigest(),
        threshold=1.5,
        score_name="energy",
    )


def test_internal_error_marks_failed(
    settings: Any,
    queued_job: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from core.pipeline import Progress

    def explode(spec: Any, on_progress: Any, should_stop: Any, device: str) -> Any:
        on_progress(Progress(stage="training", fraction=0.3, epoch=1, epochs=1))
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.pipeline, "run_job", explode)
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert job.status == "failed"
    assert job.error == (
        "internal error in stage training: RuntimeError: boom; "
        f"see the worker log for job {queued_job}"
    )
    assert len(errors) == 1
    assert errors[0].exc_info is not None


def test_input_error_marks_failed_without_traceback(
    settings: Any,
    queued_job: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def reject(spec: Any, on_progress: Any, should_stop: Any, device: str) -> Any:
        raise DatasetError("dataset reference 'x' has no files: put the IDX files there")

    monkeypatch.setattr(runner.pipeline, "run_job", reject)
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    assert job.status == "failed"
    assert job.error == "dataset reference 'x' has no files: put the IDX files there"
    assert all(record.exc_info is None for record in caplog.records)
    assert all(record.levelno < logging.ERROR for record in caplog.records)


def test_success_stores_sanitised_metrics(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner.pipeline, "run_job", lambda *args, **kwargs: _fake_result())
    JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    assert job.status == "succeeded"
    assert job.metrics == {"auroc": None, "nested": {"loss": 0.5}}
    assert job.claimed_by is not None
    assert job.heartbeat_at is None


def test_second_success_is_discarded(settings: Any, queued_job: str) -> None:
    result = _fake_result()
    fields = {
        "metrics": {},
        "artifact": result.artifact,
        "artifact_kind": "weights",
        "artifact_sha256": result.artifact_sha256,
        "threshold": 1.0,
        "score_name": "energy",
        "progress": {"fraction": 1.0},
    }
    with session_scope(settings.database_url) as session:
        assert lease.claim_job(session, queued_job, "worker-a", 60).outcome == "claimed"
        first = lease.finish_succeeded(session, queued_job, "worker-a", **fields)
        second = lease.finish_succeeded(session, queued_job, "worker-a", **fields)
    assert first is True
    assert second is False


def test_fresh_lease_elsewhere_checks_later(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set(
        settings,
        queued_job,
        status="running",
        claimed_by="other",
        heartbeat_at=utc_now(),
        attempt=1,
    )
    monkeypatch.setattr(
        runner.pipeline, "run_job", lambda *args, **kwargs: pytest.fail("ran twice")
    )
    redispatches = Redispatches()
    JobRunner(settings, queued_job, redispatches).run()
    job = _job(settings, queued_job)
    assert redispatches == [(queued_job, settings.lease_timeout_s)]
    assert job.claimed_by == "other"
    assert job.attempt == 1


def test_stale_lease_is_taken_over(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = utc_now() - timedelta(seconds=settings.lease_timeout_s + 1)
    _set(settings, queued_job, status="running", claimed_by="dead", heartbeat_at=stale, attempt=1)
    monkeypatch.setattr(runner.pipeline, "run_job", lambda *args, **kwargs: _fake_result())
    JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    assert job.status == "succeeded"
    assert job.attempt == 2
    assert job.claimed_by != "dead"


def test_finished_job_is_left_alone(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set(settings, queued_job, status="cancelled", finished_at=utc_now())
    monkeypatch.setattr(runner.pipeline, "run_job", lambda *args, **kwargs: pytest.fail("ran"))
    redispatches = Redispatches()
    JobRunner(settings, queued_job, redispatches).run()
    assert _job(settings, queued_job).status == "cancelled"
    assert redispatches == []


def test_too_many_attempts_fail(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = utc_now() - timedelta(seconds=settings.lease_timeout_s + 1)
    attempts = settings.max_attempts
    _set(
        settings,
        queued_job,
        status="running",
        claimed_by="dead",
        heartbeat_at=stale,
        attempt=attempts,
    )
    monkeypatch.setattr(runner.pipeline, "run_job", lambda *args, **kwargs: pytest.fail("ran"))
    JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    assert job.status == "failed"
    assert job.error.startswith(
        f"the job was started {attempts} times and its worker stopped each time"
    )


def test_lost_lease_writes_nothing(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lose_lease(spec: Any, on_progress: Any, should_stop: Any, device: str) -> Any:
        _set(settings, queued_job, claimed_by="thief", heartbeat_at=utc_now())
        deadline = utc_now() + timedelta(seconds=10)
        while utc_now() < deadline:
            if should_stop():
                raise Cancelled("stopped")
        pytest.fail("should_stop never returned True after the lease was lost")

    monkeypatch.setattr(runner.pipeline, "run_job", lose_lease)
    JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    assert job.status == "running"
    assert job.claimed_by == "thief"


def test_cancel_flag_stops_run(
    settings: Any, queued_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wait_for_cancel(spec: Any, on_progress: Any, should_stop: Any, device: str) -> Any:
        _set(settings, queued_job, cancel_requested=True)
        deadline = utc_now() + timedelta(seconds=10)
        while utc_now() < deadline:
            if should_stop():
                raise Cancelled("stopped")
        pytest.fail("should_stop never returned True after the cancel request")

    monkeypatch.setattr(runner.pipeline, "run_job", wait_for_cancel)
    JobRunner(settings, queued_job, Redispatches()).run()
    job = _job(settings, queued_job)
    assert job.status == "cancelled"
    assert job.finished_at is not None
