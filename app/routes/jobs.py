"""Job submission, status, listing, cancellation, artifact download and scoring."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, Header, HTTPException, Query, Response, UploadFile, status
from fastapi.responses import JSONResponse

from app import repository, services
from app.deps import CeleryDep, OwnerDep, PredictorCacheDep, SessionDep, SettingsDep
from app.schemas import ApiError, JobCreate, JobList, JobOut, JobStatus, ScoreResponse

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

_NOT_FOUND = {404: {"model": ApiError}}
_CONFLICT = {409: {"model": ApiError}}


@router.post(
    "",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"model": JobOut, "description": "Job created earlier with the same Idempotency-Key."},
        404: {"model": ApiError},
        409: {"model": ApiError},
        422: {"model": ApiError},
        503: {"model": ApiError},
    },
)
def submit_job(
    body: JobCreate,
    response: Response,
    owner: OwnerDep,
    session: SessionDep,
    settings: SettingsDep,
    celery_app: CeleryDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1, max_length=255, description="Retry-safe key; reuse returns the same job."
        ),
    ] = None,
) -> JobOut:
    """Queue a hardening job; poll the URL in the Location header."""
    view, created = services.submit_job(session, settings, celery_app, owner, body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{view.job.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return services.job_out(view)


@router.get("", response_model=JobList)
def list_jobs(
    owner: OwnerDep,
    session: SessionDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobList:
    """List your jobs, newest first, optionally only those with one status."""
    try:
        views, next_cursor = repository.list_jobs(session, owner, status_filter, limit, cursor)
    except repository.InvalidCursor as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    return JobList(items=[services.job_out(view) for view in views], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=_NOT_FOUND)
def get_job(job_id: str, owner: OwnerDep, session: SessionDep) -> JobOut:
    """Return the status, progress and metrics of a job."""
    return services.job_out(services.require_job(session, owner, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses={
        202: {"model": JobOut, "description": "The job is running; its worker will stop it."},
        **_NOT_FOUND,
        **_CONFLICT,
    },
)
def cancel_job(job_id: str, owner: OwnerDep, session: SessionDep) -> JSONResponse:
    """Cancel a job: a queued one at once (200), a running one at its next step (202)."""
    view, cancelled_now = services.cancel(session, owner, job_id)
    body = services.job_out(view).model_dump(mode="json")
    return JSONResponse(
        body, status_code=status.HTTP_200_OK if cancelled_now else status.HTTP_202_ACCEPTED
    )


def _artifact_response(
    kind: str, job_id: str, owner: str, session: SessionDep, if_none_match: str | None
) -> Response:
    view = services.require_job(session, owner, job_id)
    artifact = services.artifact_of(session, view, kind)
    headers = {"ETag": f'"{artifact.sha256}"'}
    if services.etag_matches(if_none_match, artifact.sha256):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{job_id}-{kind}.safetensors"'
    return Response(content=artifact.data, media_type="application/octet-stream", headers=headers)


_ARTIFACT_RESPONSES = {
    200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"},
    304: {"description": "The If-None-Match header lists the current ETag."},
    **_NOT_FOUND,
    **_CONFLICT,
}


@router.get("/{job_id}/mask", response_class=Response, responses=_ARTIFACT_RESPONSES)
def download_mask(
    job_id: str,
    owner: OwnerDep,
    session: SessionDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download the learned mask of a succeeded UMAP job (safetensors; ETag is its SHA-256)."""
    return _artifact_response("mask", job_id, owner, session, if_none_match)


@router.get("/{job_id}/weights", response_class=Response, responses=_ARTIFACT_RESPONSES)
def download_weights(
    job_id: str,
    owner: OwnerDep,
    session: SessionDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Download the fine-tuned weights of a succeeded UM job (safetensors; ETag is its SHA-256)."""
    return _artifact_response("weights", job_id, owner, session, if_none_match)


@router.post(
    "/{job_id}/score",
    response_model=ScoreResponse,
    responses={**_NOT_FOUND, **_CONFLICT, 413: {"model": ApiError}, 422: {"model": ApiError}},
)
def score_images(
    job_id: str,
    owner: OwnerDep,
    session: SessionDep,
    settings: SettingsDep,
    predictors: PredictorCacheDep,
    files: Annotated[
        list[UploadFile], File(description="PNG or JPEG images, or one .npy uint8 array [N,C,H,W].")
    ],
) -> ScoreResponse:
    """Score images with the hardened model of a succeeded job; results keep the upload order."""
    view = services.require_job(session, owner, job_id)
    services.require_succeeded(view, "scoring")
    uploads = services.read_score_uploads(settings, files)
    return services.score_uploads(session, settings, predictors, view, uploads)
