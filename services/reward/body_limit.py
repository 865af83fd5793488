"""An ASGI layer in front of POST /v1/score: the token first, then the body's size, then the app.

FastAPI reads and parses the whole body before any dependency runs, so an
unauthenticated client could make the service hold and parse any number of
bytes before it answered 401. This layer answers 401 from the headers alone,
413 from a Content-Length over the limit, and reads a body sent without one
(chunked) only up to the limit, answering 413 past it; what it lets through
is handed to the app unchanged.
"""

from __future__ import annotations

import json

from services.common.auth import RoleTokens

PATH = "/v1/score"


async def _answer(send, status: int, detail: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app, token: str | None, max_body_bytes: int) -> None:
        # The same check as the route's own (services.common.auth.http_bearer): a generation call.
        self.app, self.tokens, self.max_body_bytes = app, RoleTokens(generation=token), max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.tokens.check("generation", headers.get("authorization"), f"POST {PATH}")
        if refusal is not None and refusal[0] == "unauthenticated":
            return await _answer(send, 401, refusal[1], ((b"www-authenticate", b"Bearer"),))
        if refusal is not None:
            return await _answer(send, 403, refusal[1])
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _answer(send, 400, f"Content-Length must be a number of bytes, got {declared[:32]!r}")
            if int(declared) > limit:
                return await _answer(send, 413, f"the body is {declared} bytes; at most {limit} are allowed")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _answer(send, 413, f"the body is over {limit} bytes; at most {limit} are allowed")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
