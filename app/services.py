"""Service layer behind the routes: checkpoint checks, job submission, artifacts and scoring."""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

from celery import Celery
from fastapi import HTTPException, UploadFile, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repository
from app.config import Settings, resolve_device
from app.db.models import Checkpoint, Job
from app.repository import JobView
from app.schemas import CheckpointOut, JobCreate, JobOut, Progress, ScoreResponse, ScoreResult
from app.scoring import PredictorCache
from app.storage import ReceivedFile, accept_upload, checkpoint_path, receive_upload
from worker.celery_app import RUN_JOB_TASK

logger = logging.getLogger(__name__)

METHOD_ARTIFACT = {"umap": "mask", "um": "weights"}


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


# Serialisation


def checkpoint_out(checkpoint: Checkpoint) -> CheckpointOut:
    """Return the API view of a checkpoint record."""
    return CheckpointOut(
        id=checkpoint.id,
        sha256=checkpoint.sha256,
        size_bytes=checkpoint.size_bytes,
        arch=checkpoint.arch,
        num_classes=checkpoint.num_classes,
        in_channels=checkpoint.in_channels,
        input_size=checkpoint.input_size,
        mean=checkpoint.mean,
        std=checkpoint.std,
        created_at=repository.as_utc(checkpoint.created_at),
    )


def job_out(view: JobView) -> JobOut:
    """Return the API view of a job row."""
    job = view.job
    return JobOut(
        id=job.id,
        status=job.status,
        stage=job.stage,
        progress=Progress(**(job.progress or {})),
        cancel_requested=job.cancel_requested,
        attempt=job.attempt,
        checkpoint_id=job.checkpoint_id,
        method=job.method,
        id_dataset=job.id_dataset,
        ood_datasets=job.ood_datasets,
        val_ood_datasets=job.val_ood_datasets,
        params=job.params,
        metrics=job.metrics,
        error=job.error,
        artifact_sha256=view.artifact_sha256,
        created_at=repository.as_utc(job.created_at),
        started_at=repository.as_utc(job.started_at),
        finished_at=repository.as_utc(job.finished_at),
    )


# Checkpoints


def parse_floats(value: str | None, field: str) -> list[float] | None:
    """Parse a comma-separated list of floats such as `0.5,0.5,0.5`."""
    if value is None or not value.strip():
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise _unprocessable(
            f"{field} {value!r} is invalid: give one number per channel, separated by commas, "
            "e.g. 0.485,0.456,0.406"
        ) from None


def _check_normalisation(
    mean: list[float] | None, std: list[float] | None, in_channels: int
) -> None:
    for field, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != in_channels:
            raise _unprocessable(
                f"{field} has {len(values)} values but the model has {in_channels} input "
                f"channels: give one value per channel"
            )
    if std is not None and any(value <= 0 for value in std):
        raise _unprocessable(f"std {std} is invalid: every value must be positive")
    if (mean is None) != (std is None):
        raise _unprocessable("mean and std must be given together, or both left out")


def _load_checked(
    received: ReceivedFile,
    display_name: str,
    arch: str,
    num_classes: int | None,
    in_channels: int | None,
    input_size: int | None,
) -> Any:
    """Load an upload with `core.checkpoints.load_model` and run one forward pass on zeros."""
    import torch

    from core.architectures import ARCHITECTURES
    from core.checkpoints import load_model
    from core.errors import HardeningError

    try:
        loaded = load_model(received.path, arch, num_classes=num_classes, in_channels=in_channels)
    except HardeningError as exc:
        # The loader names the file by its path in the incoming directory; show the upload name.
        message = str(exc).replace(str(received.path), repr(display_name))
        raise _unprocessable(message) from exc
    except Exception as exc:  # noqa: BLE001 - any loader failure on user bytes is a bad upload
        logger.exception("checkpoint loader failed on an upload for %s", arch)
        raise _unprocessable(
            f"the file could not be loaded as a {arch!r} checkpoint: {type(exc).__name__}: {exc}"
        ) from exc

    side = input_size or ARCHITECTURES[loaded.arch].input_size
    try:
        with torch.no_grad():
            logits = loaded.model(torch.zeros(1, loaded.in_channels, side, side))
    except Exception as exc:  # noqa: BLE001 - a shape error means the settings do not fit
        raise _unprocessable(
            f"the {arch!r} checkpoint does not accept {loaded.in_channels}x{side}x{side} "
            f"inputs ({type(exc).__name__}: {exc}); check input_size and in_channels"
        ) from exc
    if logits.ndim != 2 or logits.shape[1] != loaded.num_classes:
        raise _unprocessable(
            f"the {arch!r} checkpoint returns outputs of shape {tuple(logits.shape)}, expected "
            f"(1, {loaded.num_classes}); check num_classes"
        )
    return loaded


