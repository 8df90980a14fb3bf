"""Runs one delivery of a hardening job: claim the row, run the pipeline, store the outcome.

Exactly-once rules, for a message that may be delivered more than once (a killed worker, a Redis
visibility timeout, a re-check scheduled by this module):

- A job that already succeeded, failed or was cancelled is left alone.
- A job running under a fresh heartbeat belongs to a live worker. This delivery schedules one more
  check after the lease timeout and ends, so the job is picked up again if that worker dies later.
- A job running under a stale heartbeat belongs to a dead worker. This delivery takes it over
  (`attempt` + 1) and runs it from the start, up to `max_attempts` times.
- Every write after the claim is conditional on this delivery still holding the lease.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.config import Settings, resolve_device
from app.db.models import Checkpoint, Job
from app.db.session import session_scope
from app.storage import checkpoint_path

# Imported when the worker starts, before it forks its pool, so that each job does not pay for
# importing torch.
from core import pipeline
from core.errors import Cancelled, HardeningError
from worker import lease

logger = logging.getLogger(__name__)

# Schedules another delivery of a job after the given number of seconds.
Redispatch = Callable[[str, float], None]


def new_worker_id() -> str:
    """Return an id unique to one delivery: host, process id and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def json_safe(value: Any) -> Any:
    """Convert NaN and infinities to None and numpy scalars to Python numbers, recursively.

    PostgreSQL's jsonb rejects NaN, and a diverging loss or an undefined metric may produce one.
    """
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class LeaseKeeper(threading.Thread):
    """Background thread that renews the lease of a running job every heartbeat interval.

    It runs beside the pipeline so that the heartbeat stays fresh through long steps that report no
    progress. When the lease turns out to be lost, it sets `lost`, which makes `should_stop`
    return True.
    """

    def __init__(self, settings: Settings, job_id: str, worker_id: str) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.settings = settings
        self.job_id = job_id
        self.worker_id = worker_id
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.settings.database_url) as session:
                    lease_held = lease.heartbeat(session, self.job_id, self.worker_id)
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat must not end the job
                logger.warning("job %s: heartbeat failed: %s", self.job_id, exc)
                continue
            if not lease_held:
                logger.warning(
                    "job %s: lease lost (another worker took the job over, or it was finished "
                    "elsewhere); stopping this attempt",
                    self.job_id,
                )
                self.lost.set()
                return

    def stop(self) -> None:
        """Stop renewing the lease and wait for the thread to end."""
        self._stop_event.set()
        self.join(timeout=self.settings.heartbeat_interval_s + 5)


