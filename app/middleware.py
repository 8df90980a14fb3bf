"""ASGI middleware that rejects request bodies over a per-route size limit while they stream in."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Returns the body limit in bytes for (method, path), or None for no limit.
LimitFor = Callable[[str, str], int | None]


class BodySizeLimitMiddleware:
    """Stop reading a request body once it passes the limit of its route.

    Starlette spools multipart uploads to a temporary file before the route runs, so without this
    an oversized upload would first be received whole. A declared Content-Length over the limit is
    rejected before any byte is read; otherwise the byte count is checked on every chunk.
    """

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return

        detail = (
            f"request body is larger than the limit of {limit} bytes for {scope['path']}; "
            "send a smaller file"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = JSONResponse({"detail": detail}, status_code=413)
                await response(scope, receive, send)
                return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises an HTTPException raised while it reads the body, and its
                    # exception handler turns it into a JSON 413.
                    raise HTTPException(status_code=413, detail=detail)
            return message

        await self.app(scope, limited_receive, send)
