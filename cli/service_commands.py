"""Commands that talk to the hardening service: submit, status, wait, download, remote-score,
cancel, and `admin create-key`, which writes to the service database directly.

The client commands read the API address from `--url` or HARDEN_URL and the API key from `--key`
or HARDEN_API_KEY. Each handler returns the process exit code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled")
_OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class CommandError(Exception):
    """A failure to report as `error: MESSAGE` with exit code 1."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register the service commands on the `harden` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help=f"API base URL (default: $HARDEN_URL or {DEFAULT_URL})"
    )
    common.add_argument("--key", default=None, help="API key (default: $HARDEN_API_KEY)")
    common.add_argument("--json", action="store_true", help="print the API response as JSON")
    common.add_argument(
        "--http-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for one HTTP response (default 300)",
    )

    submit = subparsers.add_parser(
        "submit", parents=[common], help="queue a UM or UMAP job on the service"
    )
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint file to upload first")
    source.add_argument("--checkpoint-id", help="id of a checkpoint uploaded before")
    submit.add_argument("--arch", help="architecture of --checkpoint, e.g. lenet or resnet18")
    submit.add_argument(
        "--num-classes", type=int, help="classifier outputs (default: from the file)"
    )
    submit.add_argument("--in-channels", type=int, help="input channels (default: from the file)")
    submit.add_argument(
        "--input-size", type=int, help="square input side in pixels (default: the architecture's)"
    )
    submit.add_argument("--mean", help="per-channel normalization mean, e.g. 0.5,0.5,0.5")
    submit.add_argument("--std", help="per-channel normalization std, e.g. 0.25,0.25,0.25")
    submit.add_argument("--method", choices=("um", "umap"), required=True, help="hardening method")
    submit.add_argument(
        "--id-dataset", required=True, help="ID training set reference, e.g. fashion-mnist:DIR"
    )
    submit.add_argument(
        "--ood-dataset",
        action="append",
        required=True,
        metavar="REF",
        help="OOD test set reference (repeat for several)",
    )
    submit.add_argument(
        "--val-ood-dataset",
        action="append",
        default=[],
        metavar="REF",
        help="OOD validation set reference for epoch selection (repeat for several)",
    )
    submit.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="job parameter, e.g. epochs=3 or scores=msp,energy (repeat for several)",
    )
    submit.add_argument(
        "--idempotency-key", help="resubmitting with the same key returns the same job"
    )
    submit.set_defaults(func=_submit)

    status = subparsers.add_parser("status", parents=[common], help="show the status of a job")
    status.add_argument("job_id", help="job id from `harden submit`")
    status.set_defaults(func=_status)

    wait = subparsers.add_parser(
        "wait",
        parents=[common],
        help="show a progress bar until a job finishes; exit 0 if it succeeded",
    )
    wait.add_argument("job_id", help="job id from `harden submit`")
    wait.add_argument(
        "--interval", type=float, default=2.0, help="seconds between polls (default 2)"
    )
    wait.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    wait.set_defaults(func=_wait)

    download = subparsers.add_parser(
        "download", parents=[common], help="download the mask (UMAP) or weights (UM) of a job"
    )
    download.add_argument("job_id", help="id of a succeeded job")
    download.add_argument(
        "-o",
        "--output",
        type=Path,
        help="file to write (default: JOB_ID-mask.safetensors or JOB_ID-weights.safetensors)",
    )
    download.set_defaults(func=_download)

    score = subparsers.add_parser(
        "remote-score", parents=[common], help="score images with a succeeded job on the service"
    )
    score.add_argument("job_id", help="id of a succeeded job")
    score.add_argument(
        "files", type=Path, nargs="+", help="PNG/JPEG files, or one .npy uint8 array"
    )
    score.set_defaults(func=_remote_score)

    cancel = subparsers.add_parser(
        "cancel", parents=[common], help="cancel a queued or running job"
    )
    cancel.add_argument("job_id", help="job id from `harden submit`")
    cancel.set_defaults(func=_cancel)

    admin = subparsers.add_parser(
        "admin", help="administer the service database (run on the server)"
    )
    admin_commands = admin.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    create_key = admin_commands.add_parser(
        "create-key",
        help="create an API key and print it once; uses HARDEN_DATABASE_URL like the API",
    )
    create_key.add_argument("--owner", required=True, help="owner name: letters, digits, . _ @ -")
    create_key.add_argument("--json", action="store_true", help="print {id, owner, key} as JSON")
    create_key.set_defaults(func=_create_key)