class JobRunner:
    """One delivery of the `run_job` task for one job."""

    def __init__(self, settings: Settings, job_id: str, redispatch: Redispatch) -> None:
        self.settings = settings
        self.job_id = job_id
        self.worker_id = new_worker_id()
        self.redispatch = redispatch
        self.stage = "loading"
        self.progress: dict[str, Any] = {"fraction": 0.0}
        self._last_progress_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel_seen = False
        self._keeper: LeaseKeeper | None = None

    # Delivery handling

    def run(self) -> None:
        """Claim the job and run it, or decide that this delivery has nothing to do."""
        with session_scope(self.settings.database_url) as session:
            claim = lease.claim_job(
                session, self.job_id, self.worker_id, self.settings.lease_timeout_s
            )
        job = claim.job
        if claim.outcome == "missing":
            logger.warning("job %s does not exist; dropping the message", self.job_id)
            return
        if claim.outcome == "finished":
            logger.info("job %s is already %s; nothing to do", self.job_id, job.status)
            return
        if claim.outcome == "busy":
            delay = self.settings.lease_timeout_s
            logger.info(
                "job %s is running on %s with a fresh heartbeat; checking it again in %.0f s",
                self.job_id,
                job.claimed_by,
                delay,
            )
            self.redispatch(self.job_id, delay)
            return

        if job.attempt > 1:
            logger.warning(
                "job %s: taking over from a worker that stopped sending heartbeats (attempt %d)",
                self.job_id,
                job.attempt,
            )
        if job.cancel_requested:
            self._finish("cancelled")
            logger.info("job %s cancelled before its restart", self.job_id)
            return
        if job.attempt > self.settings.max_attempts:
            self._finish(
                "failed",
                f"the job was started {job.attempt - 1} times and its worker stopped each time "
                "(killed, or out of memory); see the worker log for job "
                f"{self.job_id}, then submit it again with smaller settings",
            )
            logger.error("job %s: giving up after %d attempts", self.job_id, job.attempt - 1)
            return
        self._execute(job)

    def _execute(self, job: Job) -> None:
        logger.info(
            "job %s: started %s on %s (attempt %d, worker %s)",
            self.job_id,
            job.method,
            job.id_dataset,
            job.attempt,
            self.worker_id,
        )
        self._keeper = LeaseKeeper(self.settings, self.job_id, self.worker_id)
        self._keeper.start()
        started = time.monotonic()
        try:
            self._run_pipeline(job)
        finally:
            self._keeper.stop()
            logger.info(
                "job %s: attempt ended after %.1f s", self.job_id, time.monotonic() - started
            )

    def _run_pipeline(self, job: Job) -> None:
        try:
            spec = self._job_spec(job)
            result = pipeline.run_job(
                spec,
                on_progress=self._on_progress,
                should_stop=self._should_stop,
                device=resolve_device(self.settings.device),
            )
        except Cancelled:
            if self._keeper is not None and self._keeper.lost.is_set():
                # The worker that took the lease over resumes from the saved training state.
                logger.warning("job %s: stopped because the lease was lost", self.job_id)
                return
            self._remove_training_state()
            self._finish("cancelled")
            logger.info("job %s cancelled in stage %s", self.job_id, self.stage)
            return
        except SoftTimeLimitExceeded:
            self._remove_training_state()
            self._finish(
                "failed",
                f"time limit exceeded: the job ran longer than "
                f"{self.settings.job_soft_time_limit_s} s in stage {self.stage}; reduce epochs or "
                "max_train_samples, or raise HARDEN_JOB_SOFT_TIME_LIMIT_S",
            )
            logger.warning(
                "job %s failed: soft time limit exceeded in stage %s", self.job_id, self.stage
            )
            return
        except HardeningError as exc:
            self._remove_training_state()
            self._finish("failed", str(exc))
            logger.info("job %s failed in stage %s: %s", self.job_id, self.stage, exc)
            return
        except Exception as exc:  # noqa: BLE001 - every failure must end in a final status
            logger.exception("job %s: internal error in stage %s", self.job_id, self.stage)
            self._remove_training_state()
            self._finish(
                "failed",
                f"internal error in stage {self.stage}: {type(exc).__name__}: {exc}; "
                f"see the worker log for job {self.job_id}",
            )
            return
        self._succeed(result)
        self._remove_training_state()

    def _job_spec(self, job: Job) -> pipeline.JobSpec:
        with session_scope(self.settings.database_url) as session:
            checkpoint = session.get(Checkpoint, job.checkpoint_id)
        if checkpoint is None:
            raise RuntimeError(f"checkpoint {job.checkpoint_id} of job {job.id} is missing")
        model = pipeline.ModelSpec(
            arch=checkpoint.arch,
            checkpoint_path=checkpoint_path(self.settings.storage_dir, checkpoint.file_name),
            num_classes=checkpoint.num_classes,
            in_channels=checkpoint.in_channels,
            input_size=checkpoint.input_size,
            mean=tuple(checkpoint.mean) if checkpoint.mean else None,
            std=tuple(checkpoint.std) if checkpoint.std else None,
        )
        params = dict(job.params)
        params["scores"] = tuple(params["scores"])
        return pipeline.JobSpec(
            method=job.method,
            model=model,
            id_dataset=job.id_dataset,
            ood_datasets=list(job.ood_datasets),
            val_ood_datasets=list(job.val_ood_datasets),
            params=pipeline.HardeningParams(**params),
            data_roots=list(self.settings.data_roots),
            state_dir=self._state_dir(),
        )

    def _state_dir(self) -> Path:
        """Return the folder where the pipeline saves its training state after each epoch.

        A rerun of the job after its worker died resumes from there instead of starting over.
        """
        return self.settings.storage_dir / "job-state" / self.job_id

    def _remove_training_state(self) -> None:
        shutil.rmtree(self._state_dir(), ignore_errors=True)

    # Callbacks passed to core.pipeline.run_job

    def _on_progress(self, progress: pipeline.Progress) -> None:
        stage_changed = progress.stage != self.stage
        self.stage = progress.stage
        self.progress = json_safe(
            {
                "fraction": progress.fraction,
                "epoch": progress.epoch,
                "epochs": progress.epochs,
                "loss": progress.loss,
                "loss_constraint": progress.loss_constraint,
            }
        )
        now = time.monotonic()
        if (
            not stage_changed
            and now - self._last_progress_write < self.settings.progress_interval_s
        ):
            return
        self._last_progress_write = now
        try:
            with session_scope(self.settings.database_url) as session:
                lease_held = lease.write_progress(
                    session, self.job_id, self.worker_id, self.stage, self.progress
                )
        except Exception as exc:  # noqa: BLE001 - progress is advisory; the job goes on
            logger.warning("job %s: progress write failed: %s", self.job_id, exc)
            return
        if not lease_held and self._keeper is not None:
            self._keeper.lost.set()

    def _should_stop(self) -> bool:
        if self._keeper is not None and self._keeper.lost.is_set():
            return True
        if self._cancel_seen:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check < self.settings.progress_interval_s:
            return False
        self._last_cancel_check = now
        try:
            with session_scope(self.settings.database_url) as session:
                requested, lease_held = lease.cancel_requested(session, self.job_id, self.worker_id)
        except Exception as exc:  # noqa: BLE001 - checked again on the next call
            logger.warning("job %s: cancel check failed: %s", self.job_id, exc)
            return False
        if not lease_held and self._keeper is not None:
            self._keeper.lost.set()
            return True
        self._cancel_seen = requested
        return requested

    # Outcomes

    def _finish(self, status: str, error: str | None = None) -> None:
        with session_scope(self.settings.database_url) as session:
            done = lease.finish_job(session, self.job_id, self.worker_id, status, error)
        if not done:
            logger.warning(
                "job %s: not marked %s because this worker lost its lease on the job",
                self.job_id,
                status,
            )

    def _succeed(self, result: pipeline.JobResult) -> None:
        progress = dict(self.progress)
        progress["fraction"] = 1.0
        with session_scope(self.settings.database_url) as session:
            done = lease.finish_succeeded(
                session,
                self.job_id,
                self.worker_id,
                metrics=json_safe(result.metrics),
                artifact=result.artifact,
                artifact_kind=result.artifact_kind,
                artifact_sha256=result.artifact_sha256,
                threshold=float(result.threshold),
                score_name=result.score_name,
                progress=progress,
            )
        if done:
            logger.info(
                "job %s succeeded: %s artifact %s (%d bytes)",
                self.job_id,
                result.artifact_kind,
                result.artifact_sha256[:12],
                len(result.artifact),
            )
        else:
            logger.warning(
                "job %s: result discarded because this worker lost its lease on the job",
                self.job_id,
            )