def register_checkpoint(
    session: Session,
    settings: Settings,
    owner: str,
    source: BinaryIO,
    file_name: str | None,
    arch: str,
    num_classes: int | None,
    in_channels: int | None,
    input_size: int | None,
    mean_text: str | None,
    std_text: str | None,
) -> tuple[Checkpoint, bool]:
    """Store an uploaded checkpoint after checking that it loads for `arch`.

    Returns:
        The record and True when it is new, or the owner's identical earlier record and False.

    Raises:
        HTTPException: 413 past the size limit, 422 when the file or the settings are invalid.
            The uploaded bytes are removed in both cases.
    """
    mean = parse_floats(mean_text, "mean")
    std = parse_floats(std_text, "std")
    received = receive_upload(source, settings.storage_dir, settings.max_upload_bytes, file_name)
    try:
        if received.size_bytes == 0:
            raise _unprocessable("the uploaded file is empty: send the checkpoint as 'file'")
        loaded = _load_checked(
            received, file_name or "file", arch, num_classes, in_channels, input_size
        )
        _check_normalisation(mean, std, loaded.in_channels)
    except BaseException:
        received.path.unlink(missing_ok=True)
        raise

    fingerprint = repository.checkpoint_fingerprint(
        received.sha256, loaded.arch, loaded.num_classes, loaded.in_channels, input_size, mean, std
    )
    stored_name = accept_upload(received, settings.storage_dir)
    record = Checkpoint(
        owner=owner,
        sha256=received.sha256,
        fingerprint=fingerprint,
        file_name=stored_name,
        size_bytes=received.size_bytes,
        arch=loaded.arch,
        num_classes=loaded.num_classes,
        in_channels=loaded.in_channels,
        input_size=input_size,
        mean=mean,
        std=std,
    )
    checkpoint, created = repository.add_checkpoint(session, record)
    logger.info(
        "checkpoint %s %s (%s, %d bytes, sha256 %s)",
        checkpoint.id,
        "stored" if created else "already stored",
        arch,
        received.size_bytes,
        received.sha256[:12],
    )
    return checkpoint, created


# Jobs


def _check_datasets(body: JobCreate, settings: Settings) -> None:
    from core.datasets import check_reference
    from core.errors import HardeningError

    references = [("id_dataset", body.id_dataset)]
    references += [(f"ood_datasets[{i}]", ref) for i, ref in enumerate(body.ood_datasets)]
    references += [(f"val_ood_datasets[{i}]", ref) for i, ref in enumerate(body.val_ood_datasets)]
    for field, reference in references:
        try:
            check_reference(reference, list(settings.data_roots))
        except HardeningError as exc:
            message = str(exc)
            if reference not in message:
                message = f"{reference!r}: {message}"
            raise _unprocessable(f"{field}: {message}") from exc


def _check_params(params: dict[str, Any]) -> None:
    from core.errors import HardeningError
    from core.pipeline import HardeningParams

    values = dict(params)
    values["scores"] = tuple(values["scores"])
    try:
        HardeningParams(**values).validate()
    except HardeningError as exc:
        raise _unprocessable(f"params: {exc}") from exc


def _idempotent_match(view: JobView, body_hash: str, key: str) -> JobView:
    if view.job.request_hash != body_hash:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"Idempotency-Key {key!r} was already used for job {view.job.id} with a "
            "different request body; use a new key for a new job",
        )
    return view