# HTTP plumbing


def make_client(args: argparse.Namespace) -> httpx.Client:
    """Return an HTTP client for the API named by `--url`/HARDEN_URL, sending the API key."""
    url = args.url or os.environ.get("HARDEN_URL") or DEFAULT_URL
    key = args.key or os.environ.get("HARDEN_API_KEY")
    if not key:
        raise CommandError("no API key: pass --key or set HARDEN_API_KEY")
    # httpx logs every request at INFO, which would interleave with the command's own output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=args.http_timeout
    )


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text[:500]
    if isinstance(detail, list):
        # FastAPI validation errors: one "location: message" per problem.
        return "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
            for item in detail
        )
    return str(detail)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise CommandError(f"HTTP {response.status_code}: {_detail(response)}")
    return response


def _handler(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except httpx.TransportError as exc:
            url = args.url or os.environ.get("HARDEN_URL") or DEFAULT_URL
            print(
                f"error: cannot reach the API at {url} ({type(exc).__name__}: {exc}); "
                "check --url or HARDEN_URL and that the API is running",
                file=sys.stderr,
            )
            return 1

    return run


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _describe(job: dict[str, Any]) -> str:
    text = f"job {job['id']}: {job['status']}"
    progress = job.get("progress") or {}
    if job["status"] == "running":
        text += f" ({job.get('stage')}, {100 * (progress.get('fraction') or 0):.0f} %"
        if progress.get("epoch") is not None:
            text += f", epoch {progress['epoch']}/{progress['epochs']}"
        text += ")"
    if job.get("cancel_requested") and job["status"] == "running":
        text += ", cancel requested"
    if job.get("error"):
        text += f": {job['error']}"
    selection = (job.get("metrics") or {}).get("selection") or {}
    if selection.get("summary"):
        text += f"\n{selection['summary']}"
    return text


# Client commands


def _parse_param(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CommandError(f"--param {text!r} is invalid: use NAME=VALUE, e.g. epochs=3")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if name == "scores" and isinstance(parsed, str):
        parsed = [part.strip() for part in parsed.split(",") if part.strip()]
    return name, parsed


def _upload(client: httpx.Client, args: argparse.Namespace) -> str:
    if not args.arch:
        raise CommandError("--arch is required with --checkpoint, e.g. --arch lenet")
    if not args.checkpoint.is_file():
        raise CommandError(f"checkpoint {args.checkpoint} not found: pass an existing file")
    form = {"arch": args.arch}
    for field in ("num_classes", "in_channels", "input_size", "mean", "std"):
        value = getattr(args, field)
        if value is not None:
            form[field] = str(value)
    with args.checkpoint.open("rb") as handle:
        response = _checked(
            client.post(
                "/v1/checkpoints", files={"file": (args.checkpoint.name, handle)}, data=form
            )
        )
    checkpoint = response.json()
    print(f"checkpoint {checkpoint['id']} (sha256 {checkpoint['sha256'][:12]})", file=sys.stderr)
    return checkpoint["id"]


@_handler
def _submit(args: argparse.Namespace) -> int:
    params = dict(_parse_param(text) for text in args.param)
    with make_client(args) as client:
        checkpoint_id = args.checkpoint_id or _upload(client, args)
        body = {
            "checkpoint_id": checkpoint_id,
            "method": args.method,
            "id_dataset": args.id_dataset,
            "ood_datasets": args.ood_dataset,
            "val_ood_datasets": args.val_ood_dataset,
            "params": params,
        }
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        job = _checked(client.post("/v1/jobs", json=body, headers=headers)).json()
    if args.json:
        _print_json(job)
    else:
        print(job["id"])
    return 0


@_handler
def _status(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = _checked(client.get(f"/v1/jobs/{args.job_id}")).json()
    if args.json:
        _print_json(job)
    else:
        print(_describe(job))
    return 0


@_handler
def _wait(args: argparse.Namespace) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with (
        make_client(args) as client,
        tqdm(
            total=100,
            unit="%",
            bar_format="{l_bar}{bar}| {n:.0f}/{total} % [{elapsed}]",
            disable=None,
        ) as bar,
    ):
        while True:
            job = _checked(client.get(f"/v1/jobs/{args.job_id}")).json()
            fraction = (job.get("progress") or {}).get("fraction") or 0.0
            bar.set_description(f"{job['status']} {job.get('stage') or ''}".strip())
            bar.update(max(0.0, 100 * fraction - bar.n))
            if job["status"] in FINISHED:
                break
            if deadline is not None and time.monotonic() > deadline:
                bar.close()
                print(
                    f"error: job {args.job_id} still {job['status']} after {args.timeout} s",
                    file=sys.stderr,
                )
                return 1
            time.sleep(args.interval)
    if args.json:
        _print_json(job)
    else:
        print(_describe(job))
    return 0 if job["status"] == "succeeded" else 1


@_handler
def _download(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = _checked(client.get(f"/v1/jobs/{args.job_id}")).json()
        kind = "mask" if job["method"] == "umap" else "weights"
        output = args.output or Path(f"{args.job_id}-{kind}.safetensors")
        digest = hashlib.sha256()
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".part")
        with client.stream("GET", f"/v1/jobs/{args.job_id}/{kind}") as response:
            if response.status_code >= 400:
                response.read()
                _checked(response)
            etag = response.headers.get("etag", "").strip('"')
            with partial.open("wb") as target:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    target.write(chunk)
    if etag and digest.hexdigest() != etag:
        partial.unlink(missing_ok=True)
        raise CommandError(
            f"download of job {args.job_id} is corrupt: sha256 {digest.hexdigest()} but the server "
            f"sent {etag}; run the command again"
        )
    partial.replace(output)
    if args.json:
        _print_json({"path": str(output), "sha256": digest.hexdigest(), "kind": kind})
    else:
        print(output)
    return 0


@_handler
def _remote_score(args: argparse.Namespace) -> int:
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        raise CommandError(f"file {missing[0]} not found: pass existing image files")
    files = [("files", (path.name, path.read_bytes())) for path in args.files]
    with make_client(args) as client:
        result = _checked(client.post(f"/v1/jobs/{args.job_id}/score", files=files)).json()
    if args.json:
        _print_json(result)
        return 0
    print(f"score {result['score_name']}, threshold {result['threshold']:.4f} (below it: OOD)")
    names = [path.name for path in args.files]
    for index, item in enumerate(result["results"]):
        name = names[index] if len(names) == len(result["results"]) else f"{names[0]}[{index}]"
        verdict = "OOD" if item["is_ood"] else "ID"
        print(
            f"{name}\t{verdict}\tscore {item['ood_score']:.4f}\tclass {item['predicted_class']} "
            f"(p={item['probability']:.3f})"
        )
    return 0


@_handler
def _cancel(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        job = _checked(client.post(f"/v1/jobs/{args.job_id}/cancel")).json()
    if args.json:
        _print_json(job)
    else:
        print(_describe(job))
    return 0


# Administration


@_handler
def _create_key(args: argparse.Namespace) -> int:
    if not _OWNER_PATTERN.match(args.owner):
        raise CommandError(
            f"owner {args.owner!r} is invalid: use 1 to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    from app import repository
    from app.config import get_settings
    from app.db.session import session_scope

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        row, key = repository.create_api_key(session, args.owner)
    if args.json:
        _print_json({"id": row.id, "owner": row.owner, "key": key})
    else:
        print(
            f"created API key {row.id} for owner {row.owner!r}; it is shown only now, store it",
            file=sys.stderr,
        )
        print(key)
    return 0
