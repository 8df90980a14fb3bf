"""FastAPI dependencies and their `Annotated` aliases: settings, database session, caller."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.session import session_factory
from app.repository import owner_for_key
from app.scoring import PredictorCache

logger = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `harden admin create-key --owner NAME`.",
)
_AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _session(request: Request) -> Iterator[Session]:
    session = session_factory(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        session.close()


def _celery(request: Request) -> Celery:
    return request.app.state.celery


def _predictors(request: Request) -> PredictorCache:
    return request.app.state.predictors


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
CeleryDep = Annotated[Celery, Depends(_celery)]
PredictorCacheDep = Annotated[PredictorCache, Depends(_predictors)]


def _owner(
    request: Request,
    session: SessionDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    """Return the owner of the API key in the Authorization header, or raise a 401 error."""
    header = request.headers.get("authorization")
    if not header:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing API key: send the header 'Authorization: Bearer <key>'; an "
            "administrator creates keys with `harden admin create-key --owner NAME`",
            headers=_AUTH_HEADERS,
        )
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="malformed Authorization header: expected 'Bearer <key>'",
            headers=_AUTH_HEADERS,
        )
    owner = owner_for_key(session, key)
    if owner is None:
        logger.info(
            "rejected an unknown API key from %s", request.client.host if request.client else "?"
        )
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="invalid API key: no such key exists; check the key you sent or ask an "
            "administrator for a new one",
            headers=_AUTH_HEADERS,
        )
    return owner


OwnerDep = Annotated[str, Depends(_owner)]