def submit_job(
    session: Session,
    settings: Settings,
    celery_app: Celery,
    owner: str,
    body: JobCreate,
    idempotency_key: str | None,
) -> tuple[JobView, bool]:
    """Create a job, commit it, then queue it.

    The row is committed before the message is published, so a worker never receives the id of a
    job it cannot read.

    Returns:
        The job and True when it was created, or the job created earlier with the same
        idempotency key and False.
    """
    payload = body.model_dump(mode="json")
    body_hash = repository.request_hash(payload)
    if idempotency_key is not None:
        existing = repository.find_job_by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return _idempotent_match(existing, body_hash, idempotency_key), False

    if repository.get_checkpoint(session, owner, body.checkpoint_id) is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"checkpoint {body.checkpoint_id!r} not found: upload it with "
            "POST /v1/checkpoints and use the id it returns",
        )
    _check_datasets(body, settings)
    _check_params(payload["params"])

    job = Job(
        owner=owner,
        checkpoint_id=body.checkpoint_id,
        method=body.method,
        id_dataset=body.id_dataset,
        ood_datasets=payload["ood_datasets"],
        val_ood_datasets=payload["val_ood_datasets"],
        params=payload["params"],
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        status="queued",
        progress={"fraction": 0.0},
    )
    try:
        repository.add_job(session, job)
    except IntegrityError:
        # A concurrent request with the same idempotency key committed first.
        existing = repository.find_job_by_idempotency_key(session, owner, idempotency_key or "")
        if existing is None:
            raise
        return _idempotent_match(existing, body_hash, idempotency_key or ""), False

    try:
        celery_app.send_task(
            RUN_JOB_TASK,
            args=[job.id],
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # noqa: BLE001 - kombu raises several types for an unreachable broker
        logger.error("job %s: could not be queued, deleting it: %s", job.id, exc)
        repository.delete_job(session, job.id)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the job could not be queued because the message broker is unreachable "
            f"({type(exc).__name__}); nothing was created, retry later",
        ) from exc
    logger.info("job %s queued (%s, owner %s)", job.id, job.method, owner)
    return JobView(job=job, artifact_sha256=None), True


def require_job(session: Session, owner: str, job_id: str) -> JobView:
    """Return a job of `owner`, or raise 404."""
    view = repository.get_job(session, owner, job_id)
    if view is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job_id!r} not found")
    return view


def require_succeeded(view: JobView, action: str) -> None:
    """Raise 409 unless the job has succeeded."""
    job = view.job
    if job.status != "succeeded":
        hint = {
            "queued": "wait until it has succeeded",
            "running": "wait until it has succeeded",
            "failed": "it has no result; see its error and submit a new job",
            "cancelled": "it has no result; submit a new job",
        }[job.status]
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job.id} is {job.status}, so {action} is not possible: {hint}",
        )


def cancel(session: Session, owner: str, job_id: str) -> tuple[JobView, bool]:
    """Cancel a job of `owner`.

    Returns:
        The job after the request and True when it is cancelled already, or False when its
        worker was asked to stop.

    Raises:
        HTTPException: 404 for an unknown job, 409 when the job has already finished.
    """
    view = require_job(session, owner, job_id)
    outcome = repository.cancel_job(session, job_id)
    if outcome == "finished":
        current = require_job(session, owner, job_id)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job_id} has already {current.job.status}; only queued or running jobs "
            "can be cancelled",
        )
    logger.info("job %s: %s", job_id, "cancelled" if outcome == "cancelled" else "cancel requested")
    session.expire_all()
    return require_job(session, owner, view.job.id), outcome == "cancelled"


# Artifacts and scoring


def artifact_of(session: Session, view: JobView, kind: str) -> Any:
    """Return the artifact row, with its bytes, of a succeeded job whose method produces `kind`.

    Raises:
        HTTPException: 409 when the job has not succeeded or its method produces the other kind.
    """
    job = view.job
    expected = METHOD_ARTIFACT[job.method]
    if expected != kind:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job.id} is a {job.method.upper()} job and produces {expected}, not "
            f"{kind}: use GET /v1/jobs/{job.id}/{expected}",
        )
    require_succeeded(view, f"downloading its {kind}")
    artifact = repository.get_artifact(session, job.id, with_data=True)
    if artifact is None:
        raise RuntimeError(f"job {job.id} succeeded but has no artifact")
    return artifact


