"""The FastAPI application: `uvicorn app.main:app`."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.config import Settings, get_settings, prepare_directories
from app.middleware import BodySizeLimitMiddleware
from app.routes import checkpoints, health, jobs
from app.scoring import PredictorCache
from app.storage import UploadTooLarge
from worker.celery_app import create_celery_app

logger = logging.getLogger(__name__)

# Room for the multipart boundaries and form fields around an uploaded checkpoint.
_FORM_OVERHEAD_BYTES = 1024 * 1024
_SCORE_PATH = re.compile(r"^/v1/jobs/[^/]+/score$")


def _configure_logging(level: str) -> None:
    logging.getLogger("app").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: read from the `HARDEN_*` environment)."""
    settings = settings or get_settings()
    _configure_logging(settings.log_level)
    prepare_directories(settings)

    api = FastAPI(
        title="ood-hardening",
        summary="Harden a trained image classifier for out-of-distribution detection with "
        "Unleashing Mask (UM) or UMAP.",
        version="1",
        docs_url="/docs",
    )
    api.state.settings = settings
    api.state.celery = create_celery_app(settings)
    api.state.predictors = PredictorCache(settings.predictor_cache_size)

    def body_limit(method: str, path: str) -> int | None:
        if method == "POST" and path == "/v1/checkpoints":
            return settings.max_upload_bytes + _FORM_OVERHEAD_BYTES
        if method == "POST" and _SCORE_PATH.match(path):
            return settings.max_score_bytes + _FORM_OVERHEAD_BYTES
        return None

    api.add_middleware(BodySizeLimitMiddleware, limit_for=body_limit)

    @api.exception_handler(UploadTooLarge)
    def _upload_too_large(_request: Request, exc: UploadTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @api.exception_handler(Exception)
    def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": "internal server error; the API log has the details"}, status_code=500
        )

    api.include_router(health.router)
    api.include_router(checkpoints.router, prefix="/v1")
    api.include_router(jobs.router, prefix="/v1")
    logger.info(
        "API ready: database %s, broker %s, storage %s",
        settings.database_url.split("@")[-1],
        settings.broker_url.split("@")[-1],
        settings.storage_dir,
    )
    return api


app = create_app()
