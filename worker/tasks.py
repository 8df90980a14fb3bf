"""The Celery task `run_job(job_id)` and the worker's start-up recovery of orphaned jobs."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_ready

from app.config import get_settings, prepare_directories
from app.db.session import session_scope
from worker import lease
from worker.celery_app import RUN_JOB_TASK, app
from worker.runner import JobRunner

logger = logging.getLogger(__name__)


def redispatch(job_id: str, countdown: float) -> None:
    """Queue another delivery of a job after `countdown` seconds."""
    run_job.apply_async(args=[job_id], countdown=countdown)


class JobTask(Task):
    """Task class that marks a job failed when the hard time limit kills its process."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001 - Celery API
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        settings = get_settings()
        job_id = args[0]
        message = (
            f"time limit exceeded: the worker process was killed after "
            f"{settings.job_time_limit_s} s; reduce epochs or max_train_samples, or raise "
            "HARDEN_JOB_TIME_LIMIT_S"
        )
        with session_scope(settings.database_url) as session:
            marked = lease.fail_running_job(session, job_id, message)
        logger.error("job %s: hard time limit exceeded (marked failed: %s)", job_id, marked)


@app.task(name=RUN_JOB_TASK, base=JobTask)
def run_job(job_id: str) -> None:
    """Run hardening job `job_id` unless another delivery already ran it or is running it."""
    settings = get_settings()
    try:
        JobRunner(settings, job_id, redispatch).run()
    except Exception:
        # Typically the database was unreachable. The job may be left running without a
        # heartbeat, so a later delivery takes it over once its lease has expired.
        logger.exception(
            "job %s: delivery failed; delivering it again in %.0f s",
            job_id,
            settings.lease_timeout_s,
        )
        redispatch(job_id, settings.lease_timeout_s)


@worker_ready.connect
def recover_orphaned_jobs(**_kwargs: object) -> None:
    """Queue again every running job whose heartbeat is stale, when a worker starts.

    A job whose worker died normally comes back through broker redelivery. This covers the case
    where the message is gone as well, because the SQLite broker loses unacknowledged messages
    when the worker is killed.

    NOTE: queued jobs are not queued again, so a queued job whose message the broker lost (Redis
    restarted without persistence) stays queued until it is cancelled and submitted again.
    """
    settings = get_settings()
    prepare_directories(settings)
    with session_scope(settings.database_url) as session:
        job_ids = lease.stale_running_jobs(session, settings.lease_timeout_s)
    for job_id in job_ids:
        logger.warning("job %s: its worker stopped sending heartbeats; queueing it again", job_id)
        redispatch(job_id, 0)
