"""Request bounds the serving API enforces before any work: the body size (an ASGI middleware, so
an oversized body is refused before it is read whole) and what a chat request may carry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException

from core.protocol import ROLES

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 and the limit: at once when the
    ``Content-Length`` says so, else as soon as the streamed body passes it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _refuse(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(length) > self.limit:
                await self._too_large(send, int(length))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, for streamed answers

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any, size: int | None) -> None:
        what = f"is {size} bytes" if size is not None else "is larger than that"
        await _refuse(
            send,
            413,
            "payload_too_large",
            f"the request body {what}; at most {self.limit} bytes are accepted "
            "(SERVING_MAX_BODY_BYTES)",
        )


async def _refuse(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_chat(
    roles_and_texts: Sequence[tuple[str, str]], *, max_messages: int, max_chars: int
) -> None:
    """A chat request's messages: at most ``max_messages``, ``max_chars`` characters in all, each
    with a role the chat template renders; else 422 naming the limit."""
    if len(roles_and_texts) > max_messages:
        raise HTTPException(
            422,
            f"messages: {len(roles_and_texts)} messages; at most {max_messages} are accepted "
            "(SERVING_MAX_MESSAGES)",
        )
    for index, (role, _) in enumerate(roles_and_texts):
        if role not in ROLES:
            raise HTTPException(
                422, f"messages[{index}].role is {role!r}: use one of {', '.join(ROLES)}"
            )
    chars = sum(len(text) for _, text in roles_and_texts)
    if chars > max_chars:
        raise HTTPException(
            422,
            f"messages: {chars} characters in all; at most {max_chars} are accepted "
            "(SERVING_MAX_CHAT_CHARS)",
        )
