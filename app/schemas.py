"""Request and response bodies of the API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from core.pipeline import PARAM_BOUNDS, SERVING_SCORES, HardeningParams
from core.scores import SCORES

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Method = Literal["um", "umap"]

# Defaults come from core.pipeline.HardeningParams and inclusive bounds from PARAM_BOUNDS, so the
# API accepts exactly what the pipeline accepts.
_DEFAULTS = HardeningParams()


def _bounds(name: str) -> dict[str, float]:
    low, high = PARAM_BOUNDS[name]
    return {"ge": low, "le": high}


DatasetReference = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2048)
]


class HardeningParamsIn(BaseModel):
    """Hyperparameters of a hardening job; omitted fields take the defaults shown."""

    model_config = ConfigDict(extra="forbid")

    mask_ratio: float = Field(
        _DEFAULTS.mask_ratio,
        **_bounds("mask_ratio"),
        description="Fraction of each conv and linear weight tensor kept by the random masks "
        "that estimate the loss constraint; unused when loss_constraint is set.",
    )
    loss_constraint: float | None = Field(
        _DEFAULTS.loss_constraint,
        **_bounds("loss_constraint"),
        description="Loss constraint c of the objective |CE - c| + c: training stops fitting "
        "samples whose loss is below it. Estimated from mask_ratio when null.",
    )
    prune_rate: float = Field(
        _DEFAULTS.prune_rate,
        **_bounds("prune_rate"),
        description="UMAP: fraction of the weights of each layer that the mask keeps.",
    )
    epochs: int = Field(
        _DEFAULTS.epochs,
        **_bounds("epochs"),
        description="Training epochs; the best epoch on validation data is kept.",
    )
    lr: float | None = Field(
        _DEFAULTS.lr,
        **_bounds("lr"),
        description="Learning rate; null means 0.01 (SGD) for UM and 0.001 (Adam) for UMAP.",
    )
    batch_size: int = Field(
        _DEFAULTS.batch_size,
        **_bounds("batch_size"),
        description="Training and evaluation batch size.",
    )
    scores: list[str] = Field(
        default_factory=lambda: list(_DEFAULTS.scores),
        min_length=1,
        max_length=16,
        description="OOD scores reported in the metrics.",
    )
    selection_score: str = Field(
        _DEFAULTS.selection_score,
        description="Score that selects the epoch, sets the threshold and serves /score; one of "
        + ", ".join(SERVING_SCORES)
        + ".",
    )
    seed: int = Field(
        _DEFAULTS.seed,
        **_bounds("seed"),
        description="Seeds the masks, shuffling and hold-out split.",
    )
    max_train_samples: int | None = Field(
        _DEFAULTS.max_train_samples,
        **_bounds("max_train_samples"),
        description="Train on a random subset of this many ID images; all when null.",
    )
    holdout_fraction: float = Field(
        _DEFAULTS.holdout_fraction,
        **_bounds("holdout_fraction"),
        description="Share of the ID training set held out for epoch selection and the threshold.",
    )
    estimate_draws: int = Field(
        _DEFAULTS.estimate_draws,
        **_bounds("estimate_draws"),
        description="Random masks drawn to estimate the loss constraint.",
    )

    @field_validator("scores")
    @classmethod
    def _check_scores(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in SCORES]
        if unknown:
            raise ValueError(
                f"unknown score {unknown[0]!r}: use one of {', '.join(sorted(SCORES))}"
            )
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"score {duplicates[0]!r} is listed twice: list each score once")
        return names

    @field_validator("selection_score")
    @classmethod
    def _check_selection_score(cls, name: str) -> str:
        if name not in SERVING_SCORES:
            raise ValueError(
                f"selection_score {name!r} is not supported: use one of {', '.join(SERVING_SCORES)}"
            )
        return name


class JobCreate(BaseModel):
    """Body of `POST /v1/jobs`."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_id: str = Field(
        min_length=1, max_length=64, description="From POST /v1/checkpoints."
    )
    method: Method = Field(description="`um` fine-tunes the weights; `umap` learns a mask.")
    id_dataset: DatasetReference = Field(
        description="In-distribution training set, e.g. `fashion-mnist:/usr/share/datasets/"
        "fashion-mnist?limit=5000`; the path must lie inside a configured data root."
    )
    ood_datasets: list[DatasetReference] = Field(
        min_length=1, max_length=32, description="OOD test sets for the metrics."
    )
    val_ood_datasets: list[DatasetReference] = Field(
        default_factory=list, max_length=32, description="OOD validation sets for model selection."
    )
    params: HardeningParamsIn = Field(default_factory=HardeningParamsIn)


class Progress(BaseModel):
    """Progress of a job; fields are null when the current stage does not report them."""

    fraction: float = 0.0
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    loss_constraint: float | None = None


class JobOut(BaseModel):
    """A hardening job as the API returns it."""

    id: str
    status: JobStatus
    stage: str | None
    progress: Progress
    cancel_requested: bool
    attempt: int
    checkpoint_id: str
    method: Method
    id_dataset: str
    ood_datasets: list[str]
    val_ood_datasets: list[str]
    params: dict[str, Any]
    metrics: dict[str, Any] | None
    error: str | None
    artifact_sha256: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    """One page of jobs; pass `next_cursor` as `cursor` to get the next page (null at the end)."""

    items: list[JobOut]
    next_cursor: str | None


class CheckpointOut(BaseModel):
    """An uploaded checkpoint."""

    id: str
    sha256: str
    size_bytes: int
    arch: str
    num_classes: int
    in_channels: int
    input_size: int | None
    mean: list[float] | None
    std: list[float] | None
    created_at: datetime


class CheckpointList(BaseModel):
    """One page of checkpoints; pass `next_cursor` as `cursor` to get the next page."""

    items: list[CheckpointOut]
    next_cursor: str | None


class ScoreResult(BaseModel):
    """The verdict on one image; higher `ood_score` means more in-distribution."""

    input: str = Field(description="File name, or `NAME[i]` for image i of a .npy batch.")
    ood_score: float
    is_ood: bool
    predicted_class: int
    probability: float


class ScoreResponse(BaseModel):
    """Scores of the uploaded images, in upload order."""

    score_name: str
    threshold: float = Field(description="Images scoring below it are flagged OOD.")
    results: list[ScoreResult]


class ApiError(BaseModel):
    """Body of every error response."""

    detail: Any


class ReadyOut(BaseModel):
    """Result of the readiness probe: `ok` or the error, per dependency."""

    status: Literal["ready", "not ready"]
    checks: dict[str, str]
