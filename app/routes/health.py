"""Liveness and readiness probes; both work without an API key."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db.session import get_engine
from app.deps import CeleryDep, SettingsDep
from app.schemas import ReadyOut

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Report that the API process is up; touches no database."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
def readyz(settings: SettingsDep, celery_app: CeleryDep) -> JSONResponse:
    """Check the database (SELECT 1) and the message broker; 503 names what is down."""
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"down: {type(exc).__name__}: {exc}".splitlines()[0]
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.broker_connect_timeout_s)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["broker"] = f"down: {type(exc).__name__}: {exc}".splitlines()[0]

    down = [name for name, result in checks.items() if result != "ok"]
    if down:
        logger.warning("not ready: %s", "; ".join(f"{name} {checks[name]}" for name in down))
        body = {"status": "not ready", "checks": checks, "detail": f"{' and '.join(down)} down"}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})
