"""The Celery application, built from the same settings as the API.

Start one worker process per GPU, each with a single slot:

    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker --concurrency 1
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings, get_settings

RUN_JOB_TASK = "harden.run_job"


def create_celery_app(settings: Settings) -> Celery:
    """Build a Celery application for the broker, queue and time limits in `settings`.

    Messages are acknowledged only after the task returns (`task_acks_late`) and are requeued when
    the worker process dies, so a job whose worker is killed is delivered again. The task itself
    makes the second delivery harmless (see `worker.runner`).
    """
    celery_app = Celery("harden", broker=settings.broker_url, include=["worker.tasks"])
    celery_app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        task_default_queue=settings.task_queue,
        broker_connection_timeout=settings.broker_connect_timeout_s,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Seconds until Redis delivers an unacknowledged message (its worker died) again. The
        # SQLAlchemy transport passes transport options to create_engine, so it gets none.
        celery_app.conf.broker_transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout_s,
        }
    return celery_app


app = create_celery_app(get_settings())
