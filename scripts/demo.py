"""The main job end to end: harden a Fashion-MNIST LeNet through the REST service.

The script starts the API and one Celery worker on the embedded defaults (SQLite and the
broker-less Celery transport, under `var/demo/`). It trains a LeNet on real Fashion-MNIST, or
reuses the one cached in `var/demo/`, uploads it and runs a UM job and a UMAP job with the
built-in OOD sets. Then it prints the before/after tables and downloads both artifacts. It
re-evaluates them locally with `core.pipeline.evaluate_checkpoint` to check that the numbers
match, and scores real Fashion-MNIST and MNIST images.

    python scripts/demo.py            # `make demo` runs this
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.core_commands import format_comparison  # noqa: E402
from core.datasets import load_dataset  # noqa: E402
from core.pipeline import HardeningParams, JobSpec, ModelSpec, evaluate_checkpoint  # noqa: E402

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION = f"fashion-mnist:{FASHION_DIR}"
TEST_OOD = ["builtin:mnist-5k", "builtin:skimage-textures", "builtin:skimage-natural", "builtin:lfw-faces",
            "builtin:gaussian-noise", "builtin:uniform-noise"]
VALIDATION_OOD = ["builtin:sklearn-digits"]
SCORES = ["energy", "msp", "maxlogit", "odin", "mahalanobis"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
BIN = Path(sys.executable).parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765, help="API port on 127.0.0.1 (default 8765)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "demo", help="state, logs and downloads")
    parser.add_argument("--baseline-epochs", type=int, default=8, help="LeNet training epochs (default 8)")
    parser.add_argument("--epochs", type=int, default=3, help="UM and UMAP epochs (default 3)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not FASHION_DIR.is_dir():
        sys.exit(f"{FASHION_DIR} is missing: install Debian's dataset-fashion-mnist package first.")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = service_environment(workdir)
    run([str(BIN / "alembic"), "upgrade", "head"], env, "create the database schema")
    key = run([str(BIN / "harden"), "admin", "create-key", "--owner", "demo"], env, "create an API key").strip()

    checkpoint = workdir / "lenet-fashion-mnist.safetensors"
    if checkpoint.exists():
        print(f"Reusing the baseline {checkpoint} (delete it to train again)")
    else:
        print(f"Training a LeNet on Fashion-MNIST for {args.baseline_epochs} epochs")
        subprocess.run(
            [str(BIN / "harden"), "train", "--arch", "lenet", "--dataset", FASHION, "--epochs",
             str(args.baseline_epochs), "--output", str(checkpoint)],
            check=True, cwd=ROOT,
        )

    processes = start_services(workdir, env, args.port)
    try:
        base_url = f"http://127.0.0.1:{args.port}"
        wait_until_ready(base_url)
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            run_demo(client, checkpoint, workdir, args.epochs)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


def run_demo(client: httpx.Client, checkpoint: Path, workdir: Path, epochs: int) -> None:
    with checkpoint.open("rb") as handle:
        response = client.post("/v1/checkpoints", files={"file": (checkpoint.name, handle)}, data={"arch": "lenet"})
    response.raise_for_status()
    uploaded = response.json()
    print(f"\nUploaded checkpoint {uploaded['id']} (sha256 {uploaded['sha256'][:12]}..., {uploaded['num_classes']} classes)")

    params = {"epochs": epochs, "scores": SCORES, "seed": 0}
    jobs = {}
    for method in ("um", "umap"):
        body = {"checkpoint_id": uploaded["id"], "method": method, "id_dataset": FASHION, "ood_datasets": TEST_OOD,
                "val_ood_datasets": VALIDATION_OOD, "params": params}
        response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"demo-{method}-{uploaded['sha256'][:16]}"})
        response.raise_for_status()
        jobs[method] = response.json()
        if response.status_code == 200:
            print(f"Found the {method} job {jobs[method]['id']} that an earlier run submitted with the same "
                  "Idempotency-Key (delete var/demo/harden.db to run the jobs again)")
        else:
            print(f"Submitted {method} job {jobs[method]['id']}: {response.headers['Location']}")

    for method, job in jobs.items():
        jobs[method] = wait_for_job(client, job["id"], method)

    for method, job in jobs.items():
        print(f"\n=== {method.upper()} job {job['id']}: {job['status']} ===")
        if job["status"] != "succeeded":
            print(f"error: {job['error']}")
            continue
        print(format_comparison(job["metrics"]))

    succeeded = {method: job for method, job in jobs.items() if job["status"] == "succeeded"}
    artifacts = {}
    for method, job in succeeded.items():
        kind = "mask" if method == "umap" else "weights"
        response = client.get(f"/v1/jobs/{job['id']}/{kind}")
        response.raise_for_status()
        path = workdir / f"{method}-{kind}.safetensors"
        path.write_bytes(response.content)
        digest = hashlib.sha256(response.content).hexdigest()
        etag_matches = response.headers.get("etag", "").strip('"') == digest
        artifacts[method] = path
        print(f"\nDownloaded the {method.upper()} {kind}: {path} ({len(response.content):,} bytes, sha256 matches ETag: {etag_matches})")

    for method, path in artifacts.items():
        check_against_local_evaluation(checkpoint, path, succeeded[method], epochs)

    if "umap" in succeeded:
        score_real_inputs(client, succeeded["umap"]["id"], workdir)


def check_against_local_evaluation(checkpoint: Path, artifact: Path, job: dict, epochs: int) -> None:
    """Re-evaluate a downloaded artifact with `core` and compare with the job's metrics."""
    spec = JobSpec(
        method=job["method"], model=ModelSpec(arch="lenet", checkpoint_path=checkpoint), id_dataset=FASHION,
        ood_datasets=TEST_OOD, val_ood_datasets=VALIDATION_OOD,
        params=HardeningParams(epochs=epochs, scores=tuple(SCORES), seed=0),
    )
    local = evaluate_checkpoint(spec, artifact.read_bytes())
    served = job["metrics"]["hardened"]["scores"]
    largest = max(
        abs(local["scores"][score]["sets"][name][metric] - served[score]["sets"][name][metric])
        for score in served for name in served[score]["sets"] for metric in ("auroc", "aupr_in", "aupr_out", "fpr95")
    )
    print(f"Local `harden evaluate` of the downloaded {job['method'].upper()} artifact: largest metric difference "
          f"from the job's numbers {largest:.2e}")


