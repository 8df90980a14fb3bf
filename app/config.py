"""Service settings, read from `HARDEN_*` environment variables and validated at start-up."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3
MIB = 1024**2

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SUPPORTED_DATABASES = ("sqlite", "postgresql")


def _absolute(path: Path) -> Path:
    """Resolve a relative path against the working directory the process started in."""
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def _absolute_sqlite_url(url: str) -> str:
    """Make the file path of a SQLite URL (`sqlite:///...` or `sqla+sqlite:///...`) absolute.

    The API, the worker and Alembic may start in different directories, and a relative SQLite path
    would give each of them its own database file.
    """
    for prefix in ("sqlite:///", "sqlite+pysqlite:///", "sqla+sqlite:///"):
        if url.startswith(prefix):
            file_part, _, query = url[len(prefix) :].partition("?")
            if not file_part or file_part == ":memory:" or file_part.startswith("/"):
                return url
            absolute = _absolute(Path(file_part))
            return prefix + str(absolute) + (f"?{query}" if query else "")
    return url


def sqlite_file(url: str) -> Path | None:
    """Return the database file of a SQLite URL, or None for other databases and in-memory ones."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///", "sqla+sqlite:///"):
        if url.startswith(prefix):
            file_part = url[len(prefix) :].partition("?")[0]
            if file_part and file_part != ":memory:":
                return Path(file_part)
    return None


class Settings(BaseSettings):
    """Settings shared by the API, the Celery worker, Alembic and the admin commands.

    Every field is read from the environment variable `HARDEN_<FIELD NAME>`, for example
    `HARDEN_DATABASE_URL`. Relative paths are resolved against the working directory.
    """

    model_config = SettingsConfigDict(env_prefix="HARDEN_", extra="ignore", frozen=True)

    database_url: str = Field(
        "sqlite:///var/harden.db",
        description="SQLAlchemy URL: `sqlite:///FILE` or `postgresql+psycopg://USER@HOST/DB`.",
    )
    broker_url: str = Field(
        "sqla+sqlite:///var/broker.sqlite",
        description="Celery broker URL: `redis://HOST:6379/0`, or the serverless default that "
        "keeps messages in a SQLite file.",
    )
    broker_visibility_timeout_s: int = Field(
        3600,
        ge=1,
        description="Redis only: seconds after which a message that a worker took but never "
        "acknowledged (the worker died) is delivered again.",
    )
    broker_connect_timeout_s: float = Field(
        3.0, gt=0, description="Seconds to wait for the broker when publishing or in /readyz."
    )
    task_queue: str = Field("harden", min_length=1, description="Celery queue of hardening jobs.")
    storage_dir: Path = Field(
        Path("var/storage"), description="Directory of the uploaded checkpoint files."
    )
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("/usr/share/datasets"), Path("var/data")],
        description="Directories that dataset references may point into; comma-separated in "
        "the environment.",
    )
    max_upload_bytes: int = Field(2 * GIB, ge=1, description="Maximum checkpoint file size.")
    max_score_files: int = Field(64, ge=1, description="Maximum files in one scoring request.")
    max_score_images: int = Field(
        512,
        ge=1,
        description="Maximum decoded images in one scoring request (a .npy may hold many).",
    )
    max_score_bytes: int = Field(
        64 * MIB, ge=1, description="Maximum total size of the files in one scoring request."
    )
    job_soft_time_limit_s: int = Field(
        6 * 3600, ge=1, description="A job running longer fails with a time-limit error."
    )
    job_time_limit_s: int = Field(
        6 * 3600 + 600,
        ge=1,
        description="Hard limit: the worker process running the job is killed after this long.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Times a job is started before it is marked failed, counting restarts after "
        "a worker died.",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="Seconds between heartbeats of a running job."
    )
    lease_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A running job whose last heartbeat is older than this is taken over by the "
        "next worker that receives it.",
    )
    progress_interval_s: float = Field(
        1.0, gt=0, description="Minimum seconds between two progress writes of a job."
    )
    device: str = Field(
        "auto", description="`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."
    )
    predictor_cache_size: int = Field(
        4, ge=0, description="Scoring models kept in memory by each API process (0 disables)."
    )
    log_level: str = Field("INFO", description="Level of the `logging` module for the service.")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            return [part for part in parts if part]
        return value

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        if not roots:
            raise ValueError("data_roots is empty: set HARDEN_DATA_ROOTS to at least one directory")
        return [_absolute(root) for root in roots]

    @field_validator("storage_dir")
    @classmethod
    def _absolute_storage(cls, path: Path) -> Path:
        return _absolute(path)

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, url: str) -> str:
        scheme = url.partition(":")[0].partition("+")[0]
        if scheme not in _SUPPORTED_DATABASES:
            raise ValueError(
                f"database_url {url.split('@')[-1]!r} uses the unsupported database {scheme!r}: "
                "use sqlite:///FILE or postgresql+psycopg://USER@HOST/DATABASE"
            )
        return _absolute_sqlite_url(url)

    @field_validator("broker_url")
    @classmethod
    def _absolute_broker(cls, url: str) -> str:
        return _absolute_sqlite_url(url)

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not _DEVICE_PATTERN.match(device):
            raise ValueError(f"device {device!r} is invalid: use auto, cpu, cuda or cuda:N")
        return device

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, level: str) -> str:
        upper = level.upper()
        if upper not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level {level!r} is invalid: use DEBUG, INFO, WARNING or ERROR")
        return upper

    @model_validator(mode="after")
    def _check_timing(self) -> Settings:
        if self.job_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError(
                f"job_time_limit_s ({self.job_time_limit_s}) must be larger than "
                f"job_soft_time_limit_s ({self.job_soft_time_limit_s}) so the job can stop cleanly"
            )
        if self.lease_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_timeout_s ({self.lease_timeout_s}) must be at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}), or running jobs look dead"
            )
        return self


def prepare_directories(settings: Settings) -> None:
    """Create the storage directory and the directories of SQLite files named in the settings."""
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    for url in (settings.database_url, settings.broker_url):
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the settings of this process, read once from the environment."""
    return Settings()


def resolve_device(device: str) -> str:
    """Return the torch device for a `device` setting: `auto` becomes `cuda` when available."""
    if device != "auto":
        return device
    import torch  # imported here so that reading settings does not load torch

    return "cuda" if torch.cuda.is_available() else "cpu"