def etag_matches(if_none_match: str | None, sha256: str) -> bool:
    """Return True when an If-None-Match header lists the entity tag of `sha256` (or is `*`)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == sha256:
            return True
    return False


def model_spec(settings: Settings, checkpoint: Checkpoint) -> Any:
    """Return the `core.pipeline.ModelSpec` of a stored checkpoint."""
    from core.pipeline import ModelSpec

    return ModelSpec(
        arch=checkpoint.arch,
        checkpoint_path=checkpoint_path(settings.storage_dir, checkpoint.file_name),
        num_classes=checkpoint.num_classes,
        in_channels=checkpoint.in_channels,
        input_size=checkpoint.input_size,
        mean=tuple(checkpoint.mean) if checkpoint.mean else None,
        std=tuple(checkpoint.std) if checkpoint.std else None,
    )


def read_score_uploads(settings: Settings, files: list[UploadFile]) -> list[tuple[str, bytes]]:
    """Read the files of a scoring request as (name, bytes) pairs, enforcing the request limits.

    Raises:
        HTTPException: 422 for too many files, 413 when they are too large in all.
    """
    if len(files) > settings.max_score_files:
        raise _unprocessable(
            f"{len(files)} files sent, the limit is {settings.max_score_files} per request: "
            "split them into several requests or send one .npy batch"
        )
    uploads: list[tuple[str, bytes]] = []
    total = 0
    for index, upload in enumerate(files):
        blob = upload.file.read(settings.max_score_bytes - total + 1)
        total += len(blob)
        if total > settings.max_score_bytes:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                detail=f"the files are larger than {settings.max_score_bytes} bytes in all: "
                "split them into several requests",
            )
        uploads.append((upload.filename or f"files[{index}]", blob))
    return uploads


def score_uploads(
    session: Session,
    settings: Settings,
    predictors: PredictorCache,
    view: JobView,
    uploads: list[tuple[str, bytes]],
) -> ScoreResponse:
    """Classify and score uploaded images with the cached predictor of a succeeded job.

    Raises:
        HTTPException: 422 when a file cannot be decoded or there are too many images.
    """
    job = view.job
    checkpoint = stored_checkpoint(session, job)

    def build() -> Any:
        artifact = repository.get_artifact(session, job.id, with_data=True)
        return build_predictor(settings, checkpoint, artifact.data)

    predictor = predictors.get((job.id, view.artifact_sha256 or ""), build)
    images, names = decode_uploads(uploads, predictor)
    if images.shape[0] > settings.max_score_images:
        raise _unprocessable(
            f"{images.shape[0]} images sent, the limit is {settings.max_score_images} per "
            "request: split the batch"
        )
    results = predict(predictor, images)
    logger.info("job %s: scored %d images", job.id, len(results))
    return ScoreResponse(
        score_name=predictor.score_name,
        threshold=float(predictor.threshold),
        results=[ScoreResult(input=name, **result) for name, result in zip(names, results)],
    )


def decode_uploads(files: list[tuple[str, bytes]], predictor: Any) -> tuple[Any, list[str]]:
    """Decode uploaded images to the predictor's channels and input size, with a name per image.

    Raises:
        HTTPException: 422 naming the file that cannot be decoded.
    """
    from core.errors import HardeningError
    from core.pipeline import decode_named_images

    try:
        return decode_named_images(files, predictor.in_channels, predictor.input_size)
    except HardeningError as exc:
        raise _unprocessable(str(exc)) from exc


def predict(predictor: Any, images: Any) -> list[dict[str, Any]]:
    """Run `predictor` on decoded images; raises 422 when the images do not fit the model."""
    from core.errors import HardeningError

    try:
        return predictor.predict(images)
    except HardeningError as exc:
        raise _unprocessable(str(exc)) from exc


def build_predictor(settings: Settings, checkpoint: Checkpoint, artifact: bytes) -> Any:
    """Return a `core.pipeline.Predictor` for a checkpoint and a job artifact."""
    from core.pipeline import Predictor

    return Predictor.from_artifact(
        model_spec(settings, checkpoint), artifact, device=resolve_device(settings.device)
    )


def stored_checkpoint(session: Session, job: Job) -> Checkpoint:
    """Return the checkpoint record of a job."""
    checkpoint = session.get(Checkpoint, job.checkpoint_id)
    if checkpoint is None:
        raise RuntimeError(f"checkpoint {job.checkpoint_id} of job {job.id} is missing")
    return checkpoint
