"""Checkpoint upload and lookup."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile, status

from app import repository, services
from app.deps import OwnerDep, SessionDep, SettingsDep
from app.schemas import ApiError, CheckpointList, CheckpointOut

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


@router.post(
    "",
    response_model=CheckpointOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {
            "model": CheckpointOut,
            "description": "The same file and settings were uploaded before.",
        },
        413: {"model": ApiError},
        422: {"model": ApiError},
    },
)
def upload_checkpoint(
    response: Response,
    owner: OwnerDep,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="A state dict: .safetensors or torch.save file.")],
    arch: Annotated[str, Form(min_length=1, max_length=64, description="Architecture name.")],
    num_classes: Annotated[int | None, Form(ge=1, le=100_000)] = None,
    in_channels: Annotated[int | None, Form(ge=1, le=16)] = None,
    input_size: Annotated[int | None, Form(ge=1, le=4096, description="Square input side.")] = None,
    mean: Annotated[str | None, Form(description="Per-channel mean, e.g. 0.5,0.5,0.5.")] = None,
    std: Annotated[str | None, Form(description="Per-channel std, e.g. 0.25,0.25,0.25.")] = None,
) -> CheckpointOut:
    """Upload a checkpoint; it is checked by loading it for `arch` (weights only, no code runs)."""
    checkpoint, created = services.register_checkpoint(
        session,
        settings,
        owner,
        file.file,
        file.filename,
        arch,
        num_classes,
        in_channels,
        input_size,
        mean,
        std,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return services.checkpoint_out(checkpoint)


@router.get("", response_model=CheckpointList)
def list_checkpoints(
    owner: OwnerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> CheckpointList:
    """List your checkpoints, newest first."""
    try:
        rows, next_cursor = repository.list_checkpoints(session, owner, limit, cursor)
    except repository.InvalidCursor as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    return CheckpointList(
        items=[services.checkpoint_out(row) for row in rows], next_cursor=next_cursor
    )


@router.get("/{checkpoint_id}", response_model=CheckpointOut, responses={404: {"model": ApiError}})
def get_checkpoint(checkpoint_id: str, owner: OwnerDep, session: SessionDep) -> CheckpointOut:
    """Return one of your checkpoints."""
    checkpoint = repository.get_checkpoint(session, owner, checkpoint_id)
    if checkpoint is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"checkpoint {checkpoint_id!r} not found"
        )
    return services.checkpoint_out(checkpoint)
