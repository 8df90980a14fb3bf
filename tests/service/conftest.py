"""Fixtures for the service tests: a fresh PostgreSQL database, a Redis queue, Celery workers.

Each test session creates the database `harden_test_<random>` through the `test` database on
127.0.0.1:5432, migrates it with `alembic upgrade head`, uses its own Redis queue on
127.0.0.1:6379, and removes both at the end. Worker processes run
`python -m celery -A worker.celery_app worker` with the same `HARDEN_*` environment as the API.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_DSN = os.environ.get(
    "HARDEN_TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)
PG_URL_PREFIX = os.environ.get(
    "HARDEN_TEST_PG_URL_PREFIX", "postgresql+psycopg://postgres@127.0.0.1:5432/"
)
REDIS_URL = os.environ.get("HARDEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
UPLOAD_LIMIT = 2 * 1024 * 1024

# Small enough that a job takes seconds on two CPU cores.
ID_DATASET = f"fashion-mnist:{FASHION_MNIST}?limit=1000"
OOD_DATASETS = ["builtin:gaussian-noise"]
VAL_OOD_DATASETS = ["builtin:uniform-noise"]
FAST_PARAMS = {
    "epochs": 1,
    "max_train_samples": 500,
    "scores": ["msp", "energy"],
    "estimate_draws": 1,
    "batch_size": 100,
}

pytestmark = pytest.mark.service


@dataclass
class ServiceEnv:
    """Where this test session's service lives."""

    env: dict[str, str]
    database_url: str
    queue: str
    tmp: Path
    storage_dir: Path
    data_root: Path