def score_real_inputs(client: httpx.Client, job_id: str, workdir: Path) -> None:
    """Score four Fashion-MNIST test images and four real MNIST digits, sent as PNG files."""
    fashion = load_dataset(FASHION, channels=1, size=28, split="test")
    digits = load_dataset("builtin:mnist-5k", channels=1, size=28, split="test")
    samples = [(f"fashion-{index}.png", fashion.images[index], f"Fashion-MNIST {FASHION_CLASSES[int(fashion.labels[index])]}")
               for index in (0, 1, 2, 3)]
    # The first test image of four different digits.
    for digit in (1, 3, 5, 7):
        index = int((digits.labels == digit).nonzero()[0])
        samples.append((f"mnist-{digit}.png", digits.images[index], f"MNIST digit {digit}"))
    files = []
    for name, image, _ in samples:
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
        (workdir / name).write_bytes(buffer.getvalue())
        files.append(("files", (name, buffer.getvalue(), "image/png")))
    response = client.post(f"/v1/jobs/{job_id}/score", files=files)
    response.raise_for_status()
    payload = response.json()
    print(f"\nScoring real images with the UMAP job ({payload['score_name']} score, threshold {payload['threshold']:.3f}; "
          "below it means OOD):")
    for (name, _, truth), row in zip(samples, payload["results"]):
        verdict = "OOD" if row["is_ood"] else "in-distribution"
        predicted = FASHION_CLASSES[row["predicted_class"]]
        print(f"  {name:<15} {truth:<28} -> {verdict:<16} score {row['ood_score']:8.3f}, "
              f"predicted {predicted} (p={row['probability']:.2f})")


def wait_for_job(client: httpx.Client, job_id: str, label: str) -> dict:
    with tqdm(total=100, desc=f"{label} job", unit="%", bar_format="{l_bar}{bar}| {elapsed} {postfix}") as bar:
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            progress = job.get("progress") or {}
            bar.update(int(100 * (progress.get("fraction") or 0)) - bar.n)
            postfix = {"status": job["status"], "stage": job.get("stage")}
            if progress.get("epoch"):
                postfix["epoch"] = f"{progress['epoch']}/{progress['epochs']}"
            bar.set_postfix(postfix, refresh=True)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(2)


def service_environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HARDEN_DATABASE_URL": f"sqlite:///{workdir / 'harden.db'}",
        "HARDEN_BROKER_URL": f"sqla+sqlite:///{workdir / 'broker.sqlite'}",
        "HARDEN_STORAGE_DIR": str(workdir / "storage"),
        "HARDEN_DATA_ROOTS": f"{FASHION_DIR.parent},{workdir / 'data'}",
        "PYTHONPATH": str(ROOT),
    })
    return env


def run(command: list[str], env: dict[str, str], purpose: str) -> str:
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"Failed to {purpose} ({' '.join(command)}):\n{result.stderr}")
    return result.stdout


def start_services(workdir: Path, env: dict[str, str], port: int) -> list[subprocess.Popen]:
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    api_log = (logs / "api.log").open("w")
    worker_log = (logs / "worker.log").open("w")
    print(f"Starting the API on 127.0.0.1:{port} and one Celery worker (logs in {logs})")
    api = subprocess.Popen(
        [str(BIN / "uvicorn"), "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=ROOT, stdout=api_log, stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--loglevel", "INFO", "--concurrency", "1"],
        env=env, cwd=ROOT, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    return [api, worker]


def wait_until_ready(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"The API at {base_url} did not become ready within {timeout:.0f} s; see var/demo/logs/api.log")


if __name__ == "__main__":
    sys.exit(main())