def _require(condition: bool, message: str) -> None:
    if not condition:
        pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def service_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceEnv]:
    """Create the database and queue, export `HARDEN_*`, run the migrations; drop all at the end."""
    import psycopg
    import redis

    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN_DSN!r} is unreachable ({exc}); start it first", pytrace=False
        )
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is unreachable ({exc}); start it first", pytrace=False)

    suffix = secrets.token_hex(4)
    database = f"harden_test_{suffix}"
    admin.execute(f'CREATE DATABASE "{database}"')
    tmp = tmp_path_factory.mktemp("service")
    storage_dir = tmp / "storage"
    data_root = tmp / "data"
    data_root.mkdir()
    queue = f"harden-test-{suffix}"
    database_url = PG_URL_PREFIX + database
    env = {
        "HARDEN_DATABASE_URL": database_url,
        "HARDEN_BROKER_URL": REDIS_URL,
        "HARDEN_TASK_QUEUE": queue,
        "HARDEN_STORAGE_DIR": str(storage_dir),
        "HARDEN_DATA_ROOTS": f"/usr/share/datasets,{data_root}",
        "HARDEN_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "HARDEN_BROKER_VISIBILITY_TIMEOUT_S": "10",
        "HARDEN_HEARTBEAT_INTERVAL_S": "0.5",
        "HARDEN_LEASE_TIMEOUT_S": "3",
        "HARDEN_PROGRESS_INTERVAL_S": "0.2",
        "HARDEN_DEVICE": "cpu",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    from app.config import get_settings

    get_settings.cache_clear()
    try:
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=REPO_ROOT,
            env={**os.environ},
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield ServiceEnv(env, database_url, queue, tmp, storage_dir, data_root)
    finally:
        from app.db.session import dispose_engines

        dispose_engines()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()
        _clean_redis(redis.Redis.from_url(REDIS_URL), queue)


def _clean_redis(client: Any, queue: str) -> None:
    """Delete this session's queues, its unacknowledged messages and its workers' bindings."""
    import json

    for key in client.scan_iter(f"*{queue}*"):
        client.delete(key)
    for tag, entry in client.hgetall("unacked").items():
        _message, exchange, routing_key = json.loads(entry)
        if queue in (exchange, routing_key):
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    for member in client.smembers("_kombu.binding.celery.pidbox"):
        if f"-{queue[-8:]}-".encode() in member:
            client.srem("_kombu.binding.celery.pidbox", member)


@pytest.fixture(scope="session")
def settings(service_env: ServiceEnv) -> Any:
    """Settings of the API under test."""
    from app.config import Settings

    return Settings()


def _make_client(settings: Any) -> Any:
    from fastapi.testclient import TestClient

    from app.main import create_app

    return TestClient(create_app(settings))


@pytest.fixture(scope="session")
def client(settings: Any) -> Iterator[Any]:
    """API client whose jobs go to the queue that the test workers consume."""
    with _make_client(settings) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def idle_client(settings: Any) -> Iterator[Any]:
    """API client on the same database whose jobs go to a queue that no worker consumes.

    Jobs submitted through it stay queued, which the validation, listing and cancellation tests
    rely on.
    """
    idle_settings = settings.model_copy(update={"task_queue": settings.task_queue + "-idle"})
    with _make_client(idle_settings) as test_client:
        yield test_client


def create_key(settings: Any, owner: str) -> str:
    """Create an API key directly in the database and return it."""
    from app import repository
    from app.db.session import session_scope

    with session_scope(settings.database_url) as session:
        _, key = repository.create_api_key(session, owner)
    return key


@pytest.fixture(scope="session")
def alice(settings: Any) -> dict[str, str]:
    """Authorization header of the owner `alice`."""
    return {"Authorization": f"Bearer {create_key(settings, 'alice')}"}


@pytest.fixture(scope="session")
def bob(settings: Any) -> dict[str, str]:
    """Authorization header of the owner `bob`."""
    return {"Authorization": f"Bearer {create_key(settings, 'bob')}"}


@pytest.fixture(scope="session")
def lenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet checkpoint trained for 200 steps on 3000 Fashion-MNIST images."""
    import torch
    import torch.nn.functional as F

    from core.architectures import build_model
    from core.checkpoints import save_checkpoint
    from core.datasets import default_normalization, iterate_batches, load_dataset

    reference = f"fashion-mnist:{FASHION_MNIST}?limit=3000"
    data = load_dataset(reference, channels=1, size=28, allowed_roots=["/usr/share/datasets"])
    normalization = default_normalization(reference, 1)
    torch.manual_seed(0)
    model = build_model("lenet", 10, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    steps = 0
    model.train()
    while steps < 200:
        for inputs, labels in iterate_batches(
            data, normalization, 64, shuffle=True, generator=generator
        ):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            steps += 1
            if steps == 200:
                break
    path = tmp_path_factory.mktemp("checkpoints") / "lenet-fmnist.pt"
    save_checkpoint(model, path)
    return path


def upload(client: Any, headers: dict[str, str], path: Path, **form: Any) -> Any:
    """POST a checkpoint file; `form` gives the other multipart fields."""
    with path.open("rb") as handle:
        return client.post(
            "/v1/checkpoints",
            headers=headers,
            files={"file": (path.name, handle, "application/octet-stream")},
            data={"arch": "lenet", **{name: str(value) for name, value in form.items()}},
        )


@pytest.fixture(scope="session")
def alice_checkpoint(client: Any, alice: dict[str, str], lenet_file: Path) -> str:
    """Id of alice's uploaded LeNet checkpoint."""
    response = upload(client, alice, lenet_file)
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def job_body(checkpoint_id: str, method: str = "um", **params: Any) -> dict[str, Any]:
    """A small valid job request."""
    return {
        "checkpoint_id": checkpoint_id,
        "method": method,
        "id_dataset": ID_DATASET,
        "ood_datasets": OOD_DATASETS,
        "val_ood_datasets": VAL_OOD_DATASETS,
        "params": {**FAST_PARAMS, **params},
    }


# Workers


class WorkerProcess:
    """A Celery worker subprocess in its own process group, logging to a file."""

    def __init__(self, service: ServiceEnv, name: str) -> None:
        self.service = service
        self.name = name
        self.log_path = service.tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90) -> None:
        """Start the worker and wait until it reports ready."""
        env = {**os.environ, **self.service.env, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "1",
                "--loglevel",
                "INFO",
                "--hostname",
                # The session suffix lets the teardown find this worker's Redis bindings.
                f"{self.name}-{self.service.queue[-8:]}-{secrets.token_hex(3)}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"worker exited with {self.process.returncode}:\n{self.log_text()}",
                    pytrace=False,
                )
            if " ready." in self.log_text():
                return
            time.sleep(0.2)
        pytest.fail(f"worker not ready after {timeout_s} s:\n{self.log_text()}", pytrace=False)

    def log_text(self) -> str:
        """Return the worker log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        """Return True while the worker process runs."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash or the OOM killer would."""
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the worker: SIGTERM (warm shutdown), SIGKILL after 20 s."""
        if self.process is None or not self.alive():
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


class WorkerPool:
    """The workers of a test session; `live()` returns the running one, starting one if needed."""

    def __init__(self, service: ServiceEnv) -> None:
        self.service = service
        self.started: list[WorkerProcess] = []

    def start_new(self) -> WorkerProcess:
        """Start another worker and wait until it is ready."""
        worker = WorkerProcess(self.service, f"worker{len(self.started) + 1}")
        self.started.append(worker)
        worker.start()
        return worker

    def live(self) -> WorkerProcess:
        """Return the newest worker if it still runs, else a newly started one."""
        if self.started and self.started[-1].alive():
            return self.started[-1]
        return self.start_new()

    def stop_all(self) -> None:
        """Stop every worker of the session."""
        for worker in self.started:
            worker.stop()


@pytest.fixture(scope="session")
def worker_pool(service_env: ServiceEnv) -> Iterator[WorkerPool]:
    """The session's workers; all are stopped at the end."""
    pool = WorkerPool(service_env)
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def fmnist_images() -> Any:
    """Four Fashion-MNIST test images, uint8 [4, 28, 28]."""
    from core.datasets import load_dataset

    data = load_dataset(
        f"fashion-mnist:{FASHION_MNIST}?limit=4",
        channels=1,
        allowed_roots=["/usr/share/datasets"],
        split="test",
    )
    return data.images[:, 0].numpy()


@pytest.fixture(scope="session")
def um_job(
    client: Any, alice: dict[str, str], alice_checkpoint: str, worker_pool: WorkerPool
) -> dict[str, Any]:
    """A UM job run to completion."""
    worker_pool.live()
    response = client.post("/v1/jobs", headers=alice, json=job_body(alice_checkpoint, "um"))
    assert response.status_code == 202, response.text
    return wait_finished(client, alice, response.json()["id"])


@pytest.fixture(scope="session")
def umap_job(
    client: Any, alice: dict[str, str], alice_checkpoint: str, worker_pool: WorkerPool
) -> dict[str, Any]:
    """A UMAP job run to completion."""
    worker_pool.live()
    response = client.post("/v1/jobs", headers=alice, json=job_body(alice_checkpoint, "umap"))
    assert response.status_code == 202, response.text
    return wait_finished(client, alice, response.json()["id"])


def png_bytes(image: Any) -> bytes:
    """Encode a uint8 [H, W] array as a PNG file."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for(
    client: Any,
    headers: dict[str, str],
    job_id: str,
    condition: Callable[[dict[str, Any]], bool],
    timeout_s: float = 120,
    description: str = "condition",
) -> dict[str, Any]:
    """Poll GET /v1/jobs/{job_id} until `condition(job)` holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if condition(job):
            return job
        time.sleep(0.25)
    pytest.fail(
        f"job {job_id}: {description} not reached in {timeout_s} s; last state {job}", pytrace=False
    )


def wait_finished(
    client: Any, headers: dict[str, str], job_id: str, timeout_s: float = 180
) -> dict[str, Any]:
    """Poll a job until it has succeeded, failed or been cancelled."""
    return wait_for(
        client,
        headers,
        job_id,
        lambda job: job["status"] in ("succeeded", "failed", "cancelled"),
        timeout_s,
        "a final status",
    )
